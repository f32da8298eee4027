package storetest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// ---------------------------------------------------------------- recorded workflows

var videoSeq atomic.Int64

// testVideo is a video record with a key of its own.
func testVideo() store.WorkflowVideo {
	return store.WorkflowVideo{Key: fmt.Sprintf("vid_test%022d", videoSeq.Add(1)), SizeBytes: 9420, DurationMs: 20_000, Container: "mp4"}
}

// newRecording creates an analyzing workflow with a video.
func (b *bundle) newRecording(t *testing.T, ctx context.Context, accountID string) *store.Workflow {
	t.Helper()
	v := testVideo()
	w, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: accountID, Name: "recording", Status: protocol.WorkflowAnalyzing, Video: &v})
	if err != nil {
		t.Fatalf("WorkflowCreate (video): %v", err)
	}
	return w
}

func (b *bundle) claim(ctx context.Context, id, claimID, by string) (*store.Workflow, error) {
	return b.st.WorkflowAnalysisClaim(ctx, store.WorkflowAnalysisClaimParams{ID: id, ClaimID: claimID, By: by})
}

func testAnalysis(t *testing.T, open Opener) {
	t.Run("CreateWithVideo", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		w := b.newRecording(t, ctx, b.user.ID)
		got := b.getWorkflow(t, ctx, w.ID)
		if got.Status != protocol.WorkflowAnalyzing || got.Video == nil || *got.Video != *w.Video {
			t.Fatalf("workflow = %+v, video %+v; want analyzing with %+v", got, got.Video, w.Video)
		}
		if got.Analysis == nil || got.Analysis.FinishedAt != nil || got.Analysis.Error != nil || got.Analysis.ClaimID != "" {
			t.Fatalf("analysis = %+v, want started only", got.Analysis)
		}
		recent(t, "Analysis.StartedAt", got.Analysis.StartedAt)
		sameTime(t, "Analysis.StartedAt", got.Analysis.StartedAt, w.Analysis.StartedAt)
		if ready := b.getWorkflow(t, ctx, b.wf.ID); ready.Video != nil || ready.Analysis != nil {
			t.Errorf("a workflow made from a definition has video %+v, analysis %+v", ready.Video, ready.Analysis)
		}
	})

	t.Run("WaitingOldestFirstPaginated", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		other := b.newUser(t, ctx, 0)
		var want []string
		for i := range 5 {
			owner := b.user.ID
			if i%2 == 1 {
				owner = other.ID // every account's recordings wait in one queue
			}
			want = append(want, b.newRecording(t, ctx, owner).ID)
			tick()
		}
		claimed := b.newRecording(t, ctx, b.user.ID)
		if _, err := b.claim(ctx, claimed.ID, "clm_1", "tok_a"); err != nil {
			t.Fatal(err)
		}
		deleted := b.newRecording(t, ctx, b.user.ID)
		if err := b.st.WorkflowDelete(ctx, deleted.ID); err != nil {
			t.Fatal(err)
		}
		page, next, err := b.st.WorkflowAnalysisWaiting(ctx, store.Page{Limit: 3})
		if err != nil {
			t.Fatalf("WorkflowAnalysisWaiting: %v", err)
		}
		if next == "" {
			t.Fatal("no next cursor after a full page")
		}
		rest, next2, err := b.st.WorkflowAnalysisWaiting(ctx, store.Page{Limit: 3, Cursor: next})
		if err != nil {
			t.Fatalf("WorkflowAnalysisWaiting (page 2): %v", err)
		}
		wantIDs(t, "waiting", append(workflowIDs(page), workflowIDs(rest)...), want)
		if next2 != "" {
			t.Errorf("next cursor %q after the last page", next2)
		}
		_, _, err = b.st.WorkflowAnalysisWaiting(ctx, store.Page{Cursor: "!!"})
		wantErr(t, err, protocol.CodeBadRequest)
	})

	t.Run("ClaimOnce", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		w := b.newRecording(t, ctx, b.user.ID)
		got, err := b.claim(ctx, w.ID, "clm_first", "tok_a")
		if err != nil {
			t.Fatalf("claim: %v", err)
		}
		if a := got.Analysis; a == nil || a.ClaimID != "clm_first" || a.ClaimedBy != "tok_a" || a.ClaimedAt == nil {
			t.Fatalf("claimed analysis = %+v", a)
		}
		_, err = b.claim(ctx, w.ID, "clm_second", "tok_b")
		wantErr(t, err, protocol.CodeConflict, "reason", "already_claimed")
		if a := b.getWorkflow(t, ctx, w.ID).Analysis; a.ClaimID != "clm_first" {
			t.Errorf("claim after a refused second claim = %q", a.ClaimID)
		}

		_, err = b.claim(ctx, b.wf.ID, "clm_x", "tok_a")
		wantErr(t, err, protocol.CodeConflict, "status", protocol.WorkflowReady)
		_, err = b.claim(ctx, "wf_doesnotexist", "clm_y", "tok_a")
		wantErr(t, err, protocol.CodeWorkflowNotFound)
		gone := b.newRecording(t, ctx, b.user.ID)
		if err := b.st.WorkflowDelete(ctx, gone.ID); err != nil {
			t.Fatal(err)
		}
		_, err = b.claim(ctx, gone.ID, "clm_z", "tok_a")
		wantErr(t, err, protocol.CodeWorkflowNotFound)
	})

	t.Run("Finish", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		def := json.RawMessage(Definition)

		w := b.newRecording(t, ctx, b.user.ID)
		finish := func(p store.WorkflowAnalysisFinishParams) (*store.Workflow, error) {
			p.ID = w.ID
			return b.st.WorkflowAnalysisFinish(ctx, p)
		}
		_, err := finish(store.WorkflowAnalysisFinishParams{By: "tok_a", Definition: def})
		wantErr(t, err, protocol.CodeConflict, "reason", "not_claimed")
		if _, err := b.claim(ctx, w.ID, "clm_a", "tok_a"); err != nil {
			t.Fatal(err)
		}
		_, err = finish(store.WorkflowAnalysisFinishParams{ClaimID: "clm_other", Definition: def})
		wantErr(t, err, protocol.CodeConflict, "reason", "not_claimed")
		_, err = finish(store.WorkflowAnalysisFinishParams{By: "tok_b", Definition: def})
		wantErr(t, err, protocol.CodeConflict, "reason", "not_claimed")

		got, err := finish(store.WorkflowAnalysisFinishParams{ClaimID: "clm_a", Definition: def})
		if err != nil {
			t.Fatalf("finish: %v", err)
		}
		if got.Status != protocol.WorkflowReady || !sameJSON(t, got.Definition, def) || got.Analysis.FinishedAt == nil || got.Analysis.Error != nil {
			t.Fatalf("finished = %+v, analysis %+v", got, got.Analysis)
		}
		stored := b.getWorkflow(t, ctx, w.ID)
		if stored.Status != protocol.WorkflowReady || stored.Analysis.FinishedAt == nil || !sameJSON(t, stored.Definition, def) {
			t.Errorf("stored = %+v, analysis %+v", stored, stored.Analysis)
		}
		_, err = finish(store.WorkflowAnalysisFinishParams{ClaimID: "clm_a", Definition: def})
		wantErr(t, err, protocol.CodeConflict, "reason", "not_analyzing", "status", protocol.WorkflowReady)

		// An error, posted by the claimant's token: analysis_failed.
		f := b.newRecording(t, ctx, b.user.ID)
		if _, err := b.claim(ctx, f.ID, "clm_f", "tok_a"); err != nil {
			t.Fatal(err)
		}
		failed, err := b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: f.ID, By: "tok_a", Error: &store.AnalysisError{Code: "unreadable", Message: "No browser in the video."}})
		if err != nil {
			t.Fatalf("finish with an error: %v", err)
		}
		got = b.getWorkflow(t, ctx, f.ID)
		if failed.Status != protocol.WorkflowAnalysisFailed || got.Status != protocol.WorkflowAnalysisFailed || got.Analysis.Error == nil ||
			*got.Analysis.Error != (store.AnalysisError{Code: "unreadable", Message: "No browser in the video."}) || got.Analysis.FinishedAt == nil {
			t.Errorf("failed workflow = %+v, analysis %+v", got, got.Analysis)
		}
		_, err = b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: "wf_doesnotexist", By: "tok_a", Definition: def})
		wantErr(t, err, protocol.CodeWorkflowNotFound)
	})

	t.Run("ExpireOverdueOnly", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		old := b.newRecording(t, ctx, b.user.ID)
		claimedOld := b.newRecording(t, ctx, b.user.ID)
		if _, err := b.claim(ctx, claimedOld.ID, "clm_o", "tok_a"); err != nil {
			t.Fatal(err)
		}
		cutoff := b.getWorkflow(t, ctx, claimedOld.ID).Analysis.StartedAt
		tick()
		fresh := b.newRecording(t, ctx, b.user.ID)

		expired, err := b.st.WorkflowAnalysisExpire(ctx, cutoff)
		if err != nil {
			t.Fatalf("WorkflowAnalysisExpire: %v", err)
		}
		slices.Sort(expired)
		want := []string{old.ID, claimedOld.ID}
		slices.Sort(want)
		wantIDs(t, "expired", expired, want)
		for _, id := range want {
			w := b.getWorkflow(t, ctx, id)
			if w.Status != protocol.WorkflowAnalysisFailed || w.Analysis.Error == nil || w.Analysis.Error.Code != store.AnalysisTimeoutCode || w.Analysis.FinishedAt == nil {
				t.Errorf("expired %s = %s, analysis %+v", id, w.Status, w.Analysis)
			}
		}
		if w := b.getWorkflow(t, ctx, fresh.ID); w.Status != protocol.WorkflowAnalyzing {
			t.Errorf("fresh workflow = %s, want analyzing", w.Status)
		}
		if ready := b.getWorkflow(t, ctx, b.wf.ID); ready.Status != protocol.WorkflowReady {
			t.Errorf("ready workflow = %s", ready.Status)
		}
		again, err := b.st.WorkflowAnalysisExpire(ctx, cutoff)
		if err != nil || len(again) != 0 {
			t.Errorf("second expiry = %v, %v; want nothing", again, err)
		}
		// The claimant's late result is refused.
		_, err = b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: claimedOld.ID, ClaimID: "clm_o", Definition: json.RawMessage(Definition)})
		wantErr(t, err, protocol.CodeConflict, "status", protocol.WorkflowAnalysisFailed)
	})

	t.Run("VideoReplaceRestarts", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		w := b.newRecording(t, ctx, b.user.ID)
		first := w.Video.Key
		_, _, err := b.st.WorkflowVideoReplace(ctx, store.WorkflowVideoParams{ID: w.ID, Video: testVideo()})
		wantErr(t, err, protocol.CodeConflict, "status", protocol.WorkflowAnalyzing)

		if _, err := b.claim(ctx, w.ID, "clm_1", "tok_a"); err != nil {
			t.Fatal(err)
		}
		if _, err := b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: w.ID, ClaimID: "clm_1", Error: &store.AnalysisError{Code: "x", Message: "y"}}); err != nil {
			t.Fatal(err)
		}
		tick()
		v := testVideo()
		got, previous, err := b.st.WorkflowVideoReplace(ctx, store.WorkflowVideoParams{ID: w.ID, Video: v})
		if err != nil {
			t.Fatalf("WorkflowVideoReplace: %v", err)
		}
		if previous != first {
			t.Errorf("previous key = %q, want %q", previous, first)
		}
		stored := b.getWorkflow(t, ctx, w.ID)
		for _, x := range []*store.Workflow{got, stored} {
			if x.Status != protocol.WorkflowAnalyzing || x.Video == nil || *x.Video != v || x.Analysis == nil ||
				x.Analysis.Error != nil || x.Analysis.FinishedAt != nil || x.Analysis.ClaimID != "" || !x.Analysis.StartedAt.After(w.Analysis.StartedAt) {
				t.Errorf("restarted = %+v, video %+v, analysis %+v", x, x.Video, x.Analysis)
			}
		}
		// The old claim is void; a new claim may be made.
		_, err = b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: w.ID, ClaimID: "clm_1", Definition: json.RawMessage(Definition)})
		wantErr(t, err, protocol.CodeConflict, "reason", "not_claimed")
		if _, err := b.claim(ctx, w.ID, "clm_2", "tok_a"); err != nil {
			t.Errorf("claim after restart: %v", err)
		}

		// A ready workflow (made from a definition) may get a video; one
		// with an active run refuses.
		run := b.createRun(t, ctx, b.wf.ID, 1)
		_, _, err = b.st.WorkflowVideoReplace(ctx, store.WorkflowVideoParams{ID: b.wf.ID, Video: testVideo()})
		wantErr(t, err, protocol.CodeWorkflowHasActiveRequests, "runId", run.ID)
		b.startRun(t, ctx, run.ID)
		b.finishRun(t, ctx, run.ID, protocol.RunSucceeded, nil)
		got, previous, err = b.st.WorkflowVideoReplace(ctx, store.WorkflowVideoParams{ID: b.wf.ID, Video: testVideo()})
		if err != nil || previous != "" || got.Status != protocol.WorkflowAnalyzing {
			t.Errorf("video on a ready workflow = %+v, %q, %v", got, previous, err)
		}
		_, _, err = b.st.WorkflowVideoReplace(ctx, store.WorkflowVideoParams{ID: "wf_doesnotexist", Video: testVideo()})
		wantErr(t, err, protocol.CodeWorkflowNotFound)
	})

	t.Run("VideoKeysInUse", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		live := b.newRecording(t, ctx, b.user.ID)
		deleted := b.newRecording(t, ctx, b.user.ID)
		if err := b.st.WorkflowDelete(ctx, deleted.ID); err != nil {
			t.Fatalf("WorkflowDelete: %v", err)
		}
		// Many keys (more than one query's worth), the live one last.
		keys := []string{deleted.Video.Key, "vid_unknown"}
		for i := range 600 {
			keys = append(keys, fmt.Sprintf("vid_other%021d", i))
		}
		keys = append(keys, live.Video.Key)
		used, err := b.st.WorkflowVideoKeysInUse(ctx, keys)
		if err != nil {
			t.Fatalf("WorkflowVideoKeysInUse: %v", err)
		}
		if !used[live.Video.Key] || len(used) != 1 {
			t.Fatalf("in use = %v; want %s only (%s is a deleted workflow's)", used, live.Video.Key, deleted.Video.Key)
		}
		if used, err := b.st.WorkflowVideoKeysInUse(ctx, nil); err != nil || len(used) != 0 {
			t.Fatalf("no keys: %v, %v", used, err)
		}
	})

	t.Run("DefinitionEndsAnalysis", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		w := b.newRecording(t, ctx, b.user.ID)
		got, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: w.ID, Definition: json.RawMessage(Definition)})
		if err != nil {
			t.Fatal(err)
		}
		stored := b.getWorkflow(t, ctx, w.ID)
		if got.Status != protocol.WorkflowReady || stored.Analysis == nil || stored.Analysis.FinishedAt == nil {
			t.Errorf("after a definition: %s, analysis %+v", got.Status, stored.Analysis)
		}
		expired, err := b.st.WorkflowAnalysisExpire(ctx, time.Now().Add(time.Hour))
		if err != nil || len(expired) != 0 {
			t.Errorf("expiry = %v, %v; want nothing", expired, err)
		}
	})
}

