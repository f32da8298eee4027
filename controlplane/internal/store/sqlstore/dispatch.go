package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const agentColumns = `id, account_id, client_id, name, kind, version, labels, created_at, seen_at`

func scanAgent(row interface{ Scan(...any) error }) (*store.Agent, error) {
	var a store.Agent
	var labels sql.NullString
	var created, seen int64
	if err := row.Scan(&a.ID, &a.AccountID, &a.ClientID, &a.Name, &a.Kind, &a.Version, &labels, &created, &seen); err != nil {
		return nil, err
	}
	if err := unmarshalAll(labels.String, &a.Labels); err != nil {
		return nil, err
	}
	if a.Labels == nil {
		a.Labels = map[string]string{}
	}
	a.CreatedAt, a.SeenAt = fromMs(created), fromMs(seen)
	return &a, nil
}

// AgentUpsert records an agent at hello; its server id is stable per
// (account, client id).
func (s *DB) AgentUpsert(ctx context.Context, p store.AgentUpsertParams) (*store.Agent, error) {
	now := ms(s.now())
	var out *store.Agent
	err := s.tx(ctx, func(tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `INSERT INTO agents (id, account_id, client_id, name, kind, version, labels, created_at, seen_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (account_id, client_id) DO UPDATE SET name = excluded.name, kind = excluded.kind,
			version = excluded.version, labels = excluded.labels, seen_at = excluded.seen_at`,
			ids.New(ids.Agent), p.AccountID, p.ClientID, p.Name, p.Kind, p.Version, jsonText(p.Labels), now, now)
		if err != nil {
			return err
		}
		out, err = scanAgent(s.queryRow(ctx, tx, `SELECT `+agentColumns+` FROM agents WHERE account_id = ? AND client_id = ?`, p.AccountID, p.ClientID))
		return err
	})
	return out, err
}

func (s *DB) AgentGet(ctx context.Context, id string) (*store.Agent, error) {
	a, err := scanAgent(s.queryRow(ctx, s.r, `SELECT `+agentColumns+` FROM agents WHERE id = ?`, id))
	return a, notFound(err, protocol.CodeNotFound)
}

// batchHasRoom is true for a run outside a batch, or in a batch with fewer
// claimed or started runs than its concurrency. r is the runs table alias.
const batchHasRoom = `(r.batch_id IS NULL OR (SELECT COUNT(*) FROM runs x WHERE x.batch_id = r.batch_id
	AND (x.status IN ('running', 'awaiting_approval') OR (x.status = 'queued' AND x.lease_id IS NOT NULL)))
	< (SELECT b.concurrency FROM batches b WHERE b.id = r.batch_id))`

// limitClause is a LIMIT with the number in the SQL: SQLite prepares a
// statement whose LIMIT is a bound parameter a second time at its first
// step, which doubles the cost of these hot queries.
func limitClause(n int) string { return ` LIMIT ` + strconv.Itoa(max(n, 0)) }

func (s *DB) RunQueuedList(ctx context.Context, accountID string, limit int) ([]*store.Run, error) {
	return queryAll(ctx, s, `SELECT `+prefixed("r.", runColumns)+` FROM runs r
		WHERE r.account_id = ? AND r.status = 'queued' AND r.lease_id IS NULL AND `+batchHasRoom+`
		ORDER BY r.queued_at, r.iteration, r.id`+limitClause(limit), []any{accountID}, scanRun)
}

