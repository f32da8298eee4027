// Package cluster lets several copelfd replicas share one PostgreSQL
// database (API.md §11): it carries small signals between them over
// PostgreSQL's LISTEN/NOTIFY and elects the one that runs the maintenance
// loop, with a session advisory lock.
//
// Signals (one channel, Config.Channel; ids only, never a secret):
//
//   - queued {a}: a run of account a was queued; every replica looks at a's
//     queue (hub.Kick): the agent that can take it may be connected to any.
//   - run {a, r}: run r changed outside the path of the agent holding it (a
//     cancel requested through the API, a run the maintenance loop ended or
//     took back); the replica whose agent holds it acts (hub.Sync).
//   - approval {r, p}: approval p of run r was resolved (hub.SyncApproval).
//   - events: the event log grew (events.Broker.Wake): SSE streams on every
//     replica show it at once rather than at their next poll.
//
// A NOTIFY payload is {"origin": replica, "s": [signal, …]}, below 8000
// bytes: the signals published at about the same moment travel together,
// each at most once. A replica ignores its own (the local path already
// acted). Signals are sent after the change is committed, by one goroutine
// on a connection of its own; the API never waits for them.
//
// Signals are an accelerator, never the only path: while the listening
// connection is down (a database restart), Receiver.Resync runs every
// Config.PollInterval, and once more when listening again — the hub's own
// sweep dispatches queued runs every second regardless, and the event log's
// tail polls. Nothing is lost; only latency grows.
//
// Leadership: the replica holding pg_try_advisory_lock on its own
// connection runs the maintenance loop (hub.Peers.Leader); it loses the
// role when that connection fails its periodic ping, and every replica tries
// to take it again every Config.LeaderInterval. Every maintenance action is
// a guarded update anyway (so two leaders for a moment, after a partition,
// are harmless); leadership keeps the work and its logs on one replica. The
// analysis reaper and the event log's pruner need no leader: each is one
// guarded statement.
//
// On SQLite (one process) the cluster is a no-op that is always the leader.
//
// Goroutines (PostgreSQL only): a sender, a listener, a worker (runs the
// receiver's slow calls one at a time), a poller (the fallback) and the
// leader loop. Close stops them all and waits.
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/store"
)

// Config holds the cluster's settings; zero values take the defaults.
type Config struct {
	// Channel is the NOTIFY channel (default copelf_events).
	Channel string
	// Origin names this replica in signals and logs (default rep_<random>).
	Origin string
	// PollInterval is how often Receiver.Resync runs while the listening
	// connection is down (default 1 s).
	PollInterval time.Duration
	// PingInterval is how long the listener waits for a notification
	// before it pings its connection (default 5 s).
	PingInterval time.Duration
	// LeaderInterval is how often a follower tries to take leadership and
	// the leader pings its connection (default 1 s).
	LeaderInterval time.Duration
	// MinBackoff and MaxBackoff bound the reconnect delays (defaults 100 ms
	// and 5 s).
	MinBackoff, MaxBackoff time.Duration
	// MaxPending bounds the signals waiting to be sent (default 100,000);
	// past it they are dropped (the receivers' sweeps catch up).
	MaxPending int
}

func (c *Config) defaults() {
	if c.Channel == "" {
		c.Channel = "copelf_events"
	}
	if c.Origin == "" {
		var b [6]byte
		_, _ = rand.Read(b[:])
		c.Origin = "rep_" + hex.EncodeToString(b[:])
	}
	for _, d := range []struct {
		p   *time.Duration
		def time.Duration
	}{{&c.PollInterval, time.Second}, {&c.PingInterval, 5 * time.Second}, {&c.LeaderInterval, time.Second},
		{&c.MinBackoff, 100 * time.Millisecond}, {&c.MaxBackoff, 5 * time.Second}} {
		if *d.p <= 0 {
			*d.p = d.def
		}
	}
	c.MaxBackoff = max(c.MaxBackoff, c.MinBackoff)
	if c.MaxPending <= 0 {
		c.MaxPending = 100_000
	}
}

// Kind is a signal's kind.
type Kind string

// Kinds of signals.
const (
	KindQueued   Kind = "queued"
	KindRun      Kind = "run"
	KindApproval Kind = "approval"
	KindEvents   Kind = "events"
)

