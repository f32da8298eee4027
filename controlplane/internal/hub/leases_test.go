package hub_test

import (
	"context"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// history returns a run's applied events and fails on a (lease, seq) applied
// twice.
func (e *env) history(runID string) []*store.RunEvent {
	e.t.Helper()
	hist, err := e.st.RunEventList(context.Background(), runID)
	if err != nil {
		e.t.Fatal(err)
	}
	type key struct {
		lease string
		seq   int64
	}
	seen := map[key]bool{}
	for _, ev := range hist {
		k := key{ev.LeaseID, ev.LeaseSeq}
		if seen[k] {
			e.t.Fatalf("event %s/%d applied twice", ev.LeaseID, ev.LeaseSeq)
		}
		seen[k] = true
	}
	return hist
}

// agentLost checks a run failed because its agent was lost, and refunded.
func (e *env) agentLost(runID string) {
	e.t.Helper()
	r := e.waitStatus(runID, protocol.RunFailed)
	if r.Error == nil || r.Error.Code != protocol.CodeInternal || r.Error.Details["reason"] != protocol.ReasonAgentLost {
		e.t.Fatalf("error: %+v", r.Error)
	}
	if r.CostCharged != 0 {
		e.t.Fatalf("charged %d", r.CostCharged)
	}
	// The API shows the same.
	got := e.get("/v1/runs/" + runID)
	if errv, _ := got["error"].(map[string]any); errv["code"] != "internal" || reasonOf(errv) != protocol.ReasonAgentLost {
		e.t.Fatalf("GET run: %v", got)
	}
}

// An assign not accepted within the lease goes back to the queue and is
// assigned again: attempt 2, a new lease. The old lease is refused.
func TestLeaseAssignNotAccepted(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("slow", 1)
	run := e.runOn(nil)
	a1 := c.expectAssign(run)
	// Heartbeats do not stretch the time to accept.
	e.advance(3 * time.Second)
	c.send(&protocol.Heartbeat{Runs: []string{run}})
	c.sync()
	e.advance(3 * time.Second)
	e.reap()
	a2 := c.expectAssign(run)
	if a2.Attempt != 2 || a2.LeaseID == a1.LeaseID {
		t.Fatalf("second assign: attempt %d, lease %s (first %s)", a2.Attempt, a2.LeaseID, a1.LeaseID)
	}
	c.send(&protocol.Accept{RunID: run, LeaseID: a1.LeaseID})
	if f := c.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost); f.RunID != run {
		t.Fatalf("error runId %q", f.RunID)
	}
	c.start(a2)
	c.finish(a2, protocol.RunSucceeded)
	r := e.waitStatus(run, protocol.RunSucceeded)
	if r.Attempt != 2 {
		t.Fatalf("attempt %d", r.Attempt)
	}
	e.credits(e.account, 99, 0)
}

// The same with a real, short lease and the hub's own maintenance loop.
func TestLeaseAssignNotAcceptedRealClock(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 400 * time.Millisecond})
	c, _ := e.connect("slow", 1)
	run := e.runOn(nil)
	a1 := c.expectAssign(run)
	a2 := c.expectAssign(run)
	if a2.Attempt != 2 || a2.LeaseID == a1.LeaseID {
		t.Fatalf("second assign: %+v", a2)
	}
	c.send(&protocol.Reject{RunID: run, LeaseID: a2.LeaseID, Reason: "busy"})
	a3 := c.expectAssign(run)
	if a3.Attempt != 3 {
		t.Fatalf("third assign: %+v", a3)
	}
	c.close()
}

// Heartbeats keep a running run's lease; without them it is lost: failed,
// internal, agent_lost, and refunded.
func TestLeaseHeartbeatsKeepRunningRun(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("beating", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	for range 3 {
		e.advance(3 * time.Second)
		c.send(&protocol.Heartbeat{Runs: []string{run}})
		c.sync()
		e.reap()
	}
	if r := e.run(run); r.Status != protocol.RunRunning || r.LeaseID != a.LeaseID {
		t.Fatalf("after heartbeats: %s, lease %q", r.Status, r.LeaseID)
	}
	e.credits(e.account, 99, 0)
	// Silence for longer than the lease (the socket stays up).
	e.advance(6 * time.Second)
	e.reap()
	e.agentLost(run)
	e.credits(e.account, 100, 0)
	if ch, rf := e.charges(e.account, run); ch != 1 || rf != 1 {
		t.Fatalf("charges %d refunds %d", ch, rf)
	}
	// The agent's late report is refused and changes nothing.
	c.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	c.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost)
	if n := len(e.history(run)); n != 1 {
		t.Fatalf("history: %d events", n)
	}
	// Its slot is free again.
	next := e.runOn(nil)
	c.expectAssign(next)
}

