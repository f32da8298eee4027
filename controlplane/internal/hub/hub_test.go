package hub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(mainRunner{m}) }

type mainRunner struct{ m *testing.M }

func (r mainRunner) Run() int {
	code := r.m.Run()
	if template.dir != "" {
		os.RemoveAll(template.dir)
	}
	return code
}

// template is a migrated, empty database, copied for each env: migrating
// a fresh SQLite file per test is slow under -race.
var template struct {
	once sync.Once
	dir  string
	db   []byte
	err  error
}

func migratedDB(t testing.TB) string {
	t.Helper()
	template.once.Do(func() {
		if template.dir, template.err = os.MkdirTemp("", "hubtest-"); template.err != nil {
			return
		}
		file := filepath.Join(template.dir, "template.db")
		st, err := sqlstore.Open(context.Background(), "sqlite://"+file)
		if err != nil {
			template.err = err
			return
		}
		if template.err = st.Close(); template.err != nil {
			return
		}
		template.db, template.err = os.ReadFile(file)
	})
	if template.err != nil {
		t.Fatal(template.err)
	}
	file := filepath.Join(t.TempDir(), "copelf.db")
	if err := os.WriteFile(file, template.db, 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

// wait bounds every wait for a frame or a state change. Generous: the
// tests run under -race on two shared cores.
const wait = 10 * time.Second

// env is a real control plane (API + hub) on SQLite over real HTTP. The hub's
// clock is the wall clock plus a skew the test may advance (env.advance), so
// maintenance (hub.Reap) can be driven deterministically.
type env struct {
	t      testing.TB
	st     *sqlstore.DB
	api    *api.Server
	hub    *hub.Hub
	srv    *httptest.Server
	events *recorder
	skew   atomic.Int64

	// The default account: a member on plan pro with 100 credits.
	*account
}

// account is a user with an API token and an agent token.
type account struct {
	user  *store.User
	token string // API token
	agent string // agent token
}

type envOptions struct {
	api       api.Config
	leakCheck bool
	logLevel  logrus.Level
}

type envOption func(*envOptions)

// withAPI changes the API's configuration.
func withAPI(f func(*api.Config)) envOption { return func(o *envOptions) { f(&o.api) } }

// withLogLevel sets the level of the (discarded) log; formatting debug lines
// costs CPU that benchmarks should not measure.
func withLogLevel(l logrus.Level) envOption { return func(o *envOptions) { o.logLevel = l } }

// noLeakCheck skips the per-test goroutine check (benchmarks, parallel tests).
func noLeakCheck() envOption { return func(o *envOptions) { o.leakCheck = false } }

func newEnv(t testing.TB, cfg hub.Config, opts ...envOption) *env {
	t.Helper()
	o := envOptions{api: api.Config{RunCost: 1, DataDir: t.TempDir()}, leakCheck: true, logLevel: logrus.DebugLevel}
	for _, f := range opts {
		f(&o)
	}
	if o.leakCheck {
		// Registered first, so it runs last: after the server, the hub,
		// the store and every client are closed.
		t.Cleanup(func() {
			if !t.Failed() {
				goleak.VerifyNone(t)
			}
		})
	}
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, envDB(t))
	if err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.Out = io.Discard
	log.SetLevel(o.logLevel)
	srv := api.New(st, log, o.api)
	h := hub.New(st, log, func(ctx context.Context, token string) (*store.User, *store.Token, error) {
		p, err := srv.Authenticate(ctx, token)
		if err != nil {
			return nil, nil, err
		}
		return p.User, p.Token, nil
	}, cfg)
	e := &env{t: t, st: st, api: srv, hub: h, events: newRecorder()}
	// Set before Start: the loops read them.
	h.Now = func() time.Time { return time.Now().Add(time.Duration(e.skew.Load())) }
	h.Listener = e.events
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Hooks, srv.Agents = h, h
	srv.Handle("/v1/agents/connect", h)
	e.srv = httptest.NewServer(srv)
	t.Cleanup(func() { h.Close(); e.srv.Close(); st.Close() })
	e.account = e.newAccount("a@example.com", 100)
	return e
}

// newAccount creates a member on plan pro with credits and two tokens.
func (e *env) newAccount(email string, credits int64) *account {
	e.t.Helper()
	ctx := context.Background()
	u, err := e.st.UserCreate(ctx, store.UserCreateParams{Email: email, PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		e.t.Fatal(err)
	}
	if credits > 0 {
		if _, err := e.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: credits, Kind: store.LedgerGrant, Reason: "test"}); err != nil {
			e.t.Fatal(err)
		}
	}
	a := &account{user: u}
	if a.token, err = api.CreateToken(ctx, e.st, u.ID, store.TokenAPI, "api"); err != nil {
		e.t.Fatal(err)
	}
	if a.agent, err = api.CreateToken(ctx, e.st, u.ID, store.TokenAgent, "agent"); err != nil {
		e.t.Fatal(err)
	}
	return a
}