// RunAssign claims runs in one transaction; each claim is a guarded update.
func (s *DB) RunAssign(ctx context.Context, claims []store.RunAssignParams) ([]*store.Run, error) {
	var out []*store.Run
	err := s.tx(ctx, func(tx *sql.Tx) error {
		out = out[:0]
		now := ms(s.now())
		for _, c := range claims {
			if s.d.forUpdate != "" {
				// Where transactions run concurrently, the claims of one
				// batch's runs take turns on the batch's row, so that each
				// counts the others' against the batch's concurrency.
				if _, err := s.exec(ctx, tx, `SELECT id FROM batches WHERE id = (SELECT batch_id FROM runs WHERE id = ?)`+s.d.forUpdate, c.RunID); err != nil {
					return err
				}
			}
			n, err := s.exec(ctx, tx, `UPDATE runs SET lease_id = ?, agent_id = ?, lease_expires_at = ?, assigned_at = ?, attempt = attempt + 1
				WHERE id = ? AND status = 'queued' AND lease_id IS NULL AND `+batchHasRoomFor("runs"),
				c.LeaseID, c.AgentID, ms(c.LeaseExpires), now, c.RunID)
			if err != nil {
				return err
			}
			if n == 0 {
				continue
			}
			r, err := s.getRunTx(ctx, tx, c.RunID)
			if err != nil {
				return err
			}
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// batchHasRoomFor is batchHasRoom for an UPDATE of table t (no alias).
func batchHasRoomFor(t string) string {
	return `(` + t + `.batch_id IS NULL OR (SELECT COUNT(*) FROM runs x WHERE x.batch_id = ` + t + `.batch_id
	AND (x.status IN ('running', 'awaiting_approval') OR (x.status = 'queued' AND x.lease_id IS NOT NULL)))
	< (SELECT b.concurrency FROM batches b WHERE b.id = ` + t + `.batch_id))`
}

func prefixed(prefix, columns string) string {
	out := []byte{}
	start := true
	for i := 0; i < len(columns); i++ {
		c := columns[i]
		if start && c != ' ' && c != '\n' && c != '\t' {
			out = append(out, prefix...)
			start = false
		}
		out = append(out, c)
		if c == ',' {
			start = true
		}
	}
	return string(out)
}

func (s *DB) RunRelease(ctx context.Context, runID, leaseID string) error {
	n, err := s.exec(ctx, s.w, `UPDATE runs SET lease_id = NULL, agent_id = NULL, lease_expires_at = NULL, assigned_at = NULL
		WHERE id = ? AND status = 'queued' AND lease_id = ?`, runID, leaseID)
	if err != nil {
		return err
	}
	if n == 0 {
		return errLeaseLost()
	}
	return nil
}

// RunHeartbeat extends only started runs: an assign's accept deadline cannot
// be pushed back by listing it.
func (s *DB) RunHeartbeat(ctx context.Context, agentID string, runIDs []string, until time.Time) error {
	if len(runIDs) == 0 {
		return nil
	}
	args := []any{ms(until), agentID}
	for _, id := range runIDs {
		args = append(args, id)
	}
	_, err := s.exec(ctx, s.w, `UPDATE runs SET lease_expires_at = ? WHERE agent_id = ? AND id IN (`+placeholders(len(runIDs))+`)
		AND lease_id IS NOT NULL AND status IN ('running', 'awaiting_approval')`, args...)
	return err
}

func (s *DB) RunHeldList(ctx context.Context, agentID string) ([]*store.Run, error) {
	return queryAll(ctx, s, `SELECT `+runColumns+` FROM runs WHERE agent_id = ? AND lease_id IS NOT NULL AND status IN `+activeRunStates+`
		ORDER BY queued_at, id`, []any{agentID}, scanRun)
}

func (s *DB) RunLeasesExtend(ctx context.Context, until time.Time) error {
	_, err := s.exec(ctx, s.w, `UPDATE runs SET lease_expires_at = ? WHERE lease_id IS NOT NULL AND status IN `+activeRunStates+`
		AND (lease_expires_at IS NULL OR lease_expires_at < ?)`, ms(until), ms(until))
	return err
}

// RunEventApply: see store.Store. Events of one lease must come in order:
// a seq already applied is a duplicate, a gap is conflict.
func (s *DB) RunEventApply(ctx context.Context, p store.RunEventParams) (*store.RunEventResult, error) {
	res := &store.RunEventResult{}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		*res = store.RunEventResult{}
		r, err := s.getRunTx(ctx, tx, p.RunID)
		if err != nil {
			return err
		}
		res.Run = r
		if r.LeaseID == "" || r.LeaseID != p.LeaseID {
			return errLeaseLost()
		}
		// The lease's last applied seq and the run's history length, in one read.
		var last, runSeq int64
		if err := s.queryRow(ctx, tx, `SELECT COALESCE(MAX(CASE WHEN lease_id = ? THEN lease_seq END), 0), COALESCE(MAX(seq), 0) + 1
			FROM run_events WHERE run_id = ?`, p.LeaseID, p.RunID).Scan(&last, &runSeq); err != nil {
			return err
		}
		switch {
		case p.Seq <= last:
			res.Duplicate = true
			return nil
		case p.Seq > last+1:
			return protocol.Errorf(protocol.CodeConflict, "Event %d of this lease arrived before event %d.", p.Seq, last+1).
				With("reason", "sequence_gap").With("expectedSeq", last+1)
		}
		if r.Status.Terminal() {
			if r.Error != nil && r.Error.Details["reason"] == protocol.ReasonAgentLost {
				// Ended because this lease expired: the lease is what the
				// agent lost (protocol/README.md), whichever control
				// plane's maintenance ended it.
				return errLeaseLost()
			}
			return errRunFinished(r.Status)
		}
		body := p.Body
		if len(body) == 0 {
			body = json.RawMessage("{}")
		}
		if _, err := s.exec(ctx, tx, `INSERT INTO run_events (run_id, seq, lease_id, lease_seq, kind, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			p.RunID, runSeq, p.LeaseID, p.Seq, p.Kind, string(body), ms(s.now())); err != nil {
			return err
		}
		return s.applyEvent(ctx, tx, r, p, res)
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}

func (s *DB) applyEvent(ctx context.Context, tx *sql.Tx, r *store.Run, p store.RunEventParams, res *store.RunEventResult) error {
	now := s.now()
	step := func() (*store.StepRecord, error) {
		if p.Step == nil || *p.Step < 0 || *p.Step >= len(r.Steps) {
			return nil, protocol.FieldErrors(protocol.CodeUnprocessableEntity, "The event names no step of this run.",
				[]protocol.FieldProblem{{Field: "step", Problem: fmt.Sprintf("must be from 0 to %d", len(r.Steps)-1)}})
		}
		return &r.Steps[*p.Step], nil
	}
	saveSteps := func(extra string, args ...any) error {
		_, err := s.exec(ctx, tx, `UPDATE runs SET steps = ?`+extra+` WHERE id = ?`, append(append([]any{jsonOrEmpty(r.Steps, "[]")}, args...), r.ID)...)
		return err
	}
	switch protocol.EventKind(p.Kind) {
	case protocol.EventStarted:
		if r.Status == protocol.RunQueued {
			return s.startClaimed(ctx, tx, r)
		}
		return nil
	case protocol.EventStepStarted:
		st, err := step()
		if err != nil {
			return err
		}
		st.Status, st.StartedAt, st.Error = protocol.StepRunning, &now, nil
		st.Attempts = max(st.Attempts, p.Attempts, 1)
		return saveSteps("")
	case protocol.EventStepFinished:
		st, err := step()
		if err != nil {
			return err
		}
		st.Status, st.DurationMs, st.Error = protocol.StepStatus(p.Status), p.DurationMs, p.Error
		st.Attempts = max(st.Attempts, p.Attempts)
		if p.OutputName != "" && p.Output != nil {
			if r.Outputs == nil {
				r.Outputs = map[string]any{}
			}
			r.Outputs[p.OutputName] = p.Output
			return saveSteps(`, outputs = ?`, jsonOrEmpty(r.Outputs, "{}"))
		}
		return saveSteps("")
	case protocol.EventApprovalRequested:
		if _, err := step(); err != nil {
			return err
		}
		n, err := s.exec(ctx, tx, `UPDATE runs SET status = 'awaiting_approval' WHERE id = ? AND status = 'running'`, r.ID)
		if err != nil {
			return err
		}
		if n == 0 {
			return protocol.Errorf(protocol.CodeConflict, "The run is not running.").With("status", r.Status)
		}
		r.Status = protocol.RunAwaitingApproval
		a := &store.Approval{ID: ids.New(ids.Approval), AccountID: r.AccountID, RunID: r.ID, WorkflowID: r.WorkflowID, Step: *p.Step,
			Message: p.Message, Status: protocol.ApprovalPending, CreatedAt: now}
		_, err = s.exec(ctx, tx, `INSERT INTO approvals (id, account_id, run_id, workflow_id, step, message, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			a.ID, a.AccountID, a.RunID, a.WorkflowID, a.Step, a.Message, a.Status, ms(a.CreatedAt))
		res.Approval = a
		return err
	case protocol.EventFinished:
		outputs := r.Outputs
		if len(p.Outputs) > 0 {
			outputs = make(map[string]any, len(r.Outputs)+len(p.Outputs))
			for k, v := range r.Outputs {
				outputs[k] = v
			}
			for k, v := range p.Outputs {
				outputs[k] = v
			}
		}
		// Steps never reported end as skipped (a run that stopped early).
		for i := range r.Steps {
			if r.Steps[i].Status == protocol.StepPending || (r.Steps[i].Status == protocol.StepRunning && protocol.RunStatus(p.Status) == protocol.RunSucceeded) {
				r.Steps[i].Status = protocol.StepSkipped
			}
		}
		_, err := s.finishRun(ctx, tx, r, protocol.RunStatus(p.Status), p.Error, outputs, r.Steps)
		return err
	}
	return protocol.Errorf(protocol.CodeUnprocessableEntity, "Unknown event kind.").With("kind", p.Kind)
}

// startClaimed starts a run that is claimed under its lease (accept).
func (s *DB) startClaimed(ctx context.Context, tx *sql.Tx, r *store.Run) error {
	now := s.now()
	n, err := s.exec(ctx, tx, `UPDATE runs SET status = 'running', started_at = ?, queue_reason = NULL, queue_since = NULL
		WHERE id = ? AND status = 'queued' AND lease_id = ?`, ms(now), r.ID, r.LeaseID)
	if err != nil || n == 0 {
		return err
	}
	charged, err := s.captureHold(ctx, tx, r.ID)
	r.Status, r.StartedAt, r.CostCharged = protocol.RunRunning, &now, charged
	return err
}

func (s *DB) RunEventList(ctx context.Context, runID string) ([]*store.RunEvent, error) {
	return queryAll(ctx, s, `SELECT run_id, seq, lease_id, lease_seq, kind, body, created_at FROM run_events WHERE run_id = ? ORDER BY seq`, []any{runID},
		func(row interface{ Scan(...any) error }) (*store.RunEvent, error) {
			var e store.RunEvent
			var body string
			var created int64
			if err := row.Scan(&e.RunID, &e.Seq, &e.LeaseID, &e.LeaseSeq, &e.Kind, &body, &created); err != nil {
				return nil, err
			}
			e.Body, e.CreatedAt = json.RawMessage(body), fromMs(created)
			return &e, nil
		})
}

func (s *DB) RunDueList(ctx context.Context, now time.Time, cancelGrace time.Duration, limit int) (*store.DueRuns, error) {
	n, g := ms(now), cancelGrace.Milliseconds()
	var due store.DueRuns
	var err error
	list := func(where string, args ...any) []*store.Run {
		if err != nil {
			return nil
		}
		var rows []*store.Run
		rows, err = queryAll(ctx, s, `SELECT `+runColumns+` FROM runs WHERE `+where+` ORDER BY queued_at`+limitClause(limit), args, scanRun)
		return rows
	}
	due.LeaseExpired = list(`lease_id IS NOT NULL AND status IN `+activeRunStates+` AND lease_expires_at < ?`, n)
	due.CancelOverdue = list(`status IN ('running', 'awaiting_approval') AND cancel_requested_at IS NOT NULL AND cancel_requested_at + ? < ?`, g, n)
	due.TimedOut = list(`status IN ('running', 'awaiting_approval') AND timeout_ms > 0 AND started_at + timeout_ms + ? < ?`, g, n)
	due.QueueTimedOut = list(`status = 'queued' AND lease_id IS NULL AND queue_timeout_ms > 0 AND queued_at + queue_timeout_ms < ?`, n)
	return &due, err
}

// errNothingDue reports that a maintenance action found the run already moved on.
var errNothingDue = errors.New("nothing due")

func (s *DB) RunExpireLease(ctx context.Context, runID, leaseID string, now time.Time) (*store.Run, error) {
	var out *store.Run
	err := s.tx(ctx, func(tx *sql.Tx) error {
		r, err := s.getRunTx(ctx, tx, runID)
		if err != nil {
			return err
		}
		if r.LeaseID != leaseID || r.Status.Terminal() || r.LeaseExpiresAt == nil || !r.LeaseExpiresAt.Before(now) {
			return errNothingDue
		}
		if r.Status == protocol.RunQueued {
			_, err := s.exec(ctx, tx, `UPDATE runs SET lease_id = NULL, agent_id = NULL, lease_expires_at = NULL, assigned_at = NULL WHERE id = ?`, r.ID)
			r.LeaseID, r.AgentID, r.LeaseExpiresAt, r.AssignedAt = "", "", nil, nil
			out = r
			return err
		}
		lost := protocol.Errorf(protocol.CodeInternal, "The agent running this run stopped answering.").With("reason", protocol.ReasonAgentLost)
		out, err = s.finishRun(ctx, tx, r, protocol.RunFailed, lost, nil, nil)
		return err
	})
	if errors.Is(err, errNothingDue) {
		return nil, nil
	}
	return out, err
}

func (s *DB) ArtifactPut(ctx context.Context, a store.Artifact) error {
	_, err := s.exec(ctx, s.w, `INSERT INTO artifacts (run_id, name, content_type, size, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?)
		ON CONFLICT (run_id, name) DO UPDATE SET content_type = excluded.content_type, size = excluded.size, sha256 = excluded.sha256, created_at = excluded.created_at`,
		a.RunID, a.Name, a.ContentType, a.Size, a.SHA256, ms(s.now()))
	return err
}

func scanArtifact(row interface{ Scan(...any) error }) (*store.Artifact, error) {
	var a store.Artifact
	var created int64
	if err := row.Scan(&a.RunID, &a.Name, &a.ContentType, &a.Size, &a.SHA256, &created); err != nil {
		return nil, err
	}
	a.CreatedAt = fromMs(created)
	return &a, nil
}

func (s *DB) ArtifactList(ctx context.Context, runID string) ([]*store.Artifact, error) {
	return queryAll(ctx, s, `SELECT run_id, name, content_type, size, sha256, created_at FROM artifacts WHERE run_id = ? ORDER BY created_at, name`, []any{runID}, scanArtifact)
}

func (s *DB) ArtifactGet(ctx context.Context, runID, name string) (*store.Artifact, error) {
	a, err := scanArtifact(s.queryRow(ctx, s.r, `SELECT run_id, name, content_type, size, sha256, created_at FROM artifacts WHERE run_id = ? AND name = ?`, runID, name))
	return a, notFound(err, protocol.CodeNotFound)
}

// errRunFinished refuses a frame about a run that has ended (API.md §9: the
// agent drops the run).
func errRunFinished(status protocol.RunStatus) error {
	return protocol.Errorf(protocol.CodeConflict, "The run has already finished.").With("status", status).With("reason", "run_finished")
}
