package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"strconv"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// WorkflowAnalysisWaiting lists analyzing, unclaimed, live workflows, oldest
// analysis first; the cursor is the last one's (analysis start, id).
func (s *DB) WorkflowAnalysisWaiting(ctx context.Context, page store.Page) ([]*store.Workflow, string, error) {
	c, err := decodeCursor(page.Cursor)
	if err != nil {
		return nil, "", err
	}
	query := `SELECT ` + workflowColumns + ` FROM workflows
		WHERE status = 'analyzing' AND analysis_claim_id IS NULL AND deleted_at IS NULL`
	var args []any
	if c != nil {
		query += ` AND (analysis_started_at > ? OR (analysis_started_at = ? AND id > ?))`
		args = append(args, c.at, c.at, c.id)
	}
	limit := pageLimit(page)
	query += ` ORDER BY analysis_started_at, id LIMIT ` + strconv.Itoa(limit+1)
	items, err := queryAll(ctx, s, query, args, scanWorkflow)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(w *store.Workflow) cursor { return cursor{ms(w.Analysis.StartedAt), w.ID} })
	return items, next, nil
}

// analysisConflict explains why a guarded analysis update changed nothing:
// the workflow is gone, is not analyzing, or is claimed by another.
func (s *DB) analysisConflict(ctx context.Context, tx *sql.Tx, id string, claimed bool) error {
	w, err := scanWorkflow(s.queryRow(ctx, tx, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`, id))
	if err != nil {
		return notFound(err, protocol.CodeWorkflowNotFound)
	}
	switch {
	case w.DeletedAt != nil:
		return protocol.NewError(protocol.CodeWorkflowNotFound)
	case w.Status != protocol.WorkflowAnalyzing:
		return protocol.Errorf(protocol.CodeConflict, "The workflow is not analyzing.").With("reason", "not_analyzing").With("status", w.Status)
	case claimed:
		return protocol.Errorf(protocol.CodeConflict, "Another analyzer has claimed this workflow.").With("reason", "already_claimed")
	}
	return protocol.Errorf(protocol.CodeConflict, "The workflow's analysis is not claimed by this analyzer.").With("reason", "not_claimed")
}

// WorkflowAnalysisClaim claims an analysis with one guarded UPDATE: of two
// analyzers, the second finds analysis_claim_id set and changes nothing.
func (s *DB) WorkflowAnalysisClaim(ctx context.Context, p store.WorkflowAnalysisClaimParams) (*store.Workflow, error) {
	var out *store.Workflow
	err := s.tx(ctx, func(tx *sql.Tx) error {
		n, err := s.exec(ctx, tx, `UPDATE workflows SET analysis_claim_id = ?, analysis_claimed_by = ?, analysis_claimed_at = ?
			WHERE id = ? AND status = 'analyzing' AND analysis_claim_id IS NULL AND deleted_at IS NULL`,
			p.ClaimID, p.By, ms(s.now()), p.ID)
		if err != nil {
			return err
		}
		if n == 0 {
			return s.analysisConflict(ctx, tx, p.ID, true)
		}
		out, err = scanWorkflow(s.queryRow(ctx, tx, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`, p.ID))
		return err
	})
	return out, err
}

