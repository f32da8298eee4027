package e2e

import (
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"
)

// TestAgentKilled: an agent SIGKILLed mid-run loses its lease; the run fails
// with internal/agent_lost within the lease and costs nothing.
func TestAgentKilled(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	const lease = 2 * time.Second
	d := startDaemon(t, "-lease-timeout", lease.String())
	_, token, agentToken := d.account(t, 10)
	ag := startAgent(t, d.server, token, agentToken)
	before := d.credits(t, token)

	wf := d.workflow(t, token, "long", sleepyDefinition(site.URL, 60_000))
	id := d.runWorkflow(t, token, wf, nil)
	d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
	if c := d.credits(t, token); c.Balance != before.Balance-1 || c.Held != 0 {
		t.Errorf("credits of the running run: %+v (before %+v)", c, before)
	}
	ag.kill(t)
	killed := time.Now()

	run := d.waitRun(t, token, id, 30*time.Second)
	took := time.Since(killed)
	if code, reason := runError(run); run["status"] != "failed" || code != "internal" || reason != "agent_lost" {
		t.Fatalf("run after its agent was killed: %v", run)
	}
	// The lease, plus the reaper's sweep and polling, with room for a
	// loaded machine.
	if took > lease+5*time.Second {
		t.Errorf("the run failed %s after the agent was killed (lease %s)", took, lease)
	}
	refunded(t, d.server, token, run)
	if c := d.credits(t, token); c != before {
		t.Errorf("credits after the run: %+v, want %+v", c, before)
	}
	eventually(t, 30*time.Second, "killed agent gone from /v1/agents", func() (bool, string) {
		return !agentListed(t, d.server, token, ag.clientID), ""
	})
}

// TestControlPlaneKilled: copelfd SIGKILLed mid-run and started again on the
// same database and port; the agent reconnects by itself, resends the
// events the dead server never acknowledged, and the run succeeds once.
func TestControlPlaneKilled(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	d := startDaemon(t, "-lease-timeout", "15s")
	_, token, agentToken := d.account(t, 10)
	ag := startAgent(t, d.server, token, agentToken)
	before := d.credits(t, token)

	wf := d.workflow(t, token, "long", sleepyDefinition(site.URL, 1500))
	id := d.runWorkflow(t, token, wf, map[string]any{})
	d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
	d.p.kill(t)
	// The run ends on the agent while no server is there: its last events
	// (step 1 finished, step 2, finished) wait in the outbox.
	eventually(t, 60*time.Second, "agent finished the run while copelfd was down", func() (bool, string) {
		return ag.logContains(`msg="run finished"`, id), ""
	})
	d.start(t)

	run := d.waitRun(t, token, id, 60*time.Second)
	if run["status"] != "succeeded" || run["attempt"] != float64(1) || run["outputs"].(map[string]any)["title"] != "Widgets" {
		t.Fatalf("run after the control plane restart: %v", run)
	}
	for i, s := range run["steps"].([]any) {
		if st := s.(map[string]any); st["status"] != "succeeded" || st["durationMs"] == nil {
			t.Errorf("step %d: %v", i, st)
		}
	}
	chargedOnce(t, d.server, token, run)
	if c := d.credits(t, token); c.Balance != before.Balance-1 || c.Held != 0 {
		t.Errorf("credits: %+v (before %+v)", c, before)
	}
	if !agentListed(t, d.server, token, ag.clientID) {
		t.Errorf("the agent is not connected to the restarted control plane")
	}

	// The agent takes new runs from the restarted server.
	id = d.runWorkflow(t, token, wf, nil)
	if run := d.waitRun(t, token, id, 60*time.Second); run["status"] != "succeeded" {
		t.Fatalf("a run after the restart: %v", run)
	}
}

