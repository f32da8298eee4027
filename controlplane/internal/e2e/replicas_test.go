package e2e

// Several copelfd replicas, as subprocesses, on one PostgreSQL database (a
// fresh one per test, dropped at its end): cross-replica dispatch and its
// latency, exactly-once rules raced across replicas, cancels and approvals
// whichever replica takes the request, an agent whose replica is killed
// carrying on through another, and maintenance on one replica only.
//
// Without a reachable PostgreSQL these tests skip, except under CI=true
// (or COPELF_NEED_POSTGRES=1), where they fail.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
	"github.com/copelf/copelf/protocol"
)

// replica is one copelfd of a cluster.
type replica struct {
	*server
	name string
	args []string
	env  []string
	p    *proc
}

// startReplicas starts n copelfd on one fresh PostgreSQL database, with one
// admin token and one data directory (artifacts are shared storage).
func startReplicas(t *testing.T, n int, extra ...string) []*replica {
	t.Helper()
	return startReplicasOn(t, pgtest.Database(t), n, extra...)
}

// startReplicasOn starts n copelfd on the database at dsn.
func startReplicasOn(t *testing.T, dsn string, n int, extra ...string) []*replica {
	t.Helper()
	bin := binary(t, "copelfd")
	admin := fmt.Sprintf("copelf_api_e2e-admin-%d", time.Now().UnixNano())
	data := filepath.Join(t.TempDir(), "data")
	out := make([]*replica, n)
	for i := range out {
		addr := freeAddr(t)
		r := &replica{
			server: &server{URL: "http://" + addr, Admin: admin, stop: func() {}},
			name:   string(rune('A' + i)),
			args: append([]string{"-addr", addr, "-db", dsn, "-data-dir", data, "-log-format", "text", "-log-level", "info"},
				extra...),
			env: []string{"COPELF_ADMIN_TOKEN=" + admin},
		}
		r.start(t, bin)
		out[i] = r
	}
	return out
}

// start starts the replica's process and waits for /healthz.
func (r *replica) start(t *testing.T, bin string) {
	t.Helper()
	r.p = startProc(t, "copelfd-"+r.name, bin, r.env, r.args...)
	client := &http.Client{Timeout: 2 * time.Second}
	eventually(t, 60*time.Second, "replica "+r.name+" answering /healthz", func() (bool, string) {
		if r.p.exited() {
			t.Fatalf("replica %s exited with %d", r.name, r.p.cmd.ProcessState.ExitCode())
		}
		res, err := client.Get(r.URL + "/healthz")
		if err != nil {
			return false, err.Error()
		}
		res.Body.Close()
		return res.StatusCode == http.StatusOK, res.Status
	})
}

// try makes an API request and returns the status and decoded body,
// whatever the status.
func (s *server) try(t *testing.T, method, path, token string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, _ := json.Marshal(body)
		rd = bytes.NewReader(raw)
	}
	req, _ := http.NewRequest(method, s.URL+path, rd)
	req.Header.Set("Authorization", "Bearer "+token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err)
		return 0, nil
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return res.StatusCode, out
}

// wsAgent is a protocol client over a real websocket that does nothing but
// what a test tells it: no browser.
type wsAgent struct {
	t       *testing.T
	ws      *websocket.Conn
	frames  chan frameAt
	welcome *protocol.Welcome
	wmu     sync.Mutex
	done    chan struct{}
}

type frameAt struct {
	f  protocol.Frame
	at time.Time
}

// dialAgent connects a protocol client to a replica and reads welcome.
func dialAgent(t *testing.T, base, token, id string, slots int) *wsAgent {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: 10 * time.Second}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(base, "http")+"/v1/agents/connect", nil)
	if err != nil {
		t.Fatalf("dial %s: %v", base, err)
	}
	a := &wsAgent{t: t, ws: ws, frames: make(chan frameAt, 1024), done: make(chan struct{})}
	go a.read()
	t.Cleanup(a.close)
	a.send(&protocol.Hello{Protocol: protocol.Version, Token: token,
		Agent: protocol.AgentInfo{ID: id, Name: id, Kind: protocol.AgentHeadless, Version: "e2e", Slots: slots}})
	a.welcome = expectFrame[*protocol.Welcome](a)
	return a
}