// advance moves the hub's clock forward.
func (e *env) advance(d time.Duration) { e.skew.Add(int64(d)) }

// reap runs maintenance once at the hub's clock.
func (e *env) reap() {
	e.t.Helper()
	if err := e.hub.Reap(context.Background()); err != nil {
		e.t.Fatal(err)
	}
}

// response is an HTTP answer with its JSON body decoded.
type response struct {
	status int
	header http.Header
	body   map[string]any
	raw    []byte
}

// do sends a request with a bearer token. body is JSON-encoded unless it is
// []byte or nil.
func (e *env) do(method, path, token string, body any, header http.Header) *response {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if _, ok := body.([]byte); !ok && body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	out := &response{status: res.StatusCode, header: res.Header}
	if out.raw, err = io.ReadAll(res.Body); err != nil {
		e.t.Fatal(err)
	}
	if strings.HasPrefix(res.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(out.raw, &out.body); err != nil {
			e.t.Fatalf("%s %s: %d, body %q: %v", method, path, res.StatusCode, out.raw, err)
		}
	}
	return out
}

// ok sends a request with the default account's API token and fails the test
// on an error status.
func (e *env) ok(method, path string, body any) map[string]any {
	e.t.Helper()
	res := e.do(method, path, e.token, body, nil)
	if res.status >= 300 {
		e.t.Fatalf("%s %s: %d %s", method, path, res.status, res.raw)
	}
	return res.body
}

func (e *env) post(path string, body any) map[string]any {
	e.t.Helper()
	return e.ok("POST", path, body)
}
func (e *env) get(path string) map[string]any { e.t.Helper(); return e.ok("GET", path, nil) }

// wantEnvelope checks an error answer: status, code and the envelope's shape.
func wantEnvelope(t testing.TB, res *response, status int, code protocol.Code) {
	t.Helper()
	if res.status != status || res.body["code"] != string(code) {
		t.Fatalf("want %d %s, got %d %s", status, code, res.status, res.raw)
	}
	if id, _ := res.body["requestId"].(string); id == "" || id != res.header.Get("X-Request-Id") {
		t.Fatalf("requestId %q, X-Request-Id %q", res.body["requestId"], res.header.Get("X-Request-Id"))
	}
	if _, ok := res.body["message"].(string); !ok {
		t.Fatalf("no message: %s", res.raw)
	}
}

func reasonOf(body map[string]any) any {
	d, _ := body["details"].(map[string]any)
	return d["reason"]
}

// defaultDef: navigate, then extract "title".
const defaultDef = `{"version":1,"variables":[{"name":"q","type":"string"}],"steps":[{"type":"navigate","url":"about:blank"},{"type":"extract","selector":"h1","output":"title"}]}`

// approvalDef: navigate, an approval, then extract.
const approvalDef = `{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"},{"type":"approval","message":"Go on?"},{"type":"extract","selector":"h1","output":"title"}]}`

func (e *env) workflow() string { e.t.Helper(); return e.workflowWith(defaultDef) }

func (e *env) workflowWith(def string) string {
	e.t.Helper()
	return e.post("/v1/workflows", map[string]any{"name": "wf", "definition": json.RawMessage(def)})["id"].(string)
}

// runOn queues a run of a new workflow through the API and returns its id.
func (e *env) runOn(body map[string]any) string {
	e.t.Helper()
	return e.runOf(e.workflow(), body)
}

func (e *env) runOf(wf string, body map[string]any) string {
	e.t.Helper()
	if body == nil {
		body = map[string]any{}
	}
	if _, ok := body["inputs"]; !ok {
		body["inputs"] = map[string]any{"q": "x"}
	}
	return e.post("/v1/workflows/"+wf+"/runs", body)["id"].(string)
}

