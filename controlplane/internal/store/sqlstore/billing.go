package sqlstore

import (
	"context"
	"database/sql"
	"errors"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func (s *DB) AccountStripeCustomer(ctx context.Context, accountID string) (string, error) {
	var id sql.NullString
	err := s.r.QueryRowContext(ctx, s.q(`SELECT stripe_customer_id FROM accounts WHERE id = ?`), accountID).Scan(&id)
	return id.String, notFound(err, protocol.CodeNotFound)
}

// AccountStripeCustomerLink sets the customer only where none is set (a
// guarded update), then answers whichever customer is linked: two checkouts
// racing to link their own customers both end up with the first.
func (s *DB) AccountStripeCustomerLink(ctx context.Context, accountID, customerID string) (string, error) {
	if customerID == "" {
		return "", errors.New("link an empty Stripe customer id")
	}
	var linked sql.NullString
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `UPDATE accounts SET stripe_customer_id = ? WHERE id = ? AND stripe_customer_id IS NULL`, customerID, accountID); err != nil {
			if s.d.uniqueViolation(err) {
				return protocol.Errorf(protocol.CodeConflict, "The Stripe customer is linked to another account.")
			}
			return err
		}
		err := tx.QueryRowContext(ctx, s.q(`SELECT stripe_customer_id FROM accounts WHERE id = ?`), accountID).Scan(&linked)
		return notFound(err, protocol.CodeNotFound)
	})
	return linked.String, err
}

const checkoutColumns = `id, account_id, price_id, credits, status, created_at, updated_at`

func scanCheckout(row interface{ Scan(...any) error }) (*store.CheckoutSession, error) {
	var c store.CheckoutSession
	var created, updated int64
	if err := row.Scan(&c.ID, &c.AccountID, &c.PriceID, &c.Credits, &c.Status, &created, &updated); err != nil {
		return nil, err
	}
	c.CreatedAt, c.UpdatedAt = fromMs(created), fromMs(updated)
	return &c, nil
}

func (s *DB) CheckoutGet(ctx context.Context, sessionID string) (*store.CheckoutSession, error) {
	c, err := scanCheckout(s.r.QueryRowContext(ctx, s.q(`SELECT `+checkoutColumns+` FROM checkout_sessions WHERE id = ?`), sessionID))
	return c, notFound(err, protocol.CodeNotFound)
}

// CheckoutUpdate: in one transaction, record the session (first report) or
// move its status on (store.CheckoutStatus.Next, applied with a
// compare-and-set on the status it read), and when it is paid append the
// purchase under the ledger key "stripe:checkout:<sessionId>". Only the call
// whose insert of that key succeeds moves the balance, so the grant happens
// once however many calls race, in whatever order.
func (s *DB) CheckoutUpdate(ctx context.Context, p store.CheckoutUpdateParams) (*store.CheckoutResult, error) {
	if p.SessionID == "" || !p.Status.Valid() {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "A checkout update needs a session id and a known status.")
	}
	var out store.CheckoutResult
	err := s.tx(ctx, func(tx *sql.Tx) error {
		out = store.CheckoutResult{}
		now := ms(s.now())
		get := func() (*store.CheckoutSession, error) {
			return scanCheckout(tx.QueryRowContext(ctx, s.q(`SELECT `+checkoutColumns+` FROM checkout_sessions WHERE id = ?`+s.d.forUpdate), p.SessionID))
		}
		cur, err := get()
		if errors.Is(err, sql.ErrNoRows) {
			if _, err := s.creditsOn(ctx, tx, p.AccountID); err != nil {
				return err // not_found: nothing is written for an unknown account
			}
			if p.Credits <= 0 || p.PriceID == "" {
				return protocol.Errorf(protocol.CodeBadRequest, "A new checkout session needs a price and its credits.")
			}
			if _, err := s.exec(ctx, tx, `INSERT INTO checkout_sessions (`+checkoutColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
				p.SessionID, p.AccountID, p.PriceID, p.Credits, p.Status, now, now); err != nil {
				return err
			}
			cur, err = get()
		}
		if err != nil {
			return err
		}
		if next := cur.Status.Next(p.Status); next != cur.Status {
			n, err := s.exec(ctx, tx, `UPDATE checkout_sessions SET status = ?, updated_at = ? WHERE id = ? AND status = ?`, next, now, cur.ID, cur.Status)
			if err != nil {
				return err
			}
			if n == 1 {
				cur.Status, cur.UpdatedAt = next, fromMs(now)
			} else if cur, err = get(); err != nil {
				return err
			}
		}
		out.Session = cur
		if cur.Status != store.CheckoutPaid {
			return nil
		}
		key := "stripe:checkout:" + cur.ID
		id, inserted, err := s.appendLedger(ctx, tx, cur.AccountID, store.LedgerPurchase, cur.Credits, "", "", "checkout "+cur.ID+" ("+cur.PriceID+")", key)
		if err != nil {
			return err
		}
		if inserted {
			if _, err := s.exec(ctx, tx, `UPDATE accounts SET balance = balance + ? WHERE id = ?`, cur.Credits, cur.AccountID); err != nil {
				return err
			}
			out.Granted = true
		}
		q := `SELECT ` + ledgerColumns + ` FROM ledger WHERE idem_key = ?`
		arg := key
		if inserted {
			q, arg = `SELECT `+ledgerColumns+` FROM ledger WHERE id = ?`, id
		}
		out.Entry, err = scanLedger(tx.QueryRowContext(ctx, s.q(q), arg))
		return err
	})
	if err != nil {
		return nil, err
	}
	return &out, nil
}
