package agent

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestHelloWelcomeReadyHeartbeat(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	srv.answer = func(*protocol.Hello) protocol.Frame {
		return &protocol.Welcome{SessionID: "ses_a", AgentID: agtID, HeartbeatMs: 20, LeaseMs: 60_000}
	}
	ta := startAgent(t, &fakeExec{}, []string{srv.URL()}, func(c *Config) { c.Slots = 3 })
	c := srv.conn(t)

	if c.subprotocol != protocol.Subprotocol {
		t.Errorf("subprotocol %q, want %q", c.subprotocol, protocol.Subprotocol)
	}
	h := c.hello
	if h.Protocol != 1 || h.Token != token || h.Agent.ID != "test-agent" || h.Agent.Name != "test" ||
		h.Agent.Kind != protocol.AgentHeadless || h.Agent.Slots != 3 || h.Agent.Labels["os"] != "linux" || h.Agent.Version == "" {
		t.Errorf("hello = %+v", h)
	}
	if got := expectReady(t, c); got != 3 {
		t.Errorf("ready{%d} after welcome, want 3", got)
	}
	select {
	case hb := <-c.heartbeats:
		if hb.Runs == nil || len(hb.Runs) != 0 {
			t.Errorf("heartbeat runs = %#v, want []", hb.Runs)
		}
	case <-time.After(wait):
		t.Fatal("no heartbeat")
	}
	if strings.Contains(ta.logs.String(), token) {
		t.Error("the token appears in the logs")
	}
}

func TestRunEventsAckedArtifactUploadedBeforeFinished(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	srv.uploadStatus = func(n int) int {
		if n == 1 {
			return http.StatusServiceUnavailable // retried
		}
		return http.StatusCreated
	}
	var gotSpec atomic.Pointer[RunSpec]
	exec := &fakeExec{fn: func(ctx context.Context, spec RunSpec, rep Reporter) Result {
		gotSpec.Store(&spec)
		rep.StepStarted(0, 1)
		rep.StepFinished(0, protocol.StepSucceeded, 12, 1, "value with hunter2-secret inside", nil)
		rep.Artifact("done shot.png", "image/png", []byte("PNG"))
		return Result{Status: protocol.RunSucceeded, Outputs: map[string]any{"total": "42"}}
	}}
	ta := startAgent(t, exec, []string{srv.URL()}, nil)
	c := srv.conn(t)
	if got := expectReady(t, c); got != 1 {
		t.Fatalf("ready{%d}, want 1", got)
	}
	c.send(t, assignFrame(runA, leaseA))
	acc := expect[*protocol.Accept](t, c)
	if acc.RunID != runA || acc.LeaseID != leaseA {
		t.Fatalf("accept = %+v", acc)
	}
	started := expectEvent(t, c, protocol.EventStarted, 1)
	if started.RunID != runA || started.LeaseID != leaseA {
		t.Fatalf("started = %+v", started)
	}
	c.ack(t, started)
	ss := expectEvent(t, c, protocol.EventStepStarted, 2)
	if ss.Step == nil || *ss.Step != 0 || ss.Attempts != 1 {
		t.Errorf("step_started = %+v", ss)
	}
	c.ack(t, ss)
	sf := expectEvent(t, c, protocol.EventStepFinished, 3)
	if sf.Status != "succeeded" || sf.DurationMs == nil || *sf.DurationMs != 12 || sf.Output != "value with [redacted] inside" {
		t.Errorf("step_finished = %+v", sf)
	}
	c.ack(t, sf)
	fin := expectEvent(t, c, protocol.EventFinished, 4)
	if fin.Status != "succeeded" || fin.Outputs["total"] != "42" || fin.Error != nil {
		t.Errorf("finished = %+v", fin)
	}
	select {
	case u := <-srv.uploads:
		if u.runID != runA || u.name != "done_shot.png" || u.lease != leaseA || u.auth != "Bearer "+token ||
			u.contentType != "image/png" || string(u.body) != "PNG" {
			t.Errorf("upload = %+v", u)
		}
	default:
		t.Fatal("finished arrived before the artifact was uploaded")
	}
	// The slot is free once finished is acknowledged.
	c.ack(t, fin)
	if got := expectReady(t, c); got != 1 {
		t.Errorf("ready{%d} after finished was acked, want 1", got)
	}
	if s := gotSpec.Load(); s == nil || s.RunID != runA || s.TimeoutMs != 60_000 || s.Inputs["password"] != "hunter2-secret" {
		t.Errorf("spec = %+v", s)
	}
	if exec.closed.Load() != 1 {
		t.Errorf("%d sessions closed, want 1", exec.closed.Load())
	}
	if logs := ta.logs.String(); strings.Contains(logs, "hunter2-secret") || strings.Contains(logs, token) {
		t.Error("a secret input or the token appears in the logs")
	}
	if !strings.Contains(ta.logs.String(), `"runId":"`+runA+`"`) || !strings.Contains(ta.logs.String(), `"agentId":"`+agtID+`"`) {
		t.Error("run logs lack runId / agentId fields")
	}
}

