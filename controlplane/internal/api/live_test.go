package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// liveEnv is the API with its event log, feed and agent hub wired as
// copelfd wires them, on a real SQLite file, reached over real HTTP.
type liveEnv struct {
	*env
	Broker *events.Broker
	Hub    *hub.Hub
}

// liveWait bounds every wait for something to arrive: generous, the
// machine is slow and shared.
const liveWait = 30 * time.Second

func newLiveEnv(t *testing.T, cfg api.Config) *liveEnv {
	t.Helper()
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(t.TempDir(), "copelf.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	if cfg.RunCost == 0 {
		cfg.RunCost = 1
	}
	srv := api.New(st, log, cfg)
	b := events.New(st, log, events.Config{PollInterval: 50 * time.Millisecond})
	b.Observer = srv.Metrics()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Events = b
	feed := api.NewFeed(srv)
	h := hub.New(st, log, func(ctx context.Context, token string) (*store.User, *store.Token, error) {
		p, err := srv.Authenticate(ctx, token)
		if err != nil {
			return nil, nil, err
		}
		return p.User, p.Token, nil
	}, hub.Config{LeaseTimeout: 30 * time.Second})
	h.Listener, h.Metrics = feed, srv.Metrics()
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	srv.Hooks, srv.Agents = api.ChainHooks(h, feed.Hooks()), h
	srv.Handle("/v1/agents/connect", h)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	t.Cleanup(b.Close) // ends the streams, which hs.Close waits for
	t.Cleanup(h.Close)
	e := &env{t: t, Store: st, API: srv, Server: hs, Logs: hook}
	admin, err := st.UserCreate(ctx, store.UserCreateParams{Email: "admin@example.com", PasswordHash: "x", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if e.Admin, err = api.CreateToken(ctx, st, admin.ID, store.TokenAPI, "admin"); err != nil {
		t.Fatal(err)
	}
	return &liveEnv{env: e, Broker: b, Hub: h}
}

// sseEvent is one event read from a stream, or a comment.
type sseEvent struct {
	ID      int64
	HasID   bool
	Type    string
	Data    []byte
	Comment string
	Retry   string
}

// envelope decodes the data line.
func (ev sseEvent) envelope(t *testing.T) (out struct {
	ID        int64           `json:"id"`
	Type      string          `json:"type"`
	AccountID string          `json:"accountId"`
	At        time.Time       `json:"at"`
	Data      json.RawMessage `json:"data"`
}) {
	t.Helper()
	if err := json.Unmarshal(ev.Data, &out); err != nil {
		t.Fatalf("event data %q: %v", ev.Data, err)
	}
	if out.ID != ev.ID || out.Type != ev.Type {
		t.Fatalf("data id/type %d %q differ from the event's %d %q", out.ID, out.Type, ev.ID, ev.Type)
	}
	return out
}

// stream is an open event stream read by a goroutine of its own.
type stream struct {
	t      *testing.T
	res    *http.Response
	cancel context.CancelFunc
	items  chan sseEvent
	done   chan struct{} // closed when the server ends the stream
}

// openStream opens an event stream and checks its headers (and the
// document: checkOpenAPI with an empty body).
func (e *env) openStream(path, token string, header map[string]string) *stream {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", e.Server.URL+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := e.Server.Client().Do(req)
	if err != nil {
		cancel()
		e.t.Fatal(err)
	}
	if res.StatusCode != http.StatusOK {
		cancel()
		res.Body.Close()
		e.t.Fatalf("GET %s: status %d", path, res.StatusCode)
	}
	if ct := res.Header.Get("Content-Type"); ct != "text/event-stream" {
		e.t.Errorf("Content-Type %q", ct)
	}
	if cc := res.Header.Get("Cache-Control"); cc != "no-cache" {
		e.t.Errorf("Cache-Control %q", cc)
	}
	checkOpenAPI(e.t, req, &response{Response: res})
	s := &stream{t: e.t, res: res, cancel: cancel, items: make(chan sseEvent, 100_000), done: make(chan struct{})}
	go s.read()
	e.t.Cleanup(s.close)
	return s
}

// read parses the stream (the text/event-stream format) until it ends.
func (s *stream) read() {
	defer close(s.done)
	r := bufio.NewReader(s.res.Body)
	var ev sseEvent
	var data [][]byte
	have := false
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0:
			if have {
				ev.Data = bytes.Join(data, []byte("\n"))
				s.items <- ev
			}
			ev, data, have = sseEvent{}, nil, false
		case line[0] == ':':
			s.items <- sseEvent{Comment: strings.TrimSpace(string(line[1:]))}
		default:
			field, value, _ := bytes.Cut(line, []byte(":"))
			value = bytes.TrimPrefix(value, []byte(" "))
			have = true
			switch string(field) {
			case "id":
				ev.ID, _ = strconv.ParseInt(string(value), 10, 64)
				ev.HasID = true
			case "event":
				ev.Type = string(value)
			case "data":
				data = append(data, value)
			case "retry":
				ev.Retry = string(value)
			}
		}
	}
}

func (s *stream) close() {
	s.cancel()
	s.res.Body.Close()
	<-s.done
}

