package cluster_test

// Benchmarks of replicas on one database, in-process: each replica is a
// store (its own pool), a hub serving no-op protocol clients over real
// websockets, and a cluster; runs are created through the stores and
// announced as the API does (hub, then cluster).
//
//	go test -run='^$' -bench=CrossReplicaDispatch -benchtime=500x ./controlplane/internal/cluster
//	go test -run='^$' -bench=ReplicaLifecycles -benchtime=5000x ./controlplane/internal/cluster
//
// PostgreSQL benchmarks run on a fresh database (COPELF_TEST_POSTGRES,
// default the local test server) and skip without one.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/cluster"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
	"github.com/copelf/copelf/protocol"
)

// benchReplica is one control plane of a benchmark.
type benchReplica struct {
	st  *sqlstore.DB
	hub *hub.Hub
	cl  *cluster.Cluster
	srv *httptest.Server
}

// startReplica opens dsn and starts a hub and a cluster on it.
// wrap, when given, changes the cluster's receiver.
func startReplica(b *testing.B, dsn string, wrap ...func(cluster.Receiver) cluster.Receiver) *benchReplica {
	b.Helper()
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	log := logrus.New()
	log.Out = discard{}
	log.SetLevel(logrus.InfoLevel) // as in production
	srv := api.New(st, log, api.Config{RunCost: 1, DataDir: b.TempDir()})
	h := hub.New(st, log, func(ctx context.Context, token string) (*store.User, *store.Token, error) {
		p, err := srv.Authenticate(ctx, token)
		if err != nil {
			return nil, nil, err
		}
		return p.User, p.Token, nil
	}, hub.Config{LeaseTimeout: time.Minute})
	cl, err := cluster.New(dsn, log, cluster.Config{})
	if err != nil {
		b.Fatal(err)
	}
	h.Peers = cl
	if err := h.Start(ctx); err != nil {
		b.Fatal(err)
	}
	recv := cluster.Receiver{Queued: h.Kick, RunChanged: h.Sync, ApprovalResolved: h.SyncApproval, Resync: h.Resync}
	for _, w := range wrap {
		recv = w(recv)
	}
	cl.Start(recv)
	r := &benchReplica{st: st, hub: h, cl: cl, srv: httptest.NewServer(h)}
	b.Cleanup(func() { cl.Close(); h.Close(); r.srv.Close(); st.Close() })
	return r
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// startReplicas starts n replicas on a fresh database of kind db (sqlite or
// postgres) and waits until their clusters listen.
func startReplicas(b *testing.B, db string, n int, wrap ...func(cluster.Receiver) cluster.Receiver) []*benchReplica {
	b.Helper()
	var dsn string
	if db == "sqlite" {
		dsn = "sqlite://" + filepath.Join(b.TempDir(), "copelf.db")
	} else {
		dsn = pgtest.Database(b)
	}
	rs := make([]*benchReplica, n)
	for i := range rs {
		rs[i] = startReplica(b, dsn, wrap...)
	}
	deadline := time.Now().Add(wait)
	for _, r := range rs {
		for r.cl.Enabled() && !r.cl.Listening() {
			if time.Now().After(deadline) {
				b.Fatal("clusters not listening")
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return rs
}

// benchAccount is a member with credits, n ready workflows and an agent
// token.
func benchAccount(b *testing.B, st *sqlstore.DB, credits int64, workflows int) (*store.User, string, []string) {
	b.Helper()
	ctx := context.Background()
	u, err := st.UserCreate(ctx, store.UserCreateParams{Email: ids.New("bench") + "@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: credits, Kind: store.LedgerGrant, Reason: "bench"}); err != nil {
		b.Fatal(err)
	}
	token, err := api.CreateToken(ctx, st, u.ID, store.TokenAgent, "agent")
	if err != nil {
		b.Fatal(err)
	}
	wfs := make([]string, workflows)
	for i := range wfs {
		wf, err := st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady,
			Definition: json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"}]}`)})
		if err != nil {
			b.Fatal(err)
		}
		wfs[i] = wf.ID
	}
	return u, token, wfs
}

// create queues a run through r's store and announces it as the API does.
func (r *benchReplica) create(ctx context.Context, accountID, workflowID string) (*store.Run, error) {
	run, err := r.st.RunCreate(ctx, store.RunCreateParams{AccountID: accountID, WorkflowID: workflowID, Inputs: map[string]any{}, Cost: 1,
		Steps: []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}}})
	if err != nil {
		return nil, err
	}
	r.hub.RunQueued(ctx, run)
	r.cl.RunQueued(ctx, run)
	return run, nil
}

// benchClient is a no-op protocol client.
type benchClient struct {
	ws     *websocket.Conn
	frames chan benchFrame
}

type benchFrame struct {
	f  protocol.Frame
	at time.Time
}

func dial(b *testing.B, r *benchReplica, token, id string, slots int) *benchClient {
	b.Helper()
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: wait}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(r.srv.URL, "http"), nil)
	if err != nil {
		b.Fatal(err)
	}
	c := &benchClient{ws: ws, frames: make(chan benchFrame, 4096)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			_, data, err := ws.ReadMessage()
			if err != nil {
				close(c.frames)
				return
			}
			at := time.Now()
			f, err := protocol.DecodeFrame(data)
			if err == nil {
				if _, hb := f.(*protocol.Heartbeat); !hb {
					c.frames <- benchFrame{f: f, at: at}
				}
			}
		}
	}()
	b.Cleanup(func() { ws.Close(); <-done })
	c.send(b, &protocol.Hello{Protocol: protocol.Version, Token: token,
		Agent: protocol.AgentInfo{ID: id, Name: id, Kind: protocol.AgentHeadless, Version: "bench", Slots: slots}})
	if _, ok := c.next(b).f.(*protocol.Welcome); !ok {
		b.Fatal("no welcome")
	}
	return c
}

