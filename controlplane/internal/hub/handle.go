package hub

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// handle applies one decoded frame from an agent.
func (c *conn) handle(f protocol.Frame) {
	ctx, cancel := context.WithTimeout(c.h.ctx, 30*time.Second)
	defer cancel()
	switch f := f.(type) {
	case *protocol.Ready:
		c.h.mu.Lock()
		c.free = f.Slots - c.unaccountedLocked()
		if f.Slots > 0 {
			// Runs refused for want of a slot may come back now (a
			// reconnected agent can refuse an assign pushed on welcome
			// while a run it dropped is still stopping).
			for id, r := range c.rejected {
				if r.noSlot {
					delete(c.rejected, id)
				}
			}
		}
		c.h.mu.Unlock()
		c.h.Kick(c.accountID)
	case *protocol.Heartbeat:
		c.heartbeat(ctx, f)
	case *protocol.Accept:
		c.accept(ctx, f)
	case *protocol.Reject:
		c.reject(ctx, f)
	case *protocol.Event:
		c.event(ctx, f)
	default:
		c.sendError(protocol.Errorf(protocol.CodeBadRequest, "An agent does not send %s frames.", f.FrameType()).With("reason", "unexpected_frame"), "")
	}
}

// unaccountedLocked counts assigns the agent has not answered yet: a ready
// sent while they were in flight could not count them, so ready{n} means n
// minus those (API.md §12 "ready sets the free count outright" — of what the
// agent knows).
func (c *conn) unaccountedLocked() int {
	n := 0
	for _, hr := range c.runs {
		if !hr.accepted {
			n++
		}
	}
	return n
}

func (c *conn) heartbeat(ctx context.Context, f *protocol.Heartbeat) {
	if err := c.h.store.RunHeartbeat(ctx, c.agentID, f.Runs, c.h.Now().Add(c.h.cfg.LeaseTimeout)); err != nil {
		c.sendError(err, "")
		return
	}
	c.sendFrame(&protocol.Heartbeat{Runs: []string{}})
}

// held returns the run if this connection holds it under leaseID.
func (c *conn) held(runID, leaseID string) *heldRun {
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	hr := c.runs[runID]
	if hr == nil || hr.leaseID != leaseID {
		return nil
	}
	return hr
}

// forget drops a run this connection no longer runs and frees its slot.
func (c *conn) forget(runID string) {
	c.h.mu.Lock()
	_, ok := c.runs[runID]
	if ok {
		delete(c.runs, runID)
		c.slotBackLocked()
	}
	c.h.mu.Unlock()
	if ok {
		c.h.Kick(c.accountID)
	}
}

// checkForeign explains why a frame names a run this connection does not
// hold: another account's run is forbidden, anything else a lost lease.
func (c *conn) checkForeign(ctx context.Context, runID string) error {
	r, err := c.h.store.RunGet(ctx, runID)
	if err != nil || r.AccountID != c.accountID {
		return protocol.Errorf(protocol.CodeForbidden, "The run belongs to another account.")
	}
	return protocol.Errorf(protocol.CodeConflict, "The lease is no longer the run's current lease.").With("reason", protocol.ReasonLeaseLost)
}

func (c *conn) accept(ctx context.Context, f *protocol.Accept) {
	hr := c.held(f.RunID, f.LeaseID)
	if hr == nil {
		c.sendError(c.checkForeign(ctx, f.RunID), f.RunID)
		return
	}
	c.h.mu.Lock()
	accepted := hr.accepted
	c.h.mu.Unlock()
	if accepted {
		// A repeated accept of the lease the agent runs under changes
		// nothing; answering it with an error would make the hub forget a
		// run the agent is executing.
		return
	}
	r, err := c.h.store.RunStart(ctx, store.RunStartParams{ID: f.RunID, AgentID: c.agentID, LeaseID: f.LeaseID, LeaseExpires: c.h.Now().Add(c.h.cfg.LeaseTimeout)})
	if err != nil {
		c.forget(f.RunID)
		c.sendError(err, f.RunID)
		return
	}
	c.h.mu.Lock()
	hr.accepted = true
	c.h.mu.Unlock()
	c.log.WithField("runId", r.ID).Debug("run accepted")
	if c.h.Listener != nil {
		c.h.Listener.RunChanged(r)
	}
}

func (c *conn) reject(ctx context.Context, f *protocol.Reject) {
	hr := c.held(f.RunID, f.LeaseID)
	if hr == nil {
		c.sendError(c.checkForeign(ctx, f.RunID), f.RunID)
		return
	}
	if err := c.h.store.RunRelease(ctx, f.RunID, f.LeaseID); err != nil {
		c.sendError(err, f.RunID)
	}
	c.log.WithField("runId", f.RunID).WithField("reason", f.Reason).Info("run rejected by agent")
	c.h.mu.Lock()
	if c.rejected == nil {
		c.rejected = map[string]refusal{}
	}
	c.rejected[f.RunID] = refusal{until: c.h.Now().Add(c.h.cfg.LeaseTimeout), noSlot: f.Reason == rejectNoFreeSlot}
	c.h.mu.Unlock()
	c.forget(f.RunID)
}