// next returns the next event (comments skipped unless comments is true).
func (s *stream) next(comments bool) sseEvent {
	s.t.Helper()
	timeout := time.After(liveWait)
	for {
		select {
		case ev := <-s.items:
			if ev.Comment != "" && !comments || ev.Retry != "" && !ev.HasID {
				continue
			}
			return ev
		case <-s.done:
			select {
			case ev := <-s.items:
				if ev.Comment != "" && !comments || ev.Retry != "" && !ev.HasID {
					continue
				}
				return ev
			default:
			}
			s.t.Fatal("the stream ended")
		case <-timeout:
			s.t.Fatalf("no event within %s", liveWait)
		}
	}
}

// ended waits for the server to end the stream.
func (s *stream) ended() {
	s.t.Helper()
	select {
	case <-s.done:
	case <-time.After(liveWait):
		s.t.Fatal("the server did not end the stream")
	}
}

// runOf decodes an event's run.
func runOf(t *testing.T, ev sseEvent) map[string]any {
	t.Helper()
	var run map[string]any
	if err := json.Unmarshal(ev.envelope(t).Data, &run); err != nil {
		t.Fatal(err)
	}
	return run
}

// connectAgent connects a headless agent with a token of the account and
// waits for its welcome; the connection closes when the test ends.
func (e *env) connectAgent(token, clientID string, slots int) *websocket.Conn {
	e.t.Helper()
	url := "ws" + strings.TrimPrefix(e.Server.URL, "http") + "/v1/agents/connect"
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: liveWait}
	ws, _, err := d.Dial(url, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ws.Close() })
	send := func(f protocol.Frame) {
		data, err := protocol.EncodeFrame(f)
		if err != nil {
			e.t.Fatal(err)
		}
		if err := ws.WriteMessage(websocket.TextMessage, data); err != nil {
			e.t.Fatal(err)
		}
	}
	send(&protocol.Hello{Protocol: protocol.Version, Token: token, Agent: protocol.AgentInfo{ID: clientID, Name: clientID, Kind: protocol.AgentHeadless, Version: "test", Slots: slots}})
	_ = ws.SetReadDeadline(time.Now().Add(liveWait))
	_, data, err := ws.ReadMessage()
	if err != nil {
		e.t.Fatal(err)
	}
	if f, err := protocol.DecodeFrame(data); err != nil || f.FrameType() != protocol.FrameWelcome {
		e.t.Fatalf("first frame %s (%v)", data, err)
	}
	if slots > 0 {
		send(&protocol.Ready{Slots: slots})
	}
	return ws
}

// agentToken makes an agent token for u.
func (e *env) agentToken(u user) string {
	e.t.Helper()
	r := e.post("/v1/tokens", u.Token, map[string]any{"name": "agent", "kind": "agent"})
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)["token"].(string)
}

// storedEvents lists the stored events an account (or every account, "")
// may see.
func (e *env) storedEvents(account string) []*store.Event {
	e.t.Helper()
	var out []*store.Event
	var after int64
	for {
		evs, err := e.Store.EventsAfter(context.Background(), after, store.EventFilter{AccountID: account}, 1000)
		if err != nil {
			e.t.Fatal(err)
		}
		if len(evs) == 0 {
			return out
		}
		out = append(out, evs...)
		after = evs[len(evs)-1].ID
	}
}

