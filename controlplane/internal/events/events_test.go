package events_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wait bounds every wait for an event: generous, the machine is shared.
const wait = 30 * time.Second

func openStore(t testing.TB, file string) *sqlstore.DB {
	t.Helper()
	st, err := sqlstore.Open(context.Background(), "sqlite://"+file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func newBroker(t testing.TB, st events.Store, cfg events.Config) *events.Broker {
	t.Helper()
	log, _ := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	b := events.New(st, log, cfg)
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

func item(account string, n int) events.Item {
	return events.Item{AccountID: account, Type: events.RunUpdated, SubjectID: fmt.Sprintf("run_%d", n), RunID: fmt.Sprintf("run_%d", n), Data: map[string]int{"n": n}}
}

// receive reads n events from s, in strictly increasing id order.
func receive(t *testing.T, s *events.Subscription, n int) []*store.Event {
	t.Helper()
	out := make([]*store.Event, 0, n)
	timeout := time.After(wait)
	for len(out) < n {
		select {
		case ev := <-s.C():
			if len(out) > 0 && ev.ID <= out[len(out)-1].ID {
				t.Fatalf("event %d after %d", ev.ID, out[len(out)-1].ID)
			}
			out = append(out, ev)
		case <-s.Done():
			t.Fatalf("subscription ended after %d of %d events: %v", len(out), n, s.Err())
		case <-timeout:
			t.Fatalf("%d of %d events within %s", len(out), n, wait)
		}
	}
	return out
}

// TestPublishConcurrently: many goroutines publish at once; every event is
// stored once and delivered once, in id order, to each matching
// subscriber; the writer coalesces publications into few transactions.
func TestPublishConcurrently(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	var appends, appended atomic.Int64
	b := newBroker(t, st, events.Config{})
	b.Observer = observer{appends: &appends, events: &appended}
	all := b.Subscribe(events.Filter{})
	one := b.Subscribe(events.Filter{AccountID: "usr_1"})
	const workers, per = 8, 250
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range per {
				b.Publish(item(fmt.Sprintf("usr_%d", w), w*per+i))
			}
		})
	}
	wg.Wait()
	got := receive(t, all, workers*per)
	mine := receive(t, one, per)
	seen := map[string]bool{}
	for _, ev := range got {
		if seen[ev.SubjectID] {
			t.Fatalf("%s delivered twice", ev.SubjectID)
		}
		seen[ev.SubjectID] = true
	}
	last := -1
	for _, ev := range mine {
		var d struct{ N int }
		if err := json.Unmarshal(ev.Data, &d); err != nil || ev.AccountID != "usr_1" {
			t.Fatalf("filtered event %+v (%v)", ev, err)
		}
		if d.N <= last {
			t.Fatalf("one publisher's events out of order: %d after %d", d.N, last)
		}
		last = d.N
	}
	stored, err := st.EventsAfter(context.Background(), 0, store.EventFilter{}, 10_000)
	if err != nil || len(stored) != workers*per {
		t.Fatalf("stored %d events (%v)", len(stored), err)
	}
	t.Logf("%d events in %d append transactions", appended.Load(), appends.Load())
	if appends.Load() >= int64(workers*per) {
		t.Errorf("%d transactions for %d events: publications were not coalesced", appends.Load(), workers*per)
	}
}

type observer struct{ appends, events, dropped, slow *atomic.Int64 }

func (o observer) EventsAppended(n int, _ time.Duration) {
	o.appends.Add(1)
	o.events.Add(int64(n))
}

func (o observer) EventsDropped(n int) {
	if o.dropped != nil {
		o.dropped.Add(int64(n))
	}
}

func (o observer) SubscriberDropped() {
	if o.slow != nil {
		o.slow.Add(1)
	}
}

