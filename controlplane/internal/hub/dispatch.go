package hub

import (
	"context"
	"time"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// dispatchLoop assigns queued runs to free agents whenever something may
// have changed (a kick) and, as a safety net, every SweepInterval.
func (h *Hub) dispatchLoop() {
	defer h.wg.Done()
	sweep := time.NewTicker(h.cfg.SweepInterval)
	defer sweep.Stop()
	for {
		select {
		case <-h.ctx.Done():
			return
		case <-h.kick:
		case <-sweep.C:
			h.mu.Lock()
			for acct := range h.byAcct {
				h.pending[acct] = true
			}
			h.mu.Unlock()
		}
		h.mu.Lock()
		accounts := make([]string, 0, len(h.pending))
		for a := range h.pending {
			accounts = append(accounts, a)
		}
		clear(h.pending)
		h.mu.Unlock()
		for _, a := range accounts {
			if err := h.dispatchAccount(h.ctx, a); err != nil && h.ctx.Err() == nil {
				h.log.WithError(err).WithField("accountId", a).Warn("dispatch failed")
			}
		}
	}
}

// claim is one planned assignment.
type claim struct {
	run  *store.Run
	conn *conn
	p    store.RunAssignParams
}

// maxQueueScan bounds how far down an account's queue one dispatch looks
// past runs that no connected agent can take (labels).
const maxQueueScan = 4096

// dispatchAccount claims as many of an account's queued runs as its agents
// have free slots for, and pushes the assigns.
func (h *Hub) dispatchAccount(ctx context.Context, accountID string) error {
	limit := 0
	for {
		free := h.freeSlots(accountID)
		if free == 0 {
			return nil
		}
		limit = max(limit, free+16)
		runs, err := h.store.RunQueuedList(ctx, accountID, limit)
		if err != nil || len(runs) == 0 {
			return err
		}
		claims := h.plan(runs)
		if len(claims) == 0 {
			// The oldest runs wait for agents that are not connected
			// (labels); they must not hold up the runs behind them.
			if len(runs) < limit || limit >= maxQueueScan {
				return nil
			}
			limit = min(limit*4, maxQueueScan)
			continue
		}
		params := make([]store.RunAssignParams, len(claims))
		for i, cl := range claims {
			params[i] = cl.p
		}
		claimed, err := h.store.RunAssign(ctx, params)
		if err != nil {
			h.unplan(claims, nil)
			return err
		}
		got := make(map[string]*store.Run, len(claimed))
		for _, r := range claimed {
			got[r.ID] = r
		}
		h.unplan(claims, got)
		for _, cl := range claims {
			if r := got[cl.run.ID]; r != nil {
				h.assign(ctx, cl.conn, r)
			}
		}
		// A claim can fail when a batch reached its concurrency: the slot
		// went back and another run may take it. Every round claims a run,
		// so this ends.
		if len(claimed) == 0 || (len(claimed) == len(claims) && len(runs) < limit) {
			return nil
		}
	}
}

func (h *Hub) freeSlots(accountID string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, c := range h.byAcct[accountID] {
		n += max(c.free, 0)
	}
	return n
}

// plan pairs runs with agents that have a free slot and the labels a run
// needs, taking the slots.
func (h *Hub) plan(runs []*store.Run) []claim {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []claim
	now := h.Now()
	expires := now.Add(h.cfg.LeaseTimeout)
	for _, r := range runs {
		var best *conn
		for _, c := range h.byAcct[r.AccountID] {
			if c.free > 0 && labelsMatch(c.info.Labels, r.Labels) && !c.refusedLocked(r.ID, now) && (best == nil || c.free > best.free) {
				best = c
			}
		}
		if best == nil {
			continue
		}
		best.free--
		out = append(out, claim{run: r, conn: best, p: store.RunAssignParams{RunID: r.ID, AgentID: best.agentID, LeaseID: ids.New(ids.Lease), LeaseExpires: expires}})
	}
	return out
}

// refusedLocked reports whether the agent refused the run recently.
func (c *conn) refusedLocked(runID string, now time.Time) bool {
	r, ok := c.rejected[runID]
	if ok && now.After(r.until) {
		delete(c.rejected, runID)
		return false
	}
	return ok
}

// unplan gives back the slots of claims that did not happen.
func (h *Hub) unplan(claims []claim, got map[string]*store.Run) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, cl := range claims {
		if got[cl.run.ID] == nil {
			cl.conn.free++
		}
	}
}

