package cli

import (
	"context"
	"flag"
	"fmt"
	"net/url"

	"github.com/peterbourgon/ff/v3/ffcli"
)

func (a *app) approvalsCommand() *ffcli.Command {
	var ls listFlags
	var status string
	return group("approvals", "copelf approvals <ls|approve|reject> …", "list and resolve approval requests of paused runs",
		a.leaf("approvals ls", "copelf approvals ls [-status pending|approved|rejected|expired|all] [-limit N] [-cursor C]",
			"list approval requests (pending ones by default)", 0,
			func(fs *flag.FlagSet) {
				fs.StringVar(&status, "status", "pending", "pending, approved, rejected, expired, or all")
				ls.register(fs)
			},
			func(ctx context.Context, _ []string) error {
				q := url.Values{}
				if status != "all" && status != "" {
					q.Set("status", status)
				}
				return show(ctx, a, "GET", "/v1/approvals"+ls.query(q), nil, func(p page[ApprovalView]) {
					a.printApprovals(p.Items)
					a.more(p.NextCursor, "copelf approvals ls")
				})
			}),
		a.resolveCommand("approve", true),
		a.resolveCommand("reject", false),
	)
}

func (a *app) resolveCommand(name string, approve bool) *ffcli.Command {
	var comment string
	help := "approve a pending request: the run goes on"
	if !approve {
		help = "reject a pending request: the run fails (approval_rejected)"
	}
	return a.leaf("approvals "+name, "copelf approvals "+name+" [-comment TEXT] <approvalId>", help, 1,
		func(fs *flag.FlagSet) { fs.StringVar(&comment, "comment", "", "a comment kept with the decision") },
		func(ctx context.Context, args []string) error {
			var body any
			if comment != "" {
				body = map[string]string{"comment": comment}
			}
			var ap ApprovalView
			raw, err := a.client.Do(ctx, "POST", "/v1/approvals/"+url.PathEscape(args[0])+"/"+name, body, &ap)
			if err != nil {
				return err
			}
			if a.json() {
				return a.printRaw(raw)
			}
			line := fmt.Sprintf("%s %s (run %s, step %d)", ap.ID, ap.Status, ap.RunID, ap.Step)
			if ap.Comment != "" {
				line += fmt.Sprintf(": %q", ap.Comment)
			}
			fmt.Fprintln(a.stdout, line)
			return nil
		})
}

func (a *app) printApprovals(items []ApprovalView) {
	if len(items) == 0 {
		fmt.Fprintln(a.stdout, "no approval requests")
		return
	}
	now := a.now()
	w := newTable(a.stdout)
	fmt.Fprintln(w, "APPROVAL\tRUN\tWORKFLOW\tSTEP\tSTATUS\tCREATED\tMESSAGE\tCOMMENT")
	for _, ap := range items {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", ap.ID, ap.RunID, ap.WorkflowID, ap.Step, ap.Status,
			ago(now, ap.CreatedAt), dash(clip(ap.Message, 50)), dash(clip(ap.Comment, 40)))
	}
	w.Flush()
}
