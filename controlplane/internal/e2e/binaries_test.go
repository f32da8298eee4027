package e2e

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fixtureSite serves testdata/site on 127.0.0.1.
func fixtureSite(t *testing.T) *httptest.Server {
	t.Helper()
	site := httptest.NewServer(http.FileServer(http.Dir(filepath.Join(repoRoot(t), "testdata", "site"))))
	t.Cleanup(site.Close)
	return site
}

// sampleWorkflow reads testdata/workflows/<name> with the placeholder origin
// replaced by the fixture site's.
func sampleWorkflow(t *testing.T, siteURL, name string) json.RawMessage {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot(t), "testdata", "workflows", name))
	if err != nil {
		t.Fatal(err)
	}
	return json.RawMessage(bytes.ReplaceAll(raw, []byte("http://127.0.0.1:0/"), []byte(siteURL+"/")))
}

// sleepyDefinition opens the widgets page, sleeps ms (step 1) and extracts
// the page title: long enough for something to happen mid-run.
func sleepyDefinition(siteURL string, ms int64) map[string]any {
	return map[string]any{
		"version": 1, "timeoutMs": ms + 120_000, "variables": []any{},
		"steps": []any{
			map[string]any{"type": "navigate", "url": siteURL + "/widgets.html"},
			map[string]any{"type": "sleep", "ms": ms, "timeoutMs": ms + 60_000},
			map[string]any{"type": "extract", "selector": "#title", "output": "title"},
		},
	}
}

// chargedOnce checks that the run was charged exactly once: one ledger entry
// for it, a run_charge of −1, and cost.charged 1.
func chargedOnce(t *testing.T, s *server, token string, run map[string]any) {
	t.Helper()
	entries := s.ledger(t, token, run["id"].(string))
	if len(entries) != 1 || entries[0]["kind"] != "run_charge" || entries[0]["amount"] != float64(-1) {
		t.Errorf("ledger of run %s: %v, want one run_charge of -1", run["id"], entries)
	}
	if cost := run["cost"].(map[string]any); cost["charged"] != float64(1) {
		t.Errorf("run %s cost: %v, want charged 1", run["id"], cost)
	}
}

// refunded checks that a run that started and ended by a failure of the
// system was charged and refunded: its ledger entries sum to zero.
func refunded(t *testing.T, s *server, token string, run map[string]any) {
	t.Helper()
	entries := s.ledger(t, token, run["id"].(string))
	var sum float64
	kinds := map[string]int{}
	for _, e := range entries {
		sum += e["amount"].(float64)
		kinds[e["kind"].(string)]++
	}
	if sum != 0 || kinds["run_charge"] != 1 || kinds["run_refund"] != 1 {
		t.Errorf("ledger of run %s: %v, want one run_charge and one run_refund", run["id"], entries)
	}
	if cost := run["cost"].(map[string]any); cost["charged"] != float64(0) {
		t.Errorf("run %s cost: %v, want charged 0", run["id"], cost)
	}
}

