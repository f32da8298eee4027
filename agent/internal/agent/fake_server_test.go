package agent

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

// Test ids in the server's shapes.
const (
	agtID   = "agt_aaaaaaaaaaaaaaaa"
	wfID    = "wf_aaaaaaaaaaaaaaaa"
	runA    = "run_aaaaaaaaaaaaaaaa"
	runB    = "run_bbbbbbbbbbbbbbbb"
	leaseA  = "lse_aaaaaaaaaaaaaaaa"
	leaseA2 = "lse_aaaaaaaaaaaaaaa2"
	leaseB  = "lse_bbbbbbbbbbbbbbbb"
	aprA    = "apr_aaaaaaaaaaaaaaaa"
	aprB    = "apr_bbbbbbbbbbbbbbbb"
	token   = "agent-token-secret"
)

// wait bounds every wait of a test.
const wait = 10 * time.Second

// fakeServer speaks the server side of the agent protocol, just enough for
// the client's tests: the test drives each connection frame by frame.
type fakeServer struct {
	t     *testing.T
	srv   *httptest.Server
	conns chan *fakeConn
	// answer decides what a hello gets: a welcome or an error frame
	// (default: welcome with no runs).
	answer  func(h *protocol.Hello) protocol.Frame
	nconns  atomic.Int32
	uploads chan upload
	// uploadStatus, when set, answers artifact PUTs.
	uploadStatus func(n int) int

	mu   sync.Mutex
	open []*fakeConn
}

type upload struct {
	runID, name, lease, auth, contentType string
	body                                  []byte
}

func newFakeServer(t *testing.T) *fakeServer {
	s := &fakeServer{t: t, conns: make(chan *fakeConn, 16), uploads: make(chan upload, 16)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/agents/connect", s.connect)
	var uploadN atomic.Int32
	mux.HandleFunc("PUT /v1/runs/{id}/artifacts/{name}", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if s.uploadStatus != nil {
			if st := s.uploadStatus(int(uploadN.Add(1))); st != http.StatusCreated {
				w.WriteHeader(st)
				return
			}
		}
		s.uploads <- upload{runID: r.PathValue("id"), name: r.PathValue("name"), lease: r.Header.Get("X-Copelf-Lease"),
			auth: r.Header.Get("Authorization"), contentType: r.Header.Get("Content-Type"), body: body}
		w.WriteHeader(http.StatusCreated)
	})
	s.srv = httptest.NewServer(mux)
	t.Cleanup(s.srv.Close)
	t.Cleanup(s.closeAll) // runs before srv.Close: handlers must return
	return s
}

func (s *fakeServer) URL() string { return s.srv.URL }

func (s *fakeServer) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.open {
		c.ws.Close()
	}
}

var upgrader = websocket.Upgrader{Subprotocols: []string{protocol.Subprotocol}}

func (s *fakeServer) connect(w http.ResponseWriter, r *http.Request) {
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer ws.Close()
	s.nconns.Add(1)
	_ = ws.SetReadDeadline(time.Now().Add(wait))
	_, data, err := ws.ReadMessage()
	if err != nil {
		return
	}
	f, err := protocol.DecodeFrame(data)
	if err != nil {
		s.t.Errorf("fake server: hello: %v", err)
		return
	}
	hello, ok := f.(*protocol.Hello)
	if !ok {
		s.t.Errorf("fake server: first frame is %s, not hello", f.FrameType())
		return
	}
	var answer protocol.Frame = &protocol.Welcome{SessionID: "ses_aaaaaaaaaaaa", AgentID: agtID, HeartbeatMs: 60_000, LeaseMs: 60_000}
	if s.answer != nil {
		answer = s.answer(hello)
	}
	c := &fakeConn{ws: ws, hello: hello, subprotocol: ws.Subprotocol(), in: make(chan protocol.Frame, 1024),
		heartbeats: make(chan *protocol.Heartbeat, 1024), gone: make(chan struct{})}
	c.send(s.t, answer)
	if _, ok := answer.(*protocol.ErrorFrame); ok {
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.ClosePolicyViolation, ""), time.Now().Add(time.Second))
		return
	}
	_ = ws.SetReadDeadline(time.Time{})
	s.mu.Lock()
	s.open = append(s.open, c)
	s.mu.Unlock()
	defer close(c.gone)
	select {
	case s.conns <- c:
	default:
		s.t.Errorf("fake server: too many connections nobody looked at")
		return
	}
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			return
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			s.t.Errorf("fake server: agent sent an invalid frame: %v: %s", err, data)
			return
		}
		if hb, ok := f.(*protocol.Heartbeat); ok {
			c.heartbeats <- hb
			continue
		}
		c.in <- f
	}
}

