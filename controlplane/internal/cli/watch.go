package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/copelf/copelf/protocol"
)

// Event types of the change streams the watches read.
const (
	eventRunUpdated   = "run.updated"
	eventBatchUpdated = "batch.updated"
)

// runWatch prints a run's progress as it changes: one line per state
// change and per step that starts or finishes.
type runWatch struct {
	a       *app
	id      string
	last    *RunView
	lastRaw json.RawMessage
	// what has been printed, so replays and repeats print nothing
	status protocol.RunStatus
	detail string
	steps  map[int]int
	// running is the step whose "running" line is the last one printed
	// (-1: none); on a terminal its end replaces that line.
	running int
}

// progress orders views of one run: a view with less progress than the
// last one shown is stale (a replayed event after a fresher GET).
func progress(r *RunView) int {
	n := runRank(r.Status) * 1_000_000
	for _, st := range r.Steps {
		n += stepRank(st.Status)
	}
	return n
}

// apply takes a run view (from an event or a GET); done when it is final.
func (w *runWatch) apply(raw json.RawMessage) (bool, error) {
	var r RunView
	if err := json.Unmarshal(raw, &r); err != nil {
		return false, fmt.Errorf("run %s: the server sent a run that is not JSON: %w", w.id, err)
	}
	if r.ID != w.id {
		return false, nil
	}
	if w.last != nil && progress(&r) < progress(w.last) {
		return false, nil
	}
	w.last, w.lastRaw = &r, raw
	if !w.a.json() {
		w.print(&r)
	}
	return r.Status.Terminal(), nil
}

func (w *runWatch) print(r *RunView) {
	out := w.a.stdout
	detail := ""
	switch {
	case r.Queue != nil:
		detail = "(" + r.Queue.Reason + ")"
	case r.Status == protocol.RunRunning && r.AgentID != "":
		detail = "on " + r.AgentID
	case r.Status == protocol.RunAwaitingApproval:
		detail = "(see copelf approvals ls)"
	case r.Error != nil:
		detail = errorText(r.Error)
	}
	if r.CancelRequested {
		detail = strings.TrimSpace(detail + " cancel requested")
	}
	// Steps first: a view that finishes a step and the run prints the step
	// before the run's end.
	if w.steps == nil {
		w.steps = map[int]int{}
	}
	for _, st := range r.Steps {
		rank := stepRank(st.Status)
		if rank <= w.steps[st.Index] {
			continue
		}
		w.steps[st.Index] = rank
		if w.a.tty && rank == 2 && w.running == st.Index {
			fmt.Fprint(out, "\x1b[1A\r\x1b[K") // over the step's running line
		}
		w.running = -1
		if rank == 1 {
			w.running = st.Index
		}
		line := fmt.Sprintf("  step %-2d %-9s %s", st.Index, st.Type, st.Status)
		if st.DurationMs != nil {
			line += " " + ms(st.DurationMs)
		}
		if st.Error != nil {
			line += "  " + errorText(st.Error)
		}
		fmt.Fprintln(out, line)
	}
	if r.Status != w.status || detail != w.detail {
		w.status, w.detail, w.running = r.Status, detail, -1
		fmt.Fprintln(out, strings.TrimRight(fmt.Sprintf("  %s %s %s", r.ID, r.Status, detail), " "))
	}
}

// watchRun follows a run until it is final and returns it (and its JSON as
// the server sent it). It reads GET /v1/runs/{id}/events and falls back to
// polling GET /v1/runs/{id} when the server has no such stream.
func (a *app) watchRun(ctx context.Context, id string) (*RunView, json.RawMessage, error) {
	w := &runWatch{a: a, id: id, running: -1}
	path := "/v1/runs/" + url.PathEscape(id)
	get := func(ctx context.Context) (bool, error) {
		raw, err := a.client.Do(ctx, "GET", path, nil, nil)
		if err != nil {
			return false, err
		}
		return w.apply(raw)
	}
	f := &follower{
		client: a.client, path: path + "/events", stall: a.stall, giveUp: a.giveUp,
		onConnect: func(ctx context.Context, _ bool) (bool, error) { return get(ctx) },
		onEvent: func(ev SSEEvent) (bool, error) {
			if ev.Type != eventRunUpdated {
				return false, nil
			}
			var env streamEnvelope
			if err := json.Unmarshal([]byte(ev.Data), &env); err != nil || len(env.Data) == 0 {
				fmt.Fprintf(a.stderr, "warning: ignoring a malformed %s event\n", ev.Type)
				return false, nil
			}
			return w.apply(env.Data)
		},
		onCut: func(err error) { w.running = -1; a.reportCut(err) },
	}
	err := f.run(ctx)
	if errors.Is(err, errNoStream) {
		err = a.poll(ctx, get)
	}
	if err != nil {
		return nil, nil, err
	}
	return w.last, w.lastRaw, nil
}

// reportCut tells the user that a stream was cut and is being resumed.
func (a *app) reportCut(err error) {
	fmt.Fprintf(a.stderr, "event stream cut (%v); reconnecting\n", err)
}

// poll calls step every a.pollEvery until it is done. Failures to reach the
// server are retried for a.giveUp; an API error ends the watch.
func (a *app) poll(ctx context.Context, step func(context.Context) (bool, error)) error {
	var failingSince = a.now()
	failing := false
	for {
		done, err := step(ctx)
		var apiErr *APIError
		switch {
		case err == nil:
			failing = false
			if done {
				return nil
			}
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &apiErr) && apiErr.Status < 500 && apiErr.Status != 429:
			return err
		default:
			if !failing {
				failing, failingSince = true, a.now()
			} else if a.now().Sub(failingSince) > a.giveUp {
				return err
			}
			fmt.Fprintf(a.stderr, "warning: %v; retrying\n", err)
		}
		if err := sleep(ctx, a.pollEvery); err != nil {
			return err
		}
	}
}