// TestBinaries runs copelfd and copelf-agent as built binaries, one of each
// for every subtest: the sample workflow end to end, approvals, cancel, a
// batch, and last a graceful stop of both.
func TestBinaries(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	d := startDaemon(t)
	_, token, agentToken := d.account(t, 100)
	ag := startAgent(t, d.server, token, agentToken, "-slots", "2")

	t.Run("sample", func(t *testing.T) {
		wf := d.workflow(t, token, "login and search", sampleWorkflow(t, site.URL, "login-search.json"))
		before := d.credits(t, token)
		id := d.runWorkflow(t, token, wf, map[string]any{"username": "ada", "password": "hunter2"})
		run := d.waitRun(t, token, id, 90*time.Second)
		if run["status"] != "succeeded" {
			t.Fatalf("run: %v", run)
		}
		if out := run["outputs"].(map[string]any); len(out) != 1 || out["firstResult"] != "chromium" {
			t.Errorf("outputs: %v", out)
		}
		if run["attempt"] != float64(1) || run["agentId"] == nil || run["startedAt"] == nil || run["finishedAt"] == nil {
			t.Errorf("run: %v", run)
		}
		if in := run["inputs"].(map[string]any); in["password"] != "[redacted]" || in["username"] != "ada" || in["query"] != "chrom" {
			t.Errorf("inputs: %v", in)
		}
		steps := run["steps"].([]any)
		if len(steps) != 9 {
			t.Fatalf("steps: %v", steps)
		}
		for i, s := range steps {
			st := s.(map[string]any)
			if st["index"] != float64(i) || st["status"] != "succeeded" || st["startedAt"] == nil {
				t.Errorf("step %d: %v", i, st)
			}
			if ms, ok := st["durationMs"].(float64); !ok || ms < 0 {
				t.Errorf("step %d durationMs: %v", i, st)
			}
		}
		if raw, _ := json.Marshal(run); bytes.Contains(raw, []byte("hunter2")) {
			t.Errorf("the secret shows in the run: %s", raw)
		}

		list := d.call(t, "GET", "/v1/runs/"+id+"/artifacts", token, nil, 200)["items"].([]any)
		if len(list) != 1 || list[0].(map[string]any)["name"] != "results.png" {
			t.Fatalf("artifacts: %v", list)
		}
		res, body := d.raw(t, "GET", "/v1/runs/"+id+"/artifacts/results.png", token)
		if res.StatusCode != 200 || res.Header.Get("Content-Type") != "image/png" || !bytes.HasPrefix(body, []byte("\x89PNG\r\n\x1a\n")) {
			t.Errorf("artifact: %d %s, %d bytes", res.StatusCode, res.Header.Get("Content-Type"), len(body))
		}
		if sz := list[0].(map[string]any)["size"]; sz != float64(len(body)) {
			t.Errorf("artifact size %v, downloaded %d bytes", sz, len(body))
		}

		chargedOnce(t, d.server, token, run)
		if after := d.credits(t, token); after.Balance != before.Balance-1 || after.Held != 0 || after.Available != after.Balance {
			t.Errorf("credits before %+v, after %+v", before, after)
		}
	})

	t.Run("approvals", func(t *testing.T) {
		def := map[string]any{"version": 1, "timeoutMs": 120_000, "variables": []any{}, "steps": []any{
			map[string]any{"type": "navigate", "url": site.URL + "/widgets.html"},
			map[string]any{"type": "approval", "message": "Continue run {{run.id}}?"},
			map[string]any{"type": "extract", "selector": "#title", "output": "title"},
		}}
		wf := d.workflow(t, token, "approval", def)
		pending := func(runID string) map[string]any {
			t.Helper()
			d.waitRunWhere(t, token, runID, "awaiting approval", 60*time.Second, func(r map[string]any) bool { return r["status"] == "awaiting_approval" })
			for _, it := range d.call(t, "GET", "/v1/approvals?status=pending", token, nil, 200)["items"].([]any) {
				if a := it.(map[string]any); a["runId"] == runID {
					if a["status"] != "pending" || a["step"] != float64(1) || a["message"] != "Continue run "+runID+"?" || a["workflowId"] != wf {
						t.Errorf("approval: %v", a)
					}
					return a
				}
			}
			t.Fatalf("no pending approval for run %s", runID)
			return nil
		}

		id := d.runWorkflow(t, token, wf, nil)
		apr := pending(id)
		got := d.call(t, "POST", "/v1/approvals/"+apr["id"].(string)+"/approve", token, map[string]any{"comment": "go"}, 200)
		if got["status"] != "approved" {
			t.Errorf("approve: %v", got)
		}
		if e := d.call(t, "POST", "/v1/approvals/"+apr["id"].(string)+"/reject", token, map[string]any{}, 409); e["code"] != "conflict" {
			t.Errorf("resolving twice: %v", e)
		}
		run := d.waitRun(t, token, id, 60*time.Second)
		if run["status"] != "succeeded" || run["outputs"].(map[string]any)["title"] != "Widgets" {
			t.Fatalf("approved run: %v", run)
		}
		if st := run["steps"].([]any)[1].(map[string]any); st["status"] != "succeeded" {
			t.Errorf("approval step: %v", st)
		}
		chargedOnce(t, d.server, token, run)

		id = d.runWorkflow(t, token, wf, nil)
		apr = pending(id)
		got = d.call(t, "POST", "/v1/approvals/"+apr["id"].(string)+"/reject", token, map[string]any{"comment": "no"}, 200)
		if got["status"] != "rejected" {
			t.Errorf("reject: %v", got)
		}
		run = d.waitRun(t, token, id, 60*time.Second)
		if code, reason := runError(run); run["status"] != "failed" || code != "forbidden" || reason != "approval_rejected" {
			t.Fatalf("rejected run: %v", run)
		}
		chargedOnce(t, d.server, token, run)
	})

	t.Run("cancel", func(t *testing.T) {
		wf := d.workflow(t, token, "cancel", sleepyDefinition(site.URL, 60_000))
		id := d.runWorkflow(t, token, wf, nil)
		d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
		start := time.Now()
		d.call(t, "POST", "/v1/runs/"+id+"/cancel", token, nil, 200)
		run := d.waitRun(t, token, id, 60*time.Second)
		if run["status"] != "cancelled" || run["error"] != nil {
			t.Fatalf("cancelled run: %v", run)
		}
		// The agent stopped it: the server would only end it itself after
		// the cancel grace (the 30 s lease).
		if took := time.Since(start); took > 20*time.Second {
			t.Errorf("the cancel took %s", took)
		}
		chargedOnce(t, d.server, token, run)
		if e := d.call(t, "POST", "/v1/runs/"+id+"/cancel", token, nil, 409); e["code"] != "conflict" {
			t.Errorf("cancelling a cancelled run: %v", e)
		}
	})

	// A run no agent can take (it needs a label the agent lacks) and that is
	// cancelled before it starts costs nothing: its hold is released and the
	// ledger has no entry for it, while the agent is connected.
	t.Run("cancel before start", func(t *testing.T) {
		wf := d.workflow(t, token, "never starts", sleepyDefinition(site.URL, 10))
		before := d.credits(t, token)
		queued := d.call(t, "POST", "/v1/workflows/"+wf+"/runs", token, map[string]any{"labels": map[string]any{"pool": "nowhere"}}, 201)
		id := queued["id"].(string)
		if got := d.call(t, "GET", "/v1/runs/"+id, token, nil, 200); got["status"] != "queued" || got["queue"].(map[string]any)["reason"] != "no_matching_agent" {
			t.Fatalf("run: %v", got)
		}
		if held := d.credits(t, token); held.Held != before.Held+1 {
			t.Errorf("credits while queued: %+v, before %+v", held, before)
		}
		run := d.call(t, "POST", "/v1/runs/"+id+"/cancel", token, nil, 200)
		if run["status"] != "cancelled" || run["cost"].(map[string]any)["charged"] != float64(0) {
			t.Fatalf("cancelled run: %v", run)
		}
		if after := d.credits(t, token); after != before {
			t.Errorf("credits after: %+v, before %+v", after, before)
		}
		if entries := d.ledger(t, token, id); len(entries) != 0 {
			t.Errorf("ledger of a run cancelled before it started: %v", entries)
		}
	})

	t.Run("batch", func(t *testing.T) {
		def := map[string]any{"version": 1, "timeoutMs": 120_000,
			"variables": []any{map[string]any{"name": "who", "type": "string", "required": true}},
			"steps": []any{
				map[string]any{"type": "navigate", "url": site.URL + "/login.html"},
				map[string]any{"type": "type", "selector": "#username", "text": "{{who}}"},
				map[string]any{"type": "type", "selector": "#password", "text": "pass{{iteration.index}}"},
				map[string]any{"type": "click", "selector": "#login"},
				map[string]any{"type": "waitFor", "selector": "#welcome", "state": "visible"},
				map[string]any{"type": "extract", "selector": "#welcome", "output": "greeting"},
			}}
		wf := d.workflow(t, token, "batch", def)
		who := []string{"ada", "bob", "cy"}
		var its []any
		for _, w := range who {
			its = append(its, map[string]any{"inputs": map[string]any{"who": w}})
		}
		b := d.call(t, "POST", "/v1/workflows/"+wf+"/batches", token, map[string]any{"iterations": its, "concurrency": 2}, 201)
		bid := b["id"].(string)
		if b["status"] != "created" || b["concurrency"] != float64(2) {
			t.Fatalf("batch: %v", b)
		}
		d.call(t, "POST", "/v1/batches/"+bid+"/start", token, nil, 200)
		eventually(t, 120*time.Second, "batch "+bid+" completed", func() (bool, string) {
			b = d.call(t, "GET", "/v1/batches/"+bid, token, nil, 200)
			active := 0
			for _, it := range b["iterations"].([]any) {
				if st := it.(map[string]any)["status"]; st == "running" || st == "awaiting_approval" {
					active++
				}
			}
			if active > 2 {
				t.Errorf("%d iterations run at once with concurrency 2: %v", active, b["iterations"])
			}
			return b["status"] == "completed", b["status"].(string)
		})
		for i, it := range b["iterations"].([]any) {
			if it := it.(map[string]any); it["status"] != "succeeded" || it["index"] != float64(i) || it["runId"] == nil {
				t.Errorf("iteration %d: %v", i, it)
			}
		}
		results := d.call(t, "GET", "/v1/batches/"+bid+"/results", token, nil, 200)["items"].([]any)
		if len(results) != len(who) {
			t.Fatalf("results: %v", results)
		}
		for i, r := range results {
			r := r.(map[string]any)
			if r["status"] != "succeeded" || r["outputs"].(map[string]any)["greeting"] != "Welcome, "+who[i]+"!" {
				t.Errorf("result %d: %v", i, r)
			}
			chargedOnce(t, d.server, token, d.call(t, "GET", "/v1/runs/"+r["runId"].(string), token, nil, 200))
		}
		if e := d.call(t, "POST", "/v1/batches/"+bid+"/start", token, nil, 409); e["code"] != "batch_already_completed" {
			t.Errorf("start again: %v", e)
		}
		if c := d.credits(t, token); c.Held != 0 {
			t.Errorf("credits after the batch: %+v", c)
		}
	})

	// Last: SIGTERM drains the agent (the run in flight finishes) and it
	// exits 0; then copelfd exits 0 on SIGTERM.
	t.Run("sigterm", func(t *testing.T) {
		wf := d.workflow(t, token, "drain", sleepyDefinition(site.URL, 1500))
		id := d.runWorkflow(t, token, wf, nil)
		d.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
		ag.signal(t, syscall.SIGTERM)
		if code := ag.wait(t, 60*time.Second); code != 0 {
			t.Errorf("copelf-agent exit status %d after SIGTERM, want 0", code)
		}
		if run := d.call(t, "GET", "/v1/runs/"+id, token, nil, 200); run["status"] != "succeeded" {
			t.Errorf("the run in flight when the agent was stopped: %v", run)
		}
		if !ag.logContains("agent drained") {
			t.Errorf("the agent did not say it drained")
		}
		eventually(t, 30*time.Second, "agent gone from /v1/agents", func() (bool, string) {
			return !agentListed(t, d.server, token, ag.clientID), ""
		})
		if left := using(ag.tmp); len(left) > 0 {
			t.Errorf("Chromium processes left by the agent: %v", left)
		}

		d.p.signal(t, syscall.SIGTERM)
		if code := d.p.wait(t, 60*time.Second); code != 0 {
			t.Errorf("copelfd exit status %d after SIGTERM, want 0", code)
		}
		// Nothing in this session was a failure of the server's.
		if raw, _ := os.ReadFile(d.p.log); bytes.Contains(raw, []byte("level=error")) {
			var errs []string
			for _, l := range strings.Split(string(raw), "\n") {
				if strings.Contains(l, "level=error") {
					errs = append(errs, l)
				}
			}
			t.Errorf("copelfd logged errors:\n%s", strings.Join(errs, "\n"))
		}
	})
}

