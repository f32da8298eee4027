package hub

import (
	"context"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Several control planes on one PostgreSQL database (package cluster): each
// hub serves the agents connected to it. What another control plane changes
// about a run (a run queued or cancelled through its API, an approval
// resolved there, a run its maintenance ended) reaches this hub through the
// cluster's signals, as calls to Kick, Sync, SyncApproval and Resync.

// Peers are the other control planes on the same database.
type Peers interface {
	// Leader reports whether this control plane runs the maintenance loop
	// (Reap) now. Every action of Reap is a guarded update, safe on several
	// control planes at once; leadership keeps the work, and its logs, on
	// one of them.
	Leader() bool
	// RunReaped is told about a run the maintenance loop ended or took back
	// (its lease expired): the agent holding it may be connected to another
	// control plane, which must stop it or give its slot back.
	RunReaped(r *store.Run)
}

// reaped tells the peers about a run the maintenance loop changed.
func (h *Hub) reaped(r *store.Run) {
	if h.Peers != nil && r != nil {
		h.Peers.RunReaped(r)
	}
}

// leading reports whether the maintenance loop runs here (always without
// peers).
func (h *Hub) leading() bool { return h.Peers == nil || h.Peers.Leader() }

// Holds reports whether an agent connected to this hub holds the run.
func (h *Hub) Holds(runID string) bool { return h.holder(runID) != nil }

// Sync brings this hub in line with a run another control plane changed,
// when an agent connected here holds it: a run that ended is released and
// its agent told to stop; a run whose lease was taken back is released (the
// agent's events are refused with lease_lost); a requested cancel is pushed.
// A run held by no agent of this hub costs nothing (no database read).
func (h *Hub) Sync(ctx context.Context, runID string) error { return h.sync(ctx, runID, false) }

// SyncApproval pushes an approval another control plane resolved to the
// agent holding its run, when that agent is connected here.
func (h *Hub) SyncApproval(ctx context.Context, runID, approvalID string) error {
	if !h.Holds(runID) {
		return nil
	}
	a, err := h.store.ApprovalGet(ctx, approvalID)
	if err != nil {
		return err
	}
	if a.RunID != runID || a.Status == protocol.ApprovalPending {
		return nil
	}
	h.ApprovalResolved(ctx, a)
	return nil
}

// Resync is for when signals from other control planes may have been lost
// (the cluster's connection was down): every account with an agent here is
// dispatched again, and every run held here is synced as Sync does, with an
// approval granted meanwhile pushed again (the agent ignores one it used).
func (h *Hub) Resync(ctx context.Context) error {
	h.mu.Lock()
	var runs []string
	for acct, conns := range h.byAcct {
		h.pending[acct] = true
		for _, c := range conns {
			for id := range c.runs {
				runs = append(runs, id)
			}
		}
	}
	h.mu.Unlock()
	select {
	case h.kick <- struct{}{}:
	default:
	}
	for _, id := range runs {
		if err := h.sync(ctx, id, true); err != nil {
			return err
		}
	}
	return nil
}

func (h *Hub) sync(ctx context.Context, runID string, approvals bool) error {
	c := h.holder(runID)
	if c == nil {
		return nil
	}
	r, err := h.store.RunGet(ctx, runID)
	if err != nil {
		return err
	}
	h.mu.Lock()
	hr := c.runs[runID]
	h.mu.Unlock()
	switch {
	case hr == nil:
	case r.Status.Terminal():
		h.releaseRun(r.ID, true, stopReason(r))
	case r.AgentID != c.agentID || r.LeaseID != hr.leaseID:
		h.releaseRun(r.ID, false, "")
	case r.CancelRequestedAt != nil:
		c.sendFrame(&protocol.Cancel{RunID: r.ID, Reason: "cancel_requested"})
	case approvals && r.Status == protocol.RunRunning:
		aps, _, err := h.store.ApprovalList(ctx, store.ApprovalListParams{RunID: r.ID, Status: protocol.ApprovalApproved, Page: store.Page{Limit: 1}})
		if err != nil {
			return err
		}
		if len(aps) > 0 {
			c.sendFrame(&protocol.ApprovalFrame{RunID: r.ID, ApprovalID: aps[0].ID, Approved: true, Comment: aps[0].Comment})
		}
	}
	return nil
}

// stopReason is the reason of the cancel sent to an agent whose run ended
// server-side.
func stopReason(r *store.Run) string {
	if r.Error != nil {
		if reason, _ := r.Error.Details["reason"].(string); reason != "" {
			return reason
		}
	}
	if r.Status == protocol.RunCancelled {
		return "cancelled"
	}
	return string(r.Status)
}
