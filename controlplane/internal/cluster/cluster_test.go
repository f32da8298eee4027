package cluster_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/cluster"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
)

// wait bounds every wait for something to happen: generous, for a loaded
// machine; tests wait for events, never for time.
const wait = 30 * time.Second

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func quietLog() logrus.FieldLogger {
	l := logrus.New()
	l.Out = io.Discard
	return l
}

// recorder is a Receiver that records what it is told.
type recorder struct {
	mu        sync.Mutex
	queued    map[string]int
	runs      map[string]int
	approvals map[string]string // approval → run
	events    int
	resyncs   int
	// resyncsListening counts resyncs while the cluster (c, when set)
	// listens: the one after a reconnect.
	resyncsListening int
	c                *cluster.Cluster
	changed          chan struct{}
}

func newRecorder() *recorder {
	return &recorder{queued: map[string]int{}, runs: map[string]int{}, approvals: map[string]string{}, changed: make(chan struct{}, 1)}
}

func (r *recorder) poke() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

func (r *recorder) receiver() cluster.Receiver {
	return cluster.Receiver{
		Queued: func(a string) { r.mu.Lock(); r.queued[a]++; r.mu.Unlock(); r.poke() },
		RunChanged: func(_ context.Context, id string) error {
			r.mu.Lock()
			r.runs[id]++
			r.mu.Unlock()
			r.poke()
			return nil
		},
		ApprovalResolved: func(_ context.Context, run, id string) error {
			r.mu.Lock()
			r.approvals[id] = run
			r.mu.Unlock()
			r.poke()
			return nil
		},
		EventsAppended: func() { r.mu.Lock(); r.events++; r.mu.Unlock(); r.poke() },
		Resync: func(context.Context) error {
			r.mu.Lock()
			r.resyncs++
			if r.c != nil && r.c.Listening() {
				r.resyncsListening++
			}
			r.mu.Unlock()
			r.poke()
			return nil
		},
	}
}

// until waits for cond (called with r.mu held) to hold.
func (r *recorder) until(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(wait)
	for {
		r.mu.Lock()
		ok := cond()
		r.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-r.changed:
		case <-deadline:
			t.Fatalf("%s: not within %s", what, wait)
		}
	}
}

