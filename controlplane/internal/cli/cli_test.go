package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/protocol"
)

// bg is a command running in the background, its output readable while it
// runs.
type bg struct {
	out, err *syncBuffer
	done     chan int
}

func startBG(e cliEnv, tty int, args ...string) *bg {
	return startBGCtx(context.Background(), e, tty, args...)
}

func startBGCtx(ctx context.Context, e cliEnv, tty int, args ...string) *bg {
	b := &bg{out: &syncBuffer{}, err: &syncBuffer{}, done: make(chan int, 1)}
	go func() {
		ctx, cancel := context.WithTimeout(ctx, 2*wait)
		defer cancel()
		b.done <- run(ctx, args, b.out, b.err, env{getenv: e.getenv, tty: tty})
	}()
	return b
}

// waitOutput waits until the command has printed s.
func (b *bg) waitOutput(t testing.TB, s string) {
	t.Helper()
	b.waitOutputAfter(t, 0, s)
}

// mark is where the command's output stands now, for waitOutputAfter.
func (b *bg) mark() int { return len(b.out.String()) }

// waitOutputAfter waits until the command has printed s after mark.
func (b *bg) waitOutputAfter(t testing.TB, mark int, s string) {
	t.Helper()
	deadline := time.Now().Add(wait)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(b.out.String()[mark:], s) {
		select {
		case code := <-b.done:
			b.done <- code
			if strings.Contains(b.out.String()[mark:], s) {
				return
			}
			t.Fatalf("the command ended (exit %d) without printing %q\nstdout:\n%s\nstderr:\n%s", code, s, b.out, b.err)
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command did not print %q within %s\nstdout:\n%s\nstderr:\n%s", s, wait, b.out, b.err)
		}
	}
}

// result waits for the command's end.
func (b *bg) result(t testing.TB) result {
	t.Helper()
	select {
	case code := <-b.done:
		return result{code: code, stdout: b.out.String(), stderr: b.err.String()}
	case <-time.After(2*wait + 10*time.Second):
		t.Fatalf("the command did not end\nstdout:\n%s\nstderr:\n%s", b.out, b.err)
	}
	return result{}
}

func wantExit(t testing.TB, r result, code int) {
	t.Helper()
	if r.code != code {
		t.Fatalf("want exit %d, got %s", code, r)
	}
}

func wantContains(t testing.TB, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Errorf("%s does not contain %q:\n%s", what, sub, s)
		}
	}
}

func wantMatch(t testing.TB, what, s string, patterns ...string) {
	t.Helper()
	for _, p := range patterns {
		if !regexp.MustCompile(p).MatchString(s) {
			t.Errorf("%s does not match %s:\n%s", what, p, s)
		}
	}
}

func wantNotContains(t testing.TB, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			t.Errorf("%s contains %q:\n%s", what, sub, s)
		}
	}
}

// wantSameJSON: -o json prints the API's answer as it came.
func wantSameJSON(t testing.TB, got string, api []byte) {
	t.Helper()
	if strings.TrimRight(got, "\n") != strings.TrimRight(string(api), "\n") {
		t.Errorf("-o json is not the API's answer:\ngot: %s\napi: %s", got, api)
	}
}

var (
	queuedRe = regexp.MustCompile(`queued (run_[A-Za-z0-9_-]+)`)
	// errorLine is how an API error is printed.
	errorLine = regexp.MustCompile(`^error: ([a-z_]+): (.+) \(requestId (req_[A-Za-z0-9_-]+)\)$`)
)

// headerRe matches a table header whose columns are separated by spaces.
func headerRe(cols ...string) *regexp.Regexp {
	return regexp.MustCompile(`(?m)^` + strings.Join(cols, ` +`) + `\s*$`)
}

