package storetest

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func testEvents(t *testing.T, open Opener) {
	for _, tc := range []struct {
		name string
		fn   func(*testing.T, Opener)
	}{
		{"AppendAndRead", testEventsAppendAndRead},
		{"Prune", testEventsPrune},
		{"ConcurrentAppendsSeenInOrder", testEventsConcurrent},
		{"QueueStats", testQueueStats},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, open)
		})
	}
}

func ev(account, typ, subject, run string, data any) *store.Event {
	raw, _ := json.Marshal(data)
	return &store.Event{AccountID: account, Type: typ, SubjectID: subject, RunID: run, Data: raw}
}

func testEventsAppendAndRead(t *testing.T, open Opener) {
	st := open(t)
	ctx := t.Context()
	if id, err := st.EventLatestID(ctx, ""); err != nil || id != 0 {
		t.Fatalf("EventLatestID of an empty log: %d, %v", id, err)
	}
	if err := st.EventAppend(ctx, nil); err != nil {
		t.Fatalf("EventAppend(nil): %v", err)
	}
	batch := []*store.Event{
		ev("usr_a", "run.updated", "run_1", "run_1", map[string]any{"id": "run_1", "status": "queued"}),
		ev("usr_b", "agent.connected", "agt_1", "", map[string]any{"id": "agt_1"}),
		ev("usr_a", "run.updated", "run_1", "run_1", map[string]any{"id": "run_1", "status": "running"}),
		ev("usr_a", "batch.updated", "bat_1", "", map[string]any{"id": "bat_1"}),
	}
	if err := st.EventAppend(ctx, batch); err != nil {
		t.Fatalf("EventAppend: %v", err)
	}
	for i, e := range batch {
		if e.ID <= 0 || (i > 0 && e.ID <= batch[i-1].ID) {
			t.Fatalf("ids not strictly increasing: %d after %d", e.ID, batch[max(i-1, 0)].ID)
		}
		recent(t, "CreatedAt", e.CreatedAt)
	}
	all, err := st.EventsAfter(ctx, 0, store.EventFilter{}, 100)
	if err != nil || len(all) != 4 {
		t.Fatalf("EventsAfter(0): %d events, %v", len(all), err)
	}
	for i, e := range all {
		want := batch[i]
		if e.ID != want.ID || e.AccountID != want.AccountID || e.Type != want.Type || e.SubjectID != want.SubjectID || e.RunID != want.RunID || !sameJSON(t, e.Data, want.Data) {
			t.Errorf("event %d: got %+v, want %+v", i, e, want)
		}
		sameTime(t, "CreatedAt", e.CreatedAt, want.CreatedAt)
	}
	if got, _ := st.EventsAfter(ctx, batch[1].ID, store.EventFilter{}, 1); len(got) != 1 || got[0].ID != batch[2].ID {
		t.Errorf("EventsAfter(second, limit 1): %v", got)
	}
	if got, _ := st.EventsAfter(ctx, 0, store.EventFilter{AccountID: "usr_a"}, 100); len(got) != 3 {
		t.Errorf("account filter: %d events, want 3", len(got))
	}
	if got, _ := st.EventsAfter(ctx, batch[0].ID, store.EventFilter{RunID: "run_1"}, 100); len(got) != 1 || got[0].ID != batch[2].ID {
		t.Errorf("run filter after the first: %v", got)
	}
	if got, _ := st.EventsAfter(ctx, 0, store.EventFilter{AccountID: "usr_b", RunID: "run_1"}, 100); len(got) != 0 {
		t.Errorf("account and run filters: %v", got)
	}
	if id, err := st.EventLatestID(ctx, ""); err != nil || id != batch[3].ID {
		t.Errorf("EventLatestID: %d, %v; want %d", id, err, batch[3].ID)
	}
	if id, err := st.EventLatestID(ctx, "run_1"); err != nil || id != batch[2].ID {
		t.Errorf("EventLatestID(run_1): %d, %v; want %d", id, err, batch[2].ID)
	}
	if id, err := st.EventLatestID(ctx, "run_unknown"); err != nil || id != 0 {
		t.Errorf("EventLatestID(unknown run): %d, %v", id, err)
	}
}