func TestOutboxResentAfterReconnect(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	var hellos atomic.Int32
	srv.answer = func(*protocol.Hello) protocol.Frame {
		w := &protocol.Welcome{SessionID: "ses_a", AgentID: agtID, HeartbeatMs: 60_000, LeaseMs: 60_000}
		if hellos.Add(1) > 1 {
			// The server still holds A (not B) for this agent, plus a run
			// the agent never heard of.
			w.Runs = []protocol.HeldRun{
				{RunID: runA, Attempt: 1, LeaseID: leaseA, Status: protocol.RunRunning},
				{RunID: "run_cccccccccccccccc", Attempt: 1, LeaseID: "lse_cccccccccccccccc", Status: protocol.RunRunning},
			}
		}
		return w
	}
	proceed := make(chan struct{})
	causeB := make(chan error, 1)
	exec := &fakeExec{fn: func(ctx context.Context, spec RunSpec, rep Reporter) Result {
		if spec.RunID == runB {
			return blockUntilCancelled(causeB)(ctx, spec, rep)
		}
		rep.StepStarted(0, 1)
		rep.StepFinished(0, protocol.StepSucceeded, 3, 1, nil, nil)
		<-proceed
		return Result{Status: protocol.RunSucceeded}
	}}
	startAgent(t, exec, []string{srv.URL()}, func(c *Config) { c.Slots = 2 })

	c1 := srv.conn(t)
	c1.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c1)
	c1.ack(t, expectEvent(t, c1, protocol.EventStarted, 1))
	expectEvent(t, c1, protocol.EventStepStarted, 2)
	expectEvent(t, c1, protocol.EventStepFinished, 3)
	c1.send(t, assignFrame(runB, leaseB))
	expect[*protocol.Accept](t, c1)
	expectEvent(t, c1, protocol.EventStarted, 1)
	c1.drop(t) // events 2 and 3 of A and 1 of B were never acknowledged

	c2 := srv.conn(t)
	if err := waitErr(t, causeB); !errors.Is(err, errTakenAway) {
		t.Errorf("B stopped with %v, want errTakenAway", err)
	}
	for _, seq := range []int64{2, 3} {
		ev := expect[*protocol.Event](t, c2)
		if ev.RunID != runA || ev.LeaseID != leaseA || ev.Seq != seq {
			t.Fatalf("resent %s %s seq %d, want %s seq %d", ev.RunID, ev.Kind, ev.Seq, runA, seq)
		}
		c2.ack(t, ev) // acknowledged again: the server applies each (lease, seq) once
	}
	close(proceed)
	fin := expectEvent(t, c2, protocol.EventFinished, 4)
	if fin.RunID != runA || fin.LeaseID != leaseA {
		t.Fatalf("finished = %+v", fin)
	}
	c2.ack(t, fin)
	// B never reports again; both slots end up free.
	for {
		f := c2.next(t)
		if ev, ok := f.(*protocol.Event); ok {
			t.Fatalf("unexpected event %s seq %d of %s", ev.Kind, ev.Seq, ev.RunID)
		}
		if r, ok := f.(*protocol.Ready); ok && r.Slots == 2 {
			break
		}
	}
}