// TestEventsResumeLosesNothing: many runs are queued and cancelled
// concurrently by several accounts while an operator and a member read
// /v1/events; each stream is cut mid-way and resumed with Last-Event-ID
// (the header, then the query parameter). Together the pieces hold every
// stored event the reader may see, once each, in id order, and only those.
func TestEventsResumeLosesNothing(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	operator := e.newUser(store.RoleOperator, store.PlanPro, 0)
	const accounts, workers, rounds = 3, 2, 15
	var users []user
	for range accounts {
		users = append(users, e.newUser(store.RoleMember, store.PlanPro, 1000))
	}
	member := users[0]

	all := e.openStream("/v1/events", operator.Token, nil)
	mine := e.openStream("/v1/events?types=run,batch,approval,agent", member.Token, nil)

	// Generate: each worker owns a workflow and queues then cancels runs
	// on it (two events per round).
	var wg sync.WaitGroup
	for _, u := range users {
		for range workers {
			wf := e.newWorkflow(u.Token)
			wg.Go(func() {
				for range rounds {
					r := e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs())
					if r.StatusCode != http.StatusCreated {
						t.Errorf("create run: %d %s", r.StatusCode, r.Body)
						return
					}
					id := r.Map(t)["id"].(string)
					if r := e.post("/v1/runs/"+id+"/cancel", u.Token, nil); r.StatusCode != http.StatusOK {
						t.Errorf("cancel: %d %s", r.StatusCode, r.Body)
						return
					}
				}
			})
		}
	}
	total := accounts * workers * rounds * 2
	perAccount := workers * rounds * 2

	// read takes n events from s, checking order, and returns their ids.
	read := func(s *stream, n int, account string, seen map[int64]bool, last *int64) {
		t.Helper()
		for range n {
			ev := s.next(false)
			if !ev.HasID || ev.ID <= *last || seen[ev.ID] {
				t.Fatalf("event id %d after %d (seen before: %v)", ev.ID, *last, seen[ev.ID])
			}
			env := ev.envelope(t)
			if account != "" && env.AccountID != account {
				t.Fatalf("a member's stream carried account %s's event", env.AccountID)
			}
			if ev.Type != events.RunUpdated {
				t.Fatalf("event type %q", ev.Type)
			}
			seen[ev.ID], *last = true, ev.ID
		}
	}
	check := func(name string, seen map[int64]bool, account string, want int) {
		t.Helper()
		stored := e.storedEvents(account)
		if len(stored) != want || len(seen) != want {
			t.Fatalf("%s: read %d events, %d stored, want %d", name, len(seen), len(stored), want)
		}
		for _, ev := range stored {
			if !seen[ev.ID] {
				t.Fatalf("%s: stored event %d (%s) never read", name, ev.ID, ev.Type)
			}
		}
	}

	// The operator's stream: cut after a third, resume with the header;
	// cut again, resume with the query parameter.
	seenAll, lastAll := map[int64]bool{}, int64(0)
	read(all, total/3, "", seenAll, &lastAll)
	all.close()
	all = e.openStream("/v1/events", operator.Token, map[string]string{"Last-Event-ID": strconv.FormatInt(lastAll, 10)})
	read(all, total/3, "", seenAll, &lastAll)
	all.close()
	all = e.openStream("/v1/events?lastEventId="+strconv.FormatInt(lastAll, 10), operator.Token, nil)

	// The member's stream: cut after a few, resumed while the others write.
	seenMine, lastMine := map[int64]bool{}, int64(0)
	read(mine, perAccount/4, member.ID, seenMine, &lastMine)
	mine.close()
	mine = e.openStream("/v1/events", member.Token, map[string]string{"Last-Event-ID": strconv.FormatInt(lastMine, 10)})

	wg.Wait()
	read(all, total-2*(total/3), "", seenAll, &lastAll)
	read(mine, perAccount-perAccount/4, member.ID, seenMine, &lastMine)
	check("operator", seenAll, "", total)
	check("member", seenMine, member.ID, perAccount)

	// Nothing more comes: no repeat after the last event.
	e.post("/v1/workflows/"+e.newWorkflow(member.Token)+"/runs", member.Token, goodInputs())
	if ev := mine.next(false); ev.ID <= lastMine || runOf(t, ev)["status"] != "queued" {
		t.Fatalf("after the burst: event %d %s", ev.ID, ev.Data)
	}
	if ev := all.next(false); ev.ID <= lastAll {
		t.Fatalf("operator after the burst: event %d", ev.ID)
	}
}

// TestEventsLiveStartAndRetry: without Last-Event-ID a stream starts with
// "retry: 2000" and then only events made after it opened; events carry the
// run as GET /v1/runs/{id} shows it, secrets redacted.
func TestEventsLiveStartAndRetry(t *testing.T) {
	e := newLiveEnv(t, api.Config{KeepAlive: 100 * time.Millisecond})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	old := e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs())
	expectStatus(t, old, http.StatusCreated)
	oldID := old.Map(t)["id"].(string)
	// The old run's event is stored before the stream opens.
	deadline := time.Now().Add(liveWait)
	for len(e.storedEvents(u.ID)) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	s := e.openStream("/v1/events", u.Token, nil)
	first := <-s.items
	if first.Retry != "2000" {
		t.Fatalf("first item %+v, want retry: 2000", first)
	}
	// Keep-alive comments while idle.
	if ev := s.next(true); ev.Comment != "keep-alive" {
		t.Fatalf("idle stream sent %+v, want a keep-alive comment", ev)
	}
	expectStatus(t, e.post("/v1/runs/"+oldID+"/cancel", u.Token, nil), http.StatusOK)
	ev := s.next(false)
	run := runOf(t, ev)
	if run["id"] != oldID || run["status"] != "cancelled" {
		t.Fatalf("first live event: %s", ev.Data)
	}
	got := e.get("/v1/runs/"+oldID, u.Token).Map(t)
	want, _ := json.Marshal(got)
	have, _ := json.Marshal(run)
	if !bytes.Equal(want, have) {
		t.Errorf("event run %s\nGET run %s", have, want)
	}
	if inputs := run["inputs"].(map[string]any); inputs["password"] != api.Redacted {
		t.Errorf("secret not redacted: %v", inputs)
	}
	env := ev.envelope(t)
	if env.AccountID != u.ID || time.Since(env.At) > time.Hour {
		t.Errorf("envelope %+v", env)
	}
}

