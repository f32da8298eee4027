package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"

	copelfd "github.com/copelf/copelf/controlplane/internal/app"
	"github.com/copelf/copelf/protocol"
)

// The tests drive the CLI against a real control plane: copelfd's app.Run
// in-process on a loopback port over a temporary SQLite database, with
// agents that speak the real websocket protocol (and do nothing else).

// wait bounds every wait for the server: generous, the machine is loaded.
const wait = 60 * time.Second

func TestMain(m *testing.M) { goleak.VerifyTestMain(mainRunner{m}) }

type mainRunner struct{ m *testing.M }

func (r mainRunner) Run() int {
	code := r.m.Run()
	shared.stop()
	return code
}

// server is one copelfd the package's tests share; each test makes its own
// accounts, so they do not see each other's runs.
type server struct {
	URL   string
	Admin string

	once    sync.Once
	err     error
	dir     string
	cancel  context.CancelFunc
	done    chan error
	stderr  *syncBuffer
	counter atomic.Int64
}

var shared = &server{}

// syncBuffer is a bytes.Buffer the server and the test may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// controlPlane starts the shared copelfd on first use.
func controlPlane(t testing.TB) *server {
	t.Helper()
	s := shared
	s.once.Do(func() {
		s.dir, s.err = os.MkdirTemp("", "clitest-")
		if s.err != nil {
			return
		}
		s.Admin = "copelf_api_cli-test-admin-token-0123456789abcdef"
		ctx, cancel := context.WithCancel(context.Background())
		s.cancel, s.done, s.stderr = cancel, make(chan error, 1), &syncBuffer{}
		args := []string{
			"-addr", "127.0.0.1:0",
			"-db", "sqlite://" + filepath.Join(s.dir, "copelf.db"),
			"-data-dir", filepath.Join(s.dir, "data"),
			"-admin-token", s.Admin,
			"-lease-timeout", "2m",
			"-log-level", "warn", "-log-format", "json",
		}
		ready := make(chan string, 1)
		go func() { s.done <- copelfd.Run(ctx, args, io.Discard, s.stderr, func(addr string) { ready <- addr }) }()
		select {
		case addr := <-ready:
			s.URL = "http://" + addr
		case err := <-s.done:
			s.err = fmt.Errorf("copelfd ended before serving: %v\n%s", err, s.stderr)
		case <-time.After(2 * time.Minute):
			s.err = fmt.Errorf("copelfd did not start within 2m\n%s", s.stderr)
		}
	})
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s
}

func (s *server) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	select {
	case err := <-s.done:
		if err != nil {
			fmt.Fprintf(os.Stderr, "copelfd: %v\n", err)
		}
	case <-time.After(30 * time.Second):
		fmt.Fprintln(os.Stderr, "copelfd did not stop within 30s")
	}
	os.RemoveAll(s.dir)
}

// httpClient closes its idle connections when the test ends (goleak).
func httpClient(t testing.TB) *http.Client {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: wait}
}

// call makes an API request; it fails the test unless the status is want.
// It returns the raw answer.
func (s *server) call(t testing.TB, method, path, token string, body any, want int) []byte {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, s.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := httpClient(t).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != want {
		t.Fatalf("%s %s: %d, want %d: %s", method, path, res.StatusCode, want, raw)
	}
	return raw
}

// obj calls and decodes a JSON object.
func (s *server) obj(t testing.TB, method, path, token string, body any, want int) map[string]any {
	t.Helper()
	var out map[string]any
	if err := json.Unmarshal(s.call(t, method, path, token, body, want), &out); err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return out
}

// account is a user with credits, an API token and an agent token.
type account struct {
	ID, Token, AgentToken string
}

// newAccount makes a user (role member|operator, plan free|pro) with 100
// credits.
func (s *server) newAccount(t testing.TB, role, plan string) *account {
	t.Helper()
	email := fmt.Sprintf("cli-%d-%d@example.com", time.Now().UnixNano(), s.counter.Add(1))
	u := s.obj(t, "POST", "/v1/users", s.Admin, map[string]any{"email": email, "password": "password1", "role": role, "plan": plan}, 201)
	a := &account{ID: u["id"].(string)}
	s.call(t, "POST", "/v1/accounts/"+a.ID+"/credits", s.Admin, map[string]any{"amount": 100, "reason": "test"}, 201)
	sess := s.obj(t, "POST", "/v1/sessions", "", map[string]any{"email": email, "password": "password1"}, 201)
	a.Token = s.obj(t, "POST", "/v1/tokens", sess["token"].(string), map[string]any{"name": "api", "kind": "api"}, 201)["token"].(string)
	a.AgentToken = s.obj(t, "POST", "/v1/tokens", a.Token, map[string]any{"name": "agent", "kind": "agent"}, 201)["token"].(string)
	return a
}

