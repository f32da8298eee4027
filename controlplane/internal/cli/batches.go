package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/copelf/copelf/protocol"
)

func (a *app) batchesCommand() *ffcli.Command {
	var ls listFlags
	return group("batches", "copelf batches <ls|get|watch> …", "list, show and follow batches",
		a.leaf("batches ls", "copelf batches ls [-limit N] [-cursor C]", "list batches with their progress", 0, ls.register,
			func(ctx context.Context, _ []string) error {
				return show(ctx, a, "GET", "/v1/batches"+ls.query(url.Values{}), nil, func(p page[BatchView]) {
					a.printBatches(p.Items)
					a.more(p.NextCursor, "copelf batches ls")
				})
			}),
		a.leaf("batches get", "copelf batches get <batchId>", "show a batch and its iterations", 1, nil,
			func(ctx context.Context, args []string) error {
				return show(ctx, a, "GET", "/v1/batches/"+url.PathEscape(args[0]), nil, func(b BatchView) {
					a.printBatch(&b, false)
				})
			}),
		a.leaf("batches watch", "copelf batches watch <batchId>",
			"follow a batch with a progress bar until it ends; the exit status says how it ended", 1, nil,
			func(ctx context.Context, args []string) error {
				b, raw, err := a.watchBatch(ctx, args[0])
				if err != nil {
					return err
				}
				if a.json() {
					if err := a.printRaw(raw); err != nil {
						return err
					}
				} else {
					fmt.Fprintln(a.stdout)
					a.printBatch(b, true)
				}
				return batchOutcome(b)
			}),
	)
}

// batchOutcome maps a finished batch to the exit status.
func batchOutcome(b *BatchView) error {
	switch {
	case b.Status == protocol.BatchCancelled:
		return exitError{ExitCancelled, "batch cancelled"}
	case b.Counts.Succeeded == b.Counts.Total:
		return nil
	}
	return exitError{ExitFailed, fmt.Sprintf("batch completed, %d of %d iterations succeeded", b.Counts.Succeeded, b.Counts.Total)}
}

func (a *app) printBatches(bs []BatchView) {
	if len(bs) == 0 {
		fmt.Fprintln(a.stdout, "no batches")
		return
	}
	now := a.now()
	w := newTable(a.stdout)
	fmt.Fprintln(w, "BATCH\tWORKFLOW\tSTATUS\tDONE\tSUCCEEDED\tFAILED\tACTIVE\tCREATED")
	for _, b := range bs {
		c := b.Counts
		fmt.Fprintf(w, "%s\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%s\n", b.ID, b.WorkflowID, b.Status, c.Done(), c.Total, c.Succeeded,
			c.Failed+c.TimedOut, c.Queued+c.Running+c.AwaitingApproval, ago(now, b.CreatedAt))
	}
	w.Flush()
}

// printBatch shows a batch; onlyUnsuccessful lists only the iterations
// that did not succeed (after a watch).
func (a *app) printBatch(b *BatchView, onlyUnsuccessful bool) {
	now := a.now()
	w := newTable(a.stdout)
	fmt.Fprintf(w, "batch\t%s\n", b.ID)
	fmt.Fprintf(w, "workflow\t%s\n", b.WorkflowID)
	fmt.Fprintf(w, "status\t%s\n", b.Status)
	fmt.Fprintf(w, "progress\t%s\n", countsText(b.Counts))
	fmt.Fprintf(w, "concurrency\t%d (stop on failure: %t)\n", b.Concurrency, b.StopOnFailure)
	fmt.Fprintf(w, "created\t%s (%s)\n", b.CreatedAt.Format(time.RFC3339), ago(now, b.CreatedAt))
	if b.StartedAt != nil && b.FinishedAt != nil {
		fmt.Fprintf(w, "start → finish\t%s\n", b.FinishedAt.Sub(*b.StartedAt).Round(time.Millisecond))
	}
	w.Flush()
	var its []IterationView
	for _, it := range b.Iterations {
		if !onlyUnsuccessful || it.Status != string(protocol.RunSucceeded) {
			its = append(its, it)
		}
	}
	if len(its) == 0 {
		return
	}
	if onlyUnsuccessful {
		fmt.Fprintln(a.stdout, "\niterations that did not succeed")
	} else {
		fmt.Fprintln(a.stdout, "\niterations")
	}
	w = newTable(a.stdout)
	fmt.Fprintln(w, "  #\tRUN\tSTATUS\tINPUTS")
	for _, it := range its {
		in, _ := json.Marshal(it.Inputs)
		fmt.Fprintf(w, "  %d\t%s\t%s\t%s\n", it.Index, dash(it.RunID), it.Status, clip(string(in), 60))
	}
	w.Flush()
}

// countsText is "7/10 done: succeeded 6, failed 1; running 2, queued 1".
func countsText(c protocol.BatchCounts) string {
	var done, active []string
	add := func(list *[]string, name string, n int) {
		if n > 0 {
			*list = append(*list, fmt.Sprintf("%s %d", name, n))
		}
	}
	add(&done, "succeeded", c.Succeeded)
	add(&done, "failed", c.Failed)
	add(&done, "timed_out", c.TimedOut)
	add(&done, "cancelled", c.Cancelled)
	add(&active, "running", c.Running)
	add(&active, "awaiting_approval", c.AwaitingApproval)
	add(&active, "queued", c.Queued)
	add(&active, "pending", c.Pending)
	s := fmt.Sprintf("%d/%d done", c.Done(), c.Total)
	if len(done) > 0 {
		s += ": " + strings.Join(done, ", ")
	}
	if len(active) > 0 {
		s += "; " + strings.Join(active, ", ")
	}
	return s
}