// TestRunEventsStream: GET /v1/runs/{id}/events starts with the run's
// current state, follows it and ends after a terminal state.
func TestRunEventsStream(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	operator := e.newUser(store.RoleOperator, store.PlanPro, 0)
	wf := e.newWorkflow(u.Token)
	all := e.openStream("/v1/events?types=run", u.Token, nil)
	id := e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs()).Map(t)["id"].(string)
	other := e.post("/v1/workflows/"+e.newWorkflow(u.Token)+"/runs", u.Token, goodInputs()).Map(t)["id"].(string)
	// The log's writer stores the run's queued event after the create
	// answers; the run's stream starts at the latest event stored when it
	// opens, so wait until the account's stream has carried it.
	for runOf(t, all.next(false))["id"] != id {
	}
	all.close()

	s := e.openStream("/v1/runs/"+id+"/events", u.Token, nil)
	first := s.next(false)
	if run := runOf(t, first); first.Type != events.RunUpdated || run["id"] != id || run["status"] != "queued" {
		t.Fatalf("first event: %s %s", first.Type, first.Data)
	}
	if q := runOf(t, first)["queue"].(map[string]any); q["reason"] != "no_agent_connected" {
		t.Errorf("queue %v", q)
	}
	latest, err := e.Store.EventLatestID(context.Background(), id)
	if err != nil || first.ID != latest {
		t.Errorf("first event id %d, the run's latest stored event %d (%v)", first.ID, latest, err)
	}
	// An operator follows it too.
	op := e.openStream("/v1/runs/"+id+"/events", operator.Token, nil)
	if ev := op.next(false); runOf(t, ev)["id"] != id {
		t.Fatalf("operator's first event %s", ev.Data)
	}
	// Another run's change does not show; this run's cancel does, and ends
	// the stream.
	expectStatus(t, e.post("/v1/runs/"+other+"/cancel", u.Token, nil), http.StatusOK)
	expectStatus(t, e.post("/v1/runs/"+id+"/cancel", u.Token, nil), http.StatusOK)
	for _, st := range []*stream{s, op} {
		ev := st.next(false)
		if run := runOf(t, ev); run["id"] != id || run["status"] != "cancelled" || ev.ID <= first.ID {
			t.Fatalf("second event %d: %s", ev.ID, ev.Data)
		}
		st.ended()
	}
	// A finished run replays its events, the last one terminal, then ends
	// (API.md §12; read whole by e.do, which checks the exchange against the
	// document).
	r := e.get("/v1/runs/"+id+"/events", u.Token)
	expectStatus(t, r, http.StatusOK)
	body := string(r.Body)
	stored, err := e.Store.EventsAfter(context.Background(), 0, store.EventFilter{RunID: id}, 100)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(body, "retry: 2000\n\nid: ") || strings.Count(body, "\nevent: ") != len(stored) || len(stored) < 2 ||
		!strings.HasSuffix(strings.TrimSpace(body), "}") || !strings.Contains(body[strings.LastIndex(body, "\nid: "):], `"status":"cancelled"`) {
		t.Errorf("finished run's stream (%d stored events):\n%s", len(stored), body)
	}
	// Resumed after its last event: nothing more, and the end.
	r = e.do(request{Method: "GET", Path: "/v1/runs/" + id + "/events", Token: u.Token, Header: map[string]string{"Last-Event-ID": strconv.FormatInt(stored[len(stored)-1].ID, 10)}})
	expectStatus(t, r, http.StatusOK)
	if strings.Contains(string(r.Body), "\nevent: ") {
		t.Errorf("finished run resumed after its last event:\n%s", r.Body)
	}
}

