package api

import (
	"net/http"
	"sort"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// queueFigures are one account's queue (or the total of every account's).
type queueFigures struct {
	AccountID string `json:"accountId,omitempty"`
	// Depth counts the queued runs: waiting for an agent, or assigned to one
	// and not accepted yet (Assigned).
	Depth             int64                          `json:"depth"`
	Assigned          int64                          `json:"assigned"`
	OldestQueuedAgeMs int64                          `json:"oldestQueuedAgeMs"`
	ByReason          map[protocol.QueueReason]int64 `json:"byReason"`
	Stuck             store.StuckCounts              `json:"stuck"`

	oldest time.Time
}

func newQueueFigures(account string) *queueFigures {
	return &queueFigures{AccountID: account, ByReason: map[protocol.QueueReason]int64{
		protocol.QueueNoAgentConnected: 0, protocol.QueueAgentsBusy: 0, protocol.QueueNoMatchingAgent: 0,
	}}
}

func (f *queueFigures) addGroup(g store.QueueGroup, reason protocol.QueueReason) {
	f.Depth += g.Count
	if g.Claimed {
		f.Assigned += g.Count
	} else {
		f.ByReason[reason] += g.Count
	}
	if f.oldest.IsZero() || g.OldestQueuedAt.Before(f.oldest) {
		f.oldest = g.OldestQueuedAt
	}
}

func (f *queueFigures) addStuck(c store.StuckCounts) {
	f.Stuck.Queued += c.Queued
	f.Stuck.Assigned += c.Assigned
	f.Stuck.Cancelling += c.Cancelling
	f.Stuck.AwaitingApproval += c.AwaitingApproval
	f.Stuck.Analyzing += c.Analyzing
}

func (f *queueFigures) finish(now time.Time) {
	if !f.oldest.IsZero() {
		f.OldestQueuedAgeMs = max(now.Sub(f.oldest).Milliseconds(), 0)
	}
}

// thresholdsView shows the stuck thresholds in milliseconds (0: off).
type thresholdsView struct {
	QueuedMs           int64 `json:"queued"`
	AssignedMs         int64 `json:"assigned"`
	CancellingMs       int64 `json:"cancelling"`
	AwaitingApprovalMs int64 `json:"awaiting_approval"`
	AnalyzingMs        int64 `json:"analyzing"`
}

// queueStatsView is GET /v1/queue's answer: the figures of every account
// shown at the top level (API.md §12), then per account, the same total
// with the stuck counts, and the thresholds.
type queueStatsView struct {
	At                time.Time                      `json:"at"`
	Depth             int64                          `json:"depth"`
	OldestQueuedAt    *time.Time                     `json:"oldestQueuedAt"`
	OldestQueuedAgeMs int64                          `json:"oldestQueuedAgeMs"`
	ByReason          map[protocol.QueueReason]int64 `json:"byReason"`
	Accounts          []*queueFigures                `json:"accounts"`
	Total             *queueFigures                  `json:"total"`
	StuckThresholds   thresholdsView                 `json:"stuckThresholdsMs"`
}

// getQueue is GET /v1/queue: queued runs by account and reason, and what is
// stuck. Members see their own account (always listed, if only with zeros);
// operators every account with something queued or stuck, or one with
// ?accountId=.
func (s *Server) getQueue(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	account, err := streamAccount(r, p, "queues")
	if err != nil {
		return err
	}
	now := s.Now()
	stats, err := s.store.QueueStats(r.Context(), store.QueueStatsParams{AccountID: account, Stuck: s.cfg.Stuck.Since(now)})
	if err != nil {
		return err
	}
	byAcct := map[string]*queueFigures{}
	get := func(id string) *queueFigures {
		f := byAcct[id]
		if f == nil {
			f = newQueueFigures(id)
			byAcct[id] = f
		}
		return f
	}
	if account != "" {
		get(account)
	}
	total := newQueueFigures("")
	for _, g := range stats.Groups {
		reason := protocol.QueueNoAgentConnected
		if !g.Claimed && s.Agents != nil {
			reason = s.Agents.QueueReason(g.AccountID, g.Labels)
		}
		get(g.AccountID).addGroup(g, reason)
		total.addGroup(g, reason)
	}
	for id, c := range stats.Stuck {
		if c == (store.StuckCounts{}) {
			continue
		}
		get(id).addStuck(c)
		total.addStuck(c)
	}
	out := queueStatsView{At: now.UTC(), Total: total, Accounts: make([]*queueFigures, 0, len(byAcct))}
	for _, f := range byAcct {
		f.finish(now)
		out.Accounts = append(out.Accounts, f)
	}
	total.finish(now)
	out.Depth, out.OldestQueuedAgeMs, out.ByReason = total.Depth, total.OldestQueuedAgeMs, total.ByReason
	if !total.oldest.IsZero() {
		oldest := total.oldest.UTC()
		out.OldestQueuedAt = &oldest
	}
	sort.Slice(out.Accounts, func(i, j int) bool { return out.Accounts[i].AccountID < out.Accounts[j].AccountID })
	t := s.cfg.Stuck
	out.StuckThresholds = thresholdsView{t.Queued.Milliseconds(), t.Assigned.Milliseconds(), t.Cancelling.Milliseconds(),
		t.AwaitingApproval.Milliseconds(), t.Analyzing.Milliseconds()}
	return writeJSON(w, http.StatusOK, out)
}

// getMetrics is GET /metrics: no token (API.md §12), as Prometheus scrapes
// it. No metric carries an account id or anything else of a tenant's; the
// -metrics-addr listener serves the same on an address of its own, for
// deployments that keep the API's address public.
func (s *Server) getMetrics(w http.ResponseWriter, r *http.Request) error {
	s.metrics.Handler().ServeHTTP(w, r)
	return nil
}
