// Package events is the control plane's live event log (API.md §10): a
// Broker takes publications from the API and the hub, appends them to the
// store's event table in batches, and hands the events, in id order, to
// subscribers (the SSE streams of GET /v1/events and GET /v1/runs/{id}/events).
//
// Goroutines: one writer (coalesces publications into one EventAppend
// transaction), one tail (the only one that delivers to subscribers: events
// the writer just appended, or, when another replica wrote in between, what
// it reads from the table after the last id it delivered) and one pruner.
// Close flushes what is pending, stops them all and ends every subscription.
//
// Publishing never blocks and never touches the database on the caller's
// goroutine: it appends to an in-memory queue bounded by Config.MaxPending
// (past it, publications are dropped, logged and counted).
package events

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/store"
)

// Event types: the SSE event names.
const (
	RunUpdated        = "run.updated"
	BatchUpdated      = "batch.updated"
	ApprovalUpdated   = "approval.updated"
	AgentConnected    = "agent.connected"
	AgentDisconnected = "agent.disconnected"
	AgentUpdated      = "agent.updated"
)

// Categories are what GET /v1/events?types= selects.
var Categories = []string{"run", "batch", "approval", "agent"}

// Category is the category of an event type ("run" for "run.updated").
func Category(typ string) string {
	c, _, _ := strings.Cut(typ, ".")
	return c
}

// Store is what the broker needs of the store.
type Store interface {
	EventAppend(ctx context.Context, events []*store.Event) error
	EventsAfter(ctx context.Context, afterID int64, f store.EventFilter, limit int) ([]*store.Event, error)
	EventLatestID(ctx context.Context, runID string) (int64, error)
	EventPrune(ctx context.Context, before time.Time) (int64, error)
}

// Item is one publication. Data is encoded to JSON by the writer goroutine,
// so it must not change after Publish.
type Item struct {
	AccountID string
	Type      string
	SubjectID string
	RunID     string
	Data      any
}

// Builder makes items when the writer flushes (reads the current state of a
// resource: a batch's progress). It runs on the writer goroutine.
type Builder func(ctx context.Context) ([]Item, error)