func TestLeaseLostStopsRun(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	cause := make(chan error, 1)
	startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	expectReady(t, c)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	expectEvent(t, c, protocol.EventStarted, 1)
	if got := expectReady(t, c); got != 0 {
		t.Fatalf("ready{%d} while running, want 0", got)
	}
	expectEvent(t, c, protocol.EventStepStarted, 2)
	c.send(t, &protocol.ErrorFrame{Code: protocol.CodeConflict, Message: "lost", RunID: runA,
		Details: map[string]any{"reason": protocol.ReasonLeaseLost}})
	if err := waitErr(t, cause); !errors.Is(err, errLeaseLost) {
		t.Errorf("run stopped with %v, want errLeaseLost", err)
	}
	// No more events of the run; its slot is free once it returned.
	if got := expectReady(t, c); got != 1 {
		t.Errorf("ready{%d}, want 1", got)
	}
	c.expectNothing(t, 100*time.Millisecond)
}

func TestCancelFinishesCancelled(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	cause := make(chan error, 1)
	startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	expectEvent(t, c, protocol.EventStarted, 1)
	expectEvent(t, c, protocol.EventStepStarted, 2)
	c.send(t, &protocol.Cancel{RunID: runA, Reason: "cancel_requested"})
	var ce *CancelError
	if err := waitErr(t, cause); !errors.As(err, &ce) || ce.Reason != "cancel_requested" {
		t.Errorf("run stopped with %v, want a CancelError", err)
	}
	if ev := expectEvent(t, c, protocol.EventStepFinished, 3); ev.Status != "skipped" {
		t.Errorf("step_finished status %q", ev.Status)
	}
	fin := expectEvent(t, c, protocol.EventFinished, 4)
	if fin.Status != string(protocol.RunCancelled) {
		t.Errorf("finished status %q, want cancelled", fin.Status)
	}
}

func TestApproval(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	type decision struct {
		ok      bool
		comment string
		err     error
	}
	decisions := make(chan decision, 2)
	exec := &fakeExec{fn: func(ctx context.Context, spec RunSpec, rep Reporter) Result {
		for range 2 {
			ok, comment, err := rep.ApprovalRequested(ctx, 1, "Submit the order for hunter2-secret?")
			decisions <- decision{ok, comment, err}
		}
		return Result{Status: protocol.RunSucceeded}
	}}
	startAgent(t, exec, []string{srv.URL()}, nil)
	c := srv.conn(t)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	expectEvent(t, c, protocol.EventStarted, 1)
	ar := expectEvent(t, c, protocol.EventApprovalRequested, 2)
	if ar.Step == nil || *ar.Step != 1 || ar.Message != "Submit the order for [redacted]?" {
		t.Errorf("approval_requested = %+v", ar)
	}
	c.send(t, &protocol.ApprovalFrame{RunID: runA, ApprovalID: aprA, Approved: true, Comment: "go"})
	if d := <-decisions; !d.ok || d.comment != "go" || d.err != nil {
		t.Errorf("first decision = %+v", d)
	}
	expectEvent(t, c, protocol.EventApprovalRequested, 3)
	// The server repeats the last approval after a reconnect: ignored.
	c.send(t, &protocol.ApprovalFrame{RunID: runA, ApprovalID: aprA, Approved: true, Comment: "go"})
	c.send(t, &protocol.ApprovalFrame{RunID: runA, ApprovalID: aprB, Approved: false, Comment: "no"})
	if d := <-decisions; d.ok || d.comment != "no" || d.err != nil {
		t.Errorf("second decision = %+v", d)
	}
	expectEvent(t, c, protocol.EventFinished, 4)
}

func TestRejectWhenFull(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	cause := make(chan error, 1)
	startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	expectReady(t, c)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	expectEvent(t, c, protocol.EventStarted, 1)
	expectEvent(t, c, protocol.EventStepStarted, 2)
	c.send(t, assignFrame(runB, leaseB))
	rej := expect[*protocol.Reject](t, c)
	if rej.RunID != runB || rej.LeaseID != leaseB || rej.Reason != RejectNoFreeSlot {
		t.Errorf("reject = %+v", rej)
	}
	// The reject is followed by the true free count.
	if got := expectReady(t, c); got != 0 {
		t.Errorf("ready{%d} after reject, want 0", got)
	}
	// An unsupported definition is rejected too (with a free slot or not).
	bad := assignFrame(runB, leaseB)
	bad.Workflow.Definition.Version = 2
	c.send(t, bad)
	if rej := expect[*protocol.Reject](t, c); rej.Reason != RejectUnsupportedDefinition {
		t.Errorf("reject reason %q, want %q", rej.Reason, RejectUnsupportedDefinition)
	}
}

