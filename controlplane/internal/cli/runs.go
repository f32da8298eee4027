package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/copelf/copelf/protocol"
)

// inputsFlag collects -input name=value; values that parse as JSON numbers
// or booleans are sent typed, anything else as a string.
type inputsFlag map[string]any

func (f inputsFlag) String() string { return "" }

func (f inputsFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return errors.New("want name=value")
	}
	var typed any
	if err := json.Unmarshal([]byte(v), &typed); err == nil {
		switch typed.(type) {
		case float64, bool:
			f[k] = typed
			return nil
		}
	}
	f[k] = v
	return nil
}

// group is a command whose subcommands do the work.
func group(name, shortUsage, shortHelp string, subs ...*ffcli.Command) *ffcli.Command {
	return &ffcli.Command{
		Name: name, ShortUsage: shortUsage, ShortHelp: shortHelp, Subcommands: subs,
		Exec: func(_ context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q for copelf %s", args[0], name)
			}
			return flag.ErrHelp
		},
	}
}

// listFlags are -limit and -cursor of list commands.
type listFlags struct {
	limit  int
	cursor string
}

func (l *listFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&l.limit, "limit", 50, "items per page (1–500)")
	fs.StringVar(&l.cursor, "cursor", "", "the page after this cursor (a list's nextCursor)")
}

func (l *listFlags) query(q url.Values) string {
	if l.limit != 50 {
		q.Set("limit", strconv.Itoa(l.limit))
	}
	if l.cursor != "" {
		q.Set("cursor", l.cursor)
	}
	if len(q) == 0 {
		return ""
	}
	return "?" + q.Encode()
}

// more tells a table reader how to get the next page.
func (a *app) more(next *string, command string) {
	if next != nil && *next != "" {
		fmt.Fprintf(a.stderr, "more: %s -cursor %s\n", command, *next)
	}
}

// printRaw prints an API answer as it came.
func (a *app) printRaw(raw json.RawMessage) error {
	if _, err := a.stdout.Write(raw); err != nil {
		return err
	}
	if len(raw) == 0 || raw[len(raw)-1] != '\n' {
		_, err := a.stdout.Write([]byte{'\n'})
		return err
	}
	return nil
}

func (a *app) runsCommand() *ffcli.Command {
	var ls listFlags
	var lsWorkflow, lsBatch, lsStatus, lsAccount string
	return group("runs", "copelf runs <ls|get|create|cancel|watch> …", "list, create, show, cancel and follow runs",
		a.leaf("runs ls", "copelf runs ls [-status S] [-workflow ID] [-batch ID] [-account ID] [-limit N] [-cursor C]",
			"list runs, newest first (members: their own; operators: every account's)", 0,
			func(fs *flag.FlagSet) {
				fs.StringVar(&lsStatus, "status", "", "only runs in this state: queued, running, awaiting_approval, succeeded, failed, timed_out, cancelled")
				fs.StringVar(&lsWorkflow, "workflow", "", "only runs of this workflow")
				fs.StringVar(&lsBatch, "batch", "", "only runs of this batch")
				fs.StringVar(&lsAccount, "account", "", "only runs of this account (operators)")
				ls.register(fs)
			},
			func(ctx context.Context, _ []string) error {
				q := url.Values{}
				for k, v := range map[string]string{"status": lsStatus, "workflowId": lsWorkflow, "batchId": lsBatch, "accountId": lsAccount} {
					if v != "" {
						q.Set(k, v)
					}
				}
				return show(ctx, a, "GET", "/v1/runs"+ls.query(q), nil, func(p page[RunView]) {
					a.printRuns(p.Items)
					a.more(p.NextCursor, "copelf runs ls")
				})
			}),
		a.leaf("runs get", "copelf runs get <runId>", "show a run with its steps and outputs", 1, nil,
			func(ctx context.Context, args []string) error {
				return show(ctx, a, "GET", "/v1/runs/"+url.PathEscape(args[0]), nil, func(r RunView) {
					a.printRun(&r)
				})
			}),
		a.runsCreate(),
		a.leaf("runs cancel", "copelf runs cancel <runId>",
			"cancel a run: a queued run at once, a running one when its agent stops it", 1, nil,
			func(ctx context.Context, args []string) error {
				var r RunView
				raw, err := a.client.Do(ctx, "POST", "/v1/runs/"+url.PathEscape(args[0])+"/cancel", nil, &r)
				if err != nil {
					return err
				}
				if a.json() {
					return a.printRaw(raw)
				}
				if r.Status.Terminal() {
					fmt.Fprintf(a.stdout, "%s %s\n", r.ID, r.Status)
				} else {
					fmt.Fprintf(a.stdout, "%s %s, cancel requested: its agent stops it (copelf runs watch %s)\n", r.ID, r.Status, r.ID)
				}
				return nil
			}),
		a.leaf("runs watch", "copelf runs watch <runId>",
			"follow a run's progress until it ends; the exit status says how it ended", 1, nil,
			func(ctx context.Context, args []string) error {
				return a.watchAndReport(ctx, args[0])
			}),
	)
}