// workflow makes a ready workflow whose steps are navigate, approval (when
// withApproval) and extract; the input "outcome" tells the test agent how
// the run ends.
func (s *server) workflow(t testing.TB, a *account, withApproval bool) string {
	t.Helper()
	steps := []map[string]any{{"type": "navigate", "url": "http://127.0.0.1:1/"}}
	if withApproval {
		steps = append(steps, map[string]any{"type": "approval", "message": "Go on with the order?"})
	}
	steps = append(steps, map[string]any{"type": "extract", "selector": "#total", "output": "total"})
	def := map[string]any{
		"version": 1,
		"variables": []map[string]any{
			{"name": "outcome", "type": "string", "default": "succeeded"},
			{"name": "password", "type": "secret"},
		},
		"steps": steps,
	}
	wf := s.obj(t, "POST", "/v1/workflows", a.Token, map[string]any{"name": fmt.Sprintf("wf-%d", s.counter.Add(1)), "definition": def}, 201)
	return wf["id"].(string)
}

// createRun queues a run and returns its id.
func (s *server) createRun(t testing.TB, a *account, wf string, inputs map[string]any) string {
	t.Helper()
	return s.obj(t, "POST", "/v1/workflows/"+wf+"/runs", a.Token, map[string]any{"inputs": inputs}, 201)["id"].(string)
}

// waitRun polls a run until cond holds (an event wait with a deadline).
func (s *server) waitRun(t testing.TB, a *account, id, what string, cond func(r *RunView) bool) *RunView {
	t.Helper()
	deadline := time.Now().Add(wait)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var r RunView
		if err := json.Unmarshal(s.call(t, "GET", "/v1/runs/"+id, a.Token, nil, 200), &r); err != nil {
			t.Fatal(err)
		}
		if cond(&r) {
			return &r
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %s: not %s within %s (status %s)", id, what, wait, r.Status)
		}
		<-tick.C
	}
}

// pendingApproval waits for the run's pending approval and returns its id.
func (s *server) pendingApproval(t testing.TB, a *account, runID string) string {
	t.Helper()
	s.waitRun(t, a, runID, "awaiting approval", func(r *RunView) bool { return r.Status == protocol.RunAwaitingApproval })
	var p page[ApprovalView]
	if err := json.Unmarshal(s.call(t, "GET", "/v1/approvals?status=pending", a.Token, nil, 200), &p); err != nil {
		t.Fatal(err)
	}
	for _, ap := range p.Items {
		if ap.RunID == runID {
			return ap.ID
		}
	}
	t.Fatalf("no pending approval for %s", runID)
	return ""
}

// result is one CLI invocation's outcome.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// cliEnv is the environment of an invocation.
type cliEnv map[string]string

func (e cliEnv) getenv(k string) string { return e[k] }

// as is the environment of an account: its server and token.
func (s *server) as(a *account) cliEnv {
	return cliEnv{"COPELF_SERVER": s.URL, "COPELF_TOKEN": a.Token, "HOME": "/nonexistent-home"}
}

// copelf runs the CLI with env and args (stdout is not a terminal).
func copelf(t testing.TB, e cliEnv, args ...string) result {
	t.Helper()
	return copelfCtx(context.Background(), t, e, -1, args...)
}

func copelfCtx(ctx context.Context, t testing.TB, e cliEnv, tty int, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*wait)
	defer cancel()
	var out, errOut syncBuffer
	code := run(ctx, args, &out, &errOut, env{getenv: e.getenv, tty: tty, width: 200})
	return result{code: code, stdout: out.String(), stderr: errOut.String()}
}

// ---- a protocol agent that does nothing but report ----