// batchWatch keeps a batch's view current and draws its progress.
type batchWatch struct {
	a    *app
	id   string
	view *BatchView
	// line is the last progress line drawn; drawn: a line is on screen
	// without its newline (terminal mode).
	line  string
	drawn bool
	// hinted: the "not started" hint was printed.
	hinted bool
}

// setBatch replaces the view with the server's.
func (w *batchWatch) setBatch(raw json.RawMessage) (bool, error) {
	var b BatchView
	if err := json.Unmarshal(raw, &b); err != nil {
		return false, fmt.Errorf("batch %s: the server sent a batch that is not JSON: %w", w.id, err)
	}
	if b.ID != w.id {
		return false, nil
	}
	if w.view != nil && w.view.Status.Terminal() {
		return true, nil
	}
	w.view = &b
	w.draw()
	return b.Status.Terminal(), nil
}

// setRun moves one iteration on from a run event; a finished iteration
// never moves back.
func (w *batchWatch) setRun(raw json.RawMessage) (allDone bool, err error) {
	var r RunView
	if err := json.Unmarshal(raw, &r); err != nil {
		return false, fmt.Errorf("the server sent a run that is not JSON: %w", err)
	}
	if w.view == nil || r.BatchID != w.id || r.Iteration == nil || *r.Iteration < 0 || *r.Iteration >= len(w.view.Iterations) {
		return false, nil
	}
	it := &w.view.Iterations[*r.Iteration]
	if protocol.RunStatus(it.Status).Terminal() || (it.RunID != "" && it.RunID != r.ID) {
		return false, nil
	}
	if runRank(r.Status) < runRank(protocol.RunStatus(it.Status)) {
		return false, nil
	}
	it.Status, it.RunID = string(r.Status), r.ID
	w.view.recount()
	w.draw()
	return w.view.Counts.Total > 0 && w.view.Counts.Done() == w.view.Counts.Total, nil
}

// draw shows the progress: a bar redrawn in place on a terminal, else a
// line whenever it changes.
func (w *batchWatch) draw() {
	a := w.a
	if a.json() || w.view == nil {
		return
	}
	b := w.view
	if b.Status == protocol.BatchCreated && !w.hinted {
		w.hinted = true
		a.endLine(w)
		fmt.Fprintf(a.stdout, "%s is created but not started (POST /v1/batches/%s/start); waiting\n", b.ID, b.ID)
	}
	line := fmt.Sprintf("%s %s %s", b.ID, b.Status, countsText(b.Counts))
	if !a.tty {
		if line != w.line {
			fmt.Fprintln(a.stdout, line)
		}
		w.line = line
		return
	}
	width := a.width - 1
	barWidth := min(40, max(10, width/3))
	filled := 0
	if b.Counts.Total > 0 {
		filled = barWidth * b.Counts.Done() / b.Counts.Total
	}
	bar := "[" + strings.Repeat("#", filled) + strings.Repeat("-", barWidth-filled) + "] "
	text := bar + line
	if r := []rune(text); len(r) > width {
		text = string(r[:width])
	}
	if text == w.line && w.drawn {
		return
	}
	fmt.Fprint(a.stdout, "\r\x1b[K"+text)
	w.line, w.drawn = text, true
}

// endLine ends a progress line left on the terminal.
func (a *app) endLine(w *batchWatch) {
	if w.drawn {
		fmt.Fprintln(a.stdout)
		w.drawn = false
	}
}

// watchBatch follows a batch until it is completed or cancelled and returns
// it (and its JSON as the server answered GET /v1/batches/{id} at the end).
// It reads GET /v1/events?types=run,batch and falls back to polling.
func (a *app) watchBatch(ctx context.Context, id string) (*BatchView, json.RawMessage, error) {
	w := &batchWatch{a: a, id: id}
	path := "/v1/batches/" + url.PathEscape(id)
	get := func(ctx context.Context) (bool, error) {
		raw, err := a.client.Do(ctx, "GET", path, nil, nil)
		if err != nil {
			return false, err
		}
		return w.setBatch(raw)
	}
	f := &follower{
		client: a.client, path: "/v1/events?types=run,batch", stall: a.stall, giveUp: a.giveUp,
		onConnect: func(ctx context.Context, _ bool) (bool, error) { return get(ctx) },
		onEvent: func(ev SSEEvent) (bool, error) {
			if ev.Type != eventBatchUpdated && ev.Type != eventRunUpdated {
				return false, nil
			}
			var env streamEnvelope
			if err := json.Unmarshal([]byte(ev.Data), &env); err != nil || len(env.Data) == 0 {
				fmt.Fprintf(a.stderr, "warning: ignoring a malformed %s event\n", ev.Type)
				return false, nil
			}
			if ev.Type == eventBatchUpdated {
				return w.setBatch(env.Data)
			}
			allDone, err := w.setRun(env.Data)
			if err != nil || !allDone {
				return false, err
			}
			// Every iteration ended: the batch is completed, or about to
			// be (its own event follows).
			return get(ctx)
		},
		onCut: func(err error) { a.endLine(w); a.reportCut(err) },
	}
	err := f.run(ctx)
	if errors.Is(err, errNoStream) {
		err = a.poll(ctx, get)
	}
	a.endLine(w)
	if err != nil {
		return nil, nil, err
	}
	// The final state as the API shows it (the events patched the view).
	var final BatchView
	raw, err := a.client.Do(ctx, "GET", path, nil, &final)
	if err != nil {
		return nil, nil, err
	}
	return &final, raw, nil
}