// conn waits for the next welcomed connection.
func (s *fakeServer) conn(t *testing.T) *fakeConn {
	t.Helper()
	select {
	case c := <-s.conns:
		return c
	case <-time.After(wait):
		t.Fatal("no agent connection")
		return nil
	}
}

// fakeConn is one agent connection as the server sees it.
type fakeConn struct {
	ws          *websocket.Conn
	hello       *protocol.Hello
	subprotocol string
	in          chan protocol.Frame
	heartbeats  chan *protocol.Heartbeat
	gone        chan struct{} // closed when the reader ends
	wmu         sync.Mutex
}

func (c *fakeConn) send(t *testing.T, f protocol.Frame) {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		t.Errorf("encode: %v", err)
		return
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(wait))
	if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
		t.Errorf("fake server: send %s: %v", f.FrameType(), err)
	}
}

// drop ends the connection abruptly, without a close frame.
func (c *fakeConn) drop(t *testing.T) {
	t.Helper()
	c.ws.UnderlyingConn().Close()
	select {
	case <-c.gone:
	case <-time.After(wait):
		t.Fatal("connection reader did not end")
	}
}

// next returns the next frame (heartbeats are kept apart).
func (c *fakeConn) next(t *testing.T) protocol.Frame {
	t.Helper()
	select {
	case f := <-c.in:
		return f
	case <-time.After(wait):
		t.Fatal("no frame from the agent")
		return nil
	}
}

// expect returns the next frame of type T, skipping ready frames (unless T
// is Ready); any other frame fails the test.
func expect[T protocol.Frame](t *testing.T, c *fakeConn) T {
	t.Helper()
	for {
		f := c.next(t)
		if v, ok := f.(T); ok {
			return v
		}
		if _, ok := f.(*protocol.Ready); ok {
			continue
		}
		var zero T
		data, _ := protocol.EncodeFrame(f)
		t.Fatalf("got %s, want %T", data, zero)
		return zero
	}
}

// expectReady returns the next ready frame's slots, skipping nothing.
func expectReady(t *testing.T, c *fakeConn) int {
	t.Helper()
	f := c.next(t)
	r, ok := f.(*protocol.Ready)
	if !ok {
		data, _ := protocol.EncodeFrame(f)
		t.Fatalf("got %s, want ready", data)
	}
	return r.Slots
}

// expectEvent returns the next event and checks its kind and seq.
func expectEvent(t *testing.T, c *fakeConn, kind protocol.EventKind, seq int64) *protocol.Event {
	t.Helper()
	ev := expect[*protocol.Event](t, c)
	if ev.Kind != kind || ev.Seq != seq {
		t.Fatalf("got event %s seq %d, want %s seq %d", ev.Kind, ev.Seq, kind, seq)
	}
	return ev
}

func (c *fakeConn) ack(t *testing.T, ev *protocol.Event) {
	c.send(t, &protocol.Ack{RunID: ev.RunID, Seq: ev.Seq})
}

// expectNothing checks that no frame other than ready arrives for d.
func (c *fakeConn) expectNothing(t *testing.T, d time.Duration) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case f := <-c.in:
			if _, ok := f.(*protocol.Ready); ok {
				continue
			}
			data, _ := protocol.EncodeFrame(f)
			t.Fatalf("unexpected frame %s", data)
		case <-timer.C:
			return
		}
	}
}