// TestSlowSubscriberDropped: a subscriber that reads nothing is dropped once
// its buffer is full; the others get everything, and the dropped one
// resumes from the table with Replay, losing nothing.
func TestSlowSubscriberDropped(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	var slowN atomic.Int64
	b := newBroker(t, st, events.Config{SubscriberBuffer: 8})
	b.Observer = observer{appends: new(atomic.Int64), events: new(atomic.Int64), slow: &slowN}
	slow := b.Subscribe(events.Filter{})
	fast := b.Subscribe(events.Filter{})
	const n = 100
	// The reader keeps up (one event at a time); the other reads nothing.
	for i := range n {
		b.Publish(item("usr_1", i))
		receive(t, fast, 1)
	}
	select {
	case <-slow.Done():
	case <-time.After(wait):
		t.Fatal("the slow subscriber was not dropped")
	}
	if slow.Err() != events.ErrSlow || slowN.Load() != 1 {
		t.Errorf("slow subscriber: %v, %d dropped", slow.Err(), slowN.Load())
	}
	// What it had, then the rest from the table.
	var last int64
	count := 0
	for ev := range drain(slow.C()) {
		last = ev.ID
		count++
	}
	err := b.Replay(context.Background(), events.Filter{}, last, b.LastID(), func(ev *store.Event) error {
		if ev.ID <= last {
			t.Fatalf("replayed %d after %d", ev.ID, last)
		}
		last = ev.ID
		count++
		return nil
	})
	if err != nil || count != n {
		t.Fatalf("buffered and replayed %d of %d (%v)", count, n, err)
	}
}

func drain(ch <-chan *store.Event) <-chan *store.Event {
	out := make(chan *store.Event, cap(ch))
	for {
		select {
		case ev := <-ch:
			out <- ev
		default:
			close(out)
			return out
		}
	}
}

// TestReplicasSeeEachOther: two brokers on one database (two control
// planes) deliver each other's events, by polling or when woken.
func TestReplicasSeeEachOther(t *testing.T) {
	file := filepath.Join(t.TempDir(), "e.db")
	a := newBroker(t, openStore(t, file), events.Config{PollInterval: time.Hour})
	b := newBroker(t, openStore(t, file), events.Config{PollInterval: 20 * time.Millisecond})
	sa, sb := a.Subscribe(events.Filter{}), b.Subscribe(events.Filter{})
	a.Publish(item("usr_1", 1))
	b.Publish(item("usr_1", 2))
	// b polls: it sees both. a never polls (an hour): it sees its own at
	// once, and b's when woken.
	gotB := receive(t, sb, 2)
	first := receive(t, sa, 1)
	if first[0].SubjectID != "run_1" && first[0].SubjectID != "run_2" {
		t.Fatalf("a got %+v", first[0])
	}
	a.Wake()
	rest := receive(t, sa, 1)
	if rest[0].ID <= first[0].ID || gotB[0].ID >= gotB[1].ID {
		t.Fatalf("order: a %d then %d; b %d then %d", first[0].ID, rest[0].ID, gotB[0].ID, gotB[1].ID)
	}
}

// TestLazyBuildersCoalesce: a builder published many times before a flush
// runs once, after the items published before it.
func TestLazyBuildersCoalesce(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	var calls atomic.Int64
	b := newBroker(t, gatedStore{Store: st, gate: gate, entered: entered}, events.Config{})
	s := b.Subscribe(events.Filter{})
	// The first flush waits at the gate; everything published meanwhile
	// goes in the next.
	b.Publish(item("usr_1", 0))
	select {
	case <-entered:
	case <-time.After(wait):
		t.Fatal("the writer did not append")
	}
	for i := range 50 {
		b.Publish(item("usr_1", i+1))
		b.PublishLazy("batch:bat_1", func(context.Context) ([]events.Item, error) {
			calls.Add(1)
			return []events.Item{{AccountID: "usr_1", Type: events.BatchUpdated, SubjectID: "bat_1", Data: i}}, nil
		})
	}
	close(gate)
	got := receive(t, s, 52)
	if got[51].Type != events.BatchUpdated {
		t.Errorf("the builder's event came before an item published earlier: last is %s", got[51].Type)
	}
	if calls.Load() != 1 {
		t.Errorf("builder ran %d times", calls.Load())
	}
	var last int
	if err := json.Unmarshal(got[51].Data, &last); err != nil || last != 49 {
		t.Errorf("the builder that ran is not the latest: %s", got[51].Data)
	}
}