func (a *app) runsCreate() *ffcli.Command {
	inputs := inputsFlag{}
	var wait bool
	return a.leaf("runs create", "copelf runs create [-input name=value …] [-wait] <workflowId>", "queue a run of a workflow", 1,
		func(fs *flag.FlagSet) {
			fs.Var(inputs, "input", "an input as name=value (repeatable)")
			fs.BoolVar(&wait, "wait", false, "follow the run until it ends (exit status as for runs watch)")
		},
		func(ctx context.Context, args []string) error {
			var r RunView
			raw, err := a.client.Do(ctx, "POST", "/v1/workflows/"+url.PathEscape(args[0])+"/runs", map[string]any{"inputs": map[string]any(inputs)}, &r)
			if err != nil {
				return err
			}
			if !wait {
				if a.json() {
					return a.printRaw(raw)
				}
				a.printRun(&r)
				return nil
			}
			if !a.json() {
				fmt.Fprintf(a.stdout, "queued %s\n", r.ID)
			}
			return a.watchAndReport(ctx, r.ID)
		})
}

// watchAndReport follows a run to its end, prints it, and turns how it
// ended into the exit status.
func (a *app) watchAndReport(ctx context.Context, id string) error {
	r, raw, err := a.watchRun(ctx, id)
	if err != nil {
		return err
	}
	if a.json() {
		if err := a.printRaw(raw); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(a.stdout)
		a.printRun(r)
	}
	return runOutcome(r)
}

// runOutcome maps a finished run to the exit status.
func runOutcome(r *RunView) error {
	switch r.Status {
	case protocol.RunSucceeded:
		return nil
	case protocol.RunCancelled:
		return exitError{ExitCancelled, "run cancelled"}
	case protocol.RunTimedOut:
		return exitError{ExitTimedOut, "run timed out"}
	}
	return exitError{ExitFailed, "run " + string(r.Status)}
}

// printRuns shows runs as a table; ACCOUNT appears when they belong to
// more than one account (an operator's view).
func (a *app) printRuns(runs []RunView) {
	if len(runs) == 0 {
		fmt.Fprintln(a.stdout, "no runs")
		return
	}
	accounts := map[string]bool{}
	for _, r := range runs {
		accounts[r.AccountID] = true
	}
	multi := len(accounts) > 1
	now := a.now()
	w := newTable(a.stdout)
	if multi {
		fmt.Fprint(w, "ACCOUNT\t")
	}
	fmt.Fprintln(w, "RUN\tWORKFLOW\tSTATUS\tSTEPS\tQUEUED\tTOOK\tDETAIL")
	for _, r := range runs {
		if multi {
			fmt.Fprintf(w, "%s\t", r.AccountID)
		}
		took := "-"
		if r.StartedAt != nil {
			end := now
			if r.FinishedAt != nil {
				end = *r.FinishedAt
			}
			took = short(end.Sub(*r.StartedAt))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\n", r.ID, r.WorkflowID, r.Status, r.stepsDone(), len(r.Steps),
			ago(now, r.QueuedAt), took, dash(runDetail(&r)))
	}
	w.Flush()
}

