package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/copelf/copelf/protocol"
)

// RunView is a run as the API shows it (the fields the CLI uses).
type RunView struct {
	ID         string             `json:"id"`
	WorkflowID string             `json:"workflowId"`
	Status     protocol.RunStatus `json:"status"`
	Inputs     map[string]any     `json:"inputs"`
	Outputs    map[string]any     `json:"outputs"`
	Error      *protocol.Error    `json:"error"`
	AgentID    string             `json:"agentId"`
	Attempt    int                `json:"attempt"`
	Steps      []struct {
		Index      int             `json:"index"`
		Type       string          `json:"type"`
		Status     string          `json:"status"`
		DurationMs *int64          `json:"durationMs"`
		Attempts   int             `json:"attempts"`
		Error      *protocol.Error `json:"error"`
	} `json:"steps"`
	Queue *struct {
		Reason string    `json:"reason"`
		Since  time.Time `json:"since"`
	} `json:"queue"`
	Cost struct {
		Reserved int64 `json:"reserved"`
		Charged  int64 `json:"charged"`
	} `json:"cost"`
	QueuedAt   time.Time  `json:"queuedAt"`
	StartedAt  *time.Time `json:"startedAt"`
	FinishedAt *time.Time `json:"finishedAt"`
}

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

func (a *app) runsCommand() *ffcli.Command {
	return &ffcli.Command{
		Name:       "runs",
		ShortUsage: "copelf runs <create|get|watch> …",
		ShortHelp:  "create, show and follow runs",
		Subcommands: []*ffcli.Command{
			a.runsCreate(),
			{
				Name: "get", ShortUsage: "copelf runs get <runId>", ShortHelp: "show a run",
				Exec: func(ctx context.Context, args []string) error {
					if len(args) != 1 {
						return flag.ErrHelp
					}
					var r RunView
					if err := a.client.Do(ctx, "GET", "/v1/runs/"+args[0], nil, &r); err != nil {
						return err
					}
					return a.printRun(&r)
				},
			},
			{
				Name: "watch", ShortUsage: "copelf runs watch <runId>", ShortHelp: "follow a run until it ends; the exit status says how it ended",
				Exec: func(ctx context.Context, args []string) error {
					if len(args) != 1 {
						return flag.ErrHelp
					}
					r, err := a.watch(ctx, args[0])
					if err != nil {
						return err
					}
					if err := a.printRun(r); err != nil {
						return err
					}
					return runOutcome(r)
				},
			},
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func (a *app) runsCreate() *ffcli.Command {
	fs := flag.NewFlagSet("copelf runs create", flag.ContinueOnError)
	inputs := inputsFlag{}
	fs.Var(inputs, "input", "an input as name=value (repeatable)")
	wait := fs.Bool("wait", false, "follow the run until it ends")
	return &ffcli.Command{
		Name: "create", ShortUsage: "copelf runs create [-input name=value …] [-wait] <workflowId>", ShortHelp: "queue a run of a workflow",
		FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			if len(args) != 1 {
				return flag.ErrHelp
			}
			var r RunView
			if err := a.client.Do(ctx, "POST", "/v1/workflows/"+args[0]+"/runs", map[string]any{"inputs": map[string]any(inputs)}, &r); err != nil {
				return err
			}
			if !*wait {
				return a.printRun(&r)
			}
			if a.output != "json" {
				fmt.Fprintf(a.stdout, "queued %s\n", r.ID)
			}
			done, err := a.watch(ctx, r.ID)
			if err != nil {
				return err
			}
			if err := a.printRun(done); err != nil {
				return err
			}
			return runOutcome(done)
		},
	}
}

// errRunDidNotSucceed makes the exit status non-zero.
type errRunDidNotSucceed struct{ status protocol.RunStatus }

func (e errRunDidNotSucceed) Error() string { return "run ended " + string(e.status) }

func runOutcome(r *RunView) error {
	if r.Status != protocol.RunSucceeded {
		return errRunDidNotSucceed{r.Status}
	}
	return nil
}

// watch follows a run until it is terminal, printing step progress.
func (a *app) watch(ctx context.Context, id string) (*RunView, error) {
	seen := map[int]string{}
	status := protocol.RunStatus("")
	tick := time.NewTicker(a.poll)
	defer tick.Stop()
	for {
		var r RunView
		if err := a.client.Do(ctx, "GET", "/v1/runs/"+id, nil, &r); err != nil {
			return nil, err
		}
		if a.output != "json" {
			if r.Status != status {
				line := string(r.Status)
				if r.Queue != nil {
					line += " (" + r.Queue.Reason + ")"
				}
				fmt.Fprintf(a.stdout, "  %-18s %s\n", "run", line)
				status = r.Status
			}
			for _, st := range r.Steps {
				if seen[st.Index] != st.Status && st.Status != "pending" {
					seen[st.Index] = st.Status
					fmt.Fprintf(a.stdout, "  step %-2d %-9s %s%s\n", st.Index, st.Type, st.Status, durationSuffix(st.DurationMs))
				}
			}
		}
		if r.Status.Terminal() {
			return &r, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

func durationSuffix(ms *int64) string {
	if ms == nil {
		return ""
	}
	return fmt.Sprintf(" (%d ms)", *ms)
}

// printRun shows a run as a table (or JSON with -o json).
func (a *app) printRun(r *RunView) error {
	if a.output == "json" {
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "run\t%s\n", r.ID)
	fmt.Fprintf(w, "workflow\t%s\n", r.WorkflowID)
	fmt.Fprintf(w, "status\t%s\n", r.Status)
	if r.Queue != nil {
		fmt.Fprintf(w, "queued because\t%s (since %s)\n", r.Queue.Reason, r.Queue.Since.Format(time.RFC3339))
	}
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
		reason, _ := r.Error.Details["reason"].(string)
		fmt.Fprintf(w, "error\t%s %s: %s\n", r.Error.Code, reason, r.Error.Message)
	}
	w.Flush()
	if len(r.Steps) > 0 {
		fmt.Fprintln(a.stdout, "\nsteps")
		w = tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "  #\ttype\tstatus\tduration\tattempts")
		for _, st := range r.Steps {
			d := "-"
			if st.DurationMs != nil {
				d = fmt.Sprintf("%d ms", *st.DurationMs)
			}
			fmt.Fprintf(w, "  %d\t%s\t%s\t%s\t%d\n", st.Index, st.Type, st.Status, d, st.Attempts)
		}
		w.Flush()
	}
	if len(r.Outputs) > 0 {
		fmt.Fprintln(a.stdout, "\noutputs")
		printMap(a.stdout, r.Outputs)
	}
	return nil
}

func printMap(out io.Writer, m map[string]any) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, k := range keys {
		v, _ := json.Marshal(m[k])
		fmt.Fprintf(w, "  %s\t%s\n", k, v)
	}
	w.Flush()
}