// ---------------------------------------------------------------------------
// Fake executor

// fakeExec runs each session with fn; a nil fn succeeds at once.
type fakeExec struct {
	fn       func(ctx context.Context, spec RunSpec, rep Reporter) Result
	sessions atomic.Int32
	closed   atomic.Int32
}

func (e *fakeExec) Session(ctx context.Context) (Session, error) {
	e.sessions.Add(1)
	return &fakeSession{e: e}, nil
}

type fakeSession struct{ e *fakeExec }

func (s *fakeSession) Run(ctx context.Context, spec RunSpec, rep Reporter) Result {
	if s.e.fn == nil {
		return Result{Status: protocol.RunSucceeded, Outputs: map[string]any{}}
	}
	return s.e.fn(ctx, spec, rep)
}

func (s *fakeSession) Close() error { s.e.closed.Add(1); return nil }

// blockUntilCancelled is an execution that starts step 0 and waits for its
// context, then reports what a browser would.
func blockUntilCancelled(started chan<- error) func(ctx context.Context, spec RunSpec, rep Reporter) Result {
	return func(ctx context.Context, spec RunSpec, rep Reporter) Result {
		rep.StepStarted(0, 1)
		<-ctx.Done()
		started <- context.Cause(ctx)
		rep.StepFinished(0, protocol.StepSkipped, 1, 1, nil, nil)
		return Result{Status: protocol.RunCancelled, Outputs: map[string]any{}}
	}
}

// ---------------------------------------------------------------------------
// Agent under test

func testDefinition() *protocol.Definition {
	return &protocol.Definition{Version: 1,
		Variables: []protocol.Variable{{Name: "user", Type: protocol.VarString}, {Name: "password", Type: protocol.VarSecret}},
		Steps: []protocol.Step{
			{Type: protocol.StepNavigate, URL: "https://example.com/login"},
			{Type: protocol.StepApproval, Message: "Submit the order?"},
			{Type: protocol.StepScreenshot, Name: "done"},
		}}
}

func assignFrame(runID, leaseID string) *protocol.Assign {
	return &protocol.Assign{RunID: runID, Attempt: 1, LeaseID: leaseID, TimeoutMs: 60_000,
		Workflow: protocol.AssignedWorkflow{ID: wfID, Name: "wf", Definition: testDefinition()},
		Inputs:   map[string]any{"user": "ann", "password": "hunter2-secret"}}
}

type testAgent struct {
	*Agent
	errc   chan error
	cancel context.CancelFunc
	logs   *logBuffer
}

// startAgent starts an agent against servers with a fast backoff; the test
// ends it (hard stop) unless it was stopped.
func startAgent(t *testing.T, exec Executor, servers []string, mod func(*Config)) *testAgent {
	t.Helper()
	logs := &logBuffer{}
	log := logrus.New()
	log.SetOutput(logs)
	log.SetLevel(logrus.DebugLevel)
	log.SetFormatter(&logrus.JSONFormatter{})
	cfg := Config{Servers: servers, Token: token, ID: "test-agent", Name: "test", Slots: 1, Labels: map[string]string{"os": "linux"},
		Executor: exec, Log: log, MinBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, FlushTimeout: wait}
	if mod != nil {
		mod(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{Agent: a, errc: make(chan error, 1), cancel: cancel, logs: logs}
	go func() { ta.errc <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-a.done:
		case <-time.After(wait):
			t.Error("Run did not return")
		}
	})
	return ta
}

// result waits for Run to return.
func (ta *testAgent) result(t *testing.T) error {
	t.Helper()
	select {
	case err := <-ta.errc:
		return err
	case <-time.After(wait):
		t.Fatal("Run did not return")
		return nil
	}
}

type logBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	return len(p), nil
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(slices.Clone(b.buf))
}

func discardLogger() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}