func (a *wsAgent) read() {
	defer close(a.done)
	defer close(a.frames)
	for {
		_, data, err := a.ws.ReadMessage()
		if err != nil {
			return
		}
		at := time.Now()
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			a.t.Errorf("undecodable frame %s: %v", data, err)
			return
		}
		if _, ok := f.(*protocol.Heartbeat); ok {
			continue
		}
		a.frames <- frameAt{f: f, at: at}
	}
}

func (a *wsAgent) send(f protocol.Frame) {
	a.t.Helper()
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		a.t.Fatal(err)
	}
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if err := a.ws.WriteMessage(websocket.TextMessage, data); err != nil {
		a.t.Fatalf("write %s: %v", f.FrameType(), err)
	}
}

// close ends the connection without a word (as a crash would).
func (a *wsAgent) close() {
	a.ws.UnderlyingConn().Close()
	<-a.done
}

// next returns the next frame other than a heartbeat answer.
func (a *wsAgent) next() frameAt {
	a.t.Helper()
	select {
	case it, ok := <-a.frames:
		if !ok {
			a.t.Fatal("the connection closed")
		}
		return it
	case <-time.After(60 * time.Second):
		a.t.Fatal("no frame within 60s")
	}
	return frameAt{}
}

// expectFrame returns the next frame, which must be a T.
func expectFrame[T protocol.Frame](a *wsAgent) T {
	a.t.Helper()
	return expectFrameAt[T](a).f.(T)
}

func expectFrameAt[T protocol.Frame](a *wsAgent) frameAt {
	a.t.Helper()
	it := a.next()
	if _, ok := it.f.(T); !ok {
		raw, _ := protocol.EncodeFrame(it.f)
		var zero T
		a.t.Fatalf("got %s, want a %T", raw, zero)
	}
	return it
}

// report sends an event and waits for its ack.
func (a *wsAgent) report(as *protocol.Assign, seq int64, ev protocol.Event) {
	a.t.Helper()
	ev.RunID, ev.LeaseID, ev.Seq = as.RunID, as.LeaseID, seq
	a.send(&ev)
	if ack := expectFrame[*protocol.Ack](a); ack.RunID != as.RunID || ack.Seq != seq {
		a.t.Fatalf("ack %+v, want run %s seq %d", ack, as.RunID, seq)
	}
}

// start accepts an assign and reports started (seq 1).
func (a *wsAgent) start(as *protocol.Assign) {
	a.t.Helper()
	a.send(&protocol.Accept{RunID: as.RunID, LeaseID: as.LeaseID})
	a.report(as, 1, protocol.Event{Kind: protocol.EventStarted})
}

func intp(i int) *int { return &i }

// noopDef is a workflow the protocol client "runs" without a browser.
var noopDef = json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"}]}`)

// approvalDef pauses at step 1 for an approval.
var approvalDef = json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"},{"type":"approval","message":"Go on?"},{"type":"navigate","url":"about:blank"}]}`)

// TestReplicasDispatch: an agent connected to replica A gets the runs
// created through replica B at once (PostgreSQL NOTIFY): cross-replica
// dispatch latency over 200 runs, from the POST to the assign read off
// the agent's websocket.
func TestReplicasDispatch(t *testing.T) {
	rs := startReplicas(t, 2)
	a, b := rs[0], rs[1]
	_, token, agentToken := a.account(t, 1000)
	ag := dialAgent(t, a.URL, agentToken, "noop-a", 1)
	wf := a.workflow(t, token, "noop", noopDef)

	const n = 200
	lat := make([]time.Duration, 0, n)
	for range n {
		t0 := time.Now()
		run := b.call(t, "POST", "/v1/workflows/"+wf+"/runs", token, map[string]any{"inputs": map[string]any{}}, 201)
		it := expectFrameAt[*protocol.Assign](ag)
		as := it.f.(*protocol.Assign)
		if as.RunID != run["id"] {
			t.Fatalf("assigned %s, created %s", as.RunID, run["id"])
		}
		lat = append(lat, it.at.Sub(t0))
		ag.start(as)
		ag.report(as, 2, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded"})
	}
	slices.Sort(lat)
	p50, p99 := lat[n/2], lat[n*99/100]
	t.Logf("cross-replica dispatch over %d runs (POST on B → assign read by the agent on A): p50 %s, p99 %s, max %s",
		n, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), lat[n-1].Round(10*time.Microsecond))
	// Generous bounds for a loaded machine (speed is measured by make
	// bench): the hub's one-second sweep alone, without signals, would put
	// the median near 500 ms.
	if p99 > 2*time.Second || p50 > 250*time.Millisecond {
		t.Errorf("cross-replica dispatch: p50 %s, p99 %s", p50, p99)
	}
	if c := b.credits(t, token); c.Balance != 1000-n || c.Held != 0 {
		t.Errorf("credits after %d runs: %+v", n, c)
	}
}

