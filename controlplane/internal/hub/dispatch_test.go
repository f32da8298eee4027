package hub_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// queueReason is a queued run's queue.reason as GET /v1/runs/{id} shows it.
func (e *env) queueReason(runID string) string {
	e.t.Helper()
	r := e.get("/v1/runs/" + runID)
	if r["status"] != string(protocol.RunQueued) {
		e.t.Fatalf("run %s is %v, not queued", runID, r["status"])
	}
	q, _ := r["queue"].(map[string]any)
	reason, _ := q["reason"].(string)
	return reason
}

// unclaimed checks that a run is queued and held by no agent.
func (e *env) unclaimed(runID string) {
	e.t.Helper()
	if r := e.run(runID); r.Status != protocol.RunQueued || r.LeaseID != "" || r.AgentID != "" {
		e.t.Fatalf("run %s: %s, lease %q, agent %q; want queued and unclaimed", runID, r.Status, r.LeaseID, r.AgentID)
	}
}

func TestDispatchQueuedBeforeAgentConnects(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	run := e.runOn(nil)
	if got := e.queueReason(run); got != string(protocol.QueueNoAgentConnected) {
		t.Fatalf("queue.reason %q", got)
	}
	c, w := e.connect("late", 1)
	a := c.expectAssign(run)
	if r := e.run(run); r.AgentID != w.AgentID || r.LeaseID != a.LeaseID || r.Attempt != 1 {
		t.Fatalf("stored claim: agent %q lease %q attempt %d", r.AgentID, r.LeaseID, r.Attempt)
	}
	c.start(a)
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// slots=2: two assigns; the third run waits (agents_busy) until a finished
// run gives a slot back.
func TestDispatchSlots(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("two-slots", 2)
	r1, r2 := e.runOn(nil), e.runOn(nil)
	a1, a2 := c.expectAssign(r1), c.expectAssign(r2)
	r3 := e.runOn(nil)
	c.start(a1)
	c.start(a2)
	c.sync()
	c.quiet()
	e.unclaimed(r3)
	if got := e.queueReason(r3); got != string(protocol.QueueAgentsBusy) {
		t.Fatalf("queue.reason %q, want agents_busy", got)
	}
	if ag := e.hub.Agents(e.user.ID); len(ag) != 1 || ag[0].FreeSlots != 0 || len(ag[0].ActiveRuns) != 2 {
		t.Fatalf("agents: %+v", ag)
	}
	c.finish(a2, protocol.RunSucceeded)
	a3 := c.expectAssign(r3)
	c.start(a3)
	c.finish(a1, protocol.RunSucceeded)
	c.finish(a3, protocol.RunSucceeded)
	for _, id := range []string{r1, r2, r3} {
		e.waitStatus(id, protocol.RunSucceeded)
	}
	e.credits(e.account, 97, 0)
}

// ready{0} pauses dispatch to an agent; ready{n} resumes it.
func TestDispatchReadyPausesAndResumes(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("pausable", 1)
	c.send(&protocol.Ready{Slots: 0})
	c.sync()
	run := e.runOn(nil)
	c.sync()
	c.quiet()
	e.unclaimed(run)
	if got := e.queueReason(run); got != string(protocol.QueueAgentsBusy) {
		t.Fatalf("queue.reason %q, want agents_busy", got)
	}
	c.send(&protocol.Ready{Slots: 3})
	a := c.expectAssign(run)
	if a.Attempt != 1 {
		t.Fatalf("attempt %d", a.Attempt)
	}
	// ready sets the free count outright: three, minus the one assigned.
	if ag := e.hub.Agents(e.user.ID); len(ag) != 1 || ag[0].FreeSlots != 2 {
		t.Fatalf("agents: %+v", ag)
	}
	c.start(a)
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// A run with labels goes only to an agent that has them.
func TestDispatchLabels(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	h := e.hello("linux", 2)
	h.Agent.Labels = map[string]string{"os": "linux"}
	linux, _ := e.connectWith(h)

	gpu := e.runOn(map[string]any{"labels": map[string]string{"gpu": "1"}})
	plain := e.runOn(map[string]any{"labels": map[string]string{"os": "linux"}})
	linux.expectAssign(plain)
	linux.sync()
	linux.quiet()
	e.unclaimed(gpu)
	if got := e.queueReason(gpu); got != string(protocol.QueueNoMatchingAgent) {
		t.Fatalf("queue.reason %q, want no_matching_agent", got)
	}

	h = e.hello("gpu-box", 1)
	h.Agent.Labels = map[string]string{"gpu": "1", "os": "linux"}
	box, _ := e.connectWith(h)
	a := box.expectAssign(gpu)
	box.start(a)
	box.finish(a, protocol.RunSucceeded)
	e.waitStatus(gpu, protocol.RunSucceeded)
	linux.quiet()
}

func TestQueueReasons(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	first := e.runOn(nil)
	if got := e.queueReason(first); got != string(protocol.QueueNoAgentConnected) {
		t.Fatalf("no agent: %q", got)
	}
	c, _ := e.connect("busy", 1)
	a := c.expectAssign(first)
	c.start(a)
	second := e.runOn(nil)
	if got := e.queueReason(second); got != string(protocol.QueueAgentsBusy) {
		t.Fatalf("all busy: %q", got)
	}
	// The queue reason of GET /v1/runs?status=queued is live too.
	list := e.get("/v1/runs?status=queued")
	items, _ := list["items"].([]any)
	if len(items) != 1 || items[0].(map[string]any)["queue"].(map[string]any)["reason"] != string(protocol.QueueAgentsBusy) {
		t.Fatalf("list: %v", list)
	}
	c.close()
	// The agent is gone: once the hub has unregistered it, nobody is connected.
	e.waitFor("unregistered", func() bool { return len(e.hub.Agents(e.user.ID)) == 0 })
	if got := e.queueReason(second); got != string(protocol.QueueNoAgentConnected) {
		t.Fatalf("agent gone: %q", got)
	}
}

// A batch dispatches at most concurrency runs at a time and completes.
func TestDispatchBatchConcurrency(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("wide", 8)
	wf := e.workflow()
	iters := make([]map[string]any, 5)
	for i := range iters {
		iters[i] = map[string]any{"inputs": map[string]any{"q": fmt.Sprint(i)}}
	}
	b := e.post("/v1/workflows/"+wf+"/batches", map[string]any{"iterations": iters, "concurrency": 2})
	id := b["id"].(string)
	e.post("/v1/batches/"+id+"/start", nil)

	seen := map[int]bool{}
	take := func() *protocol.Assign {
		t.Helper()
		a := c.expectAssign("")
		if a.BatchID != id || a.Iteration == nil || seen[*a.Iteration] || a.Inputs["q"] != fmt.Sprint(*a.Iteration) {
			t.Fatalf("assign: %+v", a)
		}
		seen[*a.Iteration] = true
		return a
	}
	// Both assigns come at once; then each finished run lets one more in.
	active := []*protocol.Assign{take(), take()}
	c.start(active[0])
	c.start(active[1])
	for len(active) > 0 {
		c.sync()
		c.quiet() // a third assign would be waiting here
		c.finish(active[0], protocol.RunSucceeded)
		active = active[1:]
		// One run finished, one slot of the batch is free.
		if len(seen) < len(iters) {
			a := take()
			c.start(a)
			active = append(active, a)
		}
	}
	got := e.get("/v1/batches/" + id)
	if got["status"] != string(protocol.BatchCompleted) {
		t.Fatalf("batch: %v", got)
	}
	e.credits(e.account, 95, 0)
}

// Twenty agents of one account race for one run: exactly one assign, and
// the run starts once.
func TestDispatchTwentyAgentsOneRun(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	run := e.runOn(nil)

	// Dial all, then send every hello at once.
	conns := make([]*websocket.Conn, 20)
	for i := range conns {
		ws, _, err := e.dial(nil)
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = ws
	}
	clients := make([]*client, len(conns))
	for i, ws := range conns {
		clients[i] = e.wrap(ws)
	}
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for i, c := range clients {
		data, _ := protocol.EncodeFrame(e.hello(fmt.Sprintf("racer-%02d", i), 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	byAgent := map[string]*client{}
	for _, c := range clients {
		// The welcome is the first frame, whatever the dispatcher does meanwhile.
		w := expect[*protocol.Welcome](c)
		byAgent[w.AgentID] = c
	}
	r := e.waitRun(run, "claimed", func(r *store.Run) bool { return r.LeaseID != "" })
	winner := byAgent[r.AgentID]
	if winner == nil {
		t.Fatalf("claimed by unknown agent %q", r.AgentID)
	}
	a := winner.expectAssign(run)
	winner.start(a)
	// A second accept of the same lease changes nothing.
	winner.send(&protocol.Accept{RunID: a.RunID, LeaseID: a.LeaseID})
	winner.reportAcked(a.RunID, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	winner.finish(a, protocol.RunSucceeded)
	for _, c := range clients {
		c.sync()
		c.quiet()
	}
	got := e.waitStatus(run, protocol.RunSucceeded)
	if got.Attempt != 1 {
		t.Fatalf("attempt %d", got.Attempt)
	}
	if ch, rf := e.charges(e.account, run); ch != 1 || rf != 0 {
		t.Fatalf("charges %d, refunds %d", ch, rf)
	}
	hist, err := e.st.RunEventList(context.Background(), run)
	if err != nil {
		t.Fatal(err)
	}
	started := 0
	for _, ev := range hist {
		if ev.Kind == string(protocol.EventStarted) {
			started++
		}
	}
	if started != 1 || len(hist) != 3 {
		t.Fatalf("history: %d events, %d started", len(hist), started)
	}
	e.credits(e.account, 99, 0)
}

// Twenty agents connect at once while twenty runs wait: the welcome always
// comes first, and every run is assigned exactly once.
func TestDispatchManyAgentsManyRuns(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	runs := map[string]bool{}
	for range 20 {
		runs[e.runOn(nil)] = false
	}
	clients := make([]*client, 20)
	for i := range clients {
		clients[i] = e.open()
	}
	var wg sync.WaitGroup
	for i, c := range clients {
		data, _ := protocol.EncodeFrame(e.hello(fmt.Sprintf("many-%02d", i), 1))
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.ws.WriteMessage(websocket.TextMessage, data)
		}()
	}
	wg.Wait()
	for _, c := range clients {
		expect[*protocol.Welcome](c)
	}
	for _, c := range clients {
		a := c.expectAssign("")
		if got, ok := runs[a.RunID]; !ok || got {
			t.Fatalf("assign of %s: known %v, assigned before %v", a.RunID, ok, got)
		}
		runs[a.RunID] = true
	}
	for _, c := range clients {
		c.sync()
		c.quiet()
	}
}

// Runs no connected agent can take do not hold up the ones behind them.
func TestDispatchUnmatchedRunsDoNotBlockTheQueue(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	for range 40 {
		e.runOn(map[string]any{"labels": map[string]string{"gpu": "1"}})
	}
	plain := e.runOn(nil)
	c, _ := e.connect("cpu-only", 1)
	a := c.expectAssign(plain)
	c.start(a)
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(plain, protocol.RunSucceeded)
}

// Slots planned for batch runs that the batch's concurrency then refused go
// to the runs behind them in the same dispatch, not at the next sweep.
func TestDispatchBatchLimitLeavesSlotsToOthers(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second, SweepInterval: time.Hour})
	wf := e.workflow()
	iters := make([]map[string]any, 6)
	for i := range iters {
		iters[i] = map[string]any{"inputs": map[string]any{"q": fmt.Sprint(i)}}
	}
	b := e.post("/v1/workflows/"+wf+"/batches", map[string]any{"iterations": iters, "concurrency": 2})
	e.post("/v1/batches/"+b["id"].(string)+"/start", nil)
	plain := e.runOn(nil)
	c, _ := e.connect("four", 4)
	got := map[string]bool{}
	batch := 0
	for range 3 {
		a := c.expectAssign("")
		got[a.RunID] = true
		if a.BatchID != "" {
			batch++
		}
	}
	if !got[plain] || batch != 2 {
		t.Fatalf("assigned %v (batch runs %d), want the plain run and two of the batch", got, batch)
	}
	c.sync()
	c.quiet()
}