func TestPermanentRefusal(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		answer *protocol.ErrorFrame
		code   protocol.Code
	}{
		{"unauthenticated", &protocol.ErrorFrame{Code: protocol.CodeUnauthenticated, Message: "The agent token is not valid.",
			Details: map[string]any{"reason": "token_unknown"}}, protocol.CodeUnauthenticated},
		{"unsupported protocol", &protocol.ErrorFrame{Code: protocol.CodeBadRequest, Message: "Protocol version 1 is not supported.",
			Details: map[string]any{"reason": reasonUnsupportedProtocol, "supported": []int{2}}}, protocol.CodeBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := newFakeServer(t)
			srv.answer = func(*protocol.Hello) protocol.Frame { return tc.answer }
			ta := startAgent(t, &fakeExec{}, []string{srv.URL()}, nil)
			err := ta.result(t)
			var pe *protocol.Error
			if !errors.As(err, &pe) || pe.Code != tc.code {
				t.Fatalf("Run = %v, want a %s error", err, tc.code)
			}
			if n := srv.nconns.Load(); n != 1 {
				t.Errorf("%d connection attempts, want 1 (no retry)", n)
			}
		})
	}
}

func TestTransientRefusalIsRetried(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	var n atomic.Int32
	srv.answer = func(*protocol.Hello) protocol.Frame {
		if n.Add(1) == 1 {
			return &protocol.ErrorFrame{Code: protocol.CodeInternal, Message: "The server is shutting down."}
		}
		return &protocol.Welcome{SessionID: "ses_a", AgentID: agtID, HeartbeatMs: 60_000, LeaseMs: 60_000}
	}
	startAgent(t, &fakeExec{}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	expectReady(t, c)
	if got := srv.nconns.Load(); got != 2 {
		t.Errorf("%d connections, want 2", got)
	}
}

func TestNextServerOnFailure(t *testing.T) {
	t.Parallel()
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close() // connection refused from now on
	srv := newFakeServer(t)
	ta := startAgent(t, &fakeExec{}, []string{deadURL, srv.URL()}, nil)
	c := srv.conn(t)
	if got := expectReady(t, c); got != 1 {
		t.Errorf("ready{%d}", got)
	}
	if !strings.Contains(ta.logs.String(), "reconnecting") {
		t.Error("the failed server is not logged")
	}
}

func TestStopDrains(t *testing.T) {
	t.Parallel()
	t.Run("runs finish within the grace period", func(t *testing.T) {
		t.Parallel()
		srv := newFakeServer(t)
		proceed := make(chan struct{})
		exec := &fakeExec{fn: func(ctx context.Context, spec RunSpec, rep Reporter) Result {
			<-proceed
			return Result{Status: protocol.RunSucceeded}
		}}
		ta := startAgent(t, exec, []string{srv.URL()}, nil)
		c := srv.conn(t)
		expectReady(t, c)
		c.send(t, assignFrame(runA, leaseA))
		expect[*protocol.Accept](t, c)
		c.ack(t, expectEvent(t, c, protocol.EventStarted, 1))
		if got := expectReady(t, c); got != 0 {
			t.Fatalf("ready{%d}", got)
		}
		stopped := make(chan error, 1)
		go func() { stopped <- ta.Stop(context.Background()) }()
		// Draining: nothing new is taken.
		waitFor(t, func() bool { ta.mu.Lock(); defer ta.mu.Unlock(); return ta.draining })
		c.send(t, assignFrame(runB, leaseB))
		if rej := expect[*protocol.Reject](t, c); rej.Reason != RejectDraining {
			t.Errorf("reject reason %q", rej.Reason)
		}
		close(proceed)
		fin := expectEvent(t, c, protocol.EventFinished, 2)
		if fin.Status != "succeeded" {
			t.Errorf("finished %q", fin.Status)
		}
		select {
		case err := <-stopped:
			t.Fatalf("Stop returned (%v) before finished was acknowledged", err)
		case <-time.After(20 * time.Millisecond):
		}
		c.ack(t, fin)
		if err := waitErr(t, stopped); err != nil {
			t.Errorf("Stop = %v", err)
		}
		if err := ta.result(t); err != nil {
			t.Errorf("Run = %v", err)
		}
	})
	t.Run("runs still going when the grace period ends are cancelled", func(t *testing.T) {
		t.Parallel()
		srv := newFakeServer(t)
		cause := make(chan error, 1)
		ta := startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
		c := srv.conn(t)
		c.send(t, assignFrame(runA, leaseA))
		expect[*protocol.Accept](t, c)
		c.ack(t, expectEvent(t, c, protocol.EventStarted, 1))
		c.ack(t, expectEvent(t, c, protocol.EventStepStarted, 2))
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		stopped := make(chan error, 1)
		go func() { stopped <- ta.Stop(ctx) }()
		if err := waitErr(t, cause); !errors.Is(err, errDrainTimeout) {
			t.Errorf("run stopped with %v, want errDrainTimeout", err)
		}
		c.ack(t, expectEvent(t, c, protocol.EventStepFinished, 3))
		fin := expectEvent(t, c, protocol.EventFinished, 4)
		if fin.Status != string(protocol.RunCancelled) {
			t.Errorf("finished %q, want cancelled", fin.Status)
		}
		c.ack(t, fin)
		if err := waitErr(t, stopped); err != nil {
			t.Errorf("Stop = %v", err)
		}
		if err := ta.result(t); err != nil {
			t.Errorf("Run = %v", err)
		}
	})
}

func TestHardStopCancelsRuns(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	cause := make(chan error, 1)
	ta := startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	expectEvent(t, c, protocol.EventStarted, 1)
	ta.cancel()
	if err := ta.result(t); err != nil {
		t.Errorf("Run = %v", err)
	}
	if err := waitErr(t, cause); err == nil {
		t.Error("the run was not cancelled")
	}
}

func TestRetryable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"network", errors.New("dial tcp: connection refused"), true},
		{"unauthenticated", protocol.NewError(protocol.CodeUnauthenticated), false},
		{"unsupported protocol", protocol.NewError(protocol.CodeBadRequest).With("reason", reasonUnsupportedProtocol), false},
		{"forbidden origin", protocol.NewError(protocol.CodeForbidden).With("reason", "origin_not_allowed"), false},
		{"internal", protocol.NewError(protocol.CodeInternal), true},
		{"hello timeout", protocol.NewError(protocol.CodeTimeout), true},
		{"rate limited", protocol.NewError(protocol.CodeRateLimited), true},
		{"session replaced", protocol.NewError(protocol.CodeConflict).With("reason", reasonSessionReplaced), true},
		{"upload lease lost", protocol.NewError(protocol.CodeConflict).With("reason", protocol.ReasonLeaseLost), false},
		{"wrapped", errors.Join(errors.New("read"), protocol.NewError(protocol.CodeUnauthenticated)), false},
		{"config", errConfig, false},
	} {
		if got := retryable(tc.err); got != tc.want {
			t.Errorf("%s: retryable = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestConnectURL(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"http://127.0.0.1:8080":       "ws://127.0.0.1:8080/v1/agents/connect",
		"https://copelf.example/":     "wss://copelf.example/v1/agents/connect",
		"https://copelf.example/base": "wss://copelf.example/base/v1/agents/connect",
		"ws://h:1":                    "ws://h:1/v1/agents/connect",
	} {
		u, err := parseServer(in)
		if err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		if got := connectURL(u); got != want {
			t.Errorf("%s → %s, want %s", in, got, want)
		}
	}
	for _, bad := range []string{"ftp://h", "127.0.0.1:8080", "http://", "http://u:p@h", "http://h?x=1"} {
		if _, err := parseServer(bad); !errors.Is(err, errConfig) {
			t.Errorf("%s: err = %v, want a config error", bad, err)
		}
	}
}

func TestLoadOrCreateID(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "copelf")
	id, err := LoadOrCreateID(dir)
	if err != nil || !ValidID(id) {
		t.Fatalf("LoadOrCreateID = %q, %v", id, err)
	}
	again, err := LoadOrCreateID(dir)
	if err != nil || again != id {
		t.Errorf("second LoadOrCreateID = %q, %v; want %q", again, err, id)
	}
	if err := os.WriteFile(filepath.Join(dir, idFile), []byte("not valid!\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateID(dir); err == nil {
		t.Error("an invalid id file was accepted")
	}
}

func TestSealEvent(t *testing.T) {
	t.Parallel()
	log := discardLogger()
	big := strings.Repeat("x", protocol.MaxFrameBytes)
	step := 0
	ev := &protocol.Event{RunID: runA, LeaseID: leaseA, Seq: 1, Kind: protocol.EventStepFinished, Step: &step, Status: "succeeded", Output: big}
	data, ok := sealEvent(ev, nil, log)
	if !ok || len(data) > maxEventBytes || ev.Output != nil {
		t.Errorf("oversized output: ok=%v len=%d", ok, len(data))
	}
	ev = &protocol.Event{RunID: runA, LeaseID: leaseA, Seq: 2, Kind: protocol.EventApprovalRequested, Step: &step}
	if _, ok := sealEvent(ev, nil, log); !ok || ev.Message == "" {
		t.Errorf("approval without message: ok=%v message=%q", ok, ev.Message)
	}
	ev = &protocol.Event{RunID: runA, LeaseID: leaseA, Seq: 3, Kind: protocol.EventFinished, Status: "failed",
		Error: &protocol.Error{Code: protocol.CodeInternal, Message: "bad pw: s3cret", Details: map[string]any{"value": "s3cret"}}}
	if _, ok := sealEvent(ev, []string{"s3cret"}, log); !ok || strings.Contains(ev.Error.Message, "s3cret") || ev.Error.Details["value"] != protocol.RedactedValue {
		t.Errorf("secret not scrubbed: %+v", ev.Error)
	}
	if got := artifactName("../x y.png"); got != "x_y.png" {
		t.Errorf("artifactName = %q", got)
	}
}

// waitErr receives from ch within the test's bound.
func waitErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(wait):
		t.Fatal("timed out")
		return nil
	}
}