// TestReplicasExactlyOnce: a coupon redeemed by many accounts at once
// through three replicas is granted exactly maxRedemptions times; 50
// concurrent starts of one workflow through three replicas make exactly
// one run.
func TestReplicasExactlyOnce(t *testing.T) {
	rs := startReplicas(t, 3)

	t.Run("coupon", func(t *testing.T) {
		const accounts, max = 21, 7
		rs[0].call(t, "POST", "/v1/coupons", rs[0].Admin, map[string]any{"code": "RACE-7", "credits": 5, "maxRedemptions": max, "active": true}, 201)
		tokens := make([]string, accounts)
		for i := range tokens {
			_, tokens[i], _ = rs[i%3].account(t, 1)
		}
		codes := make([]int, accounts)
		errs := make([]string, accounts)
		var wg sync.WaitGroup
		begin := make(chan struct{})
		for i := range tokens {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-begin
				st, body := rs[i%3].try(t, "POST", "/v1/coupons/redeem", tokens[i], map[string]any{"code": "RACE-7"})
				codes[i] = st
				errs[i], _ = body["code"].(string)
			}()
		}
		close(begin)
		wg.Wait()
		granted := 0
		for i, st := range codes {
			switch {
			case st == 201:
				granted++
				if c := rs[(i+1)%3].credits(t, tokens[i]); c.Balance != 1+5 {
					t.Errorf("account %d redeemed, balance %v", i, c.Balance)
				}
			case st == 400 && errs[i] == string(protocol.CodeCouponMaxRedemptionsReached):
				if c := rs[(i+1)%3].credits(t, tokens[i]); c.Balance != 1 {
					t.Errorf("account %d refused, balance %v", i, c.Balance)
				}
			default:
				t.Errorf("redeem %d: %d %s", i, st, errs[i])
			}
		}
		if granted != max {
			t.Errorf("%d redemptions granted across replicas, want %d", granted, max)
		}
		for _, it := range rs[2].call(t, "GET", "/v1/coupons", rs[2].Admin, nil, 200)["items"].([]any) {
			if c := it.(map[string]any); c["code"] == "RACE-7" && c["redeemed"] != float64(max) {
				t.Errorf("coupon: %v", c)
			}
		}
	})

	t.Run("one active run", func(t *testing.T) {
		_, token, _ := rs[0].account(t, 100)
		wf := rs[1].workflow(t, token, "once", noopDef)
		const starts = 50
		codes := make([]int, starts)
		errs := make([]string, starts)
		var wg sync.WaitGroup
		begin := make(chan struct{})
		for i := range starts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-begin
				st, body := rs[i%3].try(t, "POST", "/v1/workflows/"+wf+"/runs", token, map[string]any{"inputs": map[string]any{}})
				codes[i] = st
				errs[i], _ = body["code"].(string)
			}()
		}
		close(begin)
		wg.Wait()
		created := 0
		for i, st := range codes {
			switch {
			case st == 201:
				created++
			case st == 409 && errs[i] == string(protocol.CodeWorkflowAlreadyRunning):
			default:
				t.Errorf("start %d: %d %s", i, st, errs[i])
			}
		}
		if created != 1 {
			t.Errorf("%d runs created by %d concurrent starts across replicas, want 1", created, starts)
		}
		runs := rs[2].call(t, "GET", "/v1/runs?workflowId="+wf, token, nil, 200)["items"].([]any)
		if len(runs) != 1 {
			t.Errorf("runs of the workflow: %d", len(runs))
		}
		if c := rs[0].credits(t, token); c.Balance != 100 || c.Held != 1 {
			t.Errorf("credits: %+v, want one run's hold", c)
		}
	})
}

