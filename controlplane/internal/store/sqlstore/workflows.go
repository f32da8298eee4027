package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const workflowColumns = `id, account_id, name, status, definition, active_run_id, active_batch_id, created_at, updated_at, deleted_at,
	video_key, video_size, video_duration_ms, video_container,
	analysis_started_at, analysis_finished_at, analysis_error, analysis_claim_id, analysis_claimed_by, analysis_claimed_at`

func scanWorkflow(row interface{ Scan(...any) error }) (*store.Workflow, error) {
	var w store.Workflow
	var def, activeRun, activeBatch sql.NullString
	var created, updated int64
	var deleted sql.NullInt64
	var videoKey, videoContainer, analysisErr, claimID, claimedBy sql.NullString
	var videoSize, videoDuration, started, finished, claimedAt sql.NullInt64
	if err := row.Scan(&w.ID, &w.AccountID, &w.Name, &w.Status, &def, &activeRun, &activeBatch, &created, &updated, &deleted,
		&videoKey, &videoSize, &videoDuration, &videoContainer,
		&started, &finished, &analysisErr, &claimID, &claimedBy, &claimedAt); err != nil {
		return nil, err
	}
	if def.Valid {
		w.Definition = json.RawMessage(def.String)
	}
	w.ActiveRunID, w.ActiveBatchID = activeRun.String, activeBatch.String
	w.CreatedAt, w.UpdatedAt, w.DeletedAt = fromMs(created), fromMs(updated), fromNullMs(deleted)
	if videoKey.Valid {
		w.Video = &store.WorkflowVideo{Key: videoKey.String, SizeBytes: videoSize.Int64, DurationMs: videoDuration.Int64, Container: videoContainer.String}
	}
	if started.Valid {
		a := &store.WorkflowAnalysis{StartedAt: fromMs(started.Int64), FinishedAt: fromNullMs(finished),
			ClaimID: claimID.String, ClaimedBy: claimedBy.String, ClaimedAt: fromNullMs(claimedAt)}
		if analysisErr.Valid {
			a.Error = &store.AnalysisError{}
			if err := json.Unmarshal([]byte(analysisErr.String), a.Error); err != nil {
				return nil, fmt.Errorf("workflow %s: analysis error: %w", w.ID, err)
			}
		}
		w.Analysis = a
	}
	return &w, nil
}

// WorkflowCreate creates a workflow; an analyzing one starts its analysis now.
func (s *DB) WorkflowCreate(ctx context.Context, p store.WorkflowCreateParams) (*store.Workflow, error) {
	now := s.now()
	w := &store.Workflow{ID: ids.New(ids.Workflow), AccountID: p.AccountID, Name: p.Name, Status: p.Status, Definition: p.Definition, CreatedAt: now, UpdatedAt: now}
	var started any
	if p.Status == protocol.WorkflowAnalyzing {
		w.Analysis, started = &store.WorkflowAnalysis{StartedAt: now}, ms(now)
	}
	var key, size, duration, container any
	if p.Video != nil {
		v := *p.Video
		w.Video = &v
		key, size, duration, container = v.Key, v.SizeBytes, v.DurationMs, v.Container
	}
	_, err := s.exec(ctx, s.w, `INSERT INTO workflows (id, account_id, name, status, definition, created_at, updated_at,
		video_key, video_size, video_duration_ms, video_container, analysis_started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		w.ID, w.AccountID, w.Name, w.Status, nullString(string(w.Definition)), ms(now), ms(now),
		key, size, duration, container, started)
	if err != nil {
		return nil, err
	}
	return w, nil
}

func (s *DB) WorkflowGet(ctx context.Context, id string) (*store.Workflow, error) {
	w, err := scanWorkflow(s.queryRow(ctx, s.r, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`, id))
	return w, notFound(err, protocol.CodeWorkflowNotFound)
}

func (s *DB) WorkflowList(ctx context.Context, accountID string, page store.Page) ([]*store.Workflow, string, error) {
	query, args, limit, err := pageQuery(`SELECT `+workflowColumns+` FROM workflows WHERE account_id = ? AND deleted_at IS NULL`, "created_at", []any{accountID}, page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanWorkflow)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(w *store.Workflow) cursor { return cursor{ms(w.CreatedAt), w.ID} })
	return items, next, nil
}