// TestLiveIsolation: a member never sees another account's runs or agents
// in /v1/queue, /v1/events, /v1/runs/{id}/events and /v1/agents; operators
// see every account, or one with ?accountId=.
func TestLiveIsolation(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	a := e.newUser(store.RoleMember, store.PlanPro, 10)
	b := e.newUser(store.RoleMember, store.PlanPro, 10)
	op := e.newUser(store.RoleOperator, store.PlanPro, 0)

	aEvents := e.openStream("/v1/events", a.Token, nil)
	opEvents := e.openStream("/v1/events", op.Token, nil)
	opB := e.openStream("/v1/events?accountId="+b.ID, op.Token, nil)

	bAgent := e.connectAgent(e.agentToken(b), "b-agent", 0)
	bRun := e.post("/v1/workflows/"+e.newWorkflow(b.Token)+"/runs", b.Token, map[string]any{"inputs": goodInputs()["inputs"], "labels": map[string]string{"gpu": "yes"}}).Map(t)["id"].(string)
	aAgent := e.connectAgent(e.agentToken(a), "a-agent", 0)
	aRun := e.post("/v1/workflows/"+e.newWorkflow(a.Token)+"/runs", a.Token, goodInputs()).Map(t)["id"].(string)
	_, _ = aAgent, bAgent

	// a's stream: its agent and its run only.
	for _, want := range []string{events.AgentConnected, events.RunUpdated} {
		ev := aEvents.next(false)
		env := ev.envelope(t)
		if ev.Type != want || env.AccountID != a.ID {
			t.Fatalf("a's stream: %s of %s, want %s of a", ev.Type, env.AccountID, want)
		}
	}
	// The operator sees all four; with ?accountId= only b's two.
	seen := map[string]int{}
	for range 4 {
		seen[opEvents.next(false).envelope(t).AccountID]++
	}
	if seen[a.ID] != 2 || seen[b.ID] != 2 {
		t.Errorf("operator's stream by account: %v", seen)
	}
	for range 2 {
		if env := opB.next(false).envelope(t); env.AccountID != b.ID {
			t.Errorf("operator's stream of b carried %s", env.AccountID)
		}
	}
	expectError(t, e.get("/v1/events?accountId="+b.ID, a.Token), protocol.CodeForbidden)

	// Runs' streams.
	expectError(t, e.get("/v1/runs/"+bRun+"/events", a.Token), protocol.CodeForbidden)
	expectError(t, e.get("/v1/runs/run_unknown/events", a.Token), protocol.CodeNotFound)
	aStream := e.openStream("/v1/runs/"+aRun+"/events", a.Token, nil)
	if ev := aStream.next(false); runOf(t, ev)["id"] != aRun {
		t.Errorf("a's run stream: %s", ev.Data)
	}
	aStream.close()

	// The queue.
	var q struct {
		Accounts []struct {
			AccountID string           `json:"accountId"`
			Depth     int64            `json:"depth"`
			ByReason  map[string]int64 `json:"byReason"`
		} `json:"accounts"`
		Total struct {
			Depth int64 `json:"depth"`
		} `json:"total"`
		// API.md §12's top-level figures.
		Depth             int64            `json:"depth"`
		OldestQueuedAt    *time.Time       `json:"oldestQueuedAt"`
		OldestQueuedAgeMs int64            `json:"oldestQueuedAgeMs"`
		ByReason          map[string]int64 `json:"byReason"`
	}
	r := e.get("/v1/queue", a.Token)
	expectStatus(t, r, http.StatusOK)
	r.JSON(t, &q)
	if len(q.Accounts) != 1 || q.Accounts[0].AccountID != a.ID || q.Accounts[0].Depth != 1 || q.Total.Depth != 1 || q.Accounts[0].ByReason["agents_busy"] != 1 {
		t.Errorf("a's queue: %s", r.Body)
	}
	if q.Depth != 1 || q.ByReason["agents_busy"] != 1 || q.OldestQueuedAt == nil || q.OldestQueuedAgeMs < 0 {
		t.Errorf("a's queue, top-level figures: %s", r.Body)
	}
	expectError(t, e.get("/v1/queue?accountId="+b.ID, a.Token), protocol.CodeForbidden)
	expectStatus(t, e.get("/v1/queue?accountId="+a.ID, a.Token), http.StatusOK)
	r = e.get("/v1/queue", op.Token)
	r.JSON(t, &q)
	if len(q.Accounts) != 2 || q.Total.Depth != 2 || q.Depth != 2 || q.ByReason["agents_busy"]+q.ByReason["no_matching_agent"] != 2 {
		t.Errorf("operator's queue: %s", r.Body)
	}
	for _, acct := range q.Accounts {
		if acct.AccountID == b.ID && acct.ByReason["no_matching_agent"] != 1 {
			t.Errorf("b's run needs gpu=yes, b's agent has no labels: %s", r.Body)
		}
	}
	r = e.get("/v1/queue?accountId="+b.ID, op.Token)
	r.JSON(t, &q)
	if len(q.Accounts) != 1 || q.Accounts[0].AccountID != b.ID {
		t.Errorf("operator's queue of b: %s", r.Body)
	}

	// Agents.
	agentIDs := func(r *response) []string {
		t.Helper()
		expectStatus(t, r, http.StatusOK)
		var l struct {
			Items []struct {
				ClientID  string `json:"clientId"`
				AccountID string `json:"accountId"`
			} `json:"items"`
		}
		r.JSON(t, &l)
		var out []string
		for _, it := range l.Items {
			out = append(out, it.ClientID)
		}
		slices.Sort(out)
		return out
	}
	if got := agentIDs(e.get("/v1/agents", a.Token)); !slices.Equal(got, []string{"a-agent"}) {
		t.Errorf("a's agents: %v", got)
	}
	if got := agentIDs(e.get("/v1/agents", op.Token)); !slices.Equal(got, []string{"a-agent", "b-agent"}) {
		t.Errorf("operator's agents: %v", got)
	}
	if got := agentIDs(e.get("/v1/agents?accountId="+b.ID, op.Token)); !slices.Equal(got, []string{"b-agent"}) {
		t.Errorf("operator's agents of b: %v", got)
	}
	expectError(t, e.get("/v1/agents?accountId="+b.ID, a.Token), protocol.CodeForbidden)

	// b's agent goes: the operator hears it, a does not.
	bAgent.Close()
	if ev := opEvents.next(false); ev.Type != events.AgentDisconnected || ev.envelope(t).AccountID != b.ID {
		t.Errorf("operator: %s %s", ev.Type, ev.Data)
	}
	aAgent.Close()
	if ev := aEvents.next(false); ev.Type != events.AgentDisconnected || ev.envelope(t).AccountID != a.ID {
		t.Errorf("a: %s %s", ev.Type, ev.Data)
	}
}