func (e *env) run(id string) *store.Run {
	e.t.Helper()
	r, err := e.st.RunGet(context.Background(), id)
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// waitRun waits until the stored run satisfies ok. The hub's listener wakes
// it; nothing polls on a timer.
func (e *env) waitRun(id string, what string, ok func(*store.Run) bool) *store.Run {
	e.t.Helper()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		changed := e.events.changed()
		r := e.run(id)
		if ok(r) {
			return r
		}
		select {
		case <-changed:
		case <-deadline.C:
			e.t.Fatalf("run %s: still not %s: status %s, lease %q, agent %q, error %+v", id, what, r.Status, r.LeaseID, r.AgentID, r.Error)
		}
	}
}

// waitFor waits until cond holds, re-checking at every change the hub's
// listener reports.
func (e *env) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		changed := e.events.changed()
		if cond() {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			e.t.Fatalf("still not %s after %s", what, wait)
		}
	}
}

func (e *env) waitStatus(id string, status protocol.RunStatus) *store.Run {
	e.t.Helper()
	return e.waitRun(id, string(status), func(r *store.Run) bool { return r.Status == status })
}

// credits checks the account's balance and held credits and that the ledger
// adds up to the balance.
func (e *env) credits(a *account, balance, held int64) {
	e.t.Helper()
	ctx := context.Background()
	cr, err := e.st.CreditsGet(ctx, a.user.ID)
	if err != nil {
		e.t.Fatal(err)
	}
	if cr.Balance != balance || cr.Held != held {
		e.t.Fatalf("credits: balance %d held %d, want %d and %d", cr.Balance, cr.Held, balance, held)
	}
	var sum int64
	cursor := ""
	for {
		entries, next, err := e.st.LedgerList(ctx, a.user.ID, store.Page{Limit: 500, Cursor: cursor})
		if err != nil {
			e.t.Fatal(err)
		}
		for _, le := range entries {
			sum += le.Amount
		}
		if next == "" {
			break
		}
		cursor = next
	}
	if sum != cr.Balance {
		e.t.Fatalf("ledger sums to %d, balance is %d", sum, cr.Balance)
	}
}

// charges counts the run_charge and run_refund entries of a run.
func (e *env) charges(a *account, runID string) (charges, refunds int) {
	e.t.Helper()
	entries, _, err := e.st.LedgerList(context.Background(), a.user.ID, store.Page{Limit: 500})
	if err != nil {
		e.t.Fatal(err)
	}
	for _, le := range entries {
		if le.RunID != runID {
			continue
		}
		switch le.Kind {
		case store.LedgerRunCharge:
			charges++
		case store.LedgerRunRefund:
			refunds++
		}
	}
	return charges, refunds
}

// recorder is the hub's listener: it wakes waiters on every change.
type recorder struct {
	mu        sync.Mutex
	wake      chan struct{}
	approvals []*store.Approval
	agents    int
}

func newRecorder() *recorder { return &recorder{wake: make(chan struct{})} }

// changed returns a channel closed at the next change.
func (r *recorder) changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.wake
}

func (r *recorder) notify(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f != nil {
		f()
	}
	close(r.wake)
	r.wake = make(chan struct{})
}

func (r *recorder) RunChanged(*store.Run) { r.notify(nil) }
func (r *recorder) ApprovalCreated(a *store.Approval) {
	r.notify(func() { r.approvals = append(r.approvals, a) })
}
func (r *recorder) AgentChanged(string) { r.notify(func() { r.agents++ }) }

// client is a protocol client over a real websocket. A reader goroutine
// decodes every frame into a queue; heartbeat answers are counted and
// skipped.
type client struct {
	t      testing.TB
	e      *env
	ws     *websocket.Conn
	frames chan item
	done   chan struct{}
	err    error            // why the reader stopped; set before done is closed
	hbs    atomic.Int64     // heartbeat answers read
	hbc    chan struct{}    // signalled at each heartbeat answer
	seqs   map[string]int64 // last seq sent per lease
	once   sync.Once
}

type item struct {
	f   protocol.Frame
	raw []byte
	err error
	at  time.Time // when the reader got it
}

func (e *env) wsURL() string {
	return "ws" + strings.TrimPrefix(e.srv.URL, "http") + "/v1/agents/connect"
}

// dial opens a websocket with the copelf subprotocol.
func (e *env) dial(header http.Header) (*websocket.Conn, *http.Response, error) {
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: wait}
	return d.Dial(e.wsURL(), header)
}

// open dials and starts the client's reader, without a hello.
func (e *env) open() *client {
	e.t.Helper()
	ws, res, err := e.dial(nil)
	if err != nil {
		e.t.Fatalf("dial: %v (%v)", err, res)
	}
	return e.wrap(ws)
}