// start makes and starts a cluster on dsn, closed when t ends.
func start(t *testing.T, dsn string, cfg cluster.Config, r *recorder) *cluster.Cluster {
	t.Helper()
	c, err := cluster.New(dsn, quietLog(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Start(r.receiver())
	t.Cleanup(c.Close)
	return c
}

// eventually polls cond every 10 ms (for state with no event to wait on:
// leadership, a connection's status).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, wait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func fast() cluster.Config {
	return cluster.Config{PollInterval: 50 * time.Millisecond, LeaderInterval: 50 * time.Millisecond, PingInterval: time.Second,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
}

func TestNoopOnSQLite(t *testing.T) {
	r := newRecorder()
	c := start(t, "sqlite://"+t.TempDir()+"/x.db", cluster.Config{}, r)
	if c.Enabled() || !c.Leader() {
		t.Fatalf("on SQLite: enabled %v, leader %v; want a no-op leader", c.Enabled(), c.Leader())
	}
	c.RunQueued(context.Background(), &store.Run{ID: "run_1", AccountID: "usr_1"})
	c.Close()
	if !c.Leader() {
		t.Error("a closed no-op cluster is still the only process, the leader")
	}
}

func TestBadURL(t *testing.T) {
	_, err := cluster.New("postgres://user:secret@[::1", quietLog(), cluster.Config{})
	if err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("bad URL: %v", err)
	}
}

// TestSignals: every kind of signal reaches the other replicas, not the
// one that sent it; a burst too large for one payload arrives whole.
func TestSignals(t *testing.T) {
	dsn := pgtest.Database(t)
	ra, rb, rc := newRecorder(), newRecorder(), newRecorder()
	a := start(t, dsn, fast(), ra)
	b := start(t, dsn, fast(), rb)
	c := start(t, dsn, fast(), rc)
	eventually(t, "all listening", func() bool { return a.Listening() && b.Listening() && c.Listening() })
	ctx := context.Background()

	a.RunQueued(ctx, &store.Run{ID: "run_1", AccountID: "usr_1"})
	a.RunChanged(ctx, &store.Run{ID: "run_2", AccountID: "usr_1"})
	a.ApprovalResolved(ctx, &store.Approval{ID: "apr_1", RunID: "run_3"})
	a.EventsObserver(nil).EventsAppended(3, time.Millisecond)
	b.RunReaped(&store.Run{ID: "run_4", AccountID: "usr_2"})
	for name, r := range map[string]*recorder{"b": rb, "c": rc} {
		r.until(t, "replica "+name+" got a's signals", func() bool {
			return r.queued["usr_1"] == 1 && r.runs["run_2"] == 1 && r.approvals["apr_1"] == "run_3" && r.events >= 1
		})
	}
	for name, r := range map[string]*recorder{"a": ra, "c": rc} {
		r.until(t, "replica "+name+" got b's signal", func() bool { return r.runs["run_4"] == 1 })
	}
	ra.mu.Lock()
	if ra.queued["usr_1"] != 0 || ra.runs["run_2"] != 0 || ra.events != 0 {
		t.Errorf("a acted on its own signals: %v %v %d", ra.queued, ra.runs, ra.events)
	}
	ra.mu.Unlock()
	rb.mu.Lock()
	if rb.runs["run_4"] != 0 {
		t.Errorf("b acted on its own signal: %v", rb.runs)
	}
	rb.mu.Unlock()

	// A burst: 5,000 accounts' runs queued at once (hundreds of payloads).
	const n = 5000
	for i := range n {
		a.RunQueued(ctx, &store.Run{ID: fmt.Sprintf("run_burst_%d", i), AccountID: fmt.Sprintf("usr_burst_%05d", i)})
	}
	rb.until(t, "the whole burst", func() bool {
		for i := range n {
			if rb.queued[fmt.Sprintf("usr_burst_%05d", i)] == 0 {
				return false
			}
		}
		return true
	})
}

// TestLeadership: exactly one replica leads; when it closes, or its
// connection is cut, another takes over.
func TestLeadership(t *testing.T) {
	dsn := pgtest.Database(t)
	db := pgtest.OpenDB(t, dsn)
	var cs []*cluster.Cluster
	for range 3 {
		c, err := cluster.New(dsn, quietLog(), fast())
		if err != nil {
			t.Fatal(err)
		}
		c.Start(cluster.Receiver{})
		t.Cleanup(c.Close)
		cs = append(cs, c)
	}
	leaders := func() []*cluster.Cluster {
		var out []*cluster.Cluster
		for _, c := range cs {
			if c.Leader() {
				out = append(out, c)
			}
		}
		return out
	}
	eventually(t, "one leader", func() bool {
		l := leaders()
		if len(l) > 1 {
			t.Fatalf("%d leaders at once", len(l))
		}
		return len(l) == 1
	})

	// Its session killed by the database: it notices at its next ping,
	// and a replica takes over.
	terminateLeader(t, db)
	eventually(t, "a leader again after the leader's session was terminated", func() bool {
		return len(leaders()) == 1 && holders(t, db) == 1
	})

	// Closed: the lock goes with it.
	var second *cluster.Cluster
	for _, c := range cs {
		if c.Leader() {
			second = c
		}
	}
	second.Close()
	if second.Leader() {
		t.Fatal("a closed cluster still says it leads")
	}
	eventually(t, "another leader after the leader closed", func() bool {
		l := leaders()
		return len(l) == 1 && l[0] != second
	})
}

// holders counts the sessions that hold an advisory lock.
func holders(t *testing.T, db *sql.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func terminateLeader(t *testing.T, db *sql.DB) {
	t.Helper()
	var n int
	err := db.QueryRow(`SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n)
	if err != nil || n != 1 {
		t.Fatalf("terminate the leader's session: %d, %v", n, err)
	}
}

// TestOutage: the database unreachable (connections reset, new ones
// refused): the replicas poll (Resync every PollInterval) and give up
// leadership; when it is back they listen again, resync once more, a
// leader is elected and signals flow; signals published during the outage
// are delivered after it.
func TestOutage(t *testing.T) {
	dsn := pgtest.Database(t)
	proxy := pgtest.NewProxy(t)
	via := proxy.URL(dsn)
	ra, rb := newRecorder(), newRecorder()
	a := start(t, via, fast(), ra)
	b := start(t, via, fast(), rb)
	eventually(t, "listening and led", func() bool { return a.Listening() && b.Listening() && (a.Leader() || b.Leader()) })
	ctx := context.Background()

	proxy.Cut()
	eventually(t, "the outage noticed", func() bool { return !a.Listening() && !b.Listening() && !a.Leader() && !b.Leader() })
	rb.mu.Lock()
	before := rb.resyncs
	rb.c, rb.resyncsListening = b, 0
	rb.mu.Unlock()
	rb.until(t, "polling while the database is away", func() bool { return rb.resyncs >= before+3 })
	// Sent during the outage: it may go out before b listens again, and
	// be lost; b's resync once it listens covers it.
	a.RunQueued(ctx, &store.Run{ID: "run_during", AccountID: "usr_during"})

	proxy.Restore(t)
	eventually(t, "listening and led again", func() bool { return a.Listening() && b.Listening() && (a.Leader() != b.Leader()) })
	rb.until(t, "a resync once listening again", func() bool { return rb.resyncsListening > 0 })
	a.RunChanged(ctx, &store.Run{ID: "run_after", AccountID: "usr_during"})
	rb.until(t, "a signal after the outage", func() bool { return rb.runs["run_after"] == 1 })
}
