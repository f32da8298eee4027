package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"

	"github.com/copelf/copelf/controlplane/internal/fsm"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const runColumns = `id, account_id, workflow_id, batch_id, iteration, status, inputs, secret_names, outputs, error, agent_id, attempt, lease_id, steps,
	queue_reason, queue_since, labels, timeout_ms, queue_timeout_ms, cost_reserved, cost_charged, queued_at, started_at, finished_at, cancel_requested_at,
	lease_expires_at, assigned_at`

// activeRunStates is the SQL list of non-terminal run states.
const activeRunStates = `('queued', 'running', 'awaiting_approval')`

func scanRun(row interface{ Scan(...any) error }) (*store.Run, error) {
	var r store.Run
	var batchID, errJSON, agentID, leaseID, queueReason, labels, secretNames sql.NullString
	var iteration sql.NullInt64
	var inputs, outputs, steps string
	var queued int64
	var queueSince, started, finished, cancelReq, leaseExp, assigned sql.NullInt64
	err := row.Scan(&r.ID, &r.AccountID, &r.WorkflowID, &batchID, &iteration, &r.Status, &inputs, &secretNames, &outputs, &errJSON, &agentID, &r.Attempt, &leaseID, &steps,
		&queueReason, &queueSince, &labels, &r.TimeoutMs, &r.QueueTimeoutMs, &r.CostReserved, &r.CostCharged, &queued, &started, &finished, &cancelReq, &leaseExp, &assigned)
	if err != nil {
		return nil, err
	}
	r.BatchID, r.AgentID, r.LeaseID = batchID.String, agentID.String, leaseID.String
	r.QueueReason = protocol.QueueReason(queueReason.String)
	if iteration.Valid {
		i := int(iteration.Int64)
		r.Iteration = &i
	}
	if err := unmarshalAll(
		inputs, &r.Inputs,
		outputs, &r.Outputs,
		steps, &r.Steps,
		errJSON.String, &r.Error,
		labels.String, &r.Labels,
		secretNames.String, &r.SecretNames,
	); err != nil {
		return nil, err
	}
	if r.Inputs == nil {
		r.Inputs = map[string]any{}
	}
	if r.Outputs == nil {
		r.Outputs = map[string]any{}
	}
	if r.Steps == nil {
		r.Steps = []store.StepRecord{}
	}
	r.QueuedAt = fromMs(queued)
	r.QueueSince, r.StartedAt, r.FinishedAt, r.CancelRequestedAt = fromNullMs(queueSince), fromNullMs(started), fromNullMs(finished), fromNullMs(cancelReq)
	r.LeaseExpiresAt, r.AssignedAt = fromNullMs(leaseExp), fromNullMs(assigned)
	return &r, nil
}

// unmarshalAll decodes pairs of (json text, destination); empty text is skipped.
func unmarshalAll(pairs ...any) error {
	for i := 0; i < len(pairs); i += 2 {
		text := pairs[i].(string)
		if text == "" || text == "null" {
			continue
		}
		if err := json.Unmarshal([]byte(text), pairs[i+1]); err != nil {
			return err
		}
	}
	return nil
}

// jsonText encodes v for a TEXT column; nil values (and empty maps for
// nullable columns) become NULL.
func jsonText(v any) any {
	b, err := json.Marshal(v)
	if err != nil || string(b) == "null" {
		return nil
	}
	return string(b)
}

func jsonOrEmpty(v any, empty string) string {
	if t, ok := jsonText(v).(string); ok {
		return t
	}
	return empty
}

func (s *DB) insertRun(ctx context.Context, tx *sql.Tx, r *store.Run) error {
	_, err := s.exec(ctx, tx, `INSERT INTO runs (id, account_id, workflow_id, batch_id, iteration, status, inputs, secret_names, outputs, steps, queue_reason, queue_since, labels,
		timeout_ms, queue_timeout_ms, cost_reserved, cost_charged, queued_at) VALUES (`+placeholders(18)+`)`,
		r.ID, r.AccountID, r.WorkflowID, nullString(r.BatchID), r.Iteration, r.Status, jsonOrEmpty(r.Inputs, "{}"), jsonText(r.SecretNames), jsonOrEmpty(r.Outputs, "{}"),
		jsonOrEmpty(r.Steps, "[]"), nullString(string(r.QueueReason)), msPtr(r.QueueSince), jsonText(r.Labels),
		r.TimeoutMs, r.QueueTimeoutMs, r.CostReserved, r.CostCharged, ms(r.QueuedAt))
	return err
}

func (s *DB) newQueuedRun(accountID, workflowID string, inputs map[string]any, steps []store.StepRecord, labels map[string]string, timeoutMs, queueTimeoutMs, cost int64) *store.Run {
	now := s.now()
	return &store.Run{
		ID: ids.New(ids.Run), AccountID: accountID, WorkflowID: workflowID, Status: protocol.RunQueued,
		Inputs: inputs, Outputs: map[string]any{}, Steps: steps, Labels: labels,
		QueueReason: protocol.QueueNoAgentConnected, QueueSince: &now,
		TimeoutMs: timeoutMs, QueueTimeoutMs: queueTimeoutMs, CostReserved: cost, QueuedAt: now,
	}
}