func (e *env) wrap(ws *websocket.Conn) *client {
	c := &client{t: e.t, e: e, ws: ws, frames: make(chan item, 4096), done: make(chan struct{}), hbc: make(chan struct{}, 1), seqs: map[string]int64{}}
	go c.read()
	e.t.Cleanup(c.close)
	return c
}

func (c *client) read() {
	defer close(c.done)
	for {
		mt, data, err := c.ws.ReadMessage()
		if err != nil {
			c.err = err
			return
		}
		it := item{raw: data, at: time.Now()}
		if mt != websocket.TextMessage {
			it.err = errors.New("the server sent a binary message")
		} else {
			it.f, it.err = protocol.DecodeFrame(data)
		}
		if hb, ok := it.f.(*protocol.Heartbeat); ok && it.err == nil && len(hb.Runs) == 0 {
			c.hbs.Add(1)
			select {
			case c.hbc <- struct{}{}:
			default:
			}
			continue
		}
		c.frames <- it
	}
}

// close drops the connection without a close frame and waits for the reader.
func (c *client) close() {
	c.once.Do(func() { c.ws.Close() })
	<-c.done
}

// hello is the default hello of an agent of the default account.
func (e *env) hello(id string, slots int) *protocol.Hello {
	return &protocol.Hello{Protocol: protocol.Version, Token: e.agent, Agent: protocol.AgentInfo{ID: id, Name: id, Kind: protocol.AgentHeadless, Version: "test", Slots: slots}}
}

// connect opens a connection for agent id and reads its welcome.
func (e *env) connect(id string, slots int) (*client, *protocol.Welcome) {
	e.t.Helper()
	return e.connectWith(e.hello(id, slots))
}

func (e *env) connectWith(h *protocol.Hello) (*client, *protocol.Welcome) {
	e.t.Helper()
	c := e.open()
	c.send(h)
	return c, expect[*protocol.Welcome](c)
}

func (c *client) send(f protocol.Frame) {
	c.t.Helper()
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		c.t.Fatal(err)
	}
	c.sendRaw(websocket.TextMessage, data)
}

