package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
)

// EventAppend inserts the events in one transaction, in order, by
// multi-row INSERTs of 64, 32, … 1 rows (few distinct statements, each
// prepared once). On PostgreSQL the table is locked for the transaction
// first: a sequence hands out ids at insert time, not commit time, and
// without the lock a reader could see id n+1 committed before id n and skip
// n for good. SQLite's single writer gives the same order by itself. Within
// a statement ids follow the VALUES order; RETURNING may list them in any
// order, so they are sorted.
func (s *DB) EventAppend(ctx context.Context, events []*store.Event) error {
	if len(events) == 0 {
		return nil
	}
	now := s.now()
	ids := make([]int64, 0, len(events))
	err := s.tx(ctx, func(tx *sql.Tx) error {
		ids = ids[:0]
		if s.d.name == "postgres" {
			if _, err := tx.ExecContext(ctx, `LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE`); err != nil {
				return err
			}
		}
		for rest := events; len(rest) > 0; {
			n := 64
			for n > len(rest) {
				n /= 2
			}
			args := make([]any, 0, 6*n)
			for _, ev := range rest[:n] {
				at := ev.CreatedAt
				if at.IsZero() {
					at = now
				}
				data := ev.Data
				if len(data) == 0 {
					data = json.RawMessage("null")
				}
				args = append(args, ev.AccountID, ev.Type, ev.SubjectID, nullString(ev.RunID), string(data), ms(at))
			}
			got, err := queryAll(ctx, s, `INSERT INTO events (account_id, type, subject_id, run_id, data, created_at) VALUES `+eventRows(n)+` RETURNING id`,
				args, func(row interface{ Scan(...any) error }) (int64, error) {
					var id int64
					return id, row.Scan(&id)
				}, tx)
			if err != nil {
				return err
			}
			if len(got) != n {
				return fmt.Errorf("event append: %d ids for %d rows", len(got), n)
			}
			slices.Sort(got)
			ids = append(ids, got...)
			rest = rest[n:]
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i, ev := range events {
		ev.ID = ids[i]
		if ev.CreatedAt.IsZero() {
			ev.CreatedAt = now
		}
	}
	return nil
}

// eventRows is the VALUES list of n events.
func eventRows(n int) string {
	return strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?, ?, ?), ", n), ", ")
}

const eventColumns = `id, account_id, type, subject_id, run_id, data, created_at`

func scanEvent(row interface{ Scan(...any) error }) (*store.Event, error) {
	var ev store.Event
	var runID sql.NullString
	var data string
	var created int64
	if err := row.Scan(&ev.ID, &ev.AccountID, &ev.Type, &ev.SubjectID, &runID, &data, &created); err != nil {
		return nil, err
	}
	ev.RunID, ev.Data, ev.CreatedAt = runID.String, json.RawMessage(data), fromMs(created)
	return &ev, nil
}

// EventsAfter reads on the read pool; each filter has its index
// (events_run, events_account), the unfiltered tail reads the primary key.
func (s *DB) EventsAfter(ctx context.Context, afterID int64, f store.EventFilter, limit int) ([]*store.Event, error) {
	query := `SELECT ` + eventColumns + ` FROM events WHERE id > ?`
	args := []any{afterID}
	if f.RunID != "" {
		query += ` AND run_id = ?`
		args = append(args, f.RunID)
	}
	if f.AccountID != "" {
		query += ` AND account_id = ?`
		args = append(args, f.AccountID)
	}
	return queryAll(ctx, s, query+` ORDER BY id`+limitClause(limit), args, scanEvent)
}

func (s *DB) EventLatestID(ctx context.Context, runID string) (int64, error) {
	var id sql.NullInt64
	var err error
	if runID == "" {
		err = s.queryRow(ctx, s.r, `SELECT MAX(id) FROM events`).Scan(&id)
	} else {
		err = s.queryRow(ctx, s.r, `SELECT MAX(id) FROM events WHERE run_id = ?`, runID).Scan(&id)
	}
	return id.Int64, err
}

func (s *DB) EventPrune(ctx context.Context, before time.Time) (int64, error) {
	// Bounded deletes: a large backlog does not hold the writer for long.
	var total int64
	for {
		var n int64
		err := s.tx(ctx, func(tx *sql.Tx) error {
			var err error
			n, err = s.exec(ctx, tx, `DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ? ORDER BY id LIMIT 5000)`, ms(before))
			return err
		})
		total += n
		if err != nil || n < 5000 {
			return total, err
		}
	}
}

// QueueStats reads the queued runs grouped by account, labels and claim,
// then the other stuck states, on the read pool. Every query walks an index
// of non-terminal rows (runs_status, approvals_one_pending,
// workflows_analysis).
func (s *DB) QueueStats(ctx context.Context, p store.QueueStatsParams) (*store.QueueStats, error) {
	out := &store.QueueStats{Stuck: map[string]store.StuckCounts{}}
	acct, args := "", []any{}
	if p.AccountID != "" {
		acct, args = ` AND account_id = ?`, []any{p.AccountID}
	}
	never := func(t time.Time) int64 {
		if t.IsZero() {
			return -1 // nothing is older than the epoch
		}
		return ms(t)
	}
	q := `SELECT account_id, COALESCE(labels, ''), CASE WHEN lease_id IS NULL THEN 0 ELSE 1 END, COUNT(*), MIN(queued_at),
		SUM(CASE WHEN (lease_id IS NULL AND queued_at < ?) OR (lease_id IS NOT NULL AND COALESCE(assigned_at, queued_at) < ?) THEN 1 ELSE 0 END)
		FROM runs WHERE status = 'queued'` + acct + ` GROUP BY 1, 2, 3 ORDER BY 1, 2, 3`
	groups, err := queryAll(ctx, s, q, append([]any{never(p.Stuck.Queued), never(p.Stuck.Assigned)}, args...),
		func(row interface{ Scan(...any) error }) (store.QueueGroup, error) {
			var g store.QueueGroup
			var labels string
			var claimed int
			var oldest int64
			if err := row.Scan(&g.AccountID, &labels, &claimed, &g.Count, &oldest, &g.Stuck); err != nil {
				return g, err
			}
			g.Claimed, g.OldestQueuedAt = claimed == 1, fromMs(oldest)
			if err := unmarshalAll(labels, &g.Labels); err != nil {
				return g, err
			}
			return g, nil
		})
	if err != nil {
		return nil, err
	}
	out.Groups = groups
	for _, g := range groups {
		c := out.Stuck[g.AccountID]
		if g.Claimed {
			c.Assigned += g.Stuck
		} else {
			c.Queued += g.Stuck
		}
		out.Stuck[g.AccountID] = c
	}
	type count struct {
		account string
		n       int64
	}
	scanCount := func(row interface{ Scan(...any) error }) (count, error) {
		var c count
		return c, row.Scan(&c.account, &c.n)
	}
	add := func(query string, since time.Time, set func(*store.StuckCounts, int64)) error {
		if since.IsZero() {
			return nil
		}
		rows, err := queryAll(ctx, s, query+acct+` GROUP BY account_id`, append([]any{ms(since)}, args...), scanCount)
		if err != nil {
			return err
		}
		for _, r := range rows {
			c := out.Stuck[r.account]
			set(&c, r.n)
			out.Stuck[r.account] = c
		}
		return nil
	}
	if err := add(`SELECT account_id, COUNT(*) FROM runs WHERE status IN ('running', 'awaiting_approval') AND cancel_requested_at < ?`,
		p.Stuck.Cancelling, func(c *store.StuckCounts, n int64) { c.Cancelling = n }); err != nil {
		return nil, err
	}
	if err := add(`SELECT account_id, COUNT(*) FROM approvals WHERE status = 'pending' AND created_at < ?`,
		p.Stuck.AwaitingApproval, func(c *store.StuckCounts, n int64) { c.AwaitingApproval = n }); err != nil {
		return nil, err
	}
	if err := add(`SELECT account_id, COUNT(*) FROM workflows WHERE status = 'analyzing' AND deleted_at IS NULL AND COALESCE(analysis_started_at, updated_at) < ?`,
		p.Stuck.Analyzing, func(c *store.StuckCounts, n int64) { c.Analyzing = n }); err != nil {
		return nil, err
	}
	return out, nil
}