// TestDevSample is `make run`: copelfd -dev seeds a demo account and the
// sample workflow over the fixture pages it serves itself (-dev-site), and
// writes the tokens to DATA_DIR/dev.env; an agent with that token runs the
// sample workflow.
func TestDevSample(t *testing.T) {
	chromium(t)
	d := startDaemon(t, "-dev", "-dev-site", filepath.Join(repoRoot(t), "testdata", "site"))
	raw, err := os.ReadFile(filepath.Join(d.dataDir, "dev.env"))
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		k, v, _ := strings.Cut(line, "=")
		env[k] = v
	}
	if env["COPELF_SERVER"] != d.URL {
		t.Errorf("dev.env: %v", env)
	}
	token, wf := env["COPELF_TOKEN"], env["COPELF_SAMPLE_WORKFLOW"]
	startAgent(t, d.server, token, env["COPELF_AGENT_TOKEN"])
	before := d.credits(t, token)

	id := d.runWorkflow(t, token, wf, map[string]any{"password": "hunter2"})
	run := d.waitRun(t, token, id, 90*time.Second)
	if run["status"] != "succeeded" {
		t.Fatalf("run: %v", run)
	}
	if out := run["outputs"].(map[string]any); out["greeting"] != "Welcome, ada!" || out["firstResult"] != "chromium" {
		t.Errorf("outputs: %v", out)
	}
	for i, s := range run["steps"].([]any) {
		if st := s.(map[string]any); st["status"] != "succeeded" || st["durationMs"] == nil {
			t.Errorf("step %d: %v", i, st)
		}
	}
	res, body := d.raw(t, "GET", "/v1/runs/"+id+"/artifacts/results.png", token)
	if res.StatusCode != 200 || !bytes.HasPrefix(body, []byte("\x89PNG")) {
		t.Errorf("screenshot: %d, %d bytes", res.StatusCode, len(body))
	}
	chargedOnce(t, d.server, token, run)
	if after := d.credits(t, token); after.Balance != before.Balance-1 || after.Held != 0 {
		t.Errorf("credits before %+v, after %+v", before, after)
	}
}