func (c *client) sendRaw(mt int, data []byte) {
	c.t.Helper()
	if err := c.ws.WriteMessage(mt, data); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// recv returns the next frame other than a heartbeat answer.
func (c *client) recv() protocol.Frame {
	c.t.Helper()
	select {
	case it := <-c.frames:
		if it.err != nil {
			c.t.Fatalf("frame %s: %v", it.raw, it.err)
		}
		return it.f
	case <-c.done:
		select {
		case it := <-c.frames:
			if it.err != nil {
				c.t.Fatalf("frame %s: %v", it.raw, it.err)
			}
			return it.f
		default:
		}
		c.t.Fatalf("connection ended: %v", c.err)
	case <-time.After(wait):
		c.t.Fatalf("no frame within %s", wait)
	}
	return nil
}

// expect reads the next frame and fails unless it is a T.
func expect[T protocol.Frame](c *client) T {
	c.t.Helper()
	f := c.recv()
	v, ok := f.(T)
	if !ok {
		data, _ := protocol.EncodeFrame(f)
		var zero T
		c.t.Fatalf("want %T, got %s", zero, data)
	}
	return v
}

// expectError reads an error frame with code and, when set, details.reason.
func (c *client) expectError(code protocol.Code, reason string) *protocol.ErrorFrame {
	c.t.Helper()
	f := expect[*protocol.ErrorFrame](c)
	if f.Code != code || (reason != "" && f.Details["reason"] != reason) {
		c.t.Fatalf("want error %s/%s, got %+v", code, reason, f)
	}
	return f
}

// expectClosed waits for the server to end the connection and returns the
// close error (nil when the connection ended without a close frame). Frames
// still queued are returned too.
func (c *client) expectClosed() (*websocket.CloseError, []protocol.Frame) {
	c.t.Helper()
	select {
	case <-c.done:
	case <-time.After(wait):
		c.t.Fatalf("the server did not close the connection within %s", wait)
	}
	var frames []protocol.Frame
	for {
		select {
		case it := <-c.frames:
			if it.err != nil {
				c.t.Fatalf("frame %s: %v", it.raw, it.err)
			}
			frames = append(frames, it.f)
			continue
		default:
		}
		break
	}
	var ce *websocket.CloseError
	if errors.As(c.err, &ce) {
		return ce, frames
	}
	return nil, frames
}

// sync sends a heartbeat and waits for its answer: every frame sent before
// it has been handled by the server.
func (c *client) sync() {
	c.t.Helper()
	n := c.hbs.Load()
	c.send(&protocol.Heartbeat{})
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for c.hbs.Load() <= n {
		select {
		case <-c.hbc:
		case <-c.done:
			c.t.Fatalf("connection ended: %v", c.err)
		case <-deadline.C:
			c.t.Fatal("no heartbeat answer")
		}
	}
}

// quiet checks that no frame is waiting.
func (c *client) quiet() {
	c.t.Helper()
	select {
	case it := <-c.frames:
		c.t.Fatalf("unexpected frame %s", it.raw)
	default:
	}
}

// report sends an event under a lease with the next seq of that lease.
func (c *client) report(runID, leaseID string, ev protocol.Event) int64 {
	c.t.Helper()
	c.seqs[leaseID]++
	ev.RunID, ev.LeaseID, ev.Seq = runID, leaseID, c.seqs[leaseID]
	c.send(&ev)
	return ev.Seq
}

// reportAcked sends an event and waits for its ack.
func (c *client) reportAcked(runID, leaseID string, ev protocol.Event) {
	c.t.Helper()
	seq := c.report(runID, leaseID, ev)
	c.expectAck(runID, seq)
}

func (c *client) expectAck(runID string, seq int64) {
	c.t.Helper()
	ack := expect[*protocol.Ack](c)
	if ack.RunID != runID || ack.Seq != seq {
		c.t.Fatalf("ack %+v, want %s/%d", ack, runID, seq)
	}
}

// expectAssign reads an assign of runID (any run when empty).
func (c *client) expectAssign(runID string) *protocol.Assign {
	c.t.Helper()
	a := expect[*protocol.Assign](c)
	if runID != "" && a.RunID != runID {
		c.t.Fatalf("assign of %s, want %s", a.RunID, runID)
	}
	return a
}

// start accepts an assign and reports started.
func (c *client) start(a *protocol.Assign) {
	c.t.Helper()
	c.send(&protocol.Accept{RunID: a.RunID, LeaseID: a.LeaseID})
	c.reportAcked(a.RunID, a.LeaseID, protocol.Event{Kind: protocol.EventStarted})
}

// finish reports finished with status.
func (c *client) finish(a *protocol.Assign, status protocol.RunStatus) {
	c.t.Helper()
	ev := protocol.Event{Kind: protocol.EventFinished, Status: string(status)}
	if status != protocol.RunSucceeded && status != protocol.RunCancelled {
		ev.Error = protocol.Errorf(protocol.CodeInternal, "it broke").With("reason", protocol.ReasonBrowserCrashed)
	}
	c.reportAcked(a.RunID, a.LeaseID, ev)
}

func intp(i int) *int { return &i }

func TestLifecycle(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, w := e.connect("agent-1", 1)
	if w.LeaseMs != 5000 || w.HeartbeatMs <= 0 || len(w.Runs) != 0 || !strings.HasPrefix(w.AgentID, "agt_") {
		t.Fatalf("welcome: %+v", w)
	}
	run := e.runOn(nil)
	a := c.expectAssign(run)
	if a.Attempt != 1 || a.Inputs["q"] != "x" || a.Workflow.Name != "wf" || a.Workflow.Definition == nil || len(a.Workflow.Definition.Steps) != 2 {
		t.Fatalf("assign: %+v", a)
	}
	e.credits(e.account, 100, 1)
	c.send(&protocol.Accept{RunID: a.RunID, LeaseID: a.LeaseID})
	events := []protocol.Event{
		{Kind: protocol.EventStarted},
		{Kind: protocol.EventStepStarted, Step: intp(0)},
		{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"},
		{Kind: protocol.EventStepStarted, Step: intp(1)},
		{Kind: protocol.EventStepFinished, Step: intp(1), Status: "succeeded", Output: "Hello"},
		{Kind: protocol.EventFinished, Status: "succeeded"},
	}
	for _, ev := range events {
		c.reportAcked(a.RunID, a.LeaseID, ev)
	}
	got := e.run(a.RunID)
	if got.Status != protocol.RunSucceeded || got.Outputs["title"] != "Hello" || got.CostCharged != 1 || got.Attempt != 1 {
		t.Fatalf("run: %+v", got)
	}
	e.credits(e.account, 99, 0)
	if c, r := e.charges(e.account, a.RunID); c != 1 || r != 0 {
		t.Fatalf("charges %d refunds %d", c, r)
	}
	hist, err := e.st.RunEventList(context.Background(), a.RunID)
	if err != nil || len(hist) != len(events) {
		t.Fatalf("history: %d events, %v", len(hist), err)
	}
}