// RunCreate: in one transaction, take the workflow's active slot, hold the
// cost and insert the queued run. The order of the checks is the API's:
// workflow state, then active run/batch, then credits.
func (s *DB) RunCreate(ctx context.Context, p store.RunCreateParams) (*store.Run, error) {
	r := s.newQueuedRun(p.AccountID, p.WorkflowID, p.Inputs, p.Steps, p.Labels, p.TimeoutMs, p.QueueTimeoutMs, p.Cost)
	r.SecretNames = p.SecretNames
	err := s.tx(ctx, func(tx *sql.Tx) error {
		n, err := s.exec(ctx, tx, `UPDATE workflows SET active_run_id = ? WHERE id = ? AND deleted_at IS NULL AND status = 'ready'
			AND active_run_id IS NULL AND active_batch_id IS NULL`, r.ID, p.WorkflowID)
		if err != nil {
			return err
		}
		if n == 0 {
			return s.workflowBusy(ctx, tx, p.WorkflowID)
		}
		if err := s.holdCredits(ctx, tx, p.AccountID, p.Cost); err != nil {
			return err
		}
		if err := s.insertHold(ctx, tx, p.AccountID, r.ID, p.Cost); err != nil {
			return err
		}
		return s.insertRun(ctx, tx, r)
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// workflowBusy explains why a workflow's active slot could not be taken.
func (s *DB) workflowBusy(ctx context.Context, tx *sql.Tx, workflowID string) error {
	w, err := scanWorkflow(s.queryRow(ctx, tx, `SELECT `+workflowColumns+` FROM workflows WHERE id = ?`, workflowID))
	switch {
	case err != nil:
		return notFound(err, protocol.CodeWorkflowNotFound)
	case w.DeletedAt != nil:
		return protocol.NewError(protocol.CodeWorkflowNotFound)
	case w.Status != protocol.WorkflowReady:
		return protocol.NewError(protocol.CodeWorkflowNotReady).With("status", w.Status)
	case w.ActiveRunID != "":
		return protocol.NewError(protocol.CodeWorkflowAlreadyRunning).With("runId", w.ActiveRunID)
	case w.ActiveBatchID != "":
		return protocol.NewError(protocol.CodeWorkflowAlreadyRunning).With("batchId", w.ActiveBatchID)
	}
	return errors.New("workflow slot update matched no row without a reason")
}

func (s *DB) RunGet(ctx context.Context, id string) (*store.Run, error) {
	r, err := scanRun(s.queryRow(ctx, s.r, `SELECT `+runColumns+` FROM runs WHERE id = ?`, id))
	return r, notFound(err, protocol.CodeNotFound)
}

func (s *DB) getRunTx(ctx context.Context, tx *sql.Tx, id string) (*store.Run, error) {
	r, err := scanRun(s.queryRow(ctx, tx, `SELECT `+runColumns+` FROM runs WHERE id = ?`+s.d.forUpdate, id))
	return r, notFound(err, protocol.CodeNotFound)
}

func (s *DB) RunList(ctx context.Context, p store.RunListParams) ([]*store.Run, string, error) {
	query := `SELECT ` + runColumns + ` FROM runs WHERE 1 = 1`
	var args []any
	for _, f := range []struct{ col, val string }{
		{"account_id", p.AccountID}, {"workflow_id", p.WorkflowID}, {"batch_id", p.BatchID}, {"status", string(p.Status)},
	} {
		if f.val != "" {
			query += ` AND ` + f.col + ` = ?`
			args = append(args, f.val)
		}
	}
	query, args, limit, err := pageQuery(query, "queued_at", args, p.Page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanRun)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(r *store.Run) cursor { return cursor{ms(r.QueuedAt), r.ID} })
	return items, next, nil
}

// RunCancel: queued → cancelled at once; running or awaiting approval →
// cancel requested (the agent is told and finishes the run as cancelled).
func (s *DB) RunCancel(ctx context.Context, id string) (*store.Run, error) {
	var out *store.Run
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.getRunTx(ctx, tx, id)
		if err != nil {
			return err
		}
		switch {
		case r.Status.Terminal():
			return protocol.Errorf(protocol.CodeConflict, "The run has already finished.").With("status", r.Status)
		case r.Status == protocol.RunQueued:
			out, err = s.finishRun(ctx, tx, r, protocol.RunCancelled, nil, nil, nil)
			return err
		}
		if r.CancelRequestedAt == nil {
			now := s.now()
			if _, err := s.exec(ctx, tx, `UPDATE runs SET cancel_requested_at = ? WHERE id = ?`, ms(now), id); err != nil {
				return err
			}
			r.CancelRequestedAt = &now
		}
		out = r
		return nil
	})
	return out, err
}