// An agent that disconnects mid-run loses the run once the lease runs out
// (real lease, the hub's own loop).
func TestLeaseLostOnDisconnect(t *testing.T) {
	// Real clock: the lease must outlast a stall of the test between its
	// assign and its accept on a loaded machine.
	e := newEnv(t, hub.Config{LeaseTimeout: 2 * time.Second})
	c, _ := e.connect("vanishing", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	c.close()
	e.agentLost(run)
	e.credits(e.account, 100, 0)
}

// A network cut shorter than the lease: the agent reconnects with the same
// id, the welcome lists the run under the same lease, events continue and
// the run is charged once.
func TestLeaseSurvivesShortCut(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c1, w1 := e.connect("flaky", 1)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.start(a)
	c1.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	c1.close()

	c2, w2 := e.connect("flaky", 1)
	if w2.AgentID != w1.AgentID || w2.SessionID == w1.SessionID {
		t.Fatalf("welcome: agent %s/%s, session %s/%s", w1.AgentID, w2.AgentID, w1.SessionID, w2.SessionID)
	}
	if len(w2.Runs) != 1 || w2.Runs[0] != (protocol.HeldRun{RunID: run, Attempt: 1, LeaseID: a.LeaseID, Status: protocol.RunRunning}) {
		t.Fatalf("welcome runs: %+v", w2.Runs)
	}
	c2.seqs[a.LeaseID] = c1.seqs[a.LeaseID]
	c2.send(&protocol.Heartbeat{Runs: []string{run}})
	c2.sync()
	c2.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"})
	c2.finish(a, protocol.RunSucceeded)
	r := e.waitStatus(run, protocol.RunSucceeded)
	if r.Attempt != 1 || r.CostCharged != 1 {
		t.Fatalf("run: attempt %d charged %d", r.Attempt, r.CostCharged)
	}
	if ch, _ := e.charges(e.account, run); ch != 1 {
		t.Fatalf("charged %d times", ch)
	}
	if n := len(e.history(run)); n != 4 {
		t.Fatalf("history: %d events", n)
	}
	e.credits(e.account, 99, 0)
	// Its slot is back.
	c2.expectAssign(e.runOn(nil))
}

// Events sent, the connection dropped before their acks were read: after a
// reconnect the agent resends them; each is applied once and acked again.
func TestLeaseResendAfterReconnect(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c1, _ := e.connect("resender", 1)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.send(&protocol.Accept{RunID: run, LeaseID: a.LeaseID})
	sent := []protocol.Event{
		{Kind: protocol.EventStarted},
		{Kind: protocol.EventStepStarted, Step: intp(0)},
		{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"},
	}
	for _, ev := range sent {
		c1.report(run, a.LeaseID, ev)
	}
	e.waitRun(run, "step 0 done", func(r *store.Run) bool { return r.Steps[0].Status == protocol.StepSucceeded })
	c1.close()

	c2, w := e.connect("resender", 1)
	if len(w.Runs) != 1 || w.Runs[0].LeaseID != a.LeaseID {
		t.Fatalf("welcome runs: %+v", w.Runs)
	}
	for _, ev := range sent {
		c2.reportAcked(run, a.LeaseID, ev)
	}
	c2.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(1)})
	c2.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(1), Status: "succeeded", Output: "T"})
	c2.finish(a, protocol.RunSucceeded)
	r := e.waitStatus(run, protocol.RunSucceeded)
	if r.Outputs["title"] != "T" {
		t.Fatalf("outputs %v", r.Outputs)
	}
	if n := len(e.history(run)); n != 6 {
		t.Fatalf("history: %d events, want 6", n)
	}
	e.credits(e.account, 99, 0)
}

// The same when the dropped events finished the run: the new connection no
// longer holds it, and the resent events are still acknowledged.
func TestLeaseResendFinishedAfterReconnect(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c1, _ := e.connect("resender", 1)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.send(&protocol.Accept{RunID: run, LeaseID: a.LeaseID})
	sent := []protocol.Event{
		{Kind: protocol.EventStarted},
		{Kind: protocol.EventStepStarted, Step: intp(0)},
		{Kind: protocol.EventFinished, Status: "succeeded"},
	}
	for _, ev := range sent {
		c1.report(run, a.LeaseID, ev)
	}
	e.waitStatus(run, protocol.RunSucceeded)
	c1.close()

	c2, w := e.connect("resender", 1)
	if len(w.Runs) != 0 {
		t.Fatalf("welcome runs: %+v", w.Runs)
	}
	for _, ev := range sent {
		c2.reportAcked(run, a.LeaseID, ev)
	}
	// A new event under the finished run's lease is refused.
	c2.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(1)})
	c2.expectError(protocol.CodeConflict, "")
	if n := len(e.history(run)); n != 3 {
		t.Fatalf("history: %d events, want 3", n)
	}
	e.credits(e.account, 99, 0)
	// The agent's one slot is free.
	c2.expectAssign(e.runOn(nil))
}