func TestRunsCreateGetListCancel(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	wf := s.workflow(t, a, false)
	ag := s.connectAgent(t, a, "agent-runs", 1)

	r := copelf(t, s.as(a), "runs", "create", "-input", "outcome=succeeded", "-input", "password=hunter2", "-wait", wf)
	wantExit(t, r, ExitOK)
	m := queuedRe.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("no queued line: %s", r)
	}
	id := m[1]
	wantContains(t, "runs create -wait", r.stdout, "step 0  navigate  succeeded", "step 1  extract   succeeded",
		id+" succeeded", "\nsteps\n", "\noutputs\n", `"42.00"`, `"[redacted]"`, "charged 1", ag.ID)
	wantNotContains(t, "runs create -wait", r.stdout+r.stderr, "hunter2")

	t.Run("get", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "get", id)
		wantExit(t, r, ExitOK)
		wantMatch(t, "runs get", r.stdout, `(?m)^run +`+id+`$`, `(?m)^workflow +`+wf+`$`, `(?m)^status +succeeded$`,
			`(?m)^agent +`+ag.ID+` \(attempt 1\)$`, `(?m)^  # +TYPE +STATUS +DURATION +ATTEMPTS +ERROR$`, `(?m)^  0 +navigate +succeeded +5ms +1 +-$`,
			`(?m)^  total +"42.00"$`, `(?m)^  password +"\[redacted\]"$`)
		r = copelf(t, s.as(a), "runs", "get", id, "-o", "json")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/runs/"+id, a.Token, nil, 200))
	})
	t.Run("ls", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "ls")
		wantExit(t, r, ExitOK)
		if !headerRe("RUN", "WORKFLOW", "STATUS", "STEPS", "QUEUED", "TOOK", "DETAIL").MatchString(r.stdout) {
			t.Errorf("no header: %s", r)
		}
		wantContains(t, "runs ls", r.stdout, id, wf, "succeeded", "2/2")
		wantNotContains(t, "runs ls", r.stdout, "ACCOUNT")
		r = copelf(t, s.as(a), "-o", "json", "runs", "ls")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/runs", a.Token, nil, 200))

		r = copelf(t, s.as(a), "runs", "ls", "-status", "queued")
		wantExit(t, r, ExitOK)
		if strings.TrimSpace(r.stdout) != "no runs" {
			t.Errorf("runs ls -status queued: %s", r)
		}
		r = copelf(t, s.as(a), "runs", "ls", "-workflow", wf, "-limit", "1", "-o", "json")
		wantExit(t, r, ExitOK)
		var p page[RunView]
		if err := json.Unmarshal([]byte(r.stdout), &p); err != nil || len(p.Items) != 1 || p.Items[0].ID != id {
			t.Errorf("runs ls -workflow -limit 1 -o json: %v %s", err, r)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		// A finished run cannot be cancelled: the API's conflict.
		r := copelf(t, s.as(a), "runs", "cancel", id)
		wantExit(t, r, ExitError)
		if m := errorLine.FindStringSubmatch(strings.SplitN(r.stderr, "\n", 2)[0]); m == nil || m[1] != "conflict" {
			t.Errorf("want a conflict error line: %s", r)
		}
		// A queued run is cancelled at once (an account without agents).
		b := s.newAccount(t, "member", "free")
		wf := s.workflow(t, b, false)
		queued := s.createRun(t, b, wf, nil)
		r = copelf(t, s.as(b), "runs", "cancel", queued)
		wantExit(t, r, ExitOK)
		if strings.TrimSpace(r.stdout) != queued+" cancelled" {
			t.Errorf("runs cancel: %s", r)
		}
		r = copelf(t, s.as(b), "runs", "watch", queued)
		wantExit(t, r, ExitCancelled)

		// The same as JSON: the API's answers.
		r = copelf(t, s.as(b), "runs", "create", "-o", "json", wf)
		wantExit(t, r, ExitOK)
		var created RunView
		if err := json.Unmarshal([]byte(r.stdout), &created); err != nil || created.Status != protocol.RunQueued || created.WorkflowID != wf {
			t.Fatalf("runs create -o json: %v %s", err, r)
		}
		r = copelf(t, s.as(b), "runs", "cancel", created.ID, "-o", "json")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/runs/"+created.ID, b.Token, nil, 200))
	})
}