// testAgent speaks the agent protocol over the real websocket. Each run
// ends as its input "outcome" says: succeeded (default), failed,
// timed_out, or hang (until cancelled). Approval steps wait for the
// decision; gate holds a run after its first step until released.
type testAgent struct {
	t    testing.TB
	ws   *websocket.Conn
	ID   string // the server's agt_ id
	done chan struct{}
	// closed is set when the test ends the connection.
	closed atomic.Bool

	mu   sync.Mutex
	errs []string
	seq  map[string]int64
	runs map[string]*agentRun
	// cancelled are the runs the server told the agent to stop, and
	// conflicts the conflict errors about each run: frames the agent had
	// sent before it heard of a cancel are refused (the run is no longer
	// queued, has finished, or its lease is gone), as protocol/README.md
	// says. Such refusals are expected for a cancelled run (told or found
	// cancelled at the end) and errors for any other.
	cancelled map[string]bool
	conflicts map[string][]string
	// holds make the agent wait, until released, at a point of its runs
	// (holdExtract, holdApproval), so that a test sees the state before it
	// moves on: the event log reads a run when it flushes, and changes
	// made within one flush show as one.
	holds map[string]chan struct{}
}

// holdExtract makes the agent keep its extract steps running (after their
// step_started) until the returned function is called.
func (ag *testAgent) holdExtract() (release func()) { return ag.holdAt("extract") }

// holdApproval makes the agent wait, when an approval reaches it, until
// the returned function is called; only then does it report the approval
// step's end and go on.
func (ag *testAgent) holdApproval() (release func()) { return ag.holdAt("approval") }

func (ag *testAgent) holdAt(point string) (release func()) {
	ch := make(chan struct{})
	ag.mu.Lock()
	ag.holds[point] = ch
	ag.mu.Unlock()
	return sync.OnceFunc(func() { close(ch) })
}

// waitHold waits at point while a test holds it.
func (ag *testAgent) waitHold(point string) {
	ag.mu.Lock()
	hold := ag.holds[point]
	ag.mu.Unlock()
	if hold == nil {
		return
	}
	select {
	case <-hold:
	case <-time.After(wait):
		ag.fail("held at %s for %s and never released", point, wait)
	}
}

type agentRun struct {
	assign *protocol.Assign
	next   int
}

// connectAgent connects an agent of account a with slots.
func (s *server) connectAgent(t testing.TB, a *account, name string, slots int) *testAgent {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: wait}
	ws, res, err := d.Dial("ws"+strings.TrimPrefix(s.URL, "http")+"/v1/agents/connect", nil)
	if err != nil {
		t.Fatalf("dial: %v (%v)", err, res)
	}
	ag := &testAgent{t: t, ws: ws, done: make(chan struct{}), seq: map[string]int64{}, runs: map[string]*agentRun{},
		cancelled: map[string]bool{}, conflicts: map[string][]string{}, holds: map[string]chan struct{}{}}
	ag.send(&protocol.Hello{Protocol: protocol.Version, Token: a.AgentToken,
		Agent: protocol.AgentInfo{ID: name, Name: name, Kind: protocol.AgentHeadless, Version: "test", Slots: slots, Labels: map[string]string{"suite": "cli"}}})
	ws.SetReadDeadline(time.Now().Add(wait))
	_, data, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("agent %s: no welcome: %v", name, err)
	}
	f, err := protocol.DecodeFrame(data)
	welcome, ok := f.(*protocol.Welcome)
	if err != nil || !ok {
		t.Fatalf("agent %s: want welcome, got %s (%v)", name, data, err)
	}
	ws.SetReadDeadline(time.Time{})
	ag.ID = welcome.AgentID
	go ag.loop()
	t.Cleanup(func() {
		ag.closed.Store(true) // frames the loop still answers go nowhere
		ws.Close()
		<-ag.done
		ag.mu.Lock()
		defer ag.mu.Unlock()
		for _, e := range ag.errs {
			t.Errorf("agent %s: %s", name, e)
		}
		for run, errs := range ag.conflicts {
			// A run cancelled between its assign and its accept may never
			// get a cancel frame: the refused accept already dropped it.
			if ag.cancelled[run] || s.obj(t, "GET", "/v1/runs/"+run, a.Token, nil, 200)["status"] == string(protocol.RunCancelled) {
				continue
			}
			for _, e := range errs {
				t.Errorf("agent %s: server error frame: %s", name, e)
			}
		}
	})
	return ag
}

func (ag *testAgent) fail(format string, args ...any) {
	ag.mu.Lock()
	ag.errs = append(ag.errs, fmt.Sprintf(format, args...))
	ag.mu.Unlock()
}

// send writes a frame; only the loop (and connect, before it) writes.
func (ag *testAgent) send(f protocol.Frame) {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		ag.fail("encode %T: %v", f, err)
		return
	}
	ag.ws.SetWriteDeadline(time.Now().Add(wait))
	if err := ag.ws.WriteMessage(websocket.TextMessage, data); err != nil && !ag.closed.Load() {
		ag.fail("write: %v", err)
	}
}