// waitFor polls cond (state that no event signals) within the test's bound.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestHeartbeatListsHeldRuns(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	srv.answer = func(*protocol.Hello) protocol.Frame {
		return &protocol.Welcome{SessionID: "ses_a", AgentID: agtID, HeartbeatMs: 10, LeaseMs: 60_000}
	}
	cause := make(chan error, 1)
	startAgent(t, &fakeExec{fn: blockUntilCancelled(cause)}, []string{srv.URL()}, nil)
	c := srv.conn(t)
	c.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c)
	timeout := time.After(wait)
	for {
		select {
		case hb := <-c.heartbeats:
			if len(hb.Runs) == 1 && hb.Runs[0] == runA {
				return
			}
		case <-timeout:
			t.Fatal("no heartbeat listing the run")
		}
	}
}

func TestServerFailureOnEventResyncs(t *testing.T) {
	t.Parallel()
	srv := newFakeServer(t)
	var hellos atomic.Int32
	srv.answer = func(*protocol.Hello) protocol.Frame {
		w := &protocol.Welcome{SessionID: "ses_a", AgentID: agtID, HeartbeatMs: 60_000, LeaseMs: 60_000}
		if hellos.Add(1) > 1 {
			w.Runs = []protocol.HeldRun{{RunID: runA, Attempt: 1, LeaseID: leaseA, Status: protocol.RunQueued}}
		}
		return w
	}
	proceed := make(chan struct{})
	startAgent(t, &fakeExec{fn: func(ctx context.Context, spec RunSpec, rep Reporter) Result {
		<-proceed
		return Result{Status: protocol.RunSucceeded}
	}}, []string{srv.URL()}, nil)
	c1 := srv.conn(t)
	c1.send(t, assignFrame(runA, leaseA))
	expect[*protocol.Accept](t, c1)
	expectEvent(t, c1, protocol.EventStarted, 1)
	// The server failed to apply the event: the agent reconnects, and the
	// event is resent on the new connection.
	c1.send(t, &protocol.ErrorFrame{Code: protocol.CodeInternal, Message: "db down", RunID: runA})
	c2 := srv.conn(t)
	c2.ack(t, expectEvent(t, c2, protocol.EventStarted, 1))
	close(proceed)
	c2.ack(t, expectEvent(t, c2, protocol.EventFinished, 2))
}
