package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/copelf/copelf/protocol"
)

// The API's views, as far as the tables use them. -o json never goes
// through these: it prints the server's bytes.

// StepView is one step record of a run.
type StepView struct {
	Index      int             `json:"index"`
	Type       string          `json:"type"`
	Status     string          `json:"status"`
	StartedAt  *time.Time      `json:"startedAt"`
	DurationMs *int64          `json:"durationMs"`
	Attempts   int             `json:"attempts"`
	Error      *protocol.Error `json:"error"`
}

// RunView is a run as the API shows it.
type RunView struct {
	ID         string             `json:"id"`
	AccountID  string             `json:"accountId"`
	WorkflowID string             `json:"workflowId"`
	BatchID    string             `json:"batchId"`
	Iteration  *int               `json:"iteration"`
	Status     protocol.RunStatus `json:"status"`
	Inputs     map[string]any     `json:"inputs"`
	Outputs    map[string]any     `json:"outputs"`
	Error      *protocol.Error    `json:"error"`
	AgentID    string             `json:"agentId"`
	Attempt    int                `json:"attempt"`
	Steps      []StepView         `json:"steps"`
	Queue      *struct {
		Reason string    `json:"reason"`
		Since  time.Time `json:"since"`
	} `json:"queue"`
	Cost struct {
		Reserved int64 `json:"reserved"`
		Charged  int64 `json:"charged"`
	} `json:"cost"`
	CancelRequested bool       `json:"cancelRequested"`
	QueuedAt        time.Time  `json:"queuedAt"`
	StartedAt       *time.Time `json:"startedAt"`
	FinishedAt      *time.Time `json:"finishedAt"`
}

// stepsDone counts steps that finished (succeeded, failed or skipped).
func (r *RunView) stepsDone() int {
	n := 0
	for _, st := range r.Steps {
		if stepRank(st.Status) == 2 {
			n++
		}
	}
	return n
}

// BatchView is a batch as the API shows it.
type BatchView struct {
	ID            string               `json:"id"`
	AccountID     string               `json:"accountId"`
	WorkflowID    string               `json:"workflowId"`
	Status        protocol.BatchStatus `json:"status"`
	Concurrency   int                  `json:"concurrency"`
	StopOnFailure bool                 `json:"stopOnFailure"`
	Counts        protocol.BatchCounts `json:"counts"`
	Iterations    []IterationView      `json:"iterations"`
	CreatedAt     time.Time            `json:"createdAt"`
	StartedAt     *time.Time           `json:"startedAt"`
	FinishedAt    *time.Time           `json:"finishedAt"`
}

// IterationView is one iteration of a batch.
type IterationView struct {
	Index  int            `json:"index"`
	Inputs map[string]any `json:"inputs"`
	RunID  string         `json:"runId"`
	Status string         `json:"status"`
}

// recount sets the counts from the iterations, as the server does.
func (b *BatchView) recount() {
	b.Counts = protocol.BatchCounts{}
	for _, it := range b.Iterations {
		b.Counts.Add(it.Status)
	}
}

// ApprovalView is an approval request.
type ApprovalView struct {
	ID         string     `json:"id"`
	AccountID  string     `json:"accountId"`
	RunID      string     `json:"runId"`
	WorkflowID string     `json:"workflowId"`
	Step       int        `json:"step"`
	Message    string     `json:"message"`
	Status     string     `json:"status"`
	CreatedAt  time.Time  `json:"createdAt"`
	ResolvedAt *time.Time `json:"resolvedAt"`
	ResolvedBy string     `json:"resolvedBy"`
	Comment    string     `json:"comment"`
}

// AgentView is a connected agent.
type AgentView struct {
	ID          string            `json:"id"`
	ClientID    string            `json:"clientId"`
	Name        string            `json:"name"`
	Kind        string            `json:"kind"`
	Version     string            `json:"version"`
	AccountID   string            `json:"accountId"`
	Labels      map[string]string `json:"labels"`
	Slots       int               `json:"slots"`
	FreeSlots   int               `json:"freeSlots"`
	ActiveRuns  []string          `json:"activeRuns"`
	ConnectedAt time.Time         `json:"connectedAt"`
	LastSeenAt  time.Time         `json:"lastSeenAt"`
}