// Config holds the broker's settings.
type Config struct {
	// PollInterval is how often the tail reads the table for events other
	// replicas wrote (default 500 ms). Wake reads at once.
	PollInterval time.Duration
	// Retention is how long events are kept (default 24 h); PruneInterval
	// how often old ones are deleted (default Retention/24, at most 10 min).
	Retention     time.Duration
	PruneInterval time.Duration
	// MaxBatch bounds the events of one append transaction (default 512).
	MaxBatch int
	// MaxPending bounds the publications waiting for the writer (default
	// 100,000); past it they are dropped.
	MaxPending int
	// SubscriberBuffer is each subscription's queue (default 1024); a
	// subscriber that lets it fill up is dropped (it resumes with
	// Last-Event-ID).
	SubscriberBuffer int
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.PollInterval <= 0 {
		c.PollInterval = 500 * time.Millisecond
	}
	if c.Retention <= 0 {
		c.Retention = 24 * time.Hour
	}
	if c.PruneInterval <= 0 {
		c.PruneInterval = min(c.Retention/24, 10*time.Minute)
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = 512
	}
	if c.MaxPending <= 0 {
		c.MaxPending = 100_000
	}
	if c.SubscriberBuffer <= 0 {
		c.SubscriberBuffer = 1024
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Observer is told what the broker does (metrics); every method must be
// cheap and safe for concurrent use.
type Observer interface {
	EventsAppended(n int, d time.Duration)
	EventsDropped(n int)
	SubscriberDropped()
}

// Broker is the event log's writer and fan-out.
type Broker struct {
	st  Store
	log logrus.FieldLogger
	cfg Config
	// Observer may be nil; set before Start.
	Observer Observer

	mu        sync.Mutex
	pending   []Item
	lazy      map[string]Builder
	lazyOrder []string
	closed    bool

	writeKick   chan struct{}
	tailKick    chan struct{}
	lastDropLog atomic.Int64
	appended    chan []*store.Event

	subMu sync.Mutex
	subs  map[*Subscription]struct{}
	last  int64 // the last id delivered (or skipped) by the tail

	ctx     context.Context
	cancel  context.CancelFunc
	stopW   chan struct{} // asks the writer to flush and stop
	writer  sync.WaitGroup
	wg      sync.WaitGroup
	started bool
	once    sync.Once
}

// New returns a broker; call Start, then Close.
func New(st Store, log logrus.FieldLogger, cfg Config) *Broker {
	cfg.defaults()
	b := &Broker{
		st: st, log: log, cfg: cfg,
		lazy:      map[string]Builder{},
		writeKick: make(chan struct{}, 1),
		tailKick:  make(chan struct{}, 1),
		appended:  make(chan []*store.Event, 64),
		subs:      map[*Subscription]struct{}{},
		stopW:     make(chan struct{}),
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	return b
}

// Start reads the latest event id (live streams start after it) and starts
// the writer, the tail and the pruner.
func (b *Broker) Start(ctx context.Context) error {
	last, err := b.st.EventLatestID(ctx, "")
	if err != nil {
		return err
	}
	b.subMu.Lock()
	b.last = last
	b.subMu.Unlock()
	b.started = true
	b.writer.Add(1)
	b.wg.Add(2)
	go b.writeLoop()
	go b.tailLoop()
	go b.pruneLoop()
	return nil
}

// Close appends what is pending (for at most a few seconds), stops the
// goroutines and ends every subscription.
func (b *Broker) Close() {
	b.once.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		if b.started {
			// The writer first: what is pending is appended and
			// delivered before the tail stops.
			close(b.stopW)
			b.writer.Wait()
		}
		b.cancel()
		b.wg.Wait()
		b.subMu.Lock()
		for s := range b.subs {
			s.end(ErrClosed)
		}
		clear(b.subs)
		b.subMu.Unlock()
	})
}

// Publish queues an item for the log. It never blocks.
func (b *Broker) Publish(items ...Item) {
	if len(items) == 0 {
		return
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	drop := len(b.pending) + len(items) - b.cfg.MaxPending
	if drop > 0 {
		items = items[:max(len(items)-drop, 0)]
	}
	b.pending = append(b.pending, items...)
	b.mu.Unlock()
	if drop > 0 {
		b.dropped(drop)
	}
	b.kickWriter()
}

// PublishLazy queues a builder under key: however often it is published
// before the writer's next flush, it runs once then, and its items follow
// the items published before the flush.
func (b *Broker) PublishLazy(key string, fn Builder) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	if _, ok := b.lazy[key]; !ok {
		if len(b.lazy) >= b.cfg.MaxPending {
			b.mu.Unlock()
			b.dropped(1)
			return
		}
		b.lazyOrder = append(b.lazyOrder, key)
	}
	b.lazy[key] = fn
	b.mu.Unlock()
	b.kickWriter()
}

func (b *Broker) dropped(n int) {
	// One warning a second at most: dropping happens in floods.
	if now := time.Now().UnixNano(); now-b.lastDropLog.Load() > int64(time.Second) {
		b.lastDropLog.Store(now)
		b.log.WithField("dropped", n).Warn("event log: too many pending publications; dropping")
	}
	if b.Observer != nil {
		b.Observer.EventsDropped(n)
	}
}

func (b *Broker) kickWriter() {
	select {
	case b.writeKick <- struct{}{}:
	default:
	}
}

// Wake makes the tail read the table now (another replica appended: a
// PostgreSQL NOTIFY).
func (b *Broker) Wake() {
	select {
	case b.tailKick <- struct{}{}:
	default:
	}
}

// LastID is the id of the last event delivered to subscribers.
func (b *Broker) LastID() int64 {
	b.subMu.Lock()
	defer b.subMu.Unlock()
	return b.last
}

// take removes up to max pending items and every lazy builder.
func (b *Broker) take(limit int) ([]Item, []Builder) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := min(len(b.pending), limit)
	items := make([]Item, n)
	copy(items, b.pending[:n])
	rest := copy(b.pending, b.pending[n:])
	clear(b.pending[rest:])
	b.pending = b.pending[:rest]
	if len(b.pending) == 0 && cap(b.pending) > 4096 {
		b.pending = nil // give a burst's memory back
	}
	var builders []Builder
	if rest == 0 {
		// Builders run once the items published before them are out.
		builders = make([]Builder, 0, len(b.lazyOrder))
		for _, k := range b.lazyOrder {
			builders = append(builders, b.lazy[k])
		}
		clear(b.lazy)
		b.lazyOrder = b.lazyOrder[:0]
	}
	return items, builders
}