type gatedStore struct {
	events.Store
	gate, entered chan struct{}
}

func (g gatedStore) EventAppend(ctx context.Context, evs []*store.Event) error {
	select {
	case g.entered <- struct{}{}:
	default:
	}
	<-g.gate
	return g.Store.EventAppend(ctx, evs)
}

// TestPublishNeverBlocks: with the writer stuck (the database does not
// answer), publishing returns at once; past MaxPending publications are
// dropped and counted. Close gives up on the stuck append.
func TestPublishNeverBlocks(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	gate := make(chan struct{})
	var dropped atomic.Int64
	log, _ := test.NewNullLogger()
	b := events.New(gatedCtxStore{Store: st, gate: gate}, log, events.Config{MaxPending: 100})
	b.Observer = observer{appends: new(atomic.Int64), events: new(atomic.Int64), dropped: &dropped}
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for i := range 10_000 {
		b.Publish(item("usr_1", i))
	}
	elapsed := time.Since(start)
	if dropped.Load() < 10_000-100-512 {
		t.Errorf("dropped %d", dropped.Load())
	}
	t.Logf("10,000 publications with the writer stuck: %s", elapsed)
	close(gate)
	b.Close()
}

// gatedCtxStore's appends wait at the gate or until their context ends.
type gatedCtxStore struct {
	events.Store
	gate chan struct{}
}

func (g gatedCtxStore) EventAppend(ctx context.Context, evs []*store.Event) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Store.EventAppend(ctx, evs)
}

// TestCloseFlushesAndEnds: what was published before Close is stored;
// subscriptions end with ErrClosed; later publications are ignored.
func TestCloseFlushesAndEnds(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	log, _ := test.NewNullLogger()
	b := events.New(st, log, events.Config{})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	s := b.Subscribe(events.Filter{})
	for i := range 200 {
		b.Publish(item("usr_1", i))
	}
	b.Close()
	<-s.Done()
	if s.Err() != events.ErrClosed {
		t.Errorf("subscription ended with %v", s.Err())
	}
	b.Publish(item("usr_1", 999))
	if n, _ := st.EventLatestID(context.Background(), ""); n != 200 {
		t.Errorf("latest stored id %d, want 200", n)
	}
	if s2 := b.Subscribe(events.Filter{}); s2.Err() != events.ErrClosed {
		t.Errorf("subscribe after close: %v", s2.Err())
	}
}

// TestPrune: events older than the retention are deleted by the pruner.
func TestPrune(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "e.db"))
	old := []*store.Event{{AccountID: "usr_1", Type: events.RunUpdated, SubjectID: "run_1", Data: []byte("{}"), CreatedAt: time.Now().Add(-2 * time.Hour)}}
	if err := st.EventAppend(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	b := newBroker(t, st, events.Config{Retention: time.Hour, PruneInterval: 10 * time.Millisecond})
	s := b.Subscribe(events.Filter{})
	b.Publish(item("usr_1", 2))
	fresh := receive(t, s, 1)
	deadline := time.Now().Add(wait)
	for {
		evs, err := st.EventsAfter(context.Background(), 0, store.EventFilter{}, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) == 1 && evs[0].ID == fresh[0].ID {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the retention: %d events", len(evs))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkPublish measures publications per second through the writer to
// SQLite and a subscriber (each op: one event published, stored, delivered).
func BenchmarkPublish(b *testing.B) {
	st := openStore(b, filepath.Join(b.TempDir(), "e.db"))
	br := newBroker(b, st, events.Config{SubscriberBuffer: 1 << 20})
	s := br.Subscribe(events.Filter{})
	run := map[string]any{"id": "run_x", "status": "running", "steps": []map[string]any{{"index": 0, "type": "navigate", "status": "succeeded"}}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		br.Publish(events.Item{AccountID: "usr_1", Type: events.RunUpdated, SubjectID: "run_x", RunID: "run_x", Data: run})
	}
	for i := 0; i < b.N; i++ {
		select {
		case <-s.C():
		case <-time.After(wait):
			b.Fatalf("%d of %d delivered", i, b.N)
		}
	}
}