func TestRunsWatchEndsWithTheRun(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	s.connectAgent(t, a, "agent-watch", 4)

	t.Run("failed", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "create", "-input", "outcome=failed", "-wait", s.workflow(t, a, false))
		wantExit(t, r, ExitFailed)
		wantContains(t, "watch", r.stdout, "step 0  navigate  failed 7ms  unprocessable_entity element_not_found",
			"failed unprocessable_entity element_not_found: No element matches #total.")
	})
	t.Run("timed_out", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "create", "-input", "outcome=timed_out", "-wait", s.workflow(t, a, false))
		wantExit(t, r, ExitTimedOut)
		wantContains(t, "watch", r.stdout, "timed_out timeout run_timeout")
	})
	t.Run("approved", func(t *testing.T) {
		id := s.createRun(t, a, s.workflow(t, a, true), nil)
		apr := s.pendingApproval(t, a, id)
		w := startBG(s.as(a), -1, "runs", "watch", id)
		w.waitOutput(t, id+" awaiting_approval")

		r := copelf(t, s.as(a), "approvals", "ls")
		wantExit(t, r, ExitOK)
		if !headerRe("APPROVAL", "RUN", "WORKFLOW", "STEP", "STATUS", "CREATED", "MESSAGE", "COMMENT").MatchString(r.stdout) {
			t.Errorf("no header: %s", r)
		}
		wantContains(t, "approvals ls", r.stdout, apr, id, "pending", "Go on with the order?")
		r = copelf(t, s.as(a), "approvals", "ls", "-o", "json")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/approvals?status=pending", a.Token, nil, 200))

		r = copelf(t, s.as(a), "approvals", "approve", apr)
		wantExit(t, r, ExitOK)
		if want := fmt.Sprintf("%s approved (run %s, step 1)", apr, id); strings.TrimSpace(r.stdout) != want {
			t.Errorf("approve: want %q, got %s", want, r)
		}
		res := w.result(t)
		wantExit(t, res, ExitOK)
		wantContains(t, "watch", res.stdout, "step 1  approval  succeeded", "step 2  extract   succeeded", id+" succeeded")
		// Each step is reported once per state.
		if n := strings.Count(res.stdout, "step 2  extract   succeeded"); n != 1 {
			t.Errorf("step 2 reported %d times:\n%s", n, res.stdout)
		}
		// Resolving again is the API's conflict.
		r = copelf(t, s.as(a), "approvals", "approve", apr)
		wantExit(t, r, ExitError)
		wantContains(t, "approve twice", r.stderr, "error: conflict: ")
	})
	t.Run("rejected", func(t *testing.T) {
		id := s.createRun(t, a, s.workflow(t, a, true), nil)
		apr := s.pendingApproval(t, a, id)
		w := startBG(s.as(a), -1, "-o", "json", "runs", "watch", id)
		// Flags may follow the argument.
		r := copelf(t, s.as(a), "approvals", "reject", apr, "-comment", "too expensive")
		wantExit(t, r, ExitOK)
		wantContains(t, "reject", r.stdout, apr+" rejected (run "+id+", step 1): \"too expensive\"")
		res := w.result(t)
		wantExit(t, res, ExitFailed)
		var run RunView
		if err := json.Unmarshal([]byte(res.stdout), &run); err != nil || run.Status != protocol.RunFailed || run.Error == nil || run.Error.Details["reason"] != "approval_rejected" {
			t.Errorf("watch -o json prints the final run: %v %s", err, res)
		}
		wantSameJSON(t, res.stdout, s.call(t, "GET", "/v1/runs/"+id, a.Token, nil, 200))
		r = copelf(t, s.as(a), "approvals", "ls", "-status", "rejected")
		wantExit(t, r, ExitOK)
		wantContains(t, "approvals ls -status rejected", r.stdout, apr, "rejected", "too expensive")
	})
	t.Run("approve -o json", func(t *testing.T) {
		id := s.createRun(t, a, s.workflow(t, a, true), nil)
		apr := s.pendingApproval(t, a, id)
		r := copelf(t, s.as(a), "approvals", "approve", "-o", "json", "-comment", "ok", apr)
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/approvals/"+apr, a.Token, nil, 200))
		wantContains(t, "approve -o json", r.stdout, `"status":"approved"`, `"comment":"ok"`)
		r = copelf(t, s.as(a), "runs", "watch", id)
		wantExit(t, r, ExitOK)
	})
	t.Run("interrupted", func(t *testing.T) {
		id := s.createRun(t, a, s.workflow(t, a, false), map[string]any{"outcome": "hang"})
		t.Cleanup(func() { copelf(t, s.as(a), "runs", "cancel", id) })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		w := startBGCtx(ctx, s.as(a), -1, "runs", "watch", id)
		w.waitOutput(t, "step 0  navigate  running")
		cancel()
		res := w.result(t)
		wantExit(t, res, ExitInterrupted)
		wantContains(t, "stderr", res.stderr, "interrupted")
	})
	t.Run("cancelled", func(t *testing.T) {
		id := s.createRun(t, a, s.workflow(t, a, false), map[string]any{"outcome": "hang"})
		s.waitRun(t, a, id, "running", func(r *RunView) bool { return r.Status == protocol.RunRunning })
		w := startBG(s.as(a), -1, "runs", "watch", id)
		w.waitOutput(t, "step 0  navigate  running")
		r := copelf(t, s.as(a), "runs", "cancel", id)
		wantExit(t, r, ExitOK)
		wantContains(t, "cancel", r.stdout, id+" running, cancel requested")
		res := w.result(t)
		wantExit(t, res, ExitCancelled)
		wantContains(t, "watch", res.stdout, id+" cancelled")
	})
}