// lockWorkflowIdle reads a live workflow for update and refuses with
// workflow_has_active_requests while it has pending approvals or an active
// run or batch.
func (s *DB) lockWorkflowIdle(ctx context.Context, tx *sql.Tx, id string) (*store.Workflow, error) {
	w, err := scanWorkflow(s.queryRow(ctx, tx, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`+s.d.forUpdate, id))
	if err != nil {
		return nil, notFound(err, protocol.CodeWorkflowNotFound)
	}
	if w.DeletedAt != nil {
		return nil, protocol.NewError(protocol.CodeWorkflowNotFound)
	}
	approvalIDs, err := queryAll(ctx, s, `SELECT id FROM approvals WHERE workflow_id = ? AND status = 'pending' ORDER BY created_at, id`, []any{id},
		func(r interface{ Scan(...any) error }) (string, error) {
			var id string
			return id, r.Scan(&id)
		}, tx)
	if err != nil {
		return nil, err
	}
	if len(approvalIDs) > 0 || w.ActiveRunID != "" || w.ActiveBatchID != "" {
		e := protocol.NewError(protocol.CodeWorkflowHasActiveRequests).With("approvalIds", approvalIDs)
		if w.ActiveRunID != "" {
			e = e.With("runId", w.ActiveRunID)
		}
		if w.ActiveBatchID != "" {
			e = e.With("batchId", w.ActiveBatchID)
		}
		return nil, e
	}
	return w, nil
}

// WorkflowUpdate renames a workflow and/or replaces its definition; a new
// definition makes the workflow ready.
func (s *DB) WorkflowUpdate(ctx context.Context, p store.WorkflowUpdateParams) (*store.Workflow, error) {
	var out *store.Workflow
	err := s.tx(ctx, func(tx *sql.Tx) error {
		w, err := s.lockWorkflowIdle(ctx, tx, p.ID)
		if err != nil {
			return err
		}
		if p.Name != nil {
			w.Name = *p.Name
		}
		w.UpdatedAt = s.now()
		if p.Definition != nil {
			if w.Status == protocol.WorkflowAnalyzing && w.Analysis != nil {
				// The owner's definition ends the analysis in progress.
				finished := w.UpdatedAt
				w.Analysis.FinishedAt = &finished
			}
			w.Definition = p.Definition
			w.Status = protocol.WorkflowReady
		}
		var finished any
		if w.Analysis != nil {
			finished = msPtr(w.Analysis.FinishedAt)
		}
		_, err = s.exec(ctx, tx, `UPDATE workflows SET name = ?, definition = ?, status = ?, updated_at = ?, analysis_finished_at = ? WHERE id = ?`,
			w.Name, nullString(string(w.Definition)), w.Status, ms(w.UpdatedAt), finished, w.ID)
		out = w
		return err
	})
	return out, err
}

// WorkflowDelete marks the workflow deleted; it answers workflow_not_found from then on.
func (s *DB) WorkflowDelete(ctx context.Context, id string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := s.lockWorkflowIdle(ctx, tx, id); err != nil {
			return err
		}
		_, err := s.exec(ctx, tx, `UPDATE workflows SET deleted_at = ? WHERE id = ?`, ms(s.now()), id)
		return err
	})
}

// queryAll runs a query (on the read pool, or on the given transaction) and scans every row.
func queryAll[T any](ctx context.Context, s *DB, query string, args []any, scan func(interface{ Scan(...any) error }) (T, error), on ...querier) ([]T, error) {
	var q querier = s.r
	if len(on) > 0 {
		q = on[0]
	}
	query = s.q(query)
	var rows *sql.Rows
	var err error
	if st := s.stmt(ctx, q, query); st != nil {
		rows, err = st.QueryContext(ctx, args...)
	} else {
		rows, err = q.QueryContext(ctx, query, args...)
	}
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []T{}
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

func (s *DB) WorkflowVideoKeysInUse(ctx context.Context, keys []string) (map[string]bool, error) {
	out := map[string]bool{}
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), 500)]
		keys = keys[len(chunk):]
		args := make([]any, len(chunk))
		for i, k := range chunk {
			args[i] = k
		}
		used, err := queryAll(ctx, s, `SELECT video_key FROM workflows WHERE deleted_at IS NULL AND video_key IN (`+placeholders(len(chunk))+`)`, args,
			func(row interface{ Scan(...any) error }) (string, error) {
				var k string
				return k, row.Scan(&k)
			})
		if err != nil {
			return nil, err
		}
		for _, k := range used {
			out[k] = true
		}
	}
	return out, nil
}