// Signal is one cross-replica signal: ids only.
type Signal struct {
	Kind       Kind   `json:"k"`
	AccountID  string `json:"a,omitempty"`
	RunID      string `json:"r,omitempty"`
	ApprovalID string `json:"p,omitempty"`
}

// Receiver is what a replica does with the other replicas' signals. Nil
// functions are skipped. Queued and EventsAppended are called on the
// listener's goroutine and must not block; the others on a worker
// goroutine, one call at a time.
type Receiver struct {
	Queued           func(accountID string)
	RunChanged       func(ctx context.Context, runID string) error
	ApprovalResolved func(ctx context.Context, runID, approvalID string) error
	EventsAppended   func()
	// Resync is called when signals may have been missed: once each time
	// the listening connection is (re)established, and every PollInterval
	// while it is down.
	Resync func(ctx context.Context) error
}

// Cluster is this replica's link to the others.
type Cluster struct {
	cfg  Config
	log  logrus.FieldLogger
	pg   *pgx.ConnConfig // nil: not PostgreSQL; everything is a no-op
	recv Receiver

	leader    atomic.Bool
	listening atomic.Bool
	retry     atomic.Bool // a receiver call failed: resync at the next poll

	mu      sync.Mutex
	pending []Signal
	queued  map[Signal]struct{} // the signals in pending
	closed  bool

	sendKick   chan struct{}
	stopSend   chan struct{}
	slow       chan Signal
	resyncKick chan struct{}

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	started bool
	once    sync.Once
}

// New returns the cluster of the database at dsn: on postgres:// (or
// postgresql://) URLs the real one, otherwise a no-op that is always the
// leader. Call Start, then Close.
func New(dsn string, log logrus.FieldLogger, cfg Config) (*Cluster, error) {
	cfg.defaults()
	c := &Cluster{
		cfg: cfg, log: log.WithField("replica", cfg.Origin),
		queued:     map[Signal]struct{}{},
		sendKick:   make(chan struct{}, 1),
		stopSend:   make(chan struct{}),
		slow:       make(chan Signal, 4096),
		resyncKick: make(chan struct{}, 1),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if !strings.HasPrefix(dsn, "postgres://") && !strings.HasPrefix(dsn, "postgresql://") {
		c.leader.Store(true)
		return c, nil
	}
	pg, err := connConfig(dsn)
	if err != nil {
		return nil, err
	}
	c.pg = pg
	return c, nil
}

// connConfig is pgx's configuration of a connection to dsn, without the
// store's pool_max_conns, named copelfd-cluster in pg_stat_activity, its
// commits asynchronous.
func connConfig(dsn string) (*pgx.ConnConfig, error) {
	u, err := url.Parse(dsn)
	if err != nil {
		return nil, errors.New("cluster: the postgres URL cannot be parsed")
	}
	q := u.Query()
	q.Del("pool_max_conns")
	u.RawQuery = q.Encode()
	cfg, err := pgx.ParseConfig(u.String())
	if err != nil {
		// pgx's message may quote the URL, password and all.
		return nil, errors.New("cluster: the postgres URL cannot be parsed")
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if _, ok := cfg.RuntimeParams["application_name"]; !ok {
		cfg.RuntimeParams["application_name"] = "copelfd-cluster"
	}
	// A NOTIFY commits a transaction of its own; signals are not data (a
	// crash loses nothing the resync would not find), so that commit need
	// not wait for the disk.
	cfg.RuntimeParams["synchronous_commit"] = "off"
	return cfg, nil
}

// Enabled reports whether the database is PostgreSQL (signals and
// leadership are real).
func (c *Cluster) Enabled() bool { return c.pg != nil }

// Origin is this replica's name in signals and logs.
func (c *Cluster) Origin() string { return c.cfg.Origin }

// Leader reports whether this replica runs the maintenance loop now.
func (c *Cluster) Leader() bool { return c.leader.Load() }

// Listening reports whether other replicas' signals arrive now.
func (c *Cluster) Listening() bool { return c.listening.Load() }

// Start starts the goroutines; signals from the others go to r.
func (c *Cluster) Start(r Receiver) {
	c.recv = r
	if c.pg == nil {
		return
	}
	c.started = true
	c.wg.Add(5)
	go c.sendLoop()
	go c.listenLoop()
	go c.workLoop()
	go c.pollLoop()
	go c.leaderLoop()
	c.log.WithField("channel", c.cfg.Channel).Info("cluster: signals between replicas over PostgreSQL")
}

// Close sends what is pending (for at most a few seconds), gives up
// leadership and stops the goroutines.
func (c *Cluster) Close() {
	c.once.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		if c.started {
			close(c.stopSend)
		}
		c.cancel()
		c.wg.Wait()
		if c.pg != nil {
			c.leader.Store(false)
		}
	})
}