// testAnalysisRaces races analyzers for one job, and the timeout against
// the analyzer's result.
func testAnalysisRaces(t *testing.T, open Opener) {
	t.Run("TwoAnalyzersOneJob", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		for round := range 5 {
			w := b.newRecording(t, ctx, b.user.ID)
			claimed := make([]*store.Workflow, 2)
			errs := race(2, func(i int) error {
				var err error
				claimed[i], err = b.claim(ctx, w.ID, fmt.Sprintf("clm_%d_%d", round, i), fmt.Sprintf("tok_%d", i))
				return err
			})
			wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 1})
			winner := slices.IndexFunc(errs, func(err error) bool { return err == nil })
			wantErr(t, errs[1-winner], protocol.CodeConflict, "reason", "already_claimed")
			if got := b.getWorkflow(t, ctx, w.ID).Analysis.ClaimID; got != claimed[winner].Analysis.ClaimID {
				t.Errorf("stored claim %q, winner's %q", got, claimed[winner].Analysis.ClaimID)
			}
		}
	})

	t.Run("ManyAnalyzersManyJobs", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		const jobs, analyzers = 6, 8
		for range jobs {
			b.newRecording(t, ctx, b.user.ID)
		}
		// Each analyzer takes the oldest waiting job it can get until none
		// is left; every job is taken exactly once.
		taken := make([][]string, analyzers)
		errs := race(analyzers, func(i int) error {
			for n := 0; ; n++ {
				waiting, _, err := b.st.WorkflowAnalysisWaiting(ctx, store.Page{Limit: 1})
				if err != nil {
					return err
				}
				if len(waiting) == 0 {
					return nil
				}
				w, err := b.claim(ctx, waiting[0].ID, fmt.Sprintf("clm_%d_%d", i, n), fmt.Sprintf("tok_%d", i))
				if protocol.ErrorCode(err) == protocol.CodeConflict {
					continue // another analyzer was first
				}
				if err != nil {
					return err
				}
				taken[i] = append(taken[i], w.ID)
			}
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": analyzers})
		var all []string
		for _, ids := range taken {
			all = append(all, ids...)
		}
		seen := map[string]bool{}
		for _, id := range all {
			if seen[id] {
				t.Errorf("job %s taken twice", id)
			}
			seen[id] = true
		}
		if len(seen) != jobs {
			t.Errorf("%d jobs taken, want %d", len(seen), jobs)
		}
	})

	t.Run("TimeoutAgainstResult", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		for round := range 5 {
			w := b.newRecording(t, ctx, b.user.ID)
			claimID := fmt.Sprintf("clm_%d", round)
			if _, err := b.claim(ctx, w.ID, claimID, "tok_a"); err != nil {
				t.Fatal(err)
			}
			var expired []string
			errs := race(2, func(i int) error {
				if i == 0 {
					var err error
					expired, err = b.st.WorkflowAnalysisExpire(ctx, time.Now().Add(time.Hour))
					return err
				}
				_, err := b.st.WorkflowAnalysisFinish(ctx, store.WorkflowAnalysisFinishParams{ID: w.ID, ClaimID: claimID, Definition: json.RawMessage(Definition)})
				return err
			})
			got := b.getWorkflow(t, ctx, w.ID)
			switch {
			case errs[0] != nil:
				t.Fatalf("expire: %v", errs[0])
			case errs[1] == nil && len(expired) == 0 && got.Status == protocol.WorkflowReady:
			case errs[1] != nil && slices.Equal(expired, []string{w.ID}) && got.Status == protocol.WorkflowAnalysisFailed:
				wantErr(t, errs[1], protocol.CodeConflict, "status", protocol.WorkflowAnalysisFailed)
			default:
				t.Fatalf("finish %v, expired %v, status %s: not exactly one winner", errs[1], expired, got.Status)
			}
		}
	})
}
