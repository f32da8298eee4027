package hub_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// env is a real control plane (API + hub) on SQLite over real HTTP.
type env struct {
	t     *testing.T
	st    *sqlstore.DB
	api   *api.Server
	hub   *hub.Hub
	srv   *httptest.Server
	user  *store.User
	token string // API token
	agent string // agent token
}

func newEnv(t *testing.T, cfg hub.Config) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(t.TempDir(), "copelf.db"))
	if err != nil {
		t.Fatal(err)
	}
	log, _ := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	srv := api.New(st, log, api.Config{RunCost: 1, DataDir: t.TempDir()})
	h := hub.New(st, log, func(ctx context.Context, token string) (*store.User, *store.Token, error) {
		p, err := srv.Authenticate(ctx, token)
		if err != nil {
			return nil, nil, err
		}
		return p.User, p.Token, nil
	}, cfg)
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Hooks, srv.Agents = h, h
	srv.Handle("/v1/agents/connect", h)
	hs := httptest.NewServer(srv)
	e := &env{t: t, st: st, api: srv, hub: h, srv: hs}
	t.Cleanup(func() { h.Close(); hs.Close(); st.Close() })
	e.user, err = st.UserCreate(ctx, store.UserCreateParams{Email: "a@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: e.user.ID, Amount: 100, Kind: store.LedgerGrant, Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	e.token, _ = api.CreateToken(ctx, st, e.user.ID, store.TokenAPI, "api")
	e.agent, _ = api.CreateToken(ctx, st, e.user.ID, store.TokenAgent, "agent")
	return e
}

func (e *env) post(path string, body any) map[string]any {
	e.t.Helper()
	raw, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", e.srv.URL+path, bytes.NewReader(raw))
	req.Header.Set("Authorization", "Bearer "+e.token)
	req.Header.Set("Content-Type", "application/json")
	res, err := e.srv.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		e.t.Fatal(err)
	}
	if res.StatusCode >= 300 {
		e.t.Fatalf("POST %s: %d %v", path, res.StatusCode, out)
	}
	return out
}

func (e *env) workflow() string {
	def := json.RawMessage(`{"version":1,"variables":[{"name":"q","type":"string"}],"steps":[{"type":"navigate","url":"about:blank"},{"type":"extract","selector":"h1","output":"title"}]}`)
	return e.post("/v1/workflows", map[string]any{"name": "wf", "definition": def})["id"].(string)
}

// client is a no-op protocol client over a real websocket.
type client struct {
	t  *testing.T
	ws *websocket.Conn
}

func (e *env) dial(header http.Header) (*websocket.Conn, *http.Response, error) {
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: 10 * time.Second}
	return d.Dial("ws"+strings.TrimPrefix(e.srv.URL, "http")+"/v1/agents/connect", header)
}

func (e *env) connect(id string, slots int) (*client, *protocol.Welcome) {
	e.t.Helper()
	ws, _, err := e.dial(nil)
	if err != nil {
		e.t.Fatal(err)
	}
	c := &client{t: e.t, ws: ws}
	e.t.Cleanup(func() { ws.Close() })
	c.send(&protocol.Hello{Protocol: protocol.Version, Token: e.agent, Agent: protocol.AgentInfo{ID: id, Name: id, Kind: protocol.AgentHeadless, Version: "test", Slots: slots}})
	w, ok := c.recv().(*protocol.Welcome)
	if !ok {
		e.t.Fatal("no welcome")
	}
	return c, w
}

func (c *client) send(f protocol.Frame) {
	c.t.Helper()
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
		c.t.Fatal(err)
	}
}

// recv reads the next frame other than a heartbeat answer.
func (c *client) recv() protocol.Frame {
	c.t.Helper()
	for {
		_ = c.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			c.t.Fatalf("decode %s: %v", data, err)
		}
		if _, ok := f.(*protocol.Heartbeat); ok {
			continue
		}
		return f
	}
}

func TestLifecycle(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("agent-1", 1)
	wf := e.workflow()
	run := e.post("/v1/workflows/"+wf+"/runs", map[string]any{"inputs": map[string]any{"q": "x"}})
	a, ok := c.recv().(*protocol.Assign)
	if !ok || a.RunID != run["id"] {
		t.Fatalf("assign: %+v", a)
	}
	c.send(&protocol.Accept{RunID: a.RunID, LeaseID: a.LeaseID})
	step := 1
	events := []*protocol.Event{
		{Kind: protocol.EventStarted},
		{Kind: protocol.EventStepStarted, Step: &step},
		{Kind: protocol.EventStepFinished, Step: &step, Status: "succeeded", Output: "Hello"},
		{Kind: protocol.EventFinished, Status: "succeeded"},
	}
	for i, ev := range events {
		ev.RunID, ev.LeaseID, ev.Seq = a.RunID, a.LeaseID, int64(i+1)
		c.send(ev)
		ack, ok := c.recv().(*protocol.Ack)
		if !ok || ack.Seq != int64(i+1) {
			t.Fatalf("ack %d: %+v", i, ack)
		}
	}
	got, err := e.st.RunGet(context.Background(), a.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != protocol.RunSucceeded || got.Outputs["title"] != "Hello" || got.CostCharged != 1 {
		t.Fatalf("run: %+v", got)
	}
	cr, _ := e.st.CreditsGet(context.Background(), e.user.ID)
	if cr.Balance != 99 || cr.Held != 0 {
		t.Fatalf("credits: %+v", cr)
	}
}
