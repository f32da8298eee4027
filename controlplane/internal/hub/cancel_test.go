package hub_test

import (
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/protocol"
)

// expectCancel reads a cancel of runID.
func (c *client) expectCancel(runID string) *protocol.Cancel {
	c.t.Helper()
	f := expect[*protocol.Cancel](c)
	if f.RunID != runID {
		c.t.Fatalf("cancel of %s, want %s", f.RunID, runID)
	}
	return f
}

// Cancelling a running run tells its agent; the agent's finished(cancelled)
// ends it, charged once.
func TestCancelRunningRun(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("obedient", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	got := e.post("/v1/runs/"+run+"/cancel", nil)
	if got["status"] != string(protocol.RunRunning) || got["cancelRequested"] != true {
		t.Fatalf("cancel answer: %v", got)
	}
	c.expectCancel(run)
	c.finish(a, protocol.RunCancelled)
	r := e.waitStatus(run, protocol.RunCancelled)
	if r.CostCharged != 1 {
		t.Fatalf("charged %d", r.CostCharged)
	}
	if ch, rf := e.charges(e.account, run); ch != 1 || rf != 0 {
		t.Fatalf("charges %d refunds %d", ch, rf)
	}
	e.credits(e.account, 99, 0)
	// Cancelling it again is a conflict.
	res := e.do("POST", "/v1/runs/"+run+"/cancel", e.token, nil, nil)
	wantEnvelope(t, res, 409, protocol.CodeConflict)
	c.expectAssign(e.runOn(nil))
}

// An agent that was disconnected when the cancel came gets it again in its
// welcome's wake.
func TestCancelResentAfterReconnect(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c1, _ := e.connect("away", 1)
	run := e.runOn(nil)
	a := c1.expectAssign(run)
	c1.start(a)
	c1.close()
	e.post("/v1/runs/"+run+"/cancel", nil)
	c2, w := e.connect("away", 1)
	if len(w.Runs) != 1 || w.Runs[0].RunID != run {
		t.Fatalf("welcome: %+v", w.Runs)
	}
	c2.expectCancel(run)
	c2.seqs[a.LeaseID] = c1.seqs[a.LeaseID]
	c2.finish(a, protocol.RunCancelled)
	e.waitStatus(run, protocol.RunCancelled)
	e.credits(e.account, 99, 0)
}

// An agent that ignores a cancel: the run ends cancelled after CancelGrace,
// and the agent is told again.
func TestCancelIgnoredForcedAfterGrace(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second, CancelGrace: 2 * time.Second})
	c, _ := e.connect("deaf", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	e.post("/v1/runs/"+run+"/cancel", nil)
	c.expectCancel(run)
	e.reap() // within the grace: nothing happens
	if r := e.run(run); r.Status != protocol.RunRunning {
		t.Fatalf("before the grace: %s", r.Status)
	}
	e.advance(3 * time.Second)
	e.reap()
	r := e.waitStatus(run, protocol.RunCancelled)
	if r.CostCharged != 1 {
		t.Fatalf("charged %d", r.CostCharged)
	}
	if f := c.expectCancel(run); f.Reason == "" {
		t.Fatalf("cancel without a reason")
	}
	e.credits(e.account, 99, 0)
	// The agent's late finish changes nothing (run_finished, as
	// protocol/README.md says); its slot is already free.
	c.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventFinished, Status: "cancelled"})
	c.expectError(protocol.CodeConflict, "run_finished")
	c.expectAssign(e.runOn(nil))
}

// Cancelling a run that is assigned but not accepted ends it at once, with
// nothing charged; the agent is told and its accept refused.
func TestCancelAssignedNotAccepted(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("undecided", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	got := e.post("/v1/runs/"+run+"/cancel", nil)
	if got["status"] != string(protocol.RunCancelled) {
		t.Fatalf("cancel answer: %v", got)
	}
	c.expectCancel(run)
	c.send(&protocol.Accept{RunID: run, LeaseID: a.LeaseID})
	c.expectError(protocol.CodeConflict, "")
	e.credits(e.account, 100, 0)
	c.expectAssign(e.runOn(nil))
}

// requestApproval runs an approval workflow up to its approval step.
func requestApproval(t *testing.T, e *env, c *client) (*protocol.Assign, map[string]any) {
	t.Helper()
	run := e.runOf(e.workflowWith(approvalDef), map[string]any{"inputs": map[string]any{}})
	a := c.expectAssign(run)
	c.start(a)
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"})
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventApprovalRequested, Step: intp(1), Message: "Go on?"})
	if r := e.run(run); r.Status != protocol.RunAwaitingApproval {
		t.Fatalf("run %s", r.Status)
	}
	list := e.get("/v1/approvals?status=pending")
	items, _ := list["items"].([]any)
	if len(items) != 1 {
		t.Fatalf("pending approvals: %v", list)
	}
	ap := items[0].(map[string]any)
	if ap["runId"] != run || ap["step"] != float64(1) || ap["message"] != "Go on?" || ap["status"] != "pending" {
		t.Fatalf("approval: %v", ap)
	}
	// The listener hears of the approval after the agent's ack is sent.
	e.waitFor("told the listener of one approval", func() bool {
		e.events.mu.Lock()
		defer e.events.mu.Unlock()
		return len(e.events.approvals) == 1
	})
	return a, ap
}