// TestReplicasCancelAndApproval: the agent is connected to replica A; runs
// are created through B, approved through C and cancelled through B; each
// decision reaches the agent on A.
func TestReplicasCancelAndApproval(t *testing.T) {
	rs := startReplicas(t, 3)
	a, b, c := rs[0], rs[1], rs[2]
	_, token, agentToken := a.account(t, 10)
	ag := dialAgent(t, a.URL, agentToken, "noop-a", 1)

	// Approved through C.
	wf := b.workflow(t, token, "approval", approvalDef)
	run := b.runWorkflow(t, token, wf, nil)
	as := expectFrame[*protocol.Assign](ag)
	ag.start(as)
	ag.report(as, 2, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	ag.report(as, 3, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"})
	ag.report(as, 4, protocol.Event{Kind: protocol.EventApprovalRequested, Step: intp(1), Message: "Go on?"})
	pending := c.call(t, "GET", "/v1/approvals?status=pending", token, nil, 200)["items"].([]any)
	if len(pending) != 1 {
		t.Fatalf("pending approvals on C: %v", pending)
	}
	apID := pending[0].(map[string]any)["id"].(string)
	c.call(t, "POST", "/v1/approvals/"+apID+"/approve", token, map[string]any{"comment": "fine"}, 200)
	got := expectFrame[*protocol.ApprovalFrame](ag)
	if got.RunID != run || got.ApprovalID != apID || !got.Approved || got.Comment != "fine" {
		t.Fatalf("approval frame: %+v", got)
	}
	ag.report(as, 5, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded"})
	if r := c.waitRun(t, token, run, 30*time.Second); r["status"] != "succeeded" {
		t.Fatalf("approved run: %v", r)
	}

	// Rejected through B: the run fails, the agent is told.
	run = c.runWorkflow(t, token, wf, nil)
	as = expectFrame[*protocol.Assign](ag)
	ag.start(as)
	ag.report(as, 2, protocol.Event{Kind: protocol.EventApprovalRequested, Step: intp(1), Message: "Go on?"})
	pending = b.call(t, "GET", "/v1/approvals?status=pending", token, nil, 200)["items"].([]any)
	apID = pending[0].(map[string]any)["id"].(string)
	b.call(t, "POST", "/v1/approvals/"+apID+"/reject", token, map[string]any{"comment": "no"}, 200)
	got = expectFrame[*protocol.ApprovalFrame](ag)
	if got.RunID != run || got.Approved {
		t.Fatalf("rejection frame: %+v", got)
	}
	if r := b.waitRun(t, token, run, 30*time.Second); r["status"] != "failed" {
		t.Fatalf("rejected run: %v", r)
	}

	// Cancelled through B while running on A's agent.
	wf = c.workflow(t, token, "noop", noopDef)
	run = c.runWorkflow(t, token, wf, nil)
	as = expectFrame[*protocol.Assign](ag)
	ag.start(as)
	b.call(t, "POST", "/v1/runs/"+run+"/cancel", token, nil, 200)
	cancel := expectFrame[*protocol.Cancel](ag)
	if cancel.RunID != run {
		t.Fatalf("cancel frame: %+v", cancel)
	}
	ag.report(as, 2, protocol.Event{Kind: protocol.EventFinished, Status: "cancelled"})
	if r := a.waitRun(t, token, run, 30*time.Second); r["status"] != "cancelled" {
		t.Fatalf("cancelled run: %v", r)
	}
	// The slot came back on A: a run created through C is assigned.
	run = c.runWorkflow(t, token, wf, nil)
	if as := expectFrame[*protocol.Assign](ag); as.RunID != run {
		t.Fatalf("assign after the cancel: %+v", as)
	}
}

// TestReplicaKilled: the real agent, given every replica's URL, is
// connected to A when A is SIGKILLed mid-run; it reconnects to B, resends
// what A never acknowledged and keeps its lease; the run, created through
// C, succeeds once and is charged once.
func TestReplicaKilled(t *testing.T) {
	chromium(t)
	site := fixtureSite(t)
	rs := startReplicas(t, 3, "-lease-timeout", "15s")
	a, b, c := rs[0], rs[1], rs[2]
	_, token, agentToken := a.account(t, 10)
	ag := startAgent(t, a.server, token, agentToken, "-server", a.URL+","+b.URL)
	before := c.credits(t, token)

	wf := c.workflow(t, token, "long", sleepyDefinition(site.URL, 3000))
	id := c.runWorkflow(t, token, wf, nil)
	c.waitRunWhere(t, token, id, "sleeping", 60*time.Second, stepRunning(1))
	if !agentListed(t, a.server, token, ag.clientID) {
		t.Fatal("the agent is not connected to A")
	}
	a.p.kill(t)

	eventually(t, 60*time.Second, "the agent connected to B", func() (bool, string) {
		return agentListed(t, b.server, token, ag.clientID), ""
	})
	run := c.waitRun(t, token, id, 90*time.Second)
	if run["status"] != "succeeded" || run["attempt"] != float64(1) || run["outputs"].(map[string]any)["title"] != "Widgets" {
		t.Fatalf("run after A was killed: %v", run)
	}
	chargedOnce(t, c.server, token, run)
	if cr := b.credits(t, token); cr.Balance != before.Balance-1 || cr.Held != 0 {
		t.Errorf("credits: %+v (before %+v)", cr, before)
	}
	// The agent takes new runs through B.
	id = c.runWorkflow(t, token, wf, nil)
	if run := c.waitRun(t, token, id, 90*time.Second); run["status"] != "succeeded" {
		t.Fatalf("a run after the failover: %v", run)
	}
}

// TestReplicasMaintenanceLeader: one replica leads maintenance (its log
// says so; the others' do not); an agent lost while connected to a
// follower has its lease reaped by the leader, and only by it; when the
// leader is killed, a follower takes over and reaps.
func TestReplicasMaintenanceLeader(t *testing.T) {
	rs := startReplicas(t, 2, "-lease-timeout", "2s")
	const acquired = "maintenance leadership acquired"
	var leader, follower *replica
	eventually(t, 30*time.Second, "a maintenance leader", func() (bool, string) {
		var leaders []*replica
		for _, r := range rs {
			if r.p.logContains(acquired) {
				leaders = append(leaders, r)
			}
		}
		if len(leaders) > 1 {
			t.Fatalf("%d replicas lead maintenance", len(leaders))
		}
		if len(leaders) == 1 {
			leader = leaders[0]
		}
		return leader != nil, ""
	})
	for _, r := range rs {
		if r != leader {
			follower = r
		}
	}
	_, token, agentToken := leader.account(t, 10)
	wf := leader.workflow(t, token, "noop", noopDef)

	// The agent, on replica on, vanishes mid-run.
	lost := func(on, via *replica) string {
		t.Helper()
		ag := dialAgent(t, on.URL, agentToken, "lost-"+on.name, 1)
		run := via.runWorkflow(t, token, wf, nil)
		as := expectFrame[*protocol.Assign](ag)
		ag.start(as)
		ag.close()
		r := on.waitRun(t, token, run, 60*time.Second)
		if code, reason := runError(r); r["status"] != "failed" || code != "internal" || reason != "agent_lost" {
			t.Fatalf("run of the lost agent: %v", r)
		}
		return run
	}
	run := lost(follower, leader)
	// The reaper logs the expired lease after it has stored the run's end.
	eventually(t, 30*time.Second, "the leader logging the expired lease of "+run, func() (bool, string) {
		return leader.p.logContains("lease expired", run), ""
	})
	if follower.p.logContains("lease expired", run) {
		t.Errorf("the follower reaped %s too", run)
	}

	// The leader killed: the follower takes over.
	leader.p.kill(t)
	eventually(t, 30*time.Second, "the follower leading", func() (bool, string) {
		return follower.p.logContains(acquired), ""
	})
	run = lost(follower, follower)
	eventually(t, 30*time.Second, "the new leader logging the expired lease of "+run, func() (bool, string) {
		return follower.p.logContains("lease expired", run), ""
	})
}

// TestReplicasEvents: a run executed through replica A shows on an event
// stream opened on replica B at once: A's appends to the event log signal
// B, whose broker reads the table then rather than at its next poll (set to
// a minute here, longer than the test waits).
func TestReplicasEvents(t *testing.T) {
	rs := startReplicas(t, 2, "-events-poll", "1m")
	a, b := rs[0], rs[1]
	_, token, agentToken := a.account(t, 10)
	req, _ := http.NewRequest("GET", b.URL+"/v1/events?types=run", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != 200 {
		t.Fatalf("event stream on B: %v %v", res, err)
	}
	lines := make(chan string, 256)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		res.Body.Close()
		for range lines {
		}
	})

	ag := dialAgent(t, a.URL, agentToken, "noop-a", 1)
	wf := a.workflow(t, token, "noop", noopDef)
	run := a.runWorkflow(t, token, wf, nil)
	as := expectFrame[*protocol.Assign](ag)
	ag.start(as)
	ag.report(as, 2, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded"})
	start := time.Now()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("B's event stream ended")
			}
			if strings.HasPrefix(l, "data: ") && strings.Contains(l, run) && strings.Contains(l, `"status":"succeeded"`) {
				t.Logf("B's stream showed the run succeeded %s after A acknowledged its finish", time.Since(start).Round(time.Millisecond))
				return
			}
		case <-deadline:
			t.Fatal("B's event stream did not show the run succeeded within 30s (its poll is a minute)")
		}
	}
}