func TestQueueAgentsAndIsolation(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	b := s.newAccount(t, "member", "free")
	op := s.newAccount(t, "operator", "free")

	// a has no agent: its run waits for one. b's only slot is taken by a
	// run that hangs, so its second run waits for a free agent.
	aRun := s.createRun(t, a, s.workflow(t, a, false), nil)
	bAgent := s.connectAgent(t, b, "agent-b", 1)
	bBusy := s.createRun(t, b, s.workflow(t, b, false), map[string]any{"outcome": "hang"})
	s.waitRun(t, b, bBusy, "running", func(r *RunView) bool { return r.Status == protocol.RunRunning })
	bQueued := s.createRun(t, b, s.workflow(t, b, false), nil)
	s.waitRun(t, b, bQueued, "queued (agents_busy)", func(r *RunView) bool {
		return r.Queue != nil && r.Queue.Reason == string(protocol.QueueAgentsBusy)
	})
	t.Cleanup(func() {
		for _, id := range []string{aRun, bBusy, bQueued} {
			acct := b
			if id == aRun {
				acct = a
			}
			copelf(t, s.as(acct), "runs", "cancel", id)
		}
	})

	t.Run("runs ls", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "ls")
		wantExit(t, r, ExitOK)
		wantContains(t, "a: runs ls", r.stdout, aRun, "no_agent_connected")
		wantNotContains(t, "a: runs ls", r.stdout, bBusy, bQueued, b.ID)
		r = copelf(t, s.as(a), "runs", "ls", "-o", "json")
		wantNotContains(t, "a: runs ls -o json", r.stdout, bBusy, bQueued, b.ID)
		// A member asking for another account's runs is refused.
		r = copelf(t, s.as(a), "runs", "ls", "-account", b.ID)
		wantExit(t, r, ExitError)
		wantContains(t, "a: runs ls -account b", r.stderr, "error: forbidden: ", "details: {\"requiredRole\":\"operator\"}")
		// An operator sees every account's, with their accounts.
		r = copelf(t, s.as(op), "runs", "ls", "-limit", "500")
		wantExit(t, r, ExitOK)
		wantContains(t, "operator: runs ls", r.stdout, "ACCOUNT", aRun, bBusy, bQueued, a.ID, b.ID)
		r = copelf(t, s.as(op), "runs", "ls", "-account", b.ID, "-o", "json")
		wantExit(t, r, ExitOK)
		wantContains(t, "operator: runs ls -account b", r.stdout, bBusy, bQueued)
		wantNotContains(t, "operator: runs ls -account b", r.stdout, aRun)
	})
	t.Run("agents", func(t *testing.T) {
		r := copelf(t, s.as(a), "agents")
		wantExit(t, r, ExitOK)
		if strings.TrimSpace(r.stdout) != "no agents connected" {
			t.Errorf("a: agents: %s", r)
		}
		r = copelf(t, s.as(b), "agents")
		wantExit(t, r, ExitOK)
		if !headerRe("AGENT", "NAME", "KIND", "ACCOUNT", "FREE/SLOTS", "RUNS", "LABELS", "CONNECTED", "LAST SEEN").MatchString(r.stdout) {
			t.Errorf("no header: %s", r)
		}
		wantContains(t, "b: agents", r.stdout, bAgent.ID, "agent-b", "headless", b.ID, "0/1", bBusy, "suite=cli")
		r = copelf(t, s.as(b), "agents", "-o", "json")
		wantExit(t, r, ExitOK)
		var p page[AgentView]
		if err := json.Unmarshal([]byte(r.stdout), &p); err != nil || len(p.Items) != 1 || p.Items[0].ID != bAgent.ID {
			t.Errorf("b: agents -o json: %v %s", err, r)
		}
		r = copelf(t, s.as(op), "agents", "-account", b.ID)
		wantExit(t, r, ExitOK)
		wantContains(t, "operator: agents -account b", r.stdout, bAgent.ID)
		r = copelf(t, s.as(op), "agents", "-account", a.ID)
		wantExit(t, r, ExitOK)
		wantNotContains(t, "operator: agents -account a", r.stdout, bAgent.ID)
	})
	t.Run("queue", func(t *testing.T) {
		if r := copelf(t, s.as(a), "queue"); r.code == ExitError && strings.Contains(r.stderr, "error: not_found:") {
			t.Skip("the server has no GET /v1/queue yet")
		}
		r := copelf(t, s.as(a), "queue")
		wantExit(t, r, ExitOK)
		wantContains(t, "a: queue", r.stdout, "queued runs", "no_agent_connected 1", aRun, a.ID)
		wantNotContains(t, "a: queue", r.stdout, bQueued, bBusy, b.ID)
		r = copelf(t, s.as(a), "queue", "-o", "json")
		wantExit(t, r, ExitOK)
		var q QueueView
		if err := json.Unmarshal([]byte(r.stdout), &q); err != nil {
			t.Fatalf("queue -o json: %v %s", err, r)
		}
		if q.total().Depth != 1 || len(q.Accounts) != 1 || q.Accounts[0].AccountID != a.ID || q.total().ByReason["no_agent_connected"] != 1 {
			t.Errorf("a: queue -o json: %s", r.stdout)
		}
		r = copelf(t, s.as(b), "queue")
		wantExit(t, r, ExitOK)
		wantContains(t, "b: queue", r.stdout, bQueued, "agents_busy")
		wantNotContains(t, "b: queue", r.stdout, aRun, a.ID)
		r = copelf(t, s.as(op), "queue")
		wantExit(t, r, ExitOK)
		wantContains(t, "operator: queue", r.stdout, a.ID, b.ID, aRun, bQueued)
	})
}