// runDetail is why a run waits or how it failed.
func runDetail(r *RunView) string {
	var parts []string
	if r.Queue != nil {
		parts = append(parts, r.Queue.Reason)
	}
	if r.CancelRequested {
		parts = append(parts, "cancel requested")
	}
	if r.Error != nil {
		s := string(r.Error.Code)
		if reason, _ := r.Error.Details["reason"].(string); reason != "" {
			s += " " + reason
		}
		parts = append(parts, s)
	}
	if r.BatchID != "" && r.Iteration != nil {
		parts = append(parts, fmt.Sprintf("%s #%d", r.BatchID, *r.Iteration))
	}
	return strings.Join(parts, "; ")
}

// printRun shows one run.
func (a *app) printRun(r *RunView) {
	now := a.now()
	w := newTable(a.stdout)
	fmt.Fprintf(w, "run\t%s\n", r.ID)
	fmt.Fprintf(w, "workflow\t%s\n", r.WorkflowID)
	if r.BatchID != "" {
		it := ""
		if r.Iteration != nil {
			it = fmt.Sprintf(" iteration %d", *r.Iteration)
		}
		fmt.Fprintf(w, "batch\t%s%s\n", r.BatchID, it)
	}
	status := string(r.Status)
	if r.CancelRequested {
		status += " (cancel requested)"
	}
	fmt.Fprintf(w, "status\t%s\n", status)
	if r.Queue != nil {
		fmt.Fprintf(w, "queued because\t%s (for %s)\n", r.Queue.Reason, short(now.Sub(r.Queue.Since)))
	}
	fmt.Fprintf(w, "queued\t%s (%s)\n", r.QueuedAt.Format(time.RFC3339), ago(now, r.QueuedAt))
	if r.AgentID != "" {
		fmt.Fprintf(w, "agent\t%s (attempt %d)\n", r.AgentID, r.Attempt)
	}
	if r.StartedAt != nil {
		fmt.Fprintf(w, "queue → start\t%s\n", r.StartedAt.Sub(r.QueuedAt).Round(time.Millisecond))
	}
	if r.StartedAt != nil && r.FinishedAt != nil {
		fmt.Fprintf(w, "start → finish\t%s\n", r.FinishedAt.Sub(*r.StartedAt).Round(time.Millisecond))
	}
	fmt.Fprintf(w, "cost\treserved %d, charged %d\n", r.Cost.Reserved, r.Cost.Charged)
	if r.Error != nil {
		fmt.Fprintf(w, "error\t%s\n", errorText(r.Error))
	}
	w.Flush()
	if len(r.Inputs) > 0 {
		fmt.Fprintln(a.stdout, "\ninputs")
		printMap(a.stdout, r.Inputs)
	}
	if len(r.Steps) > 0 {
		fmt.Fprintln(a.stdout, "\nsteps")
		w = newTable(a.stdout)
		fmt.Fprintln(w, "  #\tTYPE\tSTATUS\tDURATION\tATTEMPTS\tERROR")
		for _, st := range r.Steps {
			fmt.Fprintf(w, "  %d\t%s\t%s\t%s\t%d\t%s\n", st.Index, st.Type, st.Status, ms(st.DurationMs), st.Attempts, dash(errorText(st.Error)))
		}
		w.Flush()
	}
	if len(r.Outputs) > 0 {
		fmt.Fprintln(a.stdout, "\noutputs")
		printMap(a.stdout, r.Outputs)
	}
}

// show sends a request and prints the answer: the API's JSON as it came
// with -o json, else as render draws it.
func show[T any](ctx context.Context, a *app, method, path string, body any, render func(T)) error {
	var v T
	raw, err := a.client.Do(ctx, method, path, body, &v)
	if err != nil {
		return err
	}
	if a.json() {
		return a.printRaw(raw)
	}
	render(v)
	return nil
}
