package hub_test

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Another replica is a second hub on the env's database; what it (or its
// API) changes reaches this env's hub as the cluster delivers it: Sync,
// SyncApproval, Resync.

// peers is a hub.Peers whose leadership the test sets.
type peers struct {
	mu     sync.Mutex
	leader bool
	asked  int
	reaped []*store.Run
	wake   chan struct{}
}

func newPeers() *peers { return &peers{wake: make(chan struct{}, 1)} }

func (p *peers) Leader() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.asked++
	p.poke()
	return p.leader
}

func (p *peers) RunReaped(r *store.Run) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reaped = append(p.reaped, r)
	p.poke()
}

func (p *peers) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// until waits for cond (called with p.mu held).
func (p *peers) until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(wait)
	for {
		p.mu.Lock()
		ok := cond()
		p.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-p.wake:
		case <-deadline:
			t.Fatalf("%s: not within %s", what, wait)
		}
	}
}

// otherReplica starts a second hub on the env's store, with peers, its
// clock skewed by *skew (set after Start: Start extends every lease).
func otherReplica(t *testing.T, e *env, p *peers, skew *atomic.Int64) *hub.Hub {
	t.Helper()
	log := logrus.New()
	log.Out = io.Discard
	h := hub.New(e.st, log, nil, hub.Config{LeaseTimeout: 30 * time.Second, SweepInterval: 20 * time.Millisecond})
	h.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	h.Peers = p
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// A cancel requested through another replica: Sync pushes it to the agent
// connected here; Sync of a run no agent here holds does nothing.
func TestSyncCancel(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("here", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	ctx := context.Background()
	if _, err := e.st.RunCancel(ctx, run); err != nil {
		t.Fatal(err)
	}
	if err := e.hub.Sync(ctx, run); err != nil {
		t.Fatal(err)
	}
	c.expectCancel(run)
	c.finish(a, protocol.RunCancelled)
	e.waitStatus(run, protocol.RunCancelled)
	// The hub forgets the run after it sends the finish's ack: the
	// heartbeat's answer says it has.
	c.sync()
	if err := e.hub.Sync(ctx, run); err != nil || e.hub.Holds(run) {
		t.Fatalf("sync of a run held by nobody here: %v, held %v", err, e.hub.Holds(run))
	}
	c.quiet()
}

// Approvals resolved through another replica reach the agent here: an
// approval (the run goes on), a rejection (the run failed; its slot comes
// back).
func TestSyncApproval(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("asker", 1)
	ctx := context.Background()

	a, ap := requestApproval(t, e, c)
	if _, err := e.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: ap["id"].(string), Approved: true, By: e.user.ID, Comment: "fine"}); err != nil {
		t.Fatal(err)
	}
	if err := e.hub.SyncApproval(ctx, a.RunID, ap["id"].(string)); err != nil {
		t.Fatal(err)
	}
	f := expect[*protocol.ApprovalFrame](c)
	if f.RunID != a.RunID || !f.Approved || f.Comment != "fine" {
		t.Fatalf("approval frame: %+v", f)
	}
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(a.RunID, protocol.RunSucceeded)

	// The ids must match: an approval of another run is not pushed.
	wf := e.workflowWith(approvalDef)
	run := e.runOf(wf, map[string]any{"inputs": map[string]any{}})
	a = c.expectAssign(run)
	c.start(a)
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventApprovalRequested, Step: intp(1), Message: "Go on?"})
	aps, _, err := e.st.ApprovalList(ctx, store.ApprovalListParams{RunID: run, Status: protocol.ApprovalPending, Page: store.Page{Limit: 1}})
	if err != nil || len(aps) != 1 {
		t.Fatalf("pending approval: %v %v", aps, err)
	}
	if err := e.hub.SyncApproval(ctx, run, ap["id"].(string)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: aps[0].ID, Approved: false, By: e.user.ID, Comment: "no"}); err != nil {
		t.Fatal(err)
	}
	if err := e.hub.SyncApproval(ctx, run, aps[0].ID); err != nil {
		t.Fatal(err)
	}
	f = expect[*protocol.ApprovalFrame](c)
	if f.RunID != run || f.ApprovalID != aps[0].ID || f.Approved {
		t.Fatalf("rejection frame: %+v", f)
	}
	c.expectAssign(e.runOn(nil))
}

// Resync (signals were lost) pushes what Sync would for every run held
// here, and an approval granted meanwhile.
func TestResync(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("both", 2)
	ctx := context.Background()
	a1, ap := requestApproval(t, e, c)
	run2 := e.runOn(nil)
	a2 := c.expectAssign(run2)
	c.start(a2)
	if _, err := e.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: ap["id"].(string), Approved: true, By: e.user.ID}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.st.RunCancel(ctx, run2); err != nil {
		t.Fatal(err)
	}
	if err := e.hub.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	got := map[string]protocol.Frame{}
	for range 2 {
		f := c.recv()
		switch f := f.(type) {
		case *protocol.ApprovalFrame:
			got["approval "+f.RunID] = f
		case *protocol.Cancel:
			got["cancel "+f.RunID] = f
		}
	}
	if got["approval "+a1.RunID] == nil || got["cancel "+run2] == nil {
		t.Fatalf("after resync: %v", got)
	}
}

// The maintenance loop of a replica that does not lead does nothing; once
// it leads, it reaps, and tells its peers about the run it reaped; the hub
// whose agent held the run, told by Sync, tells the agent to stop and frees
// its slot.
func TestReaperLeadership(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("held", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)

	p := aheadReplica(t, e)
	p.mu.Lock()
	p.asked = 0
	p.mu.Unlock()
	p.until(t, "three sweeps of a follower", func() bool { return p.asked >= 3 })
	if r := e.run(run); r.Status != protocol.RunRunning {
		t.Fatalf("a follower reaped: %s", r.Status)
	}
	p.leadUntilReaped(t, e, run)
	if err := e.hub.Sync(context.Background(), run); err != nil {
		t.Fatal(err)
	}
	if f := c.expectCancel(run); f.Reason != protocol.ReasonAgentLost {
		t.Fatalf("cancel reason %q", f.Reason)
	}
	c.expectAssign(e.runOn(nil))
}

// An event about a run whose lease another replica's maintenance expired,
// sent while this hub still holds the run (before the cluster's signal
// arrives): lease_lost, as when the lease expired here, and the slot comes
// back.
func TestLeaseLostWhileStillHeld(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	c, _ := e.connect("held", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)

	aheadReplica(t, e).leadUntilReaped(t, e, run)
	c.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	c.expectError(protocol.CodeConflict, protocol.ReasonLeaseLost)
	c.expectAssign(e.runOn(nil))
}

// aheadReplica starts another replica, a follower whose clock is an hour
// ahead: to it, every lease has expired.
func aheadReplica(t *testing.T, e *env) *peers {
	t.Helper()
	p := newPeers()
	var skew atomic.Int64
	otherReplica(t, e, p, &skew)
	skew.Store(int64(time.Hour))
	return p
}

// leadUntilReaped makes the other replica lead and waits until its
// maintenance ended run (agent_lost). Nobody tells this env's hub, which
// still holds the run.
func (p *peers) leadUntilReaped(t *testing.T, e *env, run string) {
	t.Helper()
	p.mu.Lock()
	p.leader = true
	p.mu.Unlock()
	p.until(t, "the run reaped by the leader", func() bool {
		for _, r := range p.reaped {
			if r.ID == run {
				return true
			}
		}
		return false
	})
	e.agentLost(run)
	if !e.hub.Holds(run) {
		t.Fatal("this hub does not know yet: it holds the run")
	}
}