// RunStart moves a queued run to running and captures its hold.
func (s *DB) RunStart(ctx context.Context, p store.RunStartParams) (*store.Run, error) {
	var out *store.Run
	err := s.tx(ctx, func(tx *sql.Tx) error {
		now := s.now()
		var expires any
		if !p.LeaseExpires.IsZero() {
			expires = ms(p.LeaseExpires)
		}
		// A claimed run starts only under its lease; an unclaimed one is
		// claimed and started at once.
		n, err := s.exec(ctx, tx, `UPDATE runs SET status = 'running', agent_id = COALESCE(?, agent_id),
			attempt = CASE WHEN lease_id IS NULL THEN attempt + 1 ELSE attempt END, lease_id = ?,
			lease_expires_at = COALESCE(?, lease_expires_at), started_at = ?, queue_reason = NULL, queue_since = NULL
			WHERE id = ? AND status = 'queued' AND (lease_id IS NULL OR lease_id = ?)`,
			nullString(p.AgentID), nullString(p.LeaseID), expires, ms(now), p.ID, p.LeaseID)
		if err != nil {
			return err
		}
		r, err := s.getRunTx(ctx, tx, p.ID)
		if err != nil {
			return err
		}
		if n == 0 {
			if r.Status == protocol.RunQueued {
				return errLeaseLost()
			}
			if r.Status.Terminal() {
				// Cancelled (or timed out) between its assign and this
				// accept: the agent drops it at once.
				return errRunFinished(r.Status)
			}
			return protocol.Errorf(protocol.CodeConflict, "The run is not queued.").With("status", r.Status)
		}
		charged, err := s.captureHold(ctx, tx, r.ID)
		if err != nil {
			return err
		}
		r.CostCharged = charged
		out = r
		return nil
	})
	return out, err
}

// RunFinish ends a run; see store.Store.
func (s *DB) RunFinish(ctx context.Context, p store.RunFinishParams) (*store.Run, error) {
	if !p.Status.Terminal() {
		return nil, protocol.Errorf(protocol.CodeConflict, "A run can only finish in a terminal state.").With("status", p.Status)
	}
	var out *store.Run
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.getRunTx(ctx, tx, p.ID)
		if err != nil {
			return err
		}
		if p.LeaseID != "" && r.LeaseID != p.LeaseID {
			return errLeaseLost()
		}
		out, err = s.finishRun(ctx, tx, r, p.Status, p.Error, p.Outputs, p.Steps)
		return err
	})
	return out, err
}

func errLeaseLost() error {
	return protocol.Errorf(protocol.CodeConflict, "The lease is no longer the run's current lease.").With("reason", protocol.ReasonLeaseLost)
}

// noCharge reports whether a run that ends with err costs nothing in the end.
func noCharge(err *protocol.Error) bool {
	if err == nil {
		return false
	}
	if err.Code == protocol.CodeInternal {
		return true
	}
	reason, _ := err.Details["reason"].(string)
	return reason == protocol.ReasonAgentLost || reason == protocol.ReasonBrowserCrashed
}

// finishRun moves r to a terminal status and settles everything that hangs
// on it: the hold or the charge, pending approvals, the workflow's active
// slot and the batch.
func (s *DB) finishRun(ctx context.Context, tx *sql.Tx, r *store.Run, status protocol.RunStatus, runErr *protocol.Error, outputs map[string]any, steps []store.StepRecord) (*store.Run, error) {
	// The state machine decides which terminal states a run may reach from
	// where it is (a queued run cannot succeed); the guard below makes the
	// move happen once.
	if err := fsm.RunTransition(r.Status, status); err != nil {
		return nil, err
	}
	now := s.now()
	set := `status = ?, error = ?, finished_at = ?, queue_reason = NULL, queue_since = NULL`
	args := []any{status, jsonText(runErr), ms(now)}
	if outputs != nil {
		set += `, outputs = ?`
		args = append(args, jsonOrEmpty(outputs, "{}"))
		r.Outputs = outputs
	}
	if steps != nil {
		set += `, steps = ?`
		args = append(args, jsonOrEmpty(steps, "[]"))
		r.Steps = steps
	}
	args = append(args, r.ID)
	n, err := s.exec(ctx, tx, `UPDATE runs SET `+set+` WHERE id = ? AND status IN `+activeRunStates, args...)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, protocol.Errorf(protocol.CodeConflict, "The run has already finished.").With("status", r.Status)
	}
	r.Status, r.Error, r.FinishedAt, r.QueueReason, r.QueueSince = status, runErr, &now, "", nil

	switch {
	case r.StartedAt == nil:
		if err := s.voidHold(ctx, tx, r.ID); err != nil {
			return nil, err
		}
	case noCharge(runErr):
		if err := s.refundRun(ctx, tx, r); err != nil {
			return nil, err
		}
		r.CostCharged = 0
	}
	if _, err := s.exec(ctx, tx, `UPDATE approvals SET status = 'expired', resolved_at = ? WHERE run_id = ? AND status = 'pending'`, ms(now), r.ID); err != nil {
		return nil, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE workflows SET active_run_id = NULL WHERE id = ? AND active_run_id = ?`, r.WorkflowID, r.ID); err != nil {
		return nil, err
	}
	if r.BatchID != "" {
		if err := s.settleBatch(ctx, tx, r); err != nil {
			return nil, err
		}
	}
	return r, nil
}
