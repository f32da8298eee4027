package cli

import (
	"context"
	"encoding/json"
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
	w := newTable(a.stdout)
	fmt.Fprintf(w, "queued runs\t%d\n", q.Depth)
	oldest := "-"
	if q.OldestQueuedAgeMs != nil {
		oldest = ms(q.OldestQueuedAgeMs)
		if q.OldestQueuedAt != nil {
			oldest += " (since " + q.OldestQueuedAt.Format(time.RFC3339) + ")"
		}
	}
	fmt.Fprintf(w, "oldest\t%s\n", oldest)
	fmt.Fprintf(w, "why\t%s\n", reasonsText(q.ByReason))
	if stuck := stuckText(q.Stuck); stuck != "" {
		fmt.Fprintf(w, "stuck\t%s\n", stuck)
	}
	w.Flush()
	if len(q.Accounts) > 0 {
		fmt.Fprintln(a.stdout, "\nper account")
		w = newTable(a.stdout)
		fmt.Fprintln(w, "  ACCOUNT\tQUEUED\tOLDEST\tWHY")
		for _, acc := range q.Accounts {
			fmt.Fprintf(w, "  %s\t%d\t%s\t%s\n", acc.AccountID, acc.Depth, ms(acc.OldestQueuedAgeMs), reasonsText(acc.ByReason))
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

// stuckText shows the queue's stuck report, whatever its shape: a number,
// an object of counts, or a list of items.
func stuckText(raw json.RawMessage) string {
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	var counts map[string]json.RawMessage
	if json.Unmarshal(raw, &counts) == nil {
		keys := make([]string, 0, len(counts))
		for k := range counts {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var parts []string
		for _, k := range keys {
			v := strings.TrimSpace(string(counts[k]))
			var list []json.RawMessage
			if json.Unmarshal(counts[k], &list) == nil {
				v = fmt.Sprint(len(list))
			}
			if v != "0" && v != "[]" && v != "null" {
				parts = append(parts, k+" "+clip(v, 40))
			}
		}
		if len(parts) == 0 {
			return "none"
		}
		return strings.Join(parts, ", ")
	}
	var list []json.RawMessage
	if json.Unmarshal(raw, &list) == nil {
		if len(list) == 0 {
			return "none"
		}
		return fmt.Sprintf("%d", len(list))
	}
	return clip(string(raw), 60)
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
			var p page[AgentView]
			raw, err := a.client.Do(ctx, "GET", path, nil, &p)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printRaw(raw)
			}
			a.printAgents(p.Items)
			return nil
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