// TestBrowserKilled: the agent's Chromium SIGKILLed mid-run fails the run
// with internal/browser_crashed, at no cost; the next run on the same agent
// gets a fresh browser and succeeds.
func TestBrowserKilled(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	d := startDaemon(t)
	_, token, agentToken := d.account(t, 10)
	ag := startAgent(t, d.server, token, agentToken)
	before := d.credits(t, token)

	wf := d.workflow(t, token, "long", sleepyDefinition(site.URL, 60_000))
	id := d.runWorkflow(t, token, wf, nil)
	d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
	old := chromiumChildren(ag.pid())
	if len(old) == 0 {
		t.Fatal("no Chromium process under the agent")
	}
	if len(using(ag.tmp)) == 0 {
		t.Fatal("the agent's Chromium does not keep its profile under the agent's TMPDIR: a killed agent's helpers would outlive the test")
	}
	for _, pid := range old {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}

	run := d.waitRun(t, token, id, 30*time.Second)
	if code, reason := runError(run); run["status"] != "failed" || code != "internal" || reason != "browser_crashed" {
		t.Fatalf("run after Chromium was killed: %v", run)
	}
	refunded(t, d.server, token, run)
	if c := d.credits(t, token); c != before {
		t.Errorf("credits after the run: %+v, want %+v", c, before)
	}

	next := d.workflow(t, token, "sample", sampleWorkflow(t, site.URL, "login-search.json"))
	id = d.runWorkflow(t, token, next, map[string]any{"username": "ada", "password": "hunter2"})
	run = d.waitRun(t, token, id, 90*time.Second)
	if run["status"] != "succeeded" || run["outputs"].(map[string]any)["firstResult"] != "chromium" {
		t.Fatalf("the next run: %v", run)
	}
	if ag.exited() {
		t.Fatal("the agent exited")
	}
	now := chromiumChildren(ag.pid())
	if len(now) == 0 || slices.ContainsFunc(now, func(pid int) bool { return slices.Contains(old, pid) }) {
		t.Errorf("Chromium processes before the kill %v, after the next run %v: want a new one", old, now)
	}
}

// TestAgentRestarted: an agent SIGKILLed mid-run and started again with the
// same id before its lease ran out. The server still lists the old run for
// it; the new process does not know it, so the lease expires (agent_lost).
// The slot that lease held is not given back a second time: the restarted
// agent is never pushed more runs than it has slots.
func TestAgentRestarted(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	const lease = 8 * time.Second
	d := startDaemon(t, "-lease-timeout", lease.String())
	_, token, agentToken := d.account(t, 10)
	ag := startAgent(t, d.server, token, agentToken)

	long := d.workflow(t, token, "long", sleepyDefinition(site.URL, 60_000))
	lost := d.runWorkflow(t, token, long, nil)
	d.waitRunWhere(t, token, lost, "sleeping", 60*time.Second, stepRunning(1))
	ag.kill(t)
	ag2 := startAgent(t, d.server, token, agentToken, "-id", ag.clientID)
	if run := d.call(t, "GET", "/v1/runs/"+lost, token, nil, 200); run["status"] != "running" {
		t.Fatalf("the restarted agent reconnected after the lease: %v", run)
	}
	run := d.waitRun(t, token, lost, 60*time.Second)
	if code, reason := runError(run); run["status"] != "failed" || code != "internal" || reason != "agent_lost" {
		t.Fatalf("the run of the killed agent: %v", run)
	}
	refunded(t, d.server, token, run)
	for _, a := range d.call(t, "GET", "/v1/agents", token, nil, 200)["items"].([]any) {
		if a := a.(map[string]any); a["freeSlots"] != a["slots"] {
			t.Errorf("idle agent after the lost lease: %v", a)
		}
	}

	// Two runs for the one slot: they run one after the other.
	start := time.Now()
	var ids []string
	for i := range 2 {
		wf := d.workflow(t, token, fmt.Sprint("short ", i), sleepyDefinition(site.URL, 1000))
		ids = append(ids, d.runWorkflow(t, token, wf, nil))
	}
	for _, id := range ids {
		if run := d.waitRun(t, token, id, 90*time.Second); run["status"] != "succeeded" || run["attempt"] != float64(1) {
			t.Errorf("run %s: %v", id, run)
		}
	}
	// Each run sleeps a second; a run refused by the busy agent would wait
	// out the refusal (a lease) first.
	if took := time.Since(start); took > lease {
		t.Errorf("the two short runs took %s", took)
	}
	if ag2.logContains("rejecting run") {
		t.Errorf("the server pushed runs to the restarted agent beyond its slots")
	}
}