func (c *benchClient) send(b *testing.B, f protocol.Frame) {
	data, err := protocol.EncodeFrame(f)
	if err == nil {
		err = c.ws.WriteMessage(websocket.TextMessage, data)
	}
	if err != nil {
		b.Error(err)
	}
}

func (c *benchClient) next(b *testing.B) benchFrame {
	select {
	case it, ok := <-c.frames:
		if !ok {
			b.Fatal("connection closed")
		}
		return it
	case <-time.After(wait):
		b.Fatal("no frame")
	}
	return benchFrame{}
}

// run accepts an assign and finishes it (succeeded), waiting for the acks.
func (c *benchClient) run(b *testing.B, a *protocol.Assign) {
	c.send(b, &protocol.Accept{RunID: a.RunID, LeaseID: a.LeaseID})
	c.send(b, &protocol.Event{RunID: a.RunID, LeaseID: a.LeaseID, Seq: 1, Kind: protocol.EventStarted})
	c.send(b, &protocol.Event{RunID: a.RunID, LeaseID: a.LeaseID, Seq: 2, Kind: protocol.EventFinished, Status: "succeeded"})
	for range 2 {
		if _, ok := c.next(b).f.(*protocol.Ack); !ok {
			b.Fatal("want an ack")
		}
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkCrossReplicaDispatch: from the moment a run's creation commits
// on one replica until the idle agent's client, connected to another, has
// read the assign off its websocket (same-replica: the local path, for
// comparison).
func BenchmarkCrossReplicaDispatch(b *testing.B) {
	for _, mode := range []string{"same-replica", "cross-replica"} {
		b.Run("postgres/"+mode, func(b *testing.B) {
			rs := startReplicas(b, "postgres", 2)
			on, via := rs[0], rs[1]
			if mode == "same-replica" {
				via = on
			}
			u, token, wfs := benchAccount(b, on.st, int64(b.N), b.N)
			c := dial(b, on, token, "idle", 1)
			ctx := context.Background()
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				run, err := via.st.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wfs[i], Inputs: map[string]any{}, Cost: 1,
					Steps: []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}}})
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				via.hub.RunQueued(ctx, run)
				via.cl.RunQueued(ctx, run)
				it := c.next(b)
				a, ok := it.f.(*protocol.Assign)
				if !ok || a.RunID != run.ID {
					b.Fatalf("got %T", it.f)
				}
				lat = append(lat, it.at.Sub(t0))
				b.StopTimer()
				c.run(b, a)
				b.StartTimer()
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
			b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
			b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// BenchmarkReplicaLifecycles: runs created and completed per second, with
// 32 one-slot no-op agents split across the replicas and a producer per
// replica creating runs through its store (each run of its own workflow)
// and announcing them as the API does: SQLite (one process), PostgreSQL
// with one replica, and with two. All of one account (its credit
// transactions take turns on its row), and spread over 8 accounts.
func BenchmarkReplicaLifecycles(b *testing.B) {
	for _, accounts := range []int{1, 8} {
		for _, c := range []struct {
			db       string
			replicas int
		}{{"sqlite", 1}, {"postgres", 1}, {"postgres", 2}} {
			b.Run(fmt.Sprintf("accounts=%d/%s/replicas=%d", accounts, c.db, c.replicas), func(b *testing.B) {
				benchReplicaLifecycles(b, c.db, c.replicas, 32, accounts)
			})
		}
	}
}

func benchReplicaLifecycles(b *testing.B, db string, replicas, agents, accounts int) {
	rs := startReplicas(b, db, replicas)
	// Run i is of account i%accounts; so is agent i.
	users := make([]*store.User, accounts)
	tokens := make([]string, accounts)
	wfs := make([]string, b.N)
	for a := range accounts {
		n := (b.N - a + accounts - 1) / accounts
		var own []string
		users[a], tokens[a], own = benchAccount(b, rs[0].st, int64(n), n)
		for j, wf := range own {
			wfs[a+j*accounts] = wf
		}
	}
	ctx := context.Background()
	clients := make([]*benchClient, agents)
	for i := range clients {
		clients[i] = dial(b, rs[i%replicas], tokens[i%accounts], fmt.Sprintf("worker-%d", i), 1)
		clients[i].send(b, &protocol.Ready{Slots: 0}) // paused until the timer starts
	}
	var (
		completed atomic.Int64
		failed    atomic.Value
		done      = make(chan struct{})
		stop      = make(chan struct{})
		wg        sync.WaitGroup
		begin     = make(chan struct{})
	)
	target := int64(b.N)
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-begin
			write := func(f protocol.Frame) bool {
				data, _ := protocol.EncodeFrame(f)
				if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
					failed.Store(err.Error())
					return false
				}
				return true
			}
			if !write(&protocol.Ready{Slots: 1}) {
				return
			}
			for {
				var it benchFrame
				var ok bool
				select {
				case <-stop:
					return
				case it, ok = <-c.frames:
					if !ok {
						return
					}
				}
				switch f := it.f.(type) {
				case *protocol.Assign:
					for _, out := range []protocol.Frame{
						&protocol.Accept{RunID: f.RunID, LeaseID: f.LeaseID},
						&protocol.Event{RunID: f.RunID, LeaseID: f.LeaseID, Seq: 1, Kind: protocol.EventStarted},
						&protocol.Event{RunID: f.RunID, LeaseID: f.LeaseID, Seq: 2, Kind: protocol.EventFinished, Status: "succeeded"},
					} {
						if !write(out) {
							return
						}
					}
				case *protocol.Ack:
					if f.Seq == 2 && completed.Add(1) == target {
						close(done)
					}
				case *protocol.ErrorFrame:
					failed.Store(fmt.Sprintf("error frame %s: %s", f.Code, f.Message))
					return
				}
			}
		}()
	}
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	close(begin)
	for p := range replicas {
		go func() {
			for i := p; i < len(wfs); i += replicas {
				if _, err := rs[p].create(ctx, users[i%accounts].ID, wfs[i]); err != nil {
					failed.Store(err.Error())
					return
				}
			}
		}()
	}
	select {
	case <-done:
	case <-time.After(time.Duration(b.N)*50*time.Millisecond + wait):
		b.Errorf("%d of %d lifecycles completed", completed.Load(), b.N)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	close(stop)
	wg.Wait()
	if f := failed.Load(); f != nil {
		b.Fatalf("%v", f)
	}
	b.ReportMetric(float64(completed.Load())/elapsed.Seconds(), "lifecycles/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(completed.Load()), "cpu-µs/lifecycle")
	b.ReportMetric(0, "ns/op")
	for _, u := range users {
		cr, err := rs[0].st.CreditsGet(ctx, u.ID)
		if err != nil || cr.Held != 0 || cr.Balance != 0 {
			b.Fatalf("credits after %d runs: %+v %v", b.N, cr, err)
		}
	}
}

// cpuTime is the process's user and system CPU time so far (PostgreSQL's
// own is not in it).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