func TestApprovalApproved(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("asker", 1)
	a, ap := requestApproval(t, e, c)
	e.post("/v1/approvals/"+ap["id"].(string)+"/approve", map[string]any{"comment": "fine"})
	f := expect[*protocol.ApprovalFrame](c)
	if f.RunID != a.RunID || f.ApprovalID != ap["id"] || !f.Approved || f.Comment != "fine" {
		t.Fatalf("approval frame: %+v", f)
	}
	if r := e.run(a.RunID); r.Status != protocol.RunRunning {
		t.Fatalf("run %s", r.Status)
	}
	c.reportAcked(a.RunID, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(1), Status: "succeeded"})
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(a.RunID, protocol.RunSucceeded)
	e.credits(e.account, 99, 0)
}

func TestApprovalRejected(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("asker", 1)
	a, ap := requestApproval(t, e, c)
	e.post("/v1/approvals/"+ap["id"].(string)+"/reject", map[string]any{"comment": "no"})
	f := expect[*protocol.ApprovalFrame](c)
	if f.RunID != a.RunID || f.Approved || f.Comment != "no" {
		t.Fatalf("approval frame: %+v", f)
	}
	r := e.run(a.RunID)
	if r.Status != protocol.RunFailed || r.Error == nil || r.Error.Details["reason"] != protocol.ReasonApprovalRejected {
		t.Fatalf("run %s, error %+v", r.Status, r.Error)
	}
	if r.CostCharged != 1 {
		t.Fatalf("charged %d", r.CostCharged)
	}
	e.credits(e.account, 99, 0)
	// Resolving twice is a conflict.
	res := e.do("POST", "/v1/approvals/"+ap["id"].(string)+"/approve", e.token, nil, nil)
	wantEnvelope(t, res, 409, protocol.CodeConflict)
	// The run's slot is free again.
	c.expectAssign(e.runOn(nil))
}

// An approval resolved while the agent was away reaches it after it
// reconnects.
func TestApprovalResolvedWhileAway(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c1, _ := e.connect("asker", 1)
	a, ap := requestApproval(t, e, c1)
	c1.close()
	e.post("/v1/approvals/"+ap["id"].(string)+"/approve", nil)
	c2, w := e.connect("asker", 1)
	if len(w.Runs) != 1 || w.Runs[0].Status != protocol.RunRunning {
		t.Fatalf("welcome: %+v", w.Runs)
	}
	f := expect[*protocol.ApprovalFrame](c2)
	if f.RunID != a.RunID || !f.Approved {
		t.Fatalf("approval frame: %+v", f)
	}
	c2.seqs[a.LeaseID] = c1.seqs[a.LeaseID]
	c2.finish(a, protocol.RunSucceeded)
	e.waitStatus(a.RunID, protocol.RunSucceeded)
}

// A run past its definition's timeoutMs ends timed_out (run_timeout) and its
// agent is told to stop.
func TestRunTimeout(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second, CancelGrace: time.Second})
	c, _ := e.connect("slowpoke", 1)
	def := `{"version":1,"timeoutMs":2000,"variables":[],"steps":[{"type":"navigate","url":"about:blank"}]}`
	run := e.runOf(e.workflowWith(def), map[string]any{"inputs": map[string]any{}})
	a := c.expectAssign(run)
	if a.TimeoutMs != 2000 {
		t.Fatalf("assign timeoutMs %d", a.TimeoutMs)
	}
	c.start(a)
	e.advance(1500 * time.Millisecond)
	e.reap()
	if r := e.run(run); r.Status != protocol.RunRunning {
		t.Fatalf("early: %s", r.Status)
	}
	e.advance(2 * time.Second)
	e.reap()
	r := e.waitStatus(run, protocol.RunTimedOut)
	if r.Error == nil || r.Error.Code != protocol.CodeTimeout || r.Error.Details["reason"] != protocol.ReasonRunTimeout {
		t.Fatalf("error %+v", r.Error)
	}
	if f := c.expectCancel(run); f.Reason != protocol.ReasonRunTimeout {
		t.Fatalf("cancel reason %q", f.Reason)
	}
	e.credits(e.account, 99, 0)
	c.expectAssign(e.runOn(nil))
}

// A run queued past its queueTimeoutMs ends timed_out (queue_timeout), and
// its hold is released.
func TestQueueTimeout(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	run := e.runOn(map[string]any{"queueTimeoutMs": 1000})
	e.credits(e.account, 100, 1)
	e.reap()
	e.unclaimed(run)
	e.advance(2 * time.Second)
	e.reap()
	r := e.waitStatus(run, protocol.RunTimedOut)
	if r.Error == nil || r.Error.Code != protocol.CodeTimeout || r.Error.Details["reason"] != protocol.ReasonQueueTimeout {
		t.Fatalf("error %+v", r.Error)
	}
	got := e.get("/v1/runs/" + run)
	if errv, _ := got["error"].(map[string]any); reasonOf(errv) != protocol.ReasonQueueTimeout {
		t.Fatalf("GET run: %v", got)
	}
	e.credits(e.account, 100, 0)
}
