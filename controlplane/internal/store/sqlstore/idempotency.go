package sqlstore

import (
	"context"
	"database/sql"
	"errors"

	"github.com/copelf/copelf/controlplane/internal/store"
)

// IdempotencyBegin reserves (account, key). If it is taken, the stored record
// is returned with false.
func (s *DB) IdempotencyBegin(ctx context.Context, rec store.IdempotencyRecord) (*store.IdempotencyRecord, bool, error) {
	n, err := s.exec(ctx, s.w, `INSERT INTO idempotency_keys (account_id, idem_key, request_hash, done, status, created_at) VALUES (?, ?, ?, 0, 0, ?)
		ON CONFLICT (account_id, idem_key) DO NOTHING`, rec.AccountID, rec.Key, rec.RequestHash, ms(s.now()))
	if err != nil {
		return nil, false, err
	}
	if n == 1 {
		return nil, true, nil
	}
	var got store.IdempotencyRecord
	var done int
	var body sql.NullString
	var created int64
	err = s.queryRow(ctx, s.w, `SELECT account_id, idem_key, request_hash, done, status, body, created_at FROM idempotency_keys WHERE account_id = ? AND idem_key = ?`,
		rec.AccountID, rec.Key).Scan(&got.AccountID, &got.Key, &got.RequestHash, &done, &got.Status, &body, &created)
	if errors.Is(err, sql.ErrNoRows) {
		// Aborted between our insert and read: try once more.
		return s.IdempotencyBegin(ctx, rec)
	}
	if err != nil {
		return nil, false, err
	}
	got.Done, got.Body, got.CreatedAt = done != 0, []byte(body.String), fromMs(created)
	return &got, false, nil
}

// IdempotencyFinish stores the response of a reserved key.
func (s *DB) IdempotencyFinish(ctx context.Context, rec store.IdempotencyRecord) error {
	_, err := s.exec(ctx, s.w, `UPDATE idempotency_keys SET done = 1, status = ?, body = ? WHERE account_id = ? AND idem_key = ?`,
		rec.Status, string(rec.Body), rec.AccountID, rec.Key)
	return err
}

// IdempotencyAbort frees a reserved key whose request failed, so it may be retried.
func (s *DB) IdempotencyAbort(ctx context.Context, accountID, key string) error {
	_, err := s.exec(ctx, s.w, `DELETE FROM idempotency_keys WHERE account_id = ? AND idem_key = ? AND done = 0`, accountID, key)
	return err
}