// TestLiveErrors: every error of the live routes, with its requestId.
func TestLiveErrors(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	other := e.newUser(store.RoleMember, store.PlanPro, 10)
	run := e.post("/v1/workflows/"+e.newWorkflow(u.Token)+"/runs", u.Token, goodInputs()).Map(t)["id"].(string)
	agentTok := e.agentToken(u)
	bad := func(path, field string, header map[string]string) {
		t.Helper()
		r := e.do(request{Method: "GET", Path: path, Token: u.Token, Header: header})
		if er := expectError(t, r, protocol.CodeBadRequest); !hasField(t, er, field) {
			t.Errorf("%s: fields %v, want %s", path, fieldNames(t, er), field)
		}
	}
	for _, path := range []string{"/v1/events", "/v1/runs/" + run + "/events", "/v1/queue"} {
		expectError(t, e.get(path, ""), protocol.CodeUnauthenticated)
		expectError(t, e.get(path, "copelf_api_nonsense"), protocol.CodeUnauthenticated)
		expectError(t, e.get(path, agentTok), protocol.CodeForbidden)
	}
	bad("/v1/events?types=run,bogus", "types", nil)
	bad("/v1/events", "Last-Event-ID", map[string]string{"Last-Event-ID": "abc"})
	bad("/v1/events?lastEventId=-1", "lastEventId", nil)
	bad("/v1/runs/"+run+"/events", "Last-Event-ID", map[string]string{"Last-Event-ID": "1.5"})
	expectError(t, e.get("/v1/events?accountId="+other.ID, u.Token), protocol.CodeForbidden)
	expectError(t, e.get("/v1/runs/"+run+"/events", other.Token), protocol.CodeForbidden)
	expectError(t, e.get("/v1/runs/run_nope/events", u.Token), protocol.CodeNotFound)
	expectError(t, e.get("/v1/queue?accountId="+other.ID, u.Token), protocol.CodeForbidden)
	// /metrics needs no token (API.md §12) and carries no account id.
	if body := string(e.scrapeRaw("")); strings.Contains(body, u.ID) || strings.Contains(body, other.ID) || !strings.Contains(body, "copelf_") {
		t.Errorf("/metrics without a token: %.300s", body)
	}

	// HEAD answers the headers and ends.
	for _, path := range []string{"/v1/events", "/v1/runs/" + run + "/events"} {
		r := e.do(request{Method: "HEAD", Path: path, Token: u.Token})
		if r.StatusCode != http.StatusOK || r.Header.Get("Content-Type") != "text/event-stream" || len(r.Body) != 0 {
			t.Errorf("HEAD %s: %d %q %q", path, r.StatusCode, r.Header.Get("Content-Type"), r.Body)
		}
	}

	// A server without an event log answers not_found (events_disabled).
	plain := newEnv(t, api.Config{})
	pu := plain.newUser(store.RoleMember, store.PlanPro, 10)
	prun := plain.post("/v1/workflows/"+plain.newWorkflow(pu.Token)+"/runs", pu.Token, goodInputs()).Map(t)["id"].(string)
	for _, path := range []string{"/v1/events", "/v1/runs/" + prun + "/events"} {
		if er := expectError(t, plain.get(path, pu.Token), protocol.CodeNotFound); er.Details["reason"] != "events_disabled" {
			t.Errorf("%s: details %v", path, er.Details)
		}
	}
}