// closeGrace bounds the appends of what is pending at Close.
const closeGrace = 5 * time.Second

func (b *Broker) writeLoop() {
	defer b.writer.Done()
	for {
		select {
		case <-b.stopW:
			// Flush what is pending with a bounded grace, then stop.
			ctx, cancel := context.WithTimeout(context.Background(), closeGrace)
			for b.flush(ctx) {
			}
			cancel()
			return
		case <-b.writeKick:
			for b.flush(context.Background()) {
			}
		}
	}
}

// flush appends one batch; it reports whether there may be more.
func (b *Broker) flush(ctx context.Context) bool {
	items, builders := b.take(b.cfg.MaxBatch)
	for _, fn := range builders {
		bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		more, err := fn(bctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				b.log.WithError(err).Warn("event log: building an event failed")
			}
			continue
		}
		items = append(items, more...)
	}
	if len(items) == 0 {
		return false
	}
	evs := make([]*store.Event, 0, len(items))
	now := b.cfg.Now().UTC().Truncate(time.Millisecond) // as stored
	for _, it := range items {
		data, err := json.Marshal(it.Data)
		if err != nil {
			b.log.WithError(err).WithField("type", it.Type).Error("event log: encode event")
			continue
		}
		evs = append(evs, &store.Event{AccountID: it.AccountID, Type: it.Type, SubjectID: it.SubjectID, RunID: it.RunID, Data: data, CreatedAt: now})
	}
	start := time.Now()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = b.st.EventAppend(actx, evs)
		cancel()
		if err == nil || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(attempt+1) * 100 * time.Millisecond):
		}
	}
	if err != nil {
		b.log.WithError(err).WithField("events", len(evs)).Error("event log: append failed; events lost")
		if b.Observer != nil {
			b.Observer.EventsDropped(len(evs))
		}
		return true
	}
	if b.Observer != nil {
		b.Observer.EventsAppended(len(evs), time.Since(start))
	}
	select {
	case b.appended <- evs:
	default:
		b.Wake() // the tail is behind: it reads the table
	}
	return true
}

// tailLoop delivers events to subscribers in id order: a batch the writer
// just appended when it follows the last delivered id, otherwise (another
// replica appended in between, or the tail fell behind) what the table holds
// after the last delivered id.
func (b *Broker) tailLoop() {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-b.ctx.Done():
			return
		case evs := <-b.appended:
			if len(evs) > 0 && evs[0].ID == b.LastID()+1 {
				b.deliver(evs)
				continue
			}
		case <-b.tailKick:
		case <-t.C:
		}
		b.poll()
	}
}

// tailPage bounds one read of the table.
const tailPage = 1000

func (b *Broker) poll() {
	for {
		ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
		evs, err := b.st.EventsAfter(ctx, b.LastID(), store.EventFilter{}, tailPage)
		cancel()
		if err != nil {
			if b.ctx.Err() == nil {
				b.log.WithError(err).Warn("event log: reading the table failed")
			}
			return
		}
		b.deliver(evs)
		if len(evs) < tailPage {
			return
		}
	}
}