// TestReplicasDatabaseOutage: the database unreachable for every replica
// (connections reset, new ones refused) with a run in flight: the API
// answers typed 5xx envelopes (internal, database_unavailable, Retry-After)
// and the agent's report is refused, not lost; when the database is back,
// everything resumes by itself — the agent's report applies once, a run
// created through B reaches the agent on A, and nothing is charged twice.
func TestReplicasDatabaseOutage(t *testing.T) {
	dsn := pgtest.Database(t)
	proxy := pgtest.NewProxy(t)
	rs := startReplicasOn(t, proxy.URL(dsn), 2)
	a, b := rs[0], rs[1]
	_, token, agentToken := a.account(t, 10)
	ag := dialAgent(t, a.URL, agentToken, "noop-a", 1)
	wf1 := a.workflow(t, token, "first", noopDef)
	wf2 := a.workflow(t, token, "second", noopDef)
	run1 := b.runWorkflow(t, token, wf1, nil)
	as := expectFrame[*protocol.Assign](ag)
	ag.start(as)

	proxy.Cut()
	for _, r := range rs {
		res, body := r.raw(t, "GET", "/v1/runs/"+run1, token)
		var e protocol.Error
		_ = json.Unmarshal(body, &e)
		if res.StatusCode != 500 || e.Code != protocol.CodeInternal || e.Details["reason"] != "database_unavailable" ||
			e.RequestID == "" || res.Header.Get("Retry-After") == "" {
			t.Fatalf("GET a run on %s during the outage: %d %s", r.name, res.StatusCode, body)
		}
	}
	if st, body := b.try(t, "POST", "/v1/workflows/"+wf2+"/runs", token, map[string]any{"inputs": map[string]any{}}); st != 500 || body["code"] != "internal" {
		t.Fatalf("POST a run during the outage: %d %v", st, body)
	}
	// The agent's report cannot be stored: an error, no ack.
	ag.send(&protocol.Event{RunID: as.RunID, LeaseID: as.LeaseID, Seq: 2, Kind: protocol.EventFinished, Status: "succeeded"})
	if f := expectFrame[*protocol.ErrorFrame](ag); f.Code != protocol.CodeInternal || f.Details["reason"] != protocol.ReasonDatabaseUnavailable || f.RunID != as.RunID {
		t.Fatalf("report during the outage: %+v", f)
	}

	proxy.Restore(t)
	// The agent resends its report (as the real agent does after an error).
	eventually(t, 60*time.Second, "the report applied after the outage", func() (bool, string) {
		ag.send(&protocol.Event{RunID: as.RunID, LeaseID: as.LeaseID, Seq: 2, Kind: protocol.EventFinished, Status: "succeeded"})
		switch f := ag.next().f.(type) {
		case *protocol.Ack:
			return f.RunID == run1 && f.Seq == 2, ""
		case *protocol.ErrorFrame:
			return false, f.Message
		default:
			return false, fmt.Sprintf("%T", f)
		}
	})
	var run2 string
	eventually(t, 60*time.Second, "a run created through B after the outage", func() (bool, string) {
		st, body := b.try(t, "POST", "/v1/workflows/"+wf2+"/runs", token, map[string]any{"inputs": map[string]any{}})
		if st == 201 {
			run2 = body["id"].(string)
		}
		return st == 201, fmt.Sprint(st, body["code"])
	})
	as2 := expectFrame[*protocol.Assign](ag)
	if as2.RunID != run2 {
		t.Fatalf("assigned %s, want %s", as2.RunID, run2)
	}
	ag.start(as2)
	ag.report(as2, 2, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded"})
	for _, id := range []string{run1, run2} {
		run := a.waitRun(t, token, id, 30*time.Second)
		if run["status"] != "succeeded" {
			t.Fatalf("run %s after the outage: %v", id, run)
		}
		chargedOnce(t, a.server, token, run)
	}
	if c := b.credits(t, token); c.Balance != 8 || c.Held != 0 {
		t.Errorf("credits after the outage: %+v", c)
	}
}