// scrape reads /metrics as an operator and parses it with the Prometheus
// text parser.
func (e *env) scrape(token string) map[string]*dto.MetricFamily {
	e.t.Helper()
	body := e.scrapeRaw(token)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		e.t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// scrapeRaw is GET /metrics's body.
func (e *env) scrapeRaw(token string) []byte {
	e.t.Helper()
	r := e.get("/metrics", token)
	expectStatus(e.t, r, http.StatusOK)
	return r.Body
}

// metricValue is the value of the family's series with these labels (0
// when absent).
func metricValue(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	var sum float64
	for _, m := range f.GetMetric() {
		ok := true
		for k, v := range labels {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == k && lp.GetValue() == v {
					found = true
				}
			}
			ok = ok && found
		}
		if !ok {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

// TestMetrics: /metrics parsed by the Prometheus text parser; the figures
// move as runs are queued, assigned and finished and agents connect; no
// label value is an id.
func TestMetrics(t *testing.T) {
	e := newLiveEnv(t, api.Config{Stuck: store.StuckThresholds{Queued: time.Millisecond, Assigned: time.Hour}})
	op := e.newUser(store.RoleOperator, store.PlanPro, 0)
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	before := e.scrape(op.Token)
	for _, name := range []string{"copelf_queue_depth", "copelf_queue_oldest_age_seconds", "copelf_stuck", "copelf_dispatch_latency_seconds",
		"copelf_agents_connected", "copelf_queue_stats_up", "copelf_events_appended_total"} {
		if before[name] == nil {
			t.Errorf("no %s", name)
		}
	}
	if v := metricValue(before, "copelf_queue_depth", nil); v != 0 {
		t.Errorf("queue depth %v before any run", v)
	}

	wf1, wf2 := e.newWorkflow(u.Token), e.newWorkflow(u.Token)
	r1 := e.post("/v1/workflows/"+wf1+"/runs", u.Token, goodInputs()).Map(t)["id"].(string)
	e.post("/v1/workflows/"+wf2+"/runs", u.Token, goodInputs())
	// Past the 1 ms threshold both runs are stuck queued.
	var m map[string]*dto.MetricFamily
	for deadline := time.Now().Add(liveWait); ; {
		m = e.scrape(op.Token)
		if metricValue(m, "copelf_stuck", map[string]string{"state": "queued"}) == 2 || time.Now().After(deadline) {
			break
		}
	}
	if v := metricValue(m, "copelf_queue_depth", map[string]string{"reason": "no_agent_connected"}); v != 2 {
		t.Errorf("queue depth no_agent_connected = %v, want 2", v)
	}
	if v := metricValue(m, "copelf_stuck", map[string]string{"state": "queued"}); v != 2 {
		t.Errorf("stuck queued = %v, want 2", v)
	}
	if v := metricValue(m, "copelf_queue_oldest_age_seconds", nil); v <= 0 {
		t.Errorf("oldest age %v", v)
	}
	if v := metricValue(m, "copelf_http_requests_total", map[string]string{"route": "/v1/workflows/{id}/runs", "code": "201", "method": "POST"}); v != 2 {
		t.Errorf("requests to /v1/workflows/{id}/runs = %v, want 2", v)
	}

	// Cancel one: finished by status; an agent takes the other: assigned,
	// a dispatch latency, frames both ways, an agent by kind.
	expectStatus(t, e.post("/v1/runs/"+r1+"/cancel", u.Token, nil), http.StatusOK)
	ws := e.connectAgent(e.agentToken(u), "metrics-agent", 1)
	_ = ws.SetReadDeadline(time.Now().Add(liveWait))
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if f, _ := protocol.DecodeFrame(data); f != nil && f.FrameType() == protocol.FrameAssign {
			break
		}
	}
	checks := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"copelf_runs_finished_total", map[string]string{"status": "cancelled", "code": ""}, 1},
		{"copelf_queue_depth", map[string]string{"reason": "assigned"}, 1},
		{"copelf_queue_depth", map[string]string{"reason": "no_agent_connected"}, 0},
		{"copelf_stuck", map[string]string{"state": "assigned"}, 0},
		{"copelf_dispatch_latency_seconds", nil, 1},
		{"copelf_agents_connected", map[string]string{"kind": "headless"}, 1},
		{"copelf_ws_frames_total", map[string]string{"direction": "in", "type": "hello"}, 1},
		{"copelf_ws_frames_total", map[string]string{"direction": "in", "type": "ready"}, 1},
		{"copelf_ws_frames_total", map[string]string{"direction": "out", "type": "welcome"}, 1},
		{"copelf_ws_frames_total", map[string]string{"direction": "out", "type": "assign"}, 1},
	}
	// The agent may read its assign before the server has counted it (the
	// dispatch latency is observed once the frame is written): scrape
	// until every figure is there.
	mismatches := func() (out []string) {
		for _, c := range checks {
			if v := metricValue(m, c.name, c.labels); v != c.want {
				out = append(out, fmt.Sprintf("%s%v = %v, want %v", c.name, c.labels, v, c.want))
			}
		}
		return out
	}
	for deadline := time.Now().Add(liveWait); ; time.Sleep(20 * time.Millisecond) {
		m = e.scrape(op.Token)
		if len(mismatches()) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for _, msg := range mismatches() {
		t.Error(msg)
	}
	// No label value names an account, run, workflow or any other id.
	for name, f := range m {
		for _, s := range f.GetMetric() {
			for _, lp := range s.GetLabel() {
				for _, prefix := range []string{"usr_", "run_", "wf_", "agt_", "bat_", "apr_", "req_", "tok_"} {
					if strings.Contains(lp.GetValue(), prefix) {
						t.Errorf("%s{%s=%q}: an id in a label", name, lp.GetName(), lp.GetValue())
					}
				}
			}
		}
	}
}

// TestEventsStreamsEndOnShutdown: closing the event log ends every open
// stream; nothing is left running once the server is closed.
func TestEventsStreamsEndOnShutdown(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	t.Run("inner", func(t *testing.T) {
		e := newLiveEnv(t, api.Config{})
		u := e.newUser(store.RoleMember, store.PlanPro, 10)
		run := e.post("/v1/workflows/"+e.newWorkflow(u.Token)+"/runs", u.Token, goodInputs()).Map(t)["id"].(string)
		var streams []*stream
		for range 3 {
			streams = append(streams, e.openStream("/v1/events", u.Token, nil), e.openStream("/v1/runs/"+run+"/events", u.Token, nil))
		}
		e.Broker.Close()
		for _, s := range streams {
			s.ended()
		}
		e.Server.Client().CloseIdleConnections()
	})
}

// tourLive makes the live routes answer each documented success once, for
// TestOpenAPITour.
func tourLive(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	op := e.newUser(store.RoleOperator, store.PlanPro, 10)
	expectStatus(t, e.get("/v1/queue", op.Token), http.StatusOK)
	expectStatus(t, e.get("/metrics", op.Token), http.StatusOK)
	run := e.post("/v1/workflows/"+e.newWorkflow(op.Token)+"/runs", op.Token, goodInputs()).Map(t)["id"].(string)
	expectStatus(t, e.post("/v1/runs/"+run+"/cancel", op.Token, nil), http.StatusOK)
	expectStatus(t, e.get("/v1/runs/"+run+"/events", op.Token), http.StatusOK)
	s := e.openStream("/v1/events?types=run&lastEventId=0", op.Token, nil)
	if ev := s.next(false); ev.Type != events.RunUpdated {
		t.Errorf("tour: first event %s", fmt.Sprint(ev))
	}
}

// TestBatchEvents: a batch's progress is published as batch.updated (the
// batch as GET /v1/batches/{id} shows it), at most a few times however many
// of its runs change, and always in its final state.
func TestBatchEvents(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 100)
	const n = 20
	bat := e.newBatch(u.Token, e.newWorkflow(u.Token), n)
	s := e.openStream("/v1/events", u.Token, nil)
	expectStatus(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), http.StatusOK)
	expectStatus(t, e.post("/v1/batches/"+bat+"/cancel", u.Token, nil), http.StatusOK)
	runs, batches, final := 0, 0, false
	// Every run is queued then cancelled; the batch's final event may come
	// before the last runs' (it is read when the log is written).
	for runs < 2*n || !final {
		ev := s.next(false)
		switch ev.Type {
		case events.RunUpdated:
			runs++
		case events.BatchUpdated:
			batches++
			var b map[string]any
			if err := json.Unmarshal(ev.envelope(t).Data, &b); err != nil {
				t.Fatal(err)
			}
			if b["id"] != bat || len(b["iterations"].([]any)) != n {
				t.Fatalf("batch event %s", ev.Data)
			}
			if b["status"] != "cancelled" {
				continue
			}
			want := e.get("/v1/batches/"+bat, u.Token).Map(t)
			if w, g := asJSON(t, want), asJSON(t, b); w != g {
				t.Errorf("batch event\n%s\nGET batch\n%s", g, w)
			}
			final = true
		}
	}
	if batches > 6 {
		t.Errorf("%d run events, %d batch events", runs, batches)
	}
	t.Logf("%d run events, %d batch events", runs, batches)
}

func asJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestEventsWithSessionCookie: the dashboard's session cookie opens the
// streams and reads the queue, as a bearer token does.
func TestEventsWithSessionCookie(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	const password = "cookie password 1"
	email := "cookie@example.com"
	u := e.post("/v1/users", e.Admin, map[string]any{"email": email, "password": password, "role": "member", "plan": "pro"})
	expectStatus(t, u, http.StatusCreated)
	expectStatus(t, e.post("/v1/accounts/"+u.Map(t)["id"].(string)+"/credits", e.Admin, map[string]any{"amount": 10, "reason": "test"}), http.StatusCreated)
	sess := e.post("/v1/sessions", "", map[string]any{"email": email, "password": password})
	expectStatus(t, sess, http.StatusCreated)
	token := sess.Map(t)["token"].(string)
	cookie := map[string]string{"Cookie": api.SessionCookie + "=" + token}
	s := e.openStream("/v1/events?types=run", "", cookie)
	wf := e.newWorkflow(token)
	run := e.post("/v1/workflows/"+wf+"/runs", token, goodInputs()).Map(t)["id"].(string)
	if ev := s.next(false); runOf(t, ev)["id"] != run {
		t.Fatalf("cookie stream: %s", ev.Data)
	}
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/queue", Header: cookie}), http.StatusOK)
	one := e.openStream("/v1/runs/"+run+"/events", "", cookie)
	if ev := one.next(false); runOf(t, ev)["status"] != "queued" {
		t.Fatalf("cookie run stream: %s", ev.Data)
	}
}

// BenchmarkFeedRunChanged measures what a run change costs the hub's
// goroutine that reports it (the feed's view and publication; the append
// happens on the event log's writer): "caller" with the writer stopped
// (the cost on the hub's goroutine alone), "appended" until every event is
// stored and delivered.
func BenchmarkFeedRunChanged(b *testing.B) {
	for _, mode := range []string{"caller", "appended"} {
		b.Run(mode, func(b *testing.B) { benchFeed(b, mode == "appended") })
	}
}

func benchFeed(b *testing.B, start bool) {
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(b.TempDir(), "copelf.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	log, _ := test.NewNullLogger()
	srv := api.New(st, log, api.Config{RunCost: 1})
	br := events.New(st, log, events.Config{SubscriberBuffer: 1 << 20, MaxPending: 1 << 30})
	if start {
		if err := br.Start(ctx); err != nil {
			b.Fatal(err)
		}
	}
	defer br.Close()
	srv.Events = br
	feed := api.NewFeed(srv)
	now := time.Now()
	run := &store.Run{ID: "run_bench", AccountID: "usr_bench", WorkflowID: "wf_bench", Status: protocol.RunRunning, AgentID: "agt_bench",
		Inputs: map[string]any{"username": "ada", "password": "s3cret"}, SecretNames: []string{"password"}, Outputs: map[string]any{},
		Steps:    []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepSucceeded}, {Index: 1, Type: protocol.StepClick, Status: protocol.StepRunning}},
		QueuedAt: now, StartedAt: &now, Attempt: 1}
	s := br.Subscribe(events.Filter{})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		feed.RunChanged(run)
	}
	if !start {
		return
	}
	for got := 0; got < b.N; got++ {
		select {
		case <-s.C():
		case <-s.Done():
			b.Fatalf("subscription ended after %d of %d: %v", got, b.N, s.Err())
		case <-time.After(time.Minute):
			b.Fatalf("%d of %d events appended", got, b.N)
		}
	}
}

// TestBatchCreatedEvent: a new batch shows on the account's stream at once,
// before it starts (the dashboard lists it without a reload).
func TestBatchCreatedEvent(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	s := e.openStream("/v1/events?types=batch", u.Token, nil)
	bat := e.newBatch(u.Token, wf, 2)
	ev := s.next(false)
	var b struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}
	if err := json.Unmarshal(ev.envelope(t).Data, &b); err != nil || ev.Type != events.BatchUpdated || b.ID != bat || b.Status != "created" {
		t.Fatalf("first batch event %s %s (%v)", ev.Type, ev.Data, err)
	}
}
