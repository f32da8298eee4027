package sqlstore

import (
	"context"
	"database/sql"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const approvalColumns = `id, account_id, run_id, workflow_id, step, message, status, created_at, resolved_at, resolved_by, comment`

func scanApproval(row interface{ Scan(...any) error }) (*store.Approval, error) {
	var a store.Approval
	var created int64
	var resolved sql.NullInt64
	var by, comment sql.NullString
	if err := row.Scan(&a.ID, &a.AccountID, &a.RunID, &a.WorkflowID, &a.Step, &a.Message, &a.Status, &created, &resolved, &by, &comment); err != nil {
		return nil, err
	}
	a.CreatedAt, a.ResolvedAt, a.ResolvedBy, a.Comment = fromMs(created), fromNullMs(resolved), by.String, comment.String
	return &a, nil
}

// ApprovalCreate pauses a running run at an approval step and opens the request.
func (s *DB) ApprovalCreate(ctx context.Context, p store.ApprovalCreateParams) (*store.Approval, error) {
	var out *store.Approval
	err := s.tx(ctx, func(tx *sql.Tx) error {
		n, err := s.exec(ctx, tx, `UPDATE runs SET status = 'awaiting_approval' WHERE id = ? AND status = 'running'`, p.RunID)
		if err != nil {
			return err
		}
		r, err := s.getRunTx(ctx, tx, p.RunID)
		if err != nil {
			return err
		}
		if n == 0 {
			return protocol.Errorf(protocol.CodeConflict, "The run is not running.").With("status", r.Status)
		}
		a := &store.Approval{ID: ids.New(ids.Approval), AccountID: r.AccountID, RunID: r.ID, WorkflowID: r.WorkflowID, Step: p.Step,
			Message: p.Message, Status: protocol.ApprovalPending, CreatedAt: s.now()}
		_, err = s.exec(ctx, tx, `INSERT INTO approvals (id, account_id, run_id, workflow_id, step, message, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			a.ID, a.AccountID, a.RunID, a.WorkflowID, a.Step, a.Message, a.Status, ms(a.CreatedAt))
		out = a
		return err
	})
	return out, err
}

func (s *DB) ApprovalGet(ctx context.Context, id string) (*store.Approval, error) {
	a, err := scanApproval(s.queryRow(ctx, s.r, `SELECT `+approvalColumns+` FROM approvals WHERE id = ?`, id))
	return a, notFound(err, protocol.CodeNotFound)
}

func (s *DB) ApprovalList(ctx context.Context, p store.ApprovalListParams) ([]*store.Approval, string, error) {
	query := `SELECT ` + approvalColumns + ` FROM approvals WHERE 1 = 1`
	var args []any
	if p.AccountID != "" {
		query += ` AND account_id = ?`
		args = append(args, p.AccountID)
	}
	if p.RunID != "" {
		query += ` AND run_id = ?`
		args = append(args, p.RunID)
	}
	if p.Status != "" {
		query += ` AND status = ?`
		args = append(args, p.Status)
	}
	query, args, limit, err := pageQuery(query, "created_at", args, p.Page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanApproval)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(a *store.Approval) cursor { return cursor{ms(a.CreatedAt), a.ID} })
	return items, next, nil
}

// ApprovalResolve resolves a pending approval exactly once and moves its run:
// approved → running, rejected → failed (approval_rejected).
func (s *DB) ApprovalResolve(ctx context.Context, p store.ApprovalResolveParams) (*store.Approval, error) {
	status := protocol.ApprovalRejected
	if p.Approved {
		status = protocol.ApprovalApproved
	}
	var out *store.Approval
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if s.d.forUpdate != "" {
			// Lock the run before its approval: a run's transactions
			// (finishing it expires its approvals) take them in that order.
			if _, err := s.exec(ctx, tx, `SELECT id FROM runs WHERE id = (SELECT run_id FROM approvals WHERE id = ?)`+s.d.forUpdate, p.ID); err != nil {
				return err
			}
		}
		now := s.now()
		n, err := s.exec(ctx, tx, `UPDATE approvals SET status = ?, resolved_at = ?, resolved_by = ?, comment = ? WHERE id = ? AND status = 'pending'`,
			status, ms(now), nullString(p.By), nullString(p.Comment), p.ID)
		if err != nil {
			return err
		}
		a, err := scanApproval(s.queryRow(ctx, tx, `SELECT `+approvalColumns+` FROM approvals WHERE id = ?`, p.ID))
		if err != nil {
			return notFound(err, protocol.CodeNotFound)
		}
		if n == 0 {
			return protocol.Errorf(protocol.CodeConflict, "The approval has already been resolved.").With("status", a.Status)
		}
		out = a
		r, err := s.getRunTx(ctx, tx, a.RunID)
		if err != nil {
			return err
		}
		if r.Status != protocol.RunAwaitingApproval {
			return nil
		}
		if p.Approved {
			_, err = s.exec(ctx, tx, `UPDATE runs SET status = 'running' WHERE id = ? AND status = 'awaiting_approval'`, r.ID)
			return err
		}
		runErr := protocol.Errorf(protocol.CodeForbidden, "The approval was rejected.").With("reason", protocol.ReasonApprovalRejected).With("step", a.Step)
		if p.Comment != "" {
			runErr = runErr.With("comment", p.Comment)
		}
		_, err = s.finishRun(ctx, tx, r, protocol.RunFailed, runErr, nil, nil)
		return err
	})
	return out, err
}