// Publish queues signals for the other replicas. It never blocks; a signal
// already waiting is not queued twice.
func (c *Cluster) Publish(sigs ...Signal) {
	if c.pg == nil {
		return
	}
	dropped := 0
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	for _, s := range sigs {
		if _, dup := c.queued[s]; dup {
			continue
		}
		if len(c.pending) >= c.cfg.MaxPending {
			dropped++
			continue
		}
		c.queued[s] = struct{}{}
		c.pending = append(c.pending, s)
	}
	c.mu.Unlock()
	if dropped > 0 {
		c.log.WithField("dropped", dropped).Warn("cluster: too many signals waiting; dropping (the other replicas' sweeps catch up)")
	}
	select {
	case c.sendKick <- struct{}{}:
	default:
	}
}

// RunQueued signals a queued run (api.Hooks): every replica looks at the
// account's queue. Runs queued together make one signal per account.
func (c *Cluster) RunQueued(_ context.Context, r *store.Run) {
	c.Publish(Signal{Kind: KindQueued, AccountID: r.AccountID})
}

// RunChanged signals a run changed through the API (api.Hooks): a cancel.
func (c *Cluster) RunChanged(_ context.Context, r *store.Run) {
	c.Publish(Signal{Kind: KindRun, AccountID: r.AccountID, RunID: r.ID})
}

// ApprovalResolved signals an approval resolved through the API (api.Hooks).
func (c *Cluster) ApprovalResolved(_ context.Context, a *store.Approval) {
	c.Publish(Signal{Kind: KindApproval, RunID: a.RunID, ApprovalID: a.ID})
}

// RunReaped signals a run the maintenance loop changed (hub.Peers).
func (c *Cluster) RunReaped(r *store.Run) {
	c.Publish(Signal{Kind: KindRun, AccountID: r.AccountID, RunID: r.ID})
}

// EventsObserver is what the event log's broker tells its observer
// (events.Observer).
type EventsObserver interface {
	EventsAppended(n int, d time.Duration)
	EventsDropped(n int)
	SubscriberDropped()
}

// EventsObserver wraps next (may be nil): every append to the event log
// also signals the other replicas, whose brokers read the table at once.
func (c *Cluster) EventsObserver(next EventsObserver) EventsObserver {
	return eventsObserver{c: c, next: next}
}

type eventsObserver struct {
	c    *Cluster
	next EventsObserver
}

func (o eventsObserver) EventsAppended(n int, d time.Duration) {
	o.c.Publish(Signal{Kind: KindEvents})
	if o.next != nil {
		o.next.EventsAppended(n, d)
	}
}

func (o eventsObserver) EventsDropped(n int) {
	if o.next != nil {
		o.next.EventsDropped(n)
	}
}

func (o eventsObserver) SubscriberDropped() {
	if o.next != nil {
		o.next.SubscriberDropped()
	}
}

// connect opens a connection of the cluster's own.
func (c *Cluster) connect(ctx context.Context) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, c.pg.Copy())
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}

// closeConn closes a connection, waiting at most a second for the server.
func closeConn(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// newBackoff is the reconnect backoff: exponential with jitter, forever.
func (c *Cluster) newBackoff() *backoff.ExponentialBackOff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = c.cfg.MinBackoff, c.cfg.MaxBackoff, 0
	b.Reset()
	return b
}

// sleep waits d or until the cluster closes; it reports whether to go on.
func (c *Cluster) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// outage logs a connection failure: the first of a run of failures as a
// warning, the rest at debug level (a database restart must not flood the
// log).
type outage struct {
	log    logrus.FieldLogger
	what   string
	failed bool
}

func (o *outage) fail(err error, retryIn time.Duration) {
	l := o.log.WithError(err).WithField("retryIn", retryIn.Round(time.Millisecond).String())
	if o.failed {
		l.Debug("cluster: " + o.what + " still failing")
		return
	}
	o.failed = true
	l.Warn("cluster: " + o.what + " failed; retrying")
}

func (o *outage) ok() {
	if o.failed {
		o.log.Info("cluster: " + o.what + " recovered")
	}
	o.failed = false
}