// batch makes a batch of iterations with these outcomes.
func (s *server) batch(t testing.TB, a *account, wf string, concurrency int, outcomes ...string) string {
	t.Helper()
	its := make([]map[string]any, len(outcomes))
	for i, o := range outcomes {
		its[i] = map[string]any{"inputs": map[string]any{"outcome": o}}
	}
	return s.obj(t, "POST", "/v1/workflows/"+wf+"/batches", a.Token, map[string]any{"iterations": its, "concurrency": concurrency}, 201)["id"].(string)
}

func TestBatchesWatchToCompletion(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "pro")
	s.connectAgent(t, a, "agent-batches", 2)

	var done string
	t.Run("all succeed", func(t *testing.T) {
		id := s.batch(t, a, s.workflow(t, a, false), 2, "succeeded", "succeeded", "succeeded")
		w := startBG(s.as(a), -1, "batches", "watch", id)
		w.waitOutput(t, "is created but not started")
		s.call(t, "POST", "/v1/batches/"+id+"/start", a.Token, nil, 200)
		res := w.result(t)
		wantExit(t, res, ExitOK)
		wantContains(t, "batches watch", res.stdout, id+" created 0/3 done; pending 3", id+" completed 3/3 done: succeeded 3")
		wantMatch(t, "batches watch", res.stdout, `(?m)^status +completed$`)
		wantNotContains(t, "batches watch", res.stdout, "\r", "did not succeed")
		done = id
	})
	t.Run("progress bar on a terminal", func(t *testing.T) {
		id := s.batch(t, a, s.workflow(t, a, false), 1, "succeeded", "succeeded")
		s.call(t, "POST", "/v1/batches/"+id+"/start", a.Token, nil, 200)
		res := copelfCtx(context.Background(), t, s.as(a), 1, "batches", "watch", id)
		wantExit(t, res, ExitOK)
		bar := "\r\x1b[K[" + strings.Repeat("#", 40) + "] " + id + " completed 2/2 done: succeeded 2"
		wantContains(t, "batches watch (tty)", res.stdout, bar)
	})
	t.Run("an iteration fails", func(t *testing.T) {
		id := s.batch(t, a, s.workflow(t, a, false), 2, "succeeded", "failed")
		s.call(t, "POST", "/v1/batches/"+id+"/start", a.Token, nil, 200)
		res := copelf(t, s.as(a), "batches", "watch", id)
		wantExit(t, res, ExitFailed)
		wantContains(t, "batches watch", res.stdout, "completed 2/2 done: succeeded 1, failed 1", "iterations that did not succeed", `  1  run_`, `failed  {"outcome":"failed"}`)
		res = copelf(t, s.as(a), "batches", "watch", id, "-o", "json")
		wantExit(t, res, ExitFailed)
		wantSameJSON(t, res.stdout, s.call(t, "GET", "/v1/batches/"+id, a.Token, nil, 200))
	})
	t.Run("cancelled", func(t *testing.T) {
		id := s.batch(t, a, s.workflow(t, a, false), 1, "hang", "succeeded")
		s.call(t, "POST", "/v1/batches/"+id+"/start", a.Token, nil, 200)
		w := startBG(s.as(a), -1, "batches", "watch", id)
		// The hang iteration (0: batches run in iteration order) runs.
		w.waitOutput(t, "0/2 done; running 1")
		s.call(t, "POST", "/v1/batches/"+id+"/cancel", a.Token, nil, 200)
		res := w.result(t)
		wantExit(t, res, ExitCancelled)
		wantContains(t, "batches watch", res.stdout, id+" cancelled")
	})
	t.Run("ls and get", func(t *testing.T) {
		r := copelf(t, s.as(a), "batches", "ls")
		wantExit(t, r, ExitOK)
		if !headerRe("BATCH", "WORKFLOW", "STATUS", "DONE", "SUCCEEDED", "FAILED", "ACTIVE", "CREATED").MatchString(r.stdout) {
			t.Errorf("no header: %s", r)
		}
		wantContains(t, "batches ls", r.stdout, done, "completed  3/3")
		r = copelf(t, s.as(a), "batches", "ls", "-o", "json")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/batches", a.Token, nil, 200))
		r = copelf(t, s.as(a), "batches", "get", done)
		wantExit(t, r, ExitOK)
		wantMatch(t, "batches get", r.stdout, `(?m)^batch +`+done+`$`, `(?m)^progress +3/3 done: succeeded 3$`, `(?m)^iterations$`, `(?m)^  2 +run_\S+ +succeeded +\{"outcome":"succeeded"\}$`)
		r = copelf(t, s.as(a), "batches", "get", done, "-o", "json")
		wantExit(t, r, ExitOK)
		wantSameJSON(t, r.stdout, s.call(t, "GET", "/v1/batches/"+done, a.Token, nil, 200))
		// Another account's batch is not visible.
		other := s.newAccount(t, "member", "pro")
		r = copelf(t, s.as(other), "batches", "ls")
		wantNotContains(t, "other: batches ls", r.stdout, done)
		r = copelf(t, s.as(other), "batches", "watch", done)
		wantExit(t, r, ExitError)
		wantContains(t, "other: batches watch", r.stderr, "error: ")
	})
}

