package sqlstore

import (
	"context"
	"database/sql"
	"errors"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// holdCredits raises the account's held amount by amount if that many
// credits are available, in one guarded update.
func (s *DB) holdCredits(ctx context.Context, tx *sql.Tx, accountID string, amount int64) error {
	if amount == 0 {
		return nil
	}
	n, err := s.exec(ctx, tx, `UPDATE accounts SET held = held + ? WHERE id = ? AND balance - held >= ?`, amount, accountID, amount)
	if err != nil {
		return err
	}
	if n == 1 {
		return nil
	}
	c, err := s.creditsOn(ctx, tx, accountID)
	if err != nil {
		return err
	}
	return protocol.NewError(protocol.CodeInsufficientCredits).With("required", amount).With("available", c.Available)
}

func (s *DB) insertHold(ctx context.Context, tx *sql.Tx, accountID, runID string, amount int64) error {
	_, err := s.exec(ctx, tx, `INSERT INTO credit_holds (id, account_id, run_id, amount, status, created_at) VALUES (?, ?, ?, ?, 'pending', ?)`,
		ids.New(ids.Hold), accountID, runID, amount, ms(s.now()))
	return err
}

// resolveHold moves a pending hold to status at most once and returns its
// account and amount; ok is false when it was not pending.
func (s *DB) resolveHold(ctx context.Context, tx *sql.Tx, runID, status string) (accountID string, amount int64, ok bool, err error) {
	err = s.queryRow(ctx, tx, `UPDATE credit_holds SET status = ?, resolved_at = ? WHERE run_id = ? AND status = 'pending' RETURNING account_id, amount`,
		status, ms(s.now()), runID).Scan(&accountID, &amount)
	if errors.Is(err, sql.ErrNoRows) {
		return "", 0, false, nil
	}
	return accountID, amount, err == nil, err
}

// voidHold releases a run's hold, if still pending.
func (s *DB) voidHold(ctx context.Context, tx *sql.Tx, runID string) error {
	accountID, amount, ok, err := s.resolveHold(ctx, tx, runID, "voided")
	if err != nil || !ok {
		return err
	}
	_, err = s.exec(ctx, tx, `UPDATE accounts SET held = held - ? WHERE id = ?`, amount, accountID)
	return err
}

// captureHold turns a run's pending hold into a charge and returns the amount.
func (s *DB) captureHold(ctx context.Context, tx *sql.Tx, runID string) (int64, error) {
	accountID, amount, ok, err := s.resolveHold(ctx, tx, runID, "captured")
	if err != nil || !ok {
		return 0, err
	}
	if _, err := s.exec(ctx, tx, `UPDATE accounts SET held = held - ?, balance = balance - ? WHERE id = ?`, amount, amount, accountID); err != nil {
		return 0, err
	}
	if _, _, err := s.appendLedger(ctx, tx, accountID, store.LedgerRunCharge, -amount, runID, "", "", "run:"+runID+":charge"); err != nil {
		return 0, err
	}
	_, err = s.exec(ctx, tx, `UPDATE runs SET cost_charged = ? WHERE id = ?`, amount, runID)
	return amount, err
}

// refundRun gives back what a started run was charged, at most once.
func (s *DB) refundRun(ctx context.Context, tx *sql.Tx, r *store.Run) error {
	if r.CostCharged == 0 {
		return nil
	}
	_, inserted, err := s.appendLedger(ctx, tx, r.AccountID, store.LedgerRunRefund, r.CostCharged, r.ID, "", "", "run:"+r.ID+":refund")
	if err != nil || !inserted {
		return err
	}
	if _, err := s.exec(ctx, tx, `UPDATE accounts SET balance = balance + ? WHERE id = ?`, r.CostCharged, r.AccountID); err != nil {
		return err
	}
	_, err = s.exec(ctx, tx, `UPDATE runs SET cost_charged = 0 WHERE id = ?`, r.ID)
	return err
}

// appendLedger inserts an entry; with a key it inserts at most once and
// reports whether this call inserted it.
func (s *DB) appendLedger(ctx context.Context, tx *sql.Tx, accountID, kind string, amount int64, runID, couponCode, reason, key string) (string, bool, error) {
	id := ids.New(ids.Ledger)
	n, err := s.exec(ctx, tx, `INSERT INTO ledger (id, account_id, kind, amount, run_id, coupon_code, reason, idem_key, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING`,
		id, accountID, kind, amount, nullString(runID), nullString(couponCode), nullString(reason), nullString(key), ms(s.now()))
	return id, n == 1, err
}

func (s *DB) creditsOn(ctx context.Context, q querier, accountID string) (store.Credits, error) {
	var c store.Credits
	err := s.queryRow(ctx, q, `SELECT balance, held FROM accounts WHERE id = ?`, accountID).Scan(&c.Balance, &c.Held)
	if err != nil {
		return c, notFound(err, protocol.CodeNotFound)
	}
	c.Available = c.Balance - c.Held
	return c, nil
}

func (s *DB) CreditsGet(ctx context.Context, accountID string) (store.Credits, error) {
	return s.creditsOn(ctx, s.r, accountID)
}

// CreditsGrant adds (or, negative, removes) credits. Removing more than is
// available is insufficient_credits. With a key, the grant happens once and
// a repeat returns the first entry.
func (s *DB) CreditsGrant(ctx context.Context, p store.CreditsGrantParams) (*store.LedgerEntry, error) {
	var out *store.LedgerEntry
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if p.Key != "" {
			// A repeat answers with the first entry before any check: a
			// repeated deduction must not fail for want of credits it
			// already took.
			e, err := scanLedger(s.queryRow(ctx, tx, `SELECT `+ledgerColumns+` FROM ledger WHERE idem_key = ?`, p.Key))
			if err == nil {
				out = e
				return errAlreadyDone
			}
			if !errors.Is(err, sql.ErrNoRows) {
				return err
			}
		}
		n, err := s.exec(ctx, tx, `UPDATE accounts SET balance = balance + ? WHERE id = ? AND balance + ? >= held`, p.Amount, p.AccountID, p.Amount)
		if err != nil {
			return err
		}
		if n == 0 {
			c, err := s.creditsOn(ctx, tx, p.AccountID)
			if err != nil {
				return err
			}
			return protocol.NewError(protocol.CodeInsufficientCredits).With("required", -p.Amount).With("available", c.Available)
		}
		id, inserted, err := s.appendLedger(ctx, tx, p.AccountID, p.Kind, p.Amount, "", "", p.Reason, p.Key)
		if err != nil {
			return err
		}
		if !inserted {
			// Already granted under this key: undo the balance change by
			// rolling back, and answer with the first entry.
			out, err = scanLedger(s.queryRow(ctx, tx, `SELECT `+ledgerColumns+` FROM ledger WHERE idem_key = ?`, p.Key))
			if err != nil {
				return err
			}
			return errAlreadyDone
		}
		out, err = scanLedger(s.queryRow(ctx, tx, `SELECT `+ledgerColumns+` FROM ledger WHERE id = ?`, id))
		return err
	})
	if errors.Is(err, errAlreadyDone) {
		return out, nil
	}
	return out, err
}