// Resent after a reconnect that raced the old connection: the new
// connection holds the run at hello, the old one's finish is applied after
// that; the new one's duplicate finish is acked and gives the slot back.
func TestLeaseDuplicateFinishFreesSlot(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c1, _ := e.connect("twice", 1)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.start(a)
	// A second connection of the same agent takes over while the run is
	// live; the first is told why before it is closed.
	c2, w := e.connect("twice", 1)
	if len(w.Runs) != 1 {
		t.Fatalf("welcome runs: %+v", w.Runs)
	}
	ce, frames := c1.expectClosed()
	if ce == nil || ce.Code != 1008 || len(frames) != 1 {
		t.Fatalf("old connection: close %v, frames %d", ce, len(frames))
	}
	if f, ok := frames[0].(*protocol.ErrorFrame); !ok || f.Code != protocol.CodeConflict || f.Details["reason"] != "session_replaced" {
		t.Fatalf("old connection got %+v", frames[0])
	}
	// The old connection's finish, applied late (as its reader would).
	seq := c1.seqs[a.LeaseID] + 1
	res, err := e.st.RunEventApply(context.Background(), store.RunEventParams{RunID: run, LeaseID: a.LeaseID, Seq: seq, Kind: string(protocol.EventFinished), Status: "succeeded"})
	if err != nil || res.Run.Status != protocol.RunSucceeded {
		t.Fatalf("apply: %v", err)
	}
	c2.seqs[a.LeaseID] = seq - 1
	c2.finish(a, protocol.RunSucceeded)
	c2.expectAssign(e.runOn(nil))
	if n := len(e.history(run)); n != 2 {
		t.Fatalf("history: %d events", n)
	}
}

// A report under an old lease after the run was assigned again: conflict,
// lease_lost, with the runId, and nothing changes.
func TestLeaseOldLeaseReport(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	old, _ := e.connect("old", 1)
	run := e.runOn(nil)
	a1 := old.expectAssign(run)
	old.close()
	fresh, wf := e.connect("fresh", 1)
	e.advance(6 * time.Second)
	e.reap()
	a2 := fresh.expectAssign(run)
	if a2.Attempt != 2 || a2.LeaseID == a1.LeaseID {
		t.Fatalf("reassign: %+v", a2)
	}
	fresh.start(a2)

	back, w := e.connect("old", 1)
	if len(w.Runs) != 0 {
		t.Fatalf("old agent's welcome: %+v", w.Runs)
	}
	back.send(&protocol.Accept{RunID: run, LeaseID: a1.LeaseID})
	if f := back.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost); f.RunID != run {
		t.Fatalf("runId %q", f.RunID)
	}
	back.report(run, a1.LeaseID, protocol.Event{Kind: protocol.EventStarted})
	back.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost)
	back.report(run, a1.LeaseID, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded"})
	back.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost)
	back.send(&protocol.Reject{RunID: run, LeaseID: a1.LeaseID})
	back.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost)

	r := e.run(run)
	if r.Status != protocol.RunRunning || r.LeaseID != a2.LeaseID || r.AgentID != wf.AgentID || r.Attempt != 2 {
		t.Fatalf("run changed: %s lease %s agent %s attempt %d", r.Status, r.LeaseID, r.AgentID, r.Attempt)
	}
	for _, ev := range e.history(run) {
		if ev.LeaseID != a2.LeaseID {
			t.Fatalf("event of lease %s recorded", ev.LeaseID)
		}
	}
	fresh.finish(a2, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
	e.credits(e.account, 99, 0)
}

// An assign not yet accepted survives a short cut too: the welcome lists it
// as queued under its lease, and the agent may still accept it.
func TestLeaseAssignSurvivesShortCut(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c1, _ := e.connect("blinking", 2)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.close()
	c2, w := e.connect("blinking", 2)
	if len(w.Runs) != 1 || w.Runs[0] != (protocol.HeldRun{RunID: run, Attempt: 1, LeaseID: a.LeaseID, Status: protocol.RunQueued}) {
		t.Fatalf("welcome runs: %+v", w.Runs)
	}
	c2.start(a)
	c2.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
	// Both slots are free again: two runs go out at once.
	r1, r2 := e.runOn(nil), e.runOn(nil)
	got := map[string]bool{c2.expectAssign("").RunID: true, c2.expectAssign("").RunID: true}
	if !got[r1] || !got[r2] {
		t.Fatalf("assigned %v", got)
	}
}