func TestErrorsAndUsage(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	b := s.newAccount(t, "member", "free")
	bRun := s.createRun(t, b, s.workflow(t, b, false), nil)
	t.Cleanup(func() { copelf(t, s.as(b), "runs", "cancel", bRun) })

	apiErrors := []struct {
		name string
		env  cliEnv
		args []string
		code string
	}{
		{"unknown run", s.as(a), []string{"runs", "get", "run_doesnotexist"}, "not_found"},
		{"another account's run", s.as(a), []string{"runs", "get", bRun}, "forbidden"},
		{"another account's cancel", s.as(a), []string{"runs", "cancel", bRun}, "forbidden"},
		{"unknown workflow", s.as(a), []string{"runs", "create", "wf_doesnotexist"}, "workflow_not_found"},
		{"unknown approval", s.as(a), []string{"approvals", "approve", "apr_doesnotexist"}, "not_found"},
		{"unknown batch", s.as(a), []string{"batches", "watch", "bat_doesnotexist"}, "batch_not_found"},
		{"bad status", s.as(a), []string{"runs", "ls", "-status", "sleeping"}, "bad_request"},
		{"bad token", cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": "copelf_api_bogus"}, []string{"runs", "ls"}, "unauthenticated"},
		{"no token", cliEnv{"COPELF_SERVER": s.URL}, []string{"agents"}, "unauthenticated"},
	}
	for _, tc := range apiErrors {
		t.Run(tc.name, func(t *testing.T) {
			r := copelf(t, tc.env, tc.args...)
			wantExit(t, r, ExitError)
			m := errorLine.FindStringSubmatch(strings.SplitN(r.stderr, "\n", 2)[0])
			if m == nil || m[1] != tc.code {
				t.Fatalf("want error line with %s, got %s", tc.code, r)
			}
			if r.stdout != "" {
				t.Errorf("stdout on error: %q", r.stdout)
			}
		})
	}
	t.Run("details are printed", func(t *testing.T) {
		r := copelf(t, s.as(a), "runs", "create", "-input", "outcome=5", s.workflow(t, a, false))
		wantExit(t, r, ExitError)
		wantContains(t, "stderr", r.stderr, "error: unprocessable_entity: ", "details: {\"fields\":[{\"field\":\"inputs.outcome\"")
	})
	t.Run("hint without a token", func(t *testing.T) {
		r := copelf(t, cliEnv{"COPELF_SERVER": s.URL}, "runs", "ls")
		wantContains(t, "stderr", r.stderr, "hint: no token is set")
	})
	t.Run("unreachable server", func(t *testing.T) {
		r := copelf(t, cliEnv{"COPELF_SERVER": "http://127.0.0.1:1", "COPELF_TOKEN": "x"}, "runs", "ls")
		wantExit(t, r, ExitError)
		wantContains(t, "stderr", r.stderr, "error: cannot reach http://127.0.0.1:1")
	})

	usage := []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "USAGE\n  copelf [-server URL]"},
		{"unknown command", []string{"jobs"}, `error: unknown command "jobs"`},
		{"unknown subcommand", []string{"runs", "rm"}, `error: unknown command "rm" for copelf runs`},
		{"missing argument", []string{"runs", "get"}, "error: copelf runs get: missing argument"},
		{"extra argument", []string{"runs", "watch", "run_a", "run_b"}, `error: copelf runs watch: unexpected argument "run_b"`},
		{"argument to a list", []string{"queue", "now"}, "error: copelf queue takes no arguments"},
		{"unknown flag", []string{"runs", "ls", "-bogus"}, "error: flag provided but not defined: -bogus"},
		{"unknown flag after an argument", []string{"runs", "get", "run_a", "-bogus"}, "error: flag provided but not defined: -bogus"},
		{"unknown root flag", []string{"-bogus", "runs", "ls"}, "error: flag provided but not defined: -bogus"},
		{"bad output", []string{"agents", "-o", "yaml"}, `error: -o must be table or json, not "yaml"`},
		{"bad input", []string{"runs", "create", "-input", "novalue", "wf_x"}, `invalid value "novalue" for flag -input: want name=value`},
	}
	for _, tc := range usage {
		t.Run(tc.name, func(t *testing.T) {
			r := copelf(t, s.as(a), tc.args...)
			wantExit(t, r, ExitUsage)
			wantContains(t, "stderr", r.stderr, tc.want, "USAGE")
		})
	}
	t.Run("help", func(t *testing.T) {
		r := copelf(t, s.as(a), "-h")
		wantExit(t, r, ExitOK)
		wantContains(t, "copelf -h", r.stdout, "EXIT STATUS", "  3    a watched run failed", "  4    a watched run or batch was cancelled",
			"  5    a watched run timed out", "runs", "queue", "agents", "approvals", "batches", "COPELF_TOKEN", "config.json")
		r = copelf(t, s.as(a), "approvals", "reject", "-h")
		wantExit(t, r, ExitOK)
		wantContains(t, "approvals reject -h", r.stdout, "copelf approvals reject [-comment TEXT] <approvalId>", "-comment")
		r = copelf(t, s.as(a), "runs", "watch", "run_x", "-h")
		wantExit(t, r, ExitOK)
		wantContains(t, "runs watch run_x -h", r.stdout, "copelf runs watch <runId>")
	})
}