func (ag *testAgent) event(r *agentRun, ev protocol.Event) {
	ag.seq[r.assign.LeaseID]++
	ev.RunID, ev.LeaseID, ev.Seq = r.assign.RunID, r.assign.LeaseID, ag.seq[r.assign.LeaseID]
	ag.send(&ev)
}

func (ag *testAgent) loop() {
	defer close(ag.done)
	for {
		_, data, err := ag.ws.ReadMessage()
		if err != nil {
			return
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			ag.fail("frame %s: %v", data, err)
			continue
		}
		switch f := f.(type) {
		case *protocol.Assign:
			r := &agentRun{assign: f}
			ag.runs[f.RunID] = r
			ag.send(&protocol.Accept{RunID: f.RunID, LeaseID: f.LeaseID})
			ag.event(r, protocol.Event{Kind: protocol.EventStarted})
			ag.advance(r)
		case *protocol.ApprovalFrame:
			r := ag.runs[f.RunID]
			if r == nil {
				continue
			}
			if !f.Approved {
				delete(ag.runs, f.RunID) // the server failed the run
				continue
			}
			ag.waitHold("approval")
			d := int64(3)
			step := r.next
			ag.event(r, protocol.Event{Kind: protocol.EventStepFinished, Step: &step, Status: "succeeded", DurationMs: &d, Attempts: 1})
			r.next++
			ag.advance(r)
		case *protocol.Cancel:
			ag.mu.Lock()
			ag.cancelled[f.RunID] = true
			ag.mu.Unlock()
			r := ag.runs[f.RunID]
			if r == nil {
				continue
			}
			delete(ag.runs, f.RunID)
			ag.event(r, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunCancelled)})
		case *protocol.Ack, *protocol.Heartbeat:
		case *protocol.ErrorFrame:
			// The refusals a cancel can cause: lease_lost, run_finished, and
			// an accept of a run no longer queued (no reason).
			if reason, _ := f.Details["reason"].(string); f.Code == protocol.CodeConflict && f.RunID != "" &&
				(reason == protocol.ReasonLeaseLost || reason == "run_finished" || reason == "") {
				ag.mu.Lock()
				ag.conflicts[f.RunID] = append(ag.conflicts[f.RunID], string(data))
				ag.mu.Unlock()
				continue
			}
			ag.fail("server error frame: %s", data)
		}
	}
}

// advance runs steps until the run ends or waits (approval, hang).
func (ag *testAgent) advance(r *agentRun) {
	outcome, _ := r.assign.Inputs["outcome"].(string)
	steps := r.assign.Workflow.Definition.Steps
	for r.next < len(steps) {
		step := r.next
		ag.event(r, protocol.Event{Kind: protocol.EventStepStarted, Step: &step})
		switch {
		case steps[step].Type == protocol.StepApproval:
			ag.event(r, protocol.Event{Kind: protocol.EventApprovalRequested, Step: &step, Message: steps[step].Message})
			return
		case outcome == "hang":
			return // until cancelled
		case outcome == "failed":
			d := int64(7)
			e := protocol.Errorf(protocol.CodeUnprocessableEntity, "No element matches #total.").With("reason", "element_not_found").With("step", step)
			ag.event(r, protocol.Event{Kind: protocol.EventStepFinished, Step: &step, Status: "failed", DurationMs: &d, Attempts: 1, Error: e})
			ag.event(r, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunFailed), Error: e})
			delete(ag.runs, r.assign.RunID)
			return
		case outcome == "timed_out":
			e := protocol.Errorf(protocol.CodeTimeout, "The run took too long.").With("reason", "run_timeout").With("step", step)
			ag.event(r, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunTimedOut), Error: e})
			delete(ag.runs, r.assign.RunID)
			return
		}
		d := int64(5)
		ev := protocol.Event{Kind: protocol.EventStepFinished, Step: &step, Status: "succeeded", DurationMs: &d, Attempts: 1}
		if steps[step].Type == protocol.StepExtract {
			ev.Output = "42.00"
			ag.waitHold("extract")
		}
		ag.event(r, ev)
		r.next++
	}
	ag.event(r, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunSucceeded), Outputs: map[string]any{"total": "42.00"}})
	delete(ag.runs, r.assign.RunID)
}
