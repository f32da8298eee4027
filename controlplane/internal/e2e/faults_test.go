package e2e

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
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
	t.Logf("the run failed %s after the agent was killed (lease %s)", took.Round(time.Millisecond), lease)
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
// Then again with a screenshot due while the server is down.
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

	// Killed again while a screenshot is due: its upload fails while the
	// server is down and is retried; the run reports finished only once
	// the file is stored.
	shot := d.workflow(t, token, "screenshot", map[string]any{"version": 1, "timeoutMs": 120_000, "variables": []any{}, "steps": []any{
		map[string]any{"type": "navigate", "url": site.URL + "/widgets.html"},
		map[string]any{"type": "sleep", "ms": 1000},
		map[string]any{"type": "screenshot", "name": "page"},
	}})
	id = d.runWorkflow(t, token, shot, nil)
	d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
	d.p.kill(t)
	eventually(t, 60*time.Second, "the agent failed to upload the screenshot while copelfd was down", func() (bool, string) {
		return ag.logContains("artifact upload failed", id), ""
	})
	d.start(t)
	run = d.waitRun(t, token, id, 90*time.Second)
	if run["status"] != "succeeded" || run["attempt"] != float64(1) {
		t.Fatalf("run after the second restart: %v", run)
	}
	chargedOnce(t, d.server, token, run)
	if res, body := d.raw(t, "GET", "/v1/runs/"+id+"/artifacts/page.png", token); res.StatusCode != 200 || !bytes.HasPrefix(body, []byte("\x89PNG")) {
		t.Errorf("screenshot uploaded after the restart: %d, %d bytes", res.StatusCode, len(body))
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
	took := time.Since(start)
	t.Logf("the two short runs took %s", took.Round(time.Millisecond))
	if took > lease {
		t.Errorf("the two short runs took %s", took)
	}
	if ag2.logContains("rejecting run") {
		t.Errorf("the server pushed runs to the restarted agent beyond its slots")
	}
}

// TestNetworkCut: both processes stay up while the connection between them
// is cut (a proxy in between). What was decided while the agent was away
// reaches it when it reconnects: an approval (the run goes on), a rejection
// (the agent drops the run and takes the next one at once), a cancel (the
// run ends cancelled, before the server's cancel grace).
func TestNetworkCut(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	const lease = 20 * time.Second
	d := startDaemon(t, "-lease-timeout", lease.String())
	_, token, agentToken := d.account(t, 10)
	px := startProxy(t, strings.TrimPrefix(d.URL, "http://"))
	ag := startAgent(t, &server{URL: px.URL()}, token, agentToken)

	cut := func() {
		t.Helper()
		px.cut()
		eventually(t, 30*time.Second, "agent cut off", func() (bool, string) {
			return !agentListed(t, d.server, token, ag.clientID), ""
		})
	}
	resolve := func(runID, action string) {
		t.Helper()
		for _, a := range d.call(t, "GET", "/v1/approvals?status=pending", token, nil, 200)["items"].([]any) {
			if a := a.(map[string]any); a["runId"] == runID {
				d.call(t, "POST", "/v1/approvals/"+a["id"].(string)+"/"+action, token, map[string]any{}, 200)
				return
			}
		}
		t.Fatalf("no pending approval for run %s", runID)
	}
	awaiting := func(r map[string]any) bool { return r["status"] == "awaiting_approval" }
	approval := d.workflow(t, token, "approval", map[string]any{"version": 1, "timeoutMs": 120_000, "variables": []any{}, "steps": []any{
		map[string]any{"type": "navigate", "url": site.URL + "/widgets.html"},
		map[string]any{"type": "approval", "message": "Continue?"},
		map[string]any{"type": "extract", "selector": "#title", "output": "title"},
	}})

	t.Run("approve", func(t *testing.T) {
		id := d.runWorkflow(t, token, approval, nil)
		d.waitRunWhere(t, token, id, "awaiting approval", 60*time.Second, awaiting)
		cut()
		resolve(id, "approve")
		px.restore()
		run := d.waitRun(t, token, id, 60*time.Second)
		if run["status"] != "succeeded" || run["outputs"].(map[string]any)["title"] != "Widgets" {
			t.Fatalf("run approved while its agent was away: %v", run)
		}
		chargedOnce(t, d.server, token, run)
	})

	t.Run("reject", func(t *testing.T) {
		id := d.runWorkflow(t, token, approval, nil)
		d.waitRunWhere(t, token, id, "awaiting approval", 60*time.Second, awaiting)
		cut()
		resolve(id, "reject")
		run := d.waitRun(t, token, id, 10*time.Second)
		if code, reason := runError(run); run["status"] != "failed" || code != "forbidden" || reason != "approval_rejected" {
			t.Fatalf("run rejected while its agent was away: %v", run)
		}
		// The next run waits for the agent, which, on reconnecting, still
		// stops the rejected one: the next run must not wait for long.
		next := d.runWorkflow(t, token, d.workflow(t, token, "short", sleepyDefinition(site.URL, 200)), nil)
		px.restore()
		restored := time.Now()
		if run := d.waitRun(t, token, next, 60*time.Second); run["status"] != "succeeded" {
			t.Fatalf("the next run: %v", run)
		}
		took := time.Since(restored)
		t.Logf("the next run ended %s after the agent came back", took.Round(time.Millisecond))
		if took > lease/2 {
			t.Errorf("the next run ended %s after the agent came back", took)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		id := d.runWorkflow(t, token, d.workflow(t, token, "long", sleepyDefinition(site.URL, 60_000)), nil)
		d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
		cut()
		d.call(t, "POST", "/v1/runs/"+id+"/cancel", token, nil, 200)
		px.restore()
		restored := time.Now()
		run := d.waitRun(t, token, id, 60*time.Second)
		if run["status"] != "cancelled" {
			t.Fatalf("run cancelled while its agent was away: %v", run)
		}
		took := time.Since(restored)
		t.Logf("the run was cancelled %s after the agent came back", took.Round(time.Millisecond))
		if took > lease/2 {
			t.Errorf("the run was cancelled %s after the agent came back (the server's grace is %s)", took, lease)
		}
		chargedOnce(t, d.server, token, run)
	})
}