// QueueFigures are the queue's figures of one account, or their total.
type QueueFigures struct {
	AccountID         string         `json:"accountId"`
	Depth             int            `json:"depth"`
	Assigned          int            `json:"assigned"`
	OldestQueuedAgeMs *int64         `json:"oldestQueuedAgeMs"`
	ByReason          map[string]int `json:"byReason"`
	Stuck             map[string]int `json:"stuck"`
}

// QueueView is GET /v1/queue: per account and in total, with the stuck
// thresholds. (A flat form, the figures at the top level as API.md §12
// first drew it, is read too.)
type QueueView struct {
	At                time.Time        `json:"at"`
	Accounts          []QueueFigures   `json:"accounts"`
	Total             *QueueFigures    `json:"total"`
	StuckThresholdsMs map[string]int64 `json:"stuckThresholdsMs"`
	OldestQueuedAt    *time.Time       `json:"oldestQueuedAt"`
	QueueFigures
}

// total is the figures of every listed account.
func (q *QueueView) total() *QueueFigures {
	if q.Total != nil {
		return q.Total
	}
	return &q.QueueFigures
}

// stuckStates are the states the queue reports stuck runs in, in order.
var stuckStates = []string{"queued", "assigned", "cancelling", "awaiting_approval", "analyzing"}

// page is a list answer.
type page[T any] struct {
	Items      []T     `json:"items"`
	NextCursor *string `json:"nextCursor"`
}

// queueReasons are the reasons a run waits, in the order tables show them.
var queueReasons = []string{string(protocol.QueueNoAgentConnected), string(protocol.QueueAgentsBusy), string(protocol.QueueNoMatchingAgent)}

// ---- formatting ----

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

// ago formats how long ago t was, relative to now ("-" for zero).
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return short(now.Sub(t)) + " ago"
}

// short formats a duration compactly: 850ms, 1.33s, 12s, 3m04s, 2h05m, 3d04h.
func short(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
}

func ms(v *int64) string {
	if v == nil {
		return "-"
	}
	return short(time.Duration(*v) * time.Millisecond)
}

// dash shows "" as "-" so table columns stay aligned.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// clip shortens s to n runes on one line.
func clip(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

// errorText is "code reason: message" of a run or step error.
func errorText(e *protocol.Error) string {
	if e == nil {
		return ""
	}
	s := string(e.Code)
	if reason, _ := e.Details["reason"].(string); reason != "" {
		s += " " + reason
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// labelsText is k=v,… sorted by key.
func labelsText(m map[string]string) string {
	if len(m) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		keys[i] = k + "=" + m[k]
	}
	return strings.Join(keys, ",")
}

// reasonsText is "no_agent_connected 3, agents_busy 1" (zeros left out).
func reasonsText(m map[string]int) string {
	var parts []string
	seen := map[string]bool{}
	for _, r := range queueReasons {
		seen[r] = true
		if m[r] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", r, m[r]))
		}
	}
	var other []string
	for r, n := range m {
		if !seen[r] && n > 0 {
			other = append(other, fmt.Sprintf("%s %d", r, n))
		}
	}
	sort.Strings(other)
	parts = append(parts, other...)
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

func printMap(out io.Writer, m map[string]any) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	w := newTable(out)
	for _, k := range keys {
		v, _ := json.Marshal(m[k])
		fmt.Fprintf(w, "  %s\t%s\n", k, v)
	}
	w.Flush()
}

// stepRank orders step states: pending 0, running 1, finished 2.
func stepRank(s string) int {
	switch protocol.StepStatus(s) {
	case protocol.StepPending, "":
		return 0
	case protocol.StepRunning:
		return 1
	}
	return 2
}

// runRank orders run states for progress display: queued 0, running or
// paused 1, finished 2.
func runRank(s protocol.RunStatus) int {
	switch {
	case s == protocol.RunQueued || s == "":
		return 0
	case s.Terminal():
		return 2
	}
	return 1
}
