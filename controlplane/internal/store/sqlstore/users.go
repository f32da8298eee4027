package sqlstore

import (
	"context"
	"database/sql"
	"strings"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const userColumns = `id, email, password_hash, role, plan, created_at`

func scanUser(row interface{ Scan(...any) error }) (*store.User, error) {
	var u store.User
	var created int64
	if err := row.Scan(&u.ID, &u.Email, &u.PasswordHash, &u.Role, &u.Plan, &created); err != nil {
		return nil, err
	}
	u.CreatedAt = fromMs(created)
	return &u, nil
}

// UserCreate creates a user and its account. Emails are unique regardless of case.
func (s *DB) UserCreate(ctx context.Context, p store.UserCreateParams) (*store.User, error) {
	u := &store.User{ID: ids.New(ids.User), Email: p.Email, PasswordHash: p.PasswordHash, Role: p.Role, Plan: p.Plan, CreatedAt: s.now()}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `INSERT INTO users (id, email, email_lower, password_hash, role, plan, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			u.ID, u.Email, strings.ToLower(u.Email), u.PasswordHash, u.Role, u.Plan, ms(u.CreatedAt))
		if err != nil {
			if s.d.uniqueViolation(err) {
				return protocol.Errorf(protocol.CodeConflict, "A user with this email already exists.").With("field", "email")
			}
			return err
		}
		_, err = s.exec(ctx, tx, `INSERT INTO accounts (id, balance, held) VALUES (?, 0, 0)`, u.ID)
		return err
	})
	if err != nil {
		return nil, err
	}
	return u, nil
}

func (s *DB) UserGet(ctx context.Context, id string) (*store.User, error) {
	u, err := scanUser(s.queryRow(ctx, s.r, `SELECT `+userColumns+` FROM users WHERE id = ?`, id))
	return u, notFound(err, protocol.CodeNotFound)
}

func (s *DB) UserGetByEmail(ctx context.Context, email string) (*store.User, error) {
	u, err := scanUser(s.queryRow(ctx, s.r, `SELECT `+userColumns+` FROM users WHERE email_lower = ?`, strings.ToLower(email)))
	return u, notFound(err, protocol.CodeNotFound)
}

const tokenColumns = `id, user_id, kind, name, hash, created_at, expires_at, revoked_at`

func scanToken(row interface{ Scan(...any) error }, extra ...any) (*store.Token, error) {
	var t store.Token
	var created int64
	var expires, revoked sql.NullInt64
	dest := append([]any{&t.ID, &t.UserID, &t.Kind, &t.Name, &t.Hash, &created, &expires, &revoked}, extra...)
	if err := row.Scan(dest...); err != nil {
		return nil, err
	}
	t.CreatedAt = fromMs(created)
	t.ExpiresAt = fromNullMs(expires)
	t.RevokedAt = fromNullMs(revoked)
	return &t, nil
}

func (s *DB) TokenCreate(ctx context.Context, p store.TokenCreateParams) (*store.Token, error) {
	t := &store.Token{ID: ids.New(ids.Token), UserID: p.UserID, Kind: p.Kind, Name: p.Name, Hash: p.Hash, CreatedAt: s.now(), ExpiresAt: p.ExpiresAt}
	_, err := s.exec(ctx, s.w, `INSERT INTO tokens (id, user_id, kind, name, hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)`,
		t.ID, t.UserID, t.Kind, t.Name, t.Hash, ms(t.CreatedAt), msPtr(t.ExpiresAt))
	if err != nil {
		if s.d.uniqueViolation(err) {
			return nil, protocol.Errorf(protocol.CodeConflict, "This token already exists.")
		}
		return nil, err
	}
	return t, nil
}

// TokenGetByHash returns a live (not revoked) token and its user. Expiry is the
// caller's to judge: an expired session answers differently from an unknown one.
func (s *DB) TokenGetByHash(ctx context.Context, hash string) (*store.Token, *store.User, error) {
	var u store.User
	var ucreated int64
	t, err := scanToken(s.queryRow(ctx, s.r, `SELECT t.id, t.user_id, t.kind, t.name, t.hash, t.created_at, t.expires_at, t.revoked_at,
		u.id, u.email, u.password_hash, u.role, u.plan, u.created_at
		FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = ? AND t.revoked_at IS NULL`, hash),
		&u.ID, &u.Email, &u.PasswordHash, &u.Role, &u.Plan, &ucreated)
	if err != nil {
		return nil, nil, notFound(err, protocol.CodeUnauthenticated)
	}
	u.CreatedAt = fromMs(ucreated)
	return t, &u, nil
}

// TokenList lists a user's live tokens other than sessions.
func (s *DB) TokenList(ctx context.Context, userID string) ([]*store.Token, error) {
	rows, err := s.r.QueryContext(ctx, s.q(`SELECT `+tokenColumns+` FROM tokens WHERE user_id = ? AND revoked_at IS NULL AND kind <> 'session' ORDER BY created_at, id`), userID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []*store.Token{}
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// TokenRevoke revokes one of the user's tokens; another user's token is not found.
func (s *DB) TokenRevoke(ctx context.Context, userID, id string) error {
	n, err := s.exec(ctx, s.w, `UPDATE tokens SET revoked_at = ? WHERE id = ? AND user_id = ? AND revoked_at IS NULL`, ms(s.now()), id, userID)
	if err != nil {
		return err
	}
	if n == 0 {
		return protocol.Errorf(protocol.CodeNotFound, "The token does not exist.")
	}
	return nil
}