// deliver hands events above the last delivered id to the subscribers.
func (b *Broker) deliver(evs []*store.Event) {
	b.subMu.Lock()
	defer b.subMu.Unlock()
	for _, ev := range evs {
		if ev.ID <= b.last {
			continue
		}
		b.last = ev.ID
		for s := range b.subs {
			if !s.match(ev) {
				continue
			}
			select {
			case s.ch <- ev:
			default:
				delete(b.subs, s)
				s.end(ErrSlow)
				if b.Observer != nil {
					b.Observer.SubscriberDropped()
				}
			}
		}
	}
}

func (b *Broker) pruneLoop() {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.PruneInterval)
	defer t.Stop()
	for {
		b.prune()
		select {
		case <-b.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (b *Broker) prune() {
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	n, err := b.st.EventPrune(ctx, b.cfg.Now().Add(-b.cfg.Retention))
	if err != nil && b.ctx.Err() == nil {
		b.log.WithError(err).Warn("event log: prune failed")
	} else if n > 0 {
		b.log.WithField("events", n).Debug("event log: pruned")
	}
}

// Errors a subscription ends with.
var (
	ErrSlow   = errors.New("subscriber too slow")
	ErrClosed = errors.New("event broker closed")
)

// Filter selects the events of a subscription.
type Filter struct {
	AccountID string          // "" every account
	RunID     string          // "" every run
	Types     map[string]bool // by event type; nil every type
}

func (f Filter) match(ev *store.Event) bool {
	return (f.AccountID == "" || ev.AccountID == f.AccountID) && (f.RunID == "" || ev.RunID == f.RunID) &&
		(f.Types == nil || f.Types[ev.Type])
}

// Subscription receives the events delivered after it was made.
type Subscription struct {
	b      *Broker
	filter Filter
	ch     chan *store.Event
	done   chan struct{}
	err    error
	// From is the last id delivered before the subscription: it receives
	// every matching event with a greater id, in order.
	From int64
}

func (s *Subscription) match(ev *store.Event) bool { return s.filter.match(ev) }

// end is called with b.subMu held.
func (s *Subscription) end(err error) {
	if s.err == nil {
		s.err = err
		close(s.done)
	}
}

// C delivers the events.
func (s *Subscription) C() <-chan *store.Event { return s.ch }

// Done is closed when the subscription ends (Err says why); events already
// in C may still be read.
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Err says why the subscription ended.
func (s *Subscription) Err() error {
	s.b.subMu.Lock()
	defer s.b.subMu.Unlock()
	return s.err
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.b.subMu.Lock()
	defer s.b.subMu.Unlock()
	delete(s.b.subs, s)
	s.end(ErrClosed)
}

// Subscribe registers a subscription; it ends when closed, when the broker
// closes, or when it falls SubscriberBuffer events behind.
func (b *Broker) Subscribe(f Filter) *Subscription {
	s := &Subscription{b: b, filter: f, ch: make(chan *store.Event, b.cfg.SubscriberBuffer), done: make(chan struct{})}
	b.subMu.Lock()
	defer b.subMu.Unlock()
	s.From = b.last
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		s.end(ErrClosed)
		return s
	}
	b.subs[s] = struct{}{}
	return s
}

// Replay reads the stored events matching f with afterID < id ≤ upTo, in
// order, calling fn for each; it stops at fn's first error.
func (b *Broker) Replay(ctx context.Context, f Filter, afterID, upTo int64, fn func(*store.Event) error) error {
	for afterID < upTo {
		evs, err := b.st.EventsAfter(ctx, afterID, store.EventFilter{AccountID: f.AccountID, RunID: f.RunID}, tailPage)
		if err != nil {
			return err
		}
		if len(evs) == 0 {
			return nil
		}
		for _, ev := range evs {
			if ev.ID > upTo {
				return nil
			}
			afterID = ev.ID
			if f.match(ev) {
				if err := fn(ev); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// LatestID is the id of the latest stored event of a run (of any when
// runID is ""), 0 when there is none.
func (b *Broker) LatestID(ctx context.Context, runID string) (int64, error) {
	return b.st.EventLatestID(ctx, runID)
}