// assign pushes a claimed run to its agent. If the agent is gone, the run
// goes straight back to the queue.
func (h *Hub) assign(ctx context.Context, c *conn, r *store.Run) {
	hr, err := h.heldFor(ctx, r)
	if err == nil {
		h.mu.Lock()
		c.runs[r.ID] = hr
		h.mu.Unlock()
	}
	select {
	case <-c.done:
		err = errGone
	default:
	}
	if err != nil {
		h.mu.Lock()
		delete(c.runs, r.ID)
		c.free++
		h.mu.Unlock()
		if rerr := h.store.RunRelease(ctx, r.ID, r.LeaseID); rerr != nil {
			h.log.WithError(rerr).WithField("runId", r.ID).Warn("release run after a failed assign")
		}
		h.Kick(r.AccountID)
		return
	}
	c.sendFrame(&protocol.Assign{RunID: r.ID, Attempt: r.Attempt, LeaseID: r.LeaseID, Inputs: r.Inputs, TimeoutMs: r.TimeoutMs,
		Workflow: protocol.AssignedWorkflow{ID: r.WorkflowID, Name: hr.workflow, Definition: hr.def}, BatchID: r.BatchID, Iteration: r.Iteration})
	c.log.WithField("runId", r.ID).Debug("run assigned")
	if r.Attempt == 1 {
		h.Metrics.Dispatched(h.Now().Sub(r.QueuedAt))
	}
	if h.Listener != nil {
		h.Listener.RunChanged(r)
	}
}

type hubError string

func (e hubError) Error() string { return string(e) }

const errGone = hubError("agent disconnected")

// reapLoop runs maintenance every SweepInterval: expired leases, overdue
// cancels, run timeouts and queue timeouts; with peers, only while this
// control plane is their leader.
func (h *Hub) reapLoop() {
	defer h.wg.Done()
	t := time.NewTicker(h.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-h.ctx.Done():
			return
		case <-t.C:
			if !h.leading() {
				continue // another control plane runs maintenance
			}
			if err := h.Reap(h.ctx); err != nil && h.ctx.Err() == nil {
				h.log.WithError(err).Warn("maintenance failed")
			}
		}
	}
}

// Reap moves on every run whose deadline has passed. It is safe to run
// concurrently with agents: each action is a guarded update.
func (h *Hub) Reap(ctx context.Context) error {
	now := h.Now()
	due, err := h.store.RunDueList(ctx, now, h.cfg.CancelGrace, 500)
	if err != nil {
		return err
	}
	for _, r := range due.LeaseExpired {
		out, err := h.store.RunExpireLease(ctx, r.ID, r.LeaseID, now)
		if err != nil {
			return err
		}
		if out == nil {
			continue
		}
		h.log.WithField("runId", r.ID).WithField("agentId", r.AgentID).WithField("status", out.Status).Warn("lease expired")
		h.releaseRun(r.ID, false, "")
		h.changed(out)
		h.reaped(out)
		h.Kick(r.AccountID)
	}
	for _, r := range due.CancelOverdue {
		h.finish(ctx, r, protocol.RunCancelled, nil, "cancel_deadline")
	}
	for _, r := range due.TimedOut {
		h.finish(ctx, r, protocol.RunTimedOut, protocol.Errorf(protocol.CodeTimeout, "The run exceeded its timeout of %d ms.", r.TimeoutMs).
			With("reason", protocol.ReasonRunTimeout), protocol.ReasonRunTimeout)
	}
	for _, r := range due.QueueTimedOut {
		h.finish(ctx, r, protocol.RunTimedOut, protocol.Errorf(protocol.CodeTimeout, "No agent took the run within %d ms.", r.QueueTimeoutMs).
			With("reason", protocol.ReasonQueueTimeout), "")
	}
	return nil
}

// finish ends a run server-side and tells its agent to stop.
func (h *Hub) finish(ctx context.Context, r *store.Run, status protocol.RunStatus, runErr *protocol.Error, reason string) {
	out, err := h.store.RunFinish(ctx, store.RunFinishParams{ID: r.ID, LeaseID: r.LeaseID, Status: status, Error: runErr})
	if err != nil {
		if protocol.ErrorCode(err) != protocol.CodeConflict {
			h.log.WithError(err).WithField("runId", r.ID).Warn("maintenance could not finish run")
		}
		return
	}
	h.log.WithField("runId", r.ID).WithField("status", status).Info("run ended by the server")
	h.releaseRun(r.ID, reason != "", reason)
	h.changed(out)
	h.reaped(out)
}

func (h *Hub) changed(r *store.Run) {
	if h.Listener != nil {
		h.Listener.RunChanged(r)
	}
}