func (c *conn) event(ctx context.Context, f *protocol.Event) {
	hr := c.held(f.RunID, f.LeaseID)
	if hr == nil {
		c.eventNotHeld(ctx, f)
		return
	}
	p := store.RunEventParams{RunID: f.RunID, LeaseID: f.LeaseID, Seq: f.Seq, Kind: string(f.Kind), Step: f.Step, Status: f.Status,
		DurationMs: f.DurationMs, Attempts: f.Attempts, Output: scrubValue(f.Output, hr.secrets), Error: scrubError(f.Error, hr.secrets),
		Outputs: scrubMap(f.Outputs, hr.secrets), Message: scrub(f.Message, hr.secrets)}
	if f.Kind == protocol.EventStepFinished && f.Step != nil && *f.Step < len(hr.def.Steps) {
		if st := hr.def.Steps[*f.Step]; st.Type == protocol.StepExtract {
			p.OutputName = st.Output
		}
	}
	rec := *f
	rec.Output, rec.Error, rec.Outputs, rec.Message = p.Output, p.Error, p.Outputs, p.Message
	rec.Type = protocol.FrameEvent
	p.Body, _ = json.Marshal(&rec)
	res, err := c.h.store.RunEventApply(ctx, p)
	if err != nil {
		var pe *protocol.Error
		if isConflict(err, &pe) {
			if reason, _ := pe.Details["reason"].(string); reason == "run_finished" || reason == protocol.ReasonLeaseLost {
				c.forget(f.RunID)
			}
		}
		c.sendError(err, f.RunID)
		return
	}
	c.sendFrame(&protocol.Ack{RunID: f.RunID, Seq: f.Seq})
	if res.Run.Status.Terminal() {
		// Also on a duplicate: another connection of this agent may have
		// applied the finish while this one held the run.
		c.forget(f.RunID)
	}
	if res.Duplicate {
		return
	}
	if l := c.h.Listener; l != nil {
		l.RunChanged(res.Run)
		if res.Approval != nil {
			l.ApprovalCreated(res.Approval)
		}
	}
}

// eventNotHeld answers an event about a run this connection does not hold.
// An agent resends the events whose acks it lost, in order, after a
// reconnect; when they finished the run, the new connection does not hold
// it, yet each was applied and is acknowledged again. Anything else is
// refused.
func (c *conn) eventNotHeld(ctx context.Context, f *protocol.Event) {
	r, err := c.h.store.RunGet(ctx, f.RunID)
	if err == nil && r.AccountID == c.accountID && r.AgentID == c.agentID && r.LeaseID == f.LeaseID && r.Status.Terminal() {
		// A terminal run takes no new event: the store only tells whether
		// (lease, seq) was applied.
		res, err := c.h.store.RunEventApply(ctx, store.RunEventParams{RunID: f.RunID, LeaseID: f.LeaseID, Seq: f.Seq, Kind: string(f.Kind)})
		if err == nil && res.Duplicate {
			c.sendFrame(&protocol.Ack{RunID: f.RunID, Seq: f.Seq})
			return
		}
		// A new event of its own lease about a run the server ended
		// (cancel forced, timeout): run_finished, as protocol/README.md
		// says, so the agent drops the run and its outbox. (A run ended
		// because this lease expired, agent_lost, is lease_lost: the
		// store says so.)
		var pe *protocol.Error
		if isConflict(err, &pe) && pe.Details["reason"] == "run_finished" {
			c.sendError(err, f.RunID)
			return
		}
	}
	c.sendError(c.checkForeign(ctx, f.RunID), f.RunID)
}

func isConflict(err error, pe **protocol.Error) bool {
	e, ok := err.(*protocol.Error)
	if ok && e.Code == protocol.CodeConflict {
		*pe = e
		return true
	}
	return false
}

// scrub removes secret values from agent-reported text before it is stored.
func scrub(s string, secrets []string) string {
	for _, v := range secrets {
		if v != "" && strings.Contains(s, v) {
			s = strings.ReplaceAll(s, v, protocol.RedactedValue)
		}
	}
	return s
}

func scrubValue(v any, secrets []string) any {
	if len(secrets) == 0 || v == nil {
		return v
	}
	switch x := v.(type) {
	case string:
		return scrub(x, secrets)
	case map[string]any:
		return scrubMap(x, secrets)
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = scrubValue(e, secrets)
		}
		return out
	}
	return v
}

func scrubMap(m map[string]any, secrets []string) map[string]any {
	if len(secrets) == 0 || m == nil {
		return m
	}
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = scrubValue(v, secrets)
	}
	return out
}

func scrubError(e *protocol.Error, secrets []string) *protocol.Error {
	if e == nil || len(secrets) == 0 {
		return e
	}
	cp := *e
	cp.Message = scrub(e.Message, secrets)
	cp.Details = scrubMap(e.Details, secrets)
	return &cp
}
