// Package sqlstore implements store.Store over database/sql. One body of SQL
// serves every dialect; the dialect supplies placeholders, row locks and the
// migrations. SQLite (modernc.org/sqlite, no cgo) is the embedded default: one
// writer connection whose transactions take the write lock up front
// (BEGIN IMMEDIATE) and a pool of read-only connections beside it (WAL).
package sqlstore

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

//go:embed migrations
var migrationsFS embed.FS

type dialect struct {
	name string
	// rebind turns ?-placeholders into the dialect's.
	rebind func(string) string
	// forUpdate is appended to a SELECT that locks the rows it reads.
	forUpdate string
	// uniqueViolation reports a unique-constraint error.
	uniqueViolation func(error) bool
	// retry, when set, reports an error after which a transaction (or a
	// statement outside one) is run again from the start: the database
	// aborted it (deadlock, serialization failure) and nothing of it took
	// effect. Transactions then run concurrently (retryTx).
	retry func(error) bool
	// unavailable reports an error that says the server cannot be reached.
	unavailable func(error) bool
	// driverCache: the driver prepares and caches statements itself, so
	// the store's statement cache is off.
	driverCache bool
}

// DB is a store.Store on a SQL database.
type DB struct {
	w, r *sql.DB
	d    dialect
	// wstmts and rstmts are the pools' prepared statements; wtx is the
	// write transaction in progress (the writer pool has one connection).
	wstmts, rstmts stmtCache
	wtx            atomic.Pointer[sql.Tx]
	// ckpt checkpoints the WAL off the writer's path (SQLite); may be nil.
	ckpt *checkpointer
	// group commits queued write transactions together (SQLite); nil runs
	// each transaction alone.
	group *groupCommitter
	// Now is the clock; tests may replace it before use.
	Now func() time.Time
}

var _ store.Store = (*DB)(nil)

// Open opens the database named by a URL: sqlite://path/to/file.db (relative
// or, with three slashes, absolute), or postgres://user@host:port/db?… (also
// postgresql://; pgx's parameters, plus pool_max_conns). It applies pending
// migrations.
func Open(ctx context.Context, dsn string) (*DB, error) {
	switch {
	case strings.HasPrefix(dsn, "sqlite://"):
		return openSQLite(ctx, strings.TrimPrefix(dsn, "sqlite://"))
	case strings.HasPrefix(dsn, "postgres://"), strings.HasPrefix(dsn, "postgresql://"):
		return openPostgres(ctx, dsn)
	default:
		return nil, fmt.Errorf("unsupported database URL %q (want sqlite://… or postgres://…)", safeDSN(dsn))
	}
}

// Close stops the checkpointer and closes both pools.
func (s *DB) Close() error {
	var errs []error
	if s.group != nil {
		s.group.stop()
	}
	if s.ckpt != nil {
		errs = append(errs, s.ckpt.close())
	}
	return errors.Join(append(errs, s.wstmts.close(), s.rstmts.close(), s.w.Close(), s.r.Close())...)
}

// now is the clock, at the stored precision (milliseconds).
func (s *DB) now() time.Time { return s.Now().UTC().Truncate(time.Millisecond) }

func (s *DB) migrate(ctx context.Context) error {
	if err := checkMigrations(migrationsFS); err != nil {
		return err
	}
	if s.d.name == postgresDialect.name {
		unlock, err := s.migrationLock(ctx)
		if err != nil {
			return err
		}
		defer unlock()
	}
	if _, err := s.w.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("migrations table: %w", err)
	}
	dir := path.Join("migrations", s.d.name)
	entries, err := fs.ReadDir(migrationsFS, dir)
	if err != nil {
		return err
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		version, err := strconv.Atoi(num)
		if !ok || err != nil {
			return fmt.Errorf("migration %s: name must start with a number", e.Name())
		}
		body, err := migrationsFS.ReadFile(path.Join(dir, e.Name()))
		if err != nil {
			return err
		}
		err = s.tx(ctx, func(tx *sql.Tx) error {
			var n int
			if err := tx.QueryRowContext(ctx, s.q(`SELECT COUNT(*) FROM schema_migrations WHERE version = ?`), version).Scan(&n); err != nil {
				return err
			}
			if n > 0 {
				return nil
			}
			if _, err := tx.ExecContext(ctx, string(body)); err != nil {
				return fmt.Errorf("migration %s: %w", e.Name(), err)
			}
			_, err := tx.ExecContext(ctx, s.q(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`), version, ms(s.now()))
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func (s *DB) q(query string) string {
	if s.d.rebind == nil {
		return query
	}
	return s.d.rebind(query)
}

// tx runs fn in a write transaction and commits it when fn returns nil.
// On SQLite the transaction may share its commit with others queued at the
// same moment (groupCommitter); fn sees the same isolation either way.
func (s *DB) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	if s.group != nil {
		return s.group.run(ctx, fn)
	}
	if s.d.retry != nil {
		return s.retryTx(ctx, fn) // PostgreSQL: concurrent transactions
	}
	p, err := s.txAlone(ctx, fn)
	if p != nil {
		panic(p)
	}
	return err
}

// txAlone runs fn in a transaction of its own. A panic in fn rolls the
// transaction back and is returned for the caller to raise again.
func (s *DB) txAlone(ctx context.Context, fn func(*sql.Tx) error) (any, error) {
	s.wstmts.preparePending(ctx, s.w)
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
	}
	s.wtx.Store(tx)
	defer s.wtx.CompareAndSwap(tx, nil)
	if p, err := call(fn, tx); err != nil || p != nil {
		_ = tx.Rollback()
		return p, err
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	if s.ckpt != nil {
		s.ckpt.committed()
	}
	return nil, nil
}

// querier is what both *sql.DB and *sql.Tx offer.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func (s *DB) exec(ctx context.Context, q querier, query string, args ...any) (int64, error) {
	query = s.q(query)
	var res sql.Result
	var err error
	if st := s.stmt(ctx, q, query); st != nil {
		res, err = st.ExecContext(ctx, args...)
	} else if db, ok := q.(*sql.DB); ok && s.d.retry != nil {
		res, err = s.execRetry(ctx, func() (sql.Result, error) { return db.ExecContext(ctx, query, args...) })
	} else {
		res, err = q.ExecContext(ctx, query, args...)
	}
	if err != nil {
		return 0, err
	}
	if db, ok := q.(*sql.DB); ok && db == s.w && s.ckpt != nil {
		s.ckpt.committed() // a write outside s.tx commits by itself
	}
	return res.RowsAffected()
}

// ms converts a time to stored Unix milliseconds.
func ms(t time.Time) int64 { return t.UnixMilli() }

func msPtr(t *time.Time) any {
	if t == nil {
		return nil
	}
	return t.UnixMilli()
}

func fromMs(v int64) time.Time { return time.UnixMilli(v).UTC() }

func fromNullMs(v sql.NullInt64) *time.Time {
	if !v.Valid {
		return nil
	}
	t := fromMs(v.Int64)
	return &t
}

func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// notFound maps sql.ErrNoRows to the given catalog code, and a lookup by a
// value the database cannot hold (PostgreSQL: a NUL character), which no
// row can match.
func notFound(err error, code protocol.Code) error {
	if errors.Is(err, sql.ErrNoRows) || badText(err) {
		return protocol.NewError(code)
	}
	return err
}

// placeholders returns "?, ?, ?" for n values.
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}
