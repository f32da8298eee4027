package cli

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
)

// queuedShown bounds the queued runs the queue table lists.
const queuedShown = 20

func (a *app) queueCommand() *ffcli.Command {
	return a.leaf("queue", "copelf queue",
		"what is queued and why: depth, oldest age, reasons, per account, the oldest queued runs", 0, nil,
		func(ctx context.Context, _ []string) error {
			var q QueueView
			raw, err := a.client.Do(ctx, "GET", "/v1/queue", nil, &q)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printRaw(raw)
			}
			var runs page[RunView]
			if _, err := a.client.Do(ctx, "GET", "/v1/runs?status=queued&limit=500", nil, &runs); err != nil {
				return err
			}
			a.printQueue(&q, runs.Items)
			return nil
		})
}

func (a *app) printQueue(q *QueueView, queued []RunView) {
	now := a.now()
	total := q.total()
	w := newTable(a.stdout)
	depth := fmt.Sprint(total.Depth)
	if total.Assigned > 0 {
		depth += fmt.Sprintf(" (%d assigned, not yet accepted)", total.Assigned)
	}
	fmt.Fprintf(w, "queued runs\t%s\n", depth)
	oldest := "-"
	if total.Depth > 0 && total.OldestQueuedAgeMs != nil {
		oldest = ms(total.OldestQueuedAgeMs)
	}
	fmt.Fprintf(w, "oldest\t%s\n", oldest)
	fmt.Fprintf(w, "why\t%s\n", reasonsText(total.ByReason))
	fmt.Fprintf(w, "stuck\t%s\n", stuckText(total.Stuck, q.StuckThresholdsMs))
	w.Flush()
	if len(q.Accounts) > 0 {
		fmt.Fprintln(a.stdout, "\nper account")
		w = newTable(a.stdout)
		fmt.Fprintln(w, "  ACCOUNT\tQUEUED\tASSIGNED\tOLDEST\tWHY\tSTUCK")
		for _, acc := range q.Accounts {
			oldest := "-"
			if acc.Depth > 0 {
				oldest = ms(acc.OldestQueuedAgeMs)
			}
			fmt.Fprintf(w, "  %s\t%d\t%d\t%s\t%s\t%s\n", acc.AccountID, acc.Depth, acc.Assigned, oldest, reasonsText(acc.ByReason), stuckText(acc.Stuck, nil))
		}
		w.Flush()
	}
	if len(queued) == 0 {
		return
	}
	sort.SliceStable(queued, func(i, j int) bool { return queued[i].QueuedAt.Before(queued[j].QueuedAt) })
	shown := queued[:min(len(queued), queuedShown)]
	fmt.Fprintf(a.stdout, "\noldest queued runs (%d of %d)\n", len(shown), len(queued))
	w = newTable(a.stdout)
	fmt.Fprintln(w, "  RUN\tACCOUNT\tWORKFLOW\tWAITING\tWHY")
	for _, r := range shown {
		why := "-"
		if r.Queue != nil {
			why = r.Queue.Reason
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%s\n", r.ID, r.AccountID, r.WorkflowID, short(now.Sub(r.QueuedAt)), why)
	}
	w.Flush()
}

// stuckText is "queued 2 (over 5m00s), cancelling 1" or "none".
func stuckText(stuck map[string]int, thresholds map[string]int64) string {
	var parts []string
	seen := map[string]bool{}
	add := func(state string, n int) {
		if n <= 0 {
			return
		}
		p := fmt.Sprintf("%s %d", state, n)
		if ms, ok := thresholds[state]; ok && ms > 0 {
			p += " (over " + short(time.Duration(ms)*time.Millisecond) + ")"
		}
		parts = append(parts, p)
	}
	for _, st := range stuckStates {
		seen[st] = true
		add(st, stuck[st])
	}
	var other []string
	for st := range stuck {
		if !seen[st] {
			other = append(other, st)
		}
	}
	sort.Strings(other)
	for _, st := range other {
		add(st, stuck[st])
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

func (a *app) agentsCommand() *ffcli.Command {
	var account string
	return a.leaf("agents", "copelf agents [-account ID]",
		"connected agents (members: their own; operators: every account's)", 0,
		func(fs *flag.FlagSet) {
			fs.StringVar(&account, "account", "", "only this account's agents (operators)")
		},
		func(ctx context.Context, _ []string) error {
			path := "/v1/agents"
			if account != "" {
				path += "?" + url.Values{"accountId": {account}}.Encode()
			}
			return show(ctx, a, "GET", path, nil, func(p page[AgentView]) {
				a.printAgents(p.Items)
			})
		})
}

func (a *app) printAgents(agents []AgentView) {
	if len(agents) == 0 {
		fmt.Fprintln(a.stdout, "no agents connected")
		return
	}
	now := a.now()
	w := newTable(a.stdout)
	fmt.Fprintln(w, "AGENT\tNAME\tKIND\tACCOUNT\tFREE/SLOTS\tRUNS\tLABELS\tCONNECTED\tLAST SEEN")
	for _, ag := range agents {
		runs := "-"
		if len(ag.ActiveRuns) > 0 {
			runs = strings.Join(ag.ActiveRuns, ",")
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\n", ag.ID, dash(ag.Name), ag.Kind, ag.AccountID, ag.FreeSlots, ag.Slots,
			clip(runs, 60), labelsText(ag.Labels), ago(now, ag.ConnectedAt), ago(now, ag.LastSeenAt))
	}
	w.Flush()
}