func testEventsPrune(t *testing.T, open Opener) {
	st := open(t)
	ctx := t.Context()
	old := time.Now().Add(-48 * time.Hour).UTC().Truncate(time.Millisecond)
	evs := []*store.Event{ev("usr_a", "run.updated", "run_1", "run_1", 1), ev("usr_a", "run.updated", "run_1", "run_1", 2), ev("usr_a", "run.updated", "run_1", "run_1", 3)}
	evs[0].CreatedAt, evs[1].CreatedAt = old, old
	if err := st.EventAppend(ctx, evs); err != nil {
		t.Fatal(err)
	}
	n, err := st.EventPrune(ctx, time.Now().Add(-24*time.Hour))
	if err != nil || n != 2 {
		t.Fatalf("EventPrune: %d, %v; want 2", n, err)
	}
	got, _ := st.EventsAfter(ctx, 0, store.EventFilter{}, 10)
	if len(got) != 1 || got[0].ID != evs[2].ID {
		t.Fatalf("after prune: %v", got)
	}
	// Ids keep growing past pruned ones: a stream that resumes after a
	// pruned id never meets a reused one.
	if _, err := st.EventPrune(ctx, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	next := []*store.Event{ev("usr_a", "run.updated", "run_1", "run_1", 4)}
	if err := st.EventAppend(ctx, next); err != nil {
		t.Fatal(err)
	}
	if next[0].ID <= evs[2].ID {
		t.Errorf("id %d reused after prune (last %d)", next[0].ID, evs[2].ID)
	}
}

// testEventsConcurrent appends from many goroutines while a reader tails the
// log the way the broker does (EventsAfter from the last id seen): the reader
// sees every event exactly once and in id order — an id never appears below
// one already read.
func testEventsConcurrent(t *testing.T, open Opener) {
	st := open(t)
	ctx := t.Context()
	writers, per := 8, 25
	if raceEnabled {
		per = 10
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range per {
				batch := []*store.Event{ev("usr_a", "run.updated", fmt.Sprintf("run_%d_%d", w, i), "", i), ev("usr_a", "batch.updated", "bat", "", i)}
				if err := st.EventAppend(ctx, batch); err != nil {
					t.Errorf("EventAppend: %v", err)
					return
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	seen := map[int64]bool{}
	var last int64
	deadline := time.Now().Add(2 * time.Minute)
	for finished := false; ; {
		select {
		case <-done:
			finished = true
		default:
		}
		got, err := st.EventsAfter(ctx, last, store.EventFilter{}, 7)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range got {
			if e.ID <= last || seen[e.ID] {
				t.Fatalf("event %d read after %d", e.ID, last)
			}
			seen[e.ID], last = true, e.ID
		}
		if finished && len(got) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("tail did not catch up")
		}
	}
	if len(seen) != writers*per*2 {
		t.Errorf("read %d events, want %d", len(seen), writers*per*2)
	}
}

func testQueueStats(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 100)
	other := b.newUser(t, ctx, 100)
	wfs := []*store.Workflow{b.wf, b.newWorkflow(t, ctx, b.user.ID), b.newWorkflow(t, ctx, b.user.ID), b.newWorkflow(t, ctx, b.user.ID)}
	otherWf := b.newWorkflow(t, ctx, other.ID)

	// Account one: a run waiting with no labels, one waiting for gpu=yes,
	// one claimed by an agent, one running with a cancel requested, and a
	// pending approval. The other account: one waiting run.
	b.createRun(t, ctx, wfs[0].ID, 1)
	p := runParams(b.user.ID, wfs[1].ID, 1)
	p.Labels = map[string]string{"gpu": "yes"}
	if _, err := b.st.RunCreate(ctx, p); err != nil {
		t.Fatal(err)
	}
	claimed := b.createRun(t, ctx, wfs[2].ID, 1)
	if got, err := b.st.RunAssign(ctx, []store.RunAssignParams{{RunID: claimed.ID, AgentID: "agt_x", LeaseID: "lse_x", LeaseExpires: time.Now().Add(time.Minute)}}); err != nil || len(got) != 1 {
		t.Fatalf("RunAssign: %v %v", got, err)
	}
	cancelling := b.createRun(t, ctx, wfs[3].ID, 1)
	b.startRun(t, ctx, cancelling.ID)
	if _, err := b.st.RunCancel(ctx, cancelling.ID); err != nil {
		t.Fatal(err)
	}
	b.createRunFor(t, ctx, other.ID, otherWf.ID, 1)
	tick()

	// Nothing is stuck with zero thresholds.
	stats, err := b.st.QueueStats(ctx, store.QueueStatsParams{})
	if err != nil {
		t.Fatal(err)
	}
	byAcct := map[string][]store.QueueGroup{}
	for _, g := range stats.Groups {
		byAcct[g.AccountID] = append(byAcct[g.AccountID], g)
	}
	mine := byAcct[b.user.ID]
	var waiting, claimedN, gpuN int64
	for _, g := range mine {
		if g.Claimed {
			claimedN += g.Count
		} else {
			waiting += g.Count
		}
		if g.Labels["gpu"] == "yes" {
			gpuN += g.Count
		}
		if g.Stuck != 0 {
			t.Errorf("stuck without thresholds: %+v", g)
		}
		if g.OldestQueuedAt.IsZero() || g.OldestQueuedAt.After(time.Now()) {
			t.Errorf("oldest queued at %v", g.OldestQueuedAt)
		}
	}
	if waiting != 2 || claimedN != 1 || gpuN != 1 {
		t.Errorf("account groups %+v: waiting %d claimed %d gpu %d, want 2 1 1", mine, waiting, claimedN, gpuN)
	}
	if n := len(byAcct[other.ID]); n != 1 || byAcct[other.ID][0].Count != 1 {
		t.Errorf("other account groups: %+v", byAcct[other.ID])
	}
	if c := stats.Stuck[b.user.ID]; c != (store.StuckCounts{}) {
		t.Errorf("stuck without thresholds: %+v", c)
	}

	// A workflow analyzing counts by the start of its analysis.
	if _, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: b.user.ID, Name: "recorded", Status: protocol.WorkflowAnalyzing,
		Definition: json.RawMessage(Definition)}); err != nil {
		t.Fatal(err)
	}
	tick()

	// With thresholds in the future, everything in a state is stuck.
	future := time.Now().Add(time.Hour)
	all := store.StuckSince{Queued: future, Assigned: future, Cancelling: future, AwaitingApproval: future, Analyzing: future}
	stats, err = b.st.QueueStats(ctx, store.QueueStatsParams{AccountID: b.user.ID, Stuck: all})
	if err != nil {
		t.Fatal(err)
	}
	if c := stats.Stuck[b.user.ID]; c.Queued != 2 || c.Assigned != 1 || c.Cancelling != 1 || c.AwaitingApproval != 0 || c.Analyzing != 1 {
		t.Errorf("stuck counts %+v, want queued 2, assigned 1, cancelling 1, analyzing 1", c)
	}
	for _, g := range stats.Groups {
		if g.AccountID != b.user.ID {
			t.Errorf("account filter let %+v through", g)
		}
	}
	if _, ok := stats.Stuck[other.ID]; ok {
		t.Errorf("account filter let the other account's stuck counts through")
	}

	// An approval opened on a running run counts as awaiting approval; the
	// run's cancel and the others stay counted.
	wf5 := b.newWorkflow(t, ctx, b.user.ID)
	waitingRun := b.createRun(t, ctx, wf5.ID, 1)
	b.startRun(t, ctx, waitingRun.ID)
	if _, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: waitingRun.ID, Step: 0, Message: "ok?"}); err != nil {
		t.Fatal(err)
	}
	tick()
	stats, err = b.st.QueueStats(ctx, store.QueueStatsParams{AccountID: b.user.ID, Stuck: store.StuckSince{AwaitingApproval: time.Now().Add(time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	if c := stats.Stuck[b.user.ID]; c.AwaitingApproval != 1 || c.Queued != 0 || c.Cancelling != 0 {
		t.Errorf("stuck counts %+v, want awaiting_approval 1 only", c)
	}
}
