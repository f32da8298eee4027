package sqlstore

import (
	"context"
	"database/sql"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const batchColumns = `id, account_id, workflow_id, status, concurrency, stop_on_failure, secret_names, created_at, started_at, finished_at`

func scanBatch(row interface{ Scan(...any) error }) (*store.Batch, error) {
	var b store.Batch
	var stop int
	var created int64
	var started, finished sql.NullInt64
	var secretNames sql.NullString
	if err := row.Scan(&b.ID, &b.AccountID, &b.WorkflowID, &b.Status, &b.Concurrency, &stop, &secretNames, &created, &started, &finished); err != nil {
		return nil, err
	}
	if err := unmarshalAll(secretNames.String, &b.SecretNames); err != nil {
		return nil, err
	}
	b.StopOnFailure = stop != 0
	b.CreatedAt, b.StartedAt, b.FinishedAt = fromMs(created), fromNullMs(started), fromNullMs(finished)
	b.Iterations = []store.BatchIteration{}
	return &b, nil
}

func (s *DB) BatchCreate(ctx context.Context, p store.BatchCreateParams) (*store.Batch, error) {
	b := &store.Batch{ID: ids.New(ids.Batch), AccountID: p.AccountID, WorkflowID: p.WorkflowID, Status: protocol.BatchCreated,
		Concurrency: max(1, p.Concurrency), StopOnFailure: p.StopOnFailure, SecretNames: p.SecretNames, CreatedAt: s.now()}
	stop := 0
	if b.StopOnFailure {
		stop = 1
	}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		b.Iterations = b.Iterations[:0]
		if _, err := s.exec(ctx, tx, `INSERT INTO batches (id, account_id, workflow_id, status, concurrency, stop_on_failure, secret_names, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			b.ID, b.AccountID, b.WorkflowID, b.Status, b.Concurrency, stop, jsonText(b.SecretNames), ms(b.CreatedAt)); err != nil {
			return err
		}
		for i, in := range p.Iterations {
			if _, err := s.exec(ctx, tx, `INSERT INTO batch_iterations (batch_id, idx, inputs) VALUES (?, ?, ?)`, b.ID, i, jsonOrEmpty(in, "{}")); err != nil {
				return err
			}
			b.Iterations = append(b.Iterations, store.BatchIteration{Index: i, Inputs: in, Status: "pending"})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// loadIterations fills b.Iterations with each iteration's run status and outputs.
func (s *DB) loadIterations(ctx context.Context, q querier, b *store.Batch) error {
	its, err := queryAll(ctx, s, `SELECT i.idx, i.inputs, i.run_id, r.status, r.outputs, r.error FROM batch_iterations i
		LEFT JOIN runs r ON r.id = i.run_id WHERE i.batch_id = ? ORDER BY i.idx`, []any{b.ID},
		func(row interface{ Scan(...any) error }) (store.BatchIteration, error) {
			var it store.BatchIteration
			var inputs string
			var runID, status, outputs, errJSON sql.NullString
			if err := row.Scan(&it.Index, &inputs, &runID, &status, &outputs, &errJSON); err != nil {
				return it, err
			}
			it.RunID, it.Status = runID.String, status.String
			if it.Status == "" {
				it.Status = "pending"
			}
			err := unmarshalAll(inputs, &it.Inputs, outputs.String, &it.Outputs, errJSON.String, &it.Error)
			if it.Outputs == nil {
				it.Outputs = map[string]any{}
			}
			return it, err
		}, q)
	b.Iterations = its
	return err
}

func (s *DB) BatchGet(ctx context.Context, id string) (*store.Batch, error) {
	b, err := scanBatch(s.queryRow(ctx, s.r, `SELECT `+batchColumns+` FROM batches WHERE id = ?`, id))
	if err != nil {
		return nil, notFound(err, protocol.CodeBatchNotFound)
	}
	return b, s.loadIterations(ctx, s.r, b)
}

func (s *DB) getBatchTx(ctx context.Context, tx *sql.Tx, id string) (*store.Batch, error) {
	b, err := scanBatch(s.queryRow(ctx, tx, `SELECT `+batchColumns+` FROM batches WHERE id = ?`+s.d.forUpdate, id))
	return b, notFound(err, protocol.CodeBatchNotFound)
}

// BatchList lists batches without their iterations.
func (s *DB) BatchList(ctx context.Context, accountID string, page store.Page) ([]*store.Batch, string, error) {
	query, args, limit, err := pageQuery(`SELECT `+batchColumns+` FROM batches WHERE account_id = ?`, "created_at", []any{accountID}, page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanBatch)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(b *store.Batch) cursor { return cursor{ms(b.CreatedAt), b.ID} })
	return items, next, nil
}

// BatchStart takes the workflow's active slot for the batch, holds credits
// for every iteration and queues every iteration's run, atomically.
func (s *DB) BatchStart(ctx context.Context, p store.BatchStartParams) (*store.Batch, error) {
	var out *store.Batch
	err := s.tx(ctx, func(tx *sql.Tx) error {
		b, err := s.getBatchTx(ctx, tx, p.ID)
		if err != nil {
			return err
		}
		switch b.Status {
		case protocol.BatchCompleted:
			return protocol.NewError(protocol.CodeBatchAlreadyCompleted)
		case protocol.BatchRunning, protocol.BatchCancelled:
			return protocol.Errorf(protocol.CodeConflict, "The batch has already been started.").With("status", b.Status)
		}
		if err := s.loadIterations(ctx, tx, b); err != nil {
			return err
		}
		n, err := s.exec(ctx, tx, `UPDATE workflows SET active_batch_id = ? WHERE id = ? AND deleted_at IS NULL AND status = 'ready'
			AND active_run_id IS NULL AND active_batch_id IS NULL`, b.ID, b.WorkflowID)
		if err != nil {
			return err
		}
		if n == 0 {
			return s.workflowBusy(ctx, tx, b.WorkflowID)
		}
		if err := s.holdCredits(ctx, tx, b.AccountID, p.Cost*int64(len(b.Iterations))); err != nil {
			return err
		}
		for i := range b.Iterations {
			it := &b.Iterations[i]
			r := s.newQueuedRun(b.AccountID, b.WorkflowID, it.Inputs, p.Steps, nil, p.TimeoutMs, 0, p.Cost)
			r.BatchID, r.Iteration, r.SecretNames = b.ID, &it.Index, p.SecretNames
			if err := s.insertRun(ctx, tx, r); err != nil {
				return err
			}
			if err := s.insertHold(ctx, tx, b.AccountID, r.ID, p.Cost); err != nil {
				return err
			}
			if _, err := s.exec(ctx, tx, `UPDATE batch_iterations SET run_id = ? WHERE batch_id = ? AND idx = ?`, r.ID, b.ID, it.Index); err != nil {
				return err
			}
			it.RunID, it.Status = r.ID, string(r.Status)
		}
		now := s.now()
		if _, err := s.exec(ctx, tx, `UPDATE batches SET status = 'running', started_at = ? WHERE id = ?`, ms(now), b.ID); err != nil {
			return err
		}
		b.Status, b.StartedAt = protocol.BatchRunning, &now
		out = b
		return nil
	})
	return out, err
}

// BatchCancel cancels a batch: queued runs at once, running ones by request.
func (s *DB) BatchCancel(ctx context.Context, id string) (*store.Batch, error) {
	err := s.tx(ctx, func(tx *sql.Tx) error {
		b, err := s.getBatchTx(ctx, tx, id)
		if err != nil {
			return err
		}
		if b.Status.Terminal() {
			return protocol.Errorf(protocol.CodeConflict, "The batch has already finished.").With("status", b.Status)
		}
		now := s.now()
		if _, err := s.exec(ctx, tx, `UPDATE batches SET status = 'cancelled', finished_at = ? WHERE id = ?`, ms(now), id); err != nil {
			return err
		}
		if b.Status == protocol.BatchCreated {
			return nil
		}
		return s.cancelBatchRuns(ctx, tx, b.ID, b.WorkflowID)
	})
	if err != nil {
		return nil, err
	}
	return s.BatchGet(ctx, id)
}

// cancelBatchRuns cancels a batch's queued runs and asks its running ones to
// stop, then settles the workflow's slot.
func (s *DB) cancelBatchRuns(ctx context.Context, tx *sql.Tx, batchID, workflowID string) error {
	runs, err := queryAll(ctx, s, `SELECT `+runColumns+` FROM runs WHERE batch_id = ? AND status IN `+activeRunStates+` ORDER BY iteration`+s.d.forUpdate, []any{batchID}, scanRun, tx)
	if err != nil {
		return err
	}
	for _, r := range runs {
		if r.Status == protocol.RunQueued {
			if _, err := s.finishRun(ctx, tx, r, protocol.RunCancelled, nil, nil, nil); err != nil {
				return err
			}
			continue
		}
		if _, err := s.exec(ctx, tx, `UPDATE runs SET cancel_requested_at = ? WHERE id = ? AND cancel_requested_at IS NULL`, ms(s.now()), r.ID); err != nil {
			return err
		}
	}
	return s.releaseBatchSlot(ctx, tx, batchID, workflowID)
}

// settleBatch runs after one of a batch's runs finished: stop-on-failure,
// completion when every run is terminal, and the workflow's slot.
func (s *DB) settleBatch(ctx context.Context, tx *sql.Tx, r *store.Run) error {
	b, err := s.getBatchTx(ctx, tx, r.BatchID)
	if err != nil {
		return err
	}
	failed := r.Status == protocol.RunFailed || r.Status == protocol.RunTimedOut
	if failed && b.StopOnFailure && b.Status == protocol.BatchRunning {
		// Stop the rest; the batch completes when the last run ends.
		queued, err := queryAll(ctx, s, `SELECT `+runColumns+` FROM runs WHERE batch_id = ? AND status = 'queued' ORDER BY iteration`+s.d.forUpdate, []any{b.ID}, scanRun, tx)
		if err != nil {
			return err
		}
		for _, q := range queued {
			if _, err := s.finishRun(ctx, tx, q, protocol.RunCancelled, nil, nil, nil); err != nil {
				return err
			}
		}
	}
	return s.releaseBatchSlot(ctx, tx, b.ID, b.WorkflowID)
}

// releaseBatchSlot completes a running batch whose runs are all terminal and
// frees the workflow's slot.
func (s *DB) releaseBatchSlot(ctx context.Context, tx *sql.Tx, batchID, workflowID string) error {
	var active int
	if err := s.queryRow(ctx, tx, `SELECT COUNT(*) FROM runs WHERE batch_id = ? AND status IN `+activeRunStates, batchID).Scan(&active); err != nil {
		return err
	}
	if active > 0 {
		return nil
	}
	if _, err := s.exec(ctx, tx, `UPDATE batches SET status = 'completed', finished_at = ? WHERE id = ? AND status = 'running'`, ms(s.now()), batchID); err != nil {
		return err
	}
	_, err := s.exec(ctx, tx, `UPDATE workflows SET active_batch_id = NULL WHERE id = ? AND active_batch_id = ?`, workflowID, batchID)
	return err
}
