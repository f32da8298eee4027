package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/copelf/copelf/controlplane/internal/coupons"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const couponColumns = `id, code, credits, max_redemptions, redeemed, starts_at, expires_at, active, created_at`

func scanCoupon(row interface{ Scan(...any) error }) (*store.Coupon, error) {
	var c store.Coupon
	var maxRed, starts, expires sql.NullInt64
	var active int
	var created int64
	if err := row.Scan(&c.ID, &c.Code, &c.Credits, &maxRed, &c.Redeemed, &starts, &expires, &active, &created); err != nil {
		return nil, err
	}
	if maxRed.Valid {
		c.MaxRedemptions = &maxRed.Int64
	}
	c.StartsAt, c.ExpiresAt, c.Active, c.CreatedAt = fromNullMs(starts), fromNullMs(expires), active != 0, fromMs(created)
	return &c, nil
}

// msTrunc is t at the stored precision, or nil.
func msTrunc(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	v := t.UTC().Truncate(time.Millisecond)
	return &v
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// CouponCreate inserts a coupon under its normalised code; the unique code
// makes a second coupon with the same code (in any case) a conflict.
func (s *DB) CouponCreate(ctx context.Context, p store.CouponCreateParams) (*store.Coupon, error) {
	c := &store.Coupon{
		ID: ids.New(ids.Coupon), Code: coupons.Normalize(p.Code), Credits: p.Credits, MaxRedemptions: p.MaxRedemptions,
		StartsAt: msTrunc(p.StartsAt), ExpiresAt: msTrunc(p.ExpiresAt), Active: p.Active, CreatedAt: s.now(),
	}
	_, err := s.exec(ctx, s.w, `INSERT INTO coupons (id, code, credits, max_redemptions, redeemed, starts_at, expires_at, active, created_at)
		VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)`,
		c.ID, c.Code, c.Credits, c.MaxRedemptions, msPtr(c.StartsAt), msPtr(c.ExpiresAt), boolInt(c.Active), ms(c.CreatedAt))
	if err != nil {
		if s.d.uniqueViolation(err) {
			return nil, protocol.Errorf(protocol.CodeConflict, "A coupon with this code already exists.").With("field", "code")
		}
		return nil, err
	}
	return c, nil
}

func (s *DB) CouponGet(ctx context.Context, code string) (*store.Coupon, error) {
	c, err := scanCoupon(s.r.QueryRowContext(ctx, s.q(`SELECT `+couponColumns+` FROM coupons WHERE code = ?`), coupons.Normalize(code)))
	return c, notFound(err, protocol.CodeCouponNotFound)
}

func (s *DB) CouponList(ctx context.Context, page store.Page) ([]*store.Coupon, string, error) {
	query, args, limit, err := pageQuery(`SELECT `+couponColumns+` FROM coupons WHERE 1 = 1`, "created_at", nil, page)
	if err != nil {
		return nil, "", err
	}
	items, err := queryAll(ctx, s, query, args, scanCoupon)
	if err != nil {
		return nil, "", err
	}
	items, next := trimPage(items, limit, func(c *store.Coupon) cursor { return cursor{ms(c.CreatedAt), c.ID} })
	return items, next, nil
}

func (s *DB) CouponDeactivate(ctx context.Context, code string) (*store.Coupon, error) {
	var out *store.Coupon
	err := s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := s.exec(ctx, tx, `UPDATE coupons SET active = 0 WHERE code = ?`, coupons.Normalize(code)); err != nil {
			return err
		}
		var err error
		out, err = scanCoupon(tx.QueryRowContext(ctx, s.q(`SELECT `+couponColumns+` FROM coupons WHERE code = ?`), coupons.Normalize(code)))
		return notFound(err, protocol.CodeCouponNotFound)
	})
	return out, err
}

// CouponRedeem: in one transaction, check the coupon's window, record the
// redemption (UNIQUE (coupon_id, account_id)), take one of the capped
// redemptions (a guarded increment), and grant the credits (ledger key
// "coupon:<couponId>:<accountId>"). A failure at any step rolls back all.
func (s *DB) CouponRedeem(ctx context.Context, p store.CouponRedeemParams) (*store.CouponRedemption, error) {
	var out *store.CouponRedemption
	err := s.tx(ctx, func(tx *sql.Tx) error {
		c, err := scanCoupon(tx.QueryRowContext(ctx, s.q(`SELECT `+couponColumns+` FROM coupons WHERE code = ?`+s.d.forUpdate), coupons.Normalize(p.Code)))
		if errors.Is(err, sql.ErrNoRows) {
			return coupons.NotFound()
		}
		if err != nil {
			return err
		}
		if err := coupons.Usable(coupons.Window{Active: c.Active, StartsAt: c.StartsAt, ExpiresAt: c.ExpiresAt}, s.now()); err != nil {
			return err
		}
		now := s.now()
		ledgerID := ids.New(ids.Ledger)
		n, err := s.exec(ctx, tx, `INSERT INTO coupon_redemptions (id, coupon_id, account_id, ledger_id, created_at) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (coupon_id, account_id) DO NOTHING`, ids.New("rdm"), c.ID, p.AccountID, ledgerID, ms(now))
		if err != nil {
			return err
		}
		if n == 0 {
			return coupons.AlreadyRedeemed()
		}
		n, err = s.exec(ctx, tx, `UPDATE coupons SET redeemed = redeemed + 1 WHERE id = ? AND (max_redemptions IS NULL OR redeemed < max_redemptions)`, c.ID)
		if err != nil {
			return err
		}
		if n == 0 {
			return coupons.CapReached()
		}
		n, err = s.exec(ctx, tx, `UPDATE accounts SET balance = balance + ? WHERE id = ?`, c.Credits, p.AccountID)
		if err != nil {
			return err
		}
		if n == 0 {
			return protocol.Errorf(protocol.CodeNotFound, "The account does not exist.")
		}
		n, err = s.exec(ctx, tx, `INSERT INTO ledger (id, account_id, kind, amount, run_id, coupon_code, reason, idem_key, created_at)
			VALUES (?, ?, ?, ?, NULL, ?, NULL, ?, ?) ON CONFLICT (idem_key) DO NOTHING`,
			ledgerID, p.AccountID, store.LedgerCoupon, c.Credits, c.Code, "coupon:"+c.ID+":"+p.AccountID, ms(now))
		if err != nil {
			return err
		}
		if n == 0 {
			// The redemption row is unique, so its grant cannot exist yet;
			// refuse rather than grant twice.
			return coupons.AlreadyRedeemed()
		}
		credits, err := s.creditsOn(ctx, tx, p.AccountID)
		if err != nil {
			return err
		}
		out = &store.CouponRedemption{
			CouponID: c.ID, Credited: c.Credits, Balance: credits.Balance,
			Entry: &store.LedgerEntry{ID: ledgerID, AccountID: p.AccountID, Kind: store.LedgerCoupon, Amount: c.Credits, CouponCode: c.Code, CreatedAt: now},
		}
		return nil
	})
	return out, err
}