func TestTokenAndServerSources(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	run := s.createRun(t, a, s.workflow(t, a, false), nil)
	t.Cleanup(func() { copelf(t, s.as(a), "runs", "cancel", run) })

	dir := t.TempDir()
	writeConfig := func(path string, content any) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		raw, ok := content.(string)
		if !ok {
			b, _ := json.Marshal(content)
			raw = string(b)
		}
		if err := os.WriteFile(path, []byte(raw), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	good := writeConfig(filepath.Join(dir, "good.json"), map[string]string{"server": s.URL, "token": a.Token})
	badToken := writeConfig(filepath.Join(dir, "bad-token.json"), map[string]string{"server": s.URL, "token": "copelf_api_bogus"})
	serverOnly := writeConfig(filepath.Join(dir, "server-only.json"), map[string]string{"server": s.URL})
	xdg := filepath.Join(dir, "xdg")
	writeConfig(filepath.Join(xdg, "copelf", "config.json"), map[string]string{"server": s.URL, "token": a.Token})
	home := filepath.Join(dir, "home")
	writeConfig(filepath.Join(home, ".config", "copelf", "config.json"), map[string]string{"server": s.URL, "token": a.Token})
	malformed := writeConfig(filepath.Join(dir, "malformed.json"), `{"server": `)
	unknown := writeConfig(filepath.Join(dir, "unknown.json"), `{"server": "`+s.URL+`", "tokne": "x"}`)

	works := []struct {
		name string
		env  cliEnv
		args []string
	}{
		{"environment", cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": a.Token}, nil},
		{"flags", cliEnv{}, []string{"-server", s.URL, "-token", a.Token}},
		{"-config", cliEnv{}, []string{"-config", good}},
		{"-config after the command", cliEnv{}, []string{"-config", good}},
		{"COPELF_CONFIG", cliEnv{"COPELF_CONFIG": good}, nil},
		{"XDG_CONFIG_HOME", cliEnv{"XDG_CONFIG_HOME": xdg, "HOME": home + "-not"}, nil},
		{"~/.config", cliEnv{"HOME": home}, nil},
		{"env token over the file's", cliEnv{"COPELF_CONFIG": badToken, "COPELF_TOKEN": a.Token}, nil},
		{"flag token over env", cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": "copelf_api_bogus"}, []string{"-token", a.Token}},
		{"server from the file, token from env", cliEnv{"COPELF_CONFIG": serverOnly, "COPELF_TOKEN": a.Token}, nil},
		{"default config missing", cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": a.Token, "HOME": filepath.Join(dir, "nobody")}, nil},
	}
	for _, tc := range works {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string{}, tc.args...), "runs", "ls")
			if strings.Contains(tc.name, "after the command") {
				args = append([]string{"runs", "ls"}, tc.args...)
			}
			r := copelf(t, tc.env, args...)
			wantExit(t, r, ExitOK)
			wantContains(t, "runs ls", r.stdout, run)
		})
	}
	fails := []struct {
		name string
		env  cliEnv
		args []string
		code int
		want string
	}{
		{"flag token wins over a good env token", cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": a.Token}, []string{"-token", "copelf_api_bogus"}, ExitError, "error: unauthenticated: "},
		{"env token wins over a good file token", cliEnv{"COPELF_CONFIG": good, "COPELF_TOKEN": "copelf_api_bogus"}, nil, ExitError, "error: unauthenticated: "},
		{"env server wins over the file's", cliEnv{"COPELF_CONFIG": good, "COPELF_SERVER": "http://127.0.0.1:1"}, nil, ExitError, "cannot reach http://127.0.0.1:1"},
		{"missing -config", cliEnv{}, []string{"-config", filepath.Join(dir, "missing.json")}, ExitUsage, "error: config file: "},
		{"malformed config", cliEnv{"COPELF_CONFIG": malformed}, nil, ExitUsage, "error: config file " + malformed},
		{"unknown key", cliEnv{"COPELF_CONFIG": unknown}, nil, ExitUsage, `unknown field "tokne"`},
		{"server not a URL", cliEnv{"COPELF_SERVER": "127.0.0.1:8080", "COPELF_TOKEN": a.Token}, nil, ExitUsage, "the server must be an http:// or https:// URL"},
	}
	for _, tc := range fails {
		t.Run(tc.name, func(t *testing.T) {
			r := copelf(t, tc.env, append(append([]string{}, tc.args...), "runs", "ls")...)
			wantExit(t, r, tc.code)
			wantContains(t, "stderr", r.stderr, tc.want)
			if bytes.Contains([]byte(r.stderr), []byte(a.Token)) {
				t.Errorf("the token is printed: %s", r)
			}
		})
	}
}