// WorkflowAnalysisFinish ends the claimed analysis with one guarded UPDATE.
func (s *DB) WorkflowAnalysisFinish(ctx context.Context, p store.WorkflowAnalysisFinishParams) (*store.Workflow, error) {
	guard, claim := `analysis_claimed_by = ?`, p.By
	if p.ClaimID != "" {
		guard, claim = `analysis_claim_id = ?`, p.ClaimID
	}
	if claim == "" {
		return nil, protocol.Errorf(protocol.CodeConflict, "The workflow's analysis is not claimed by this analyzer.").With("reason", "not_claimed")
	}
	status, errJSON := protocol.WorkflowReady, any(nil)
	if p.Error != nil {
		raw, err := json.Marshal(p.Error)
		if err != nil {
			return nil, err
		}
		status, errJSON = protocol.WorkflowAnalysisFailed, string(raw)
	}
	var out *store.Workflow
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := ms(s.now())
		set := `status = ?, analysis_finished_at = ?, analysis_error = ?, updated_at = ?`
		args := []any{status, now, errJSON, now}
		if p.Error == nil { // an error keeps the previous definition, if any
			set += `, definition = ?`
			args = append(args, string(p.Definition))
		}
		args = append(args, p.ID, claim)
		n, err := s.exec(ctx, tx, `UPDATE workflows SET `+set+`
			WHERE id = ? AND status = 'analyzing' AND deleted_at IS NULL AND `+guard, args...)
		if err != nil {
			return err
		}
		if n == 0 {
			return s.analysisConflict(ctx, tx, p.ID, false)
		}
		out, err = scanWorkflow(s.queryRow(ctx, tx, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`, p.ID))
		return err
	})
	return out, err
}

// WorkflowAnalysisExpire fails overdue analyses in one guarded UPDATE, so
// that replicas running it at once fail each workflow once, and a finish
// that commits first wins.
func (s *DB) WorkflowAnalysisExpire(ctx context.Context, startedBefore time.Time) ([]string, error) {
	raw, err := json.Marshal(store.AnalysisError{Code: store.AnalysisTimeoutCode, Message: "The analysis did not finish in time."})
	if err != nil {
		return nil, err
	}
	var out []string
	err = s.tx(ctx, func(tx *sql.Tx) error {
		now := ms(s.now())
		var err error
		out, err = queryAll(ctx, s, `UPDATE workflows SET status = 'analysis_failed', analysis_finished_at = ?, analysis_error = ?, updated_at = ?
			WHERE status = 'analyzing' AND deleted_at IS NULL AND analysis_started_at <= ? RETURNING id`,
			[]any{now, string(raw), now, ms(startedBefore)},
			func(r interface{ Scan(...any) error }) (string, error) {
				var id string
				return id, r.Scan(&id)
			}, tx)
		return err
	})
	return out, err
}

// WorkflowVideoReplace swaps a workflow's video and restarts its analysis.
func (s *DB) WorkflowVideoReplace(ctx context.Context, p store.WorkflowVideoParams) (*store.Workflow, string, error) {
	var out *store.Workflow
	var previous string
	err := s.tx(ctx, func(tx *sql.Tx) error {
		w, err := s.lockWorkflowIdle(ctx, tx, p.ID)
		if err != nil {
			return err
		}
		if w.Status == protocol.WorkflowAnalyzing {
			return protocol.Errorf(protocol.CodeConflict, "The workflow's video is being analyzed.").With("reason", "analyzing").With("status", w.Status)
		}
		previous = ""
		if w.Video != nil {
			previous = w.Video.Key
		}
		now := s.now()
		v := p.Video
		n, err := s.exec(ctx, tx, `UPDATE workflows SET status = 'analyzing', updated_at = ?,
			video_key = ?, video_size = ?, video_duration_ms = ?, video_container = ?,
			analysis_started_at = ?, analysis_finished_at = NULL, analysis_error = NULL,
			analysis_claim_id = NULL, analysis_claimed_by = NULL, analysis_claimed_at = NULL
			WHERE id = ? AND status = ?`,
			ms(now), v.Key, v.SizeBytes, v.DurationMs, v.Container, ms(now), p.ID, w.Status)
		if err != nil {
			return err
		}
		if n == 0 {
			return protocol.Errorf(protocol.CodeConflict, "The workflow changed meanwhile.")
		}
		w.Status, w.UpdatedAt, w.Video = protocol.WorkflowAnalyzing, now, &v
		w.Analysis = &store.WorkflowAnalysis{StartedAt: now}
		out = w
		return nil
	})
	return out, previous, err
}