// errAlreadyDone rolls a transaction back whose effect already happened.
var errAlreadyDone = errors.New("already done")

const ledgerColumns = `id, account_id, kind, amount, run_id, coupon_code, reason, created_at`

func scanLedger(row interface{ Scan(...any) error }) (*store.LedgerEntry, error) {
	var e store.LedgerEntry
	var runID, coupon, reason sql.NullString
	var created int64
	if err := row.Scan(&e.ID, &e.AccountID, &e.Kind, &e.Amount, &runID, &coupon, &reason, &created); err != nil {
		return nil, err
	}
	e.RunID, e.CouponCode, e.Reason, e.CreatedAt = runID.String, coupon.String, reason.String, fromMs(created)
	return &e, nil
}

func (s *DB) LedgerList(ctx context.Context, accountID string, page store.Page) ([]*store.LedgerEntry, string, error) {
	query, args, limit, err := pageQuery(`SELECT `+ledgerColumns+` FROM ledger WHERE account_id = ?`, "created_at", []any{accountID}, page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanLedger)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(e *store.LedgerEntry) cursor { return cursor{ms(e.CreatedAt), e.ID} })
	return items, next, nil
}

func (s *DB) LedgerSum(ctx context.Context, accountID string) (int64, error) {
	var sum int64
	err := s.queryRow(ctx, s.r, `SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger WHERE account_id = ?`, accountID).Scan(&sum)
	return sum, err
}
