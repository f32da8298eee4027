package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/url"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/copelf/copelf/protocol"
)

// PostgreSQL runs the same body of SQL as SQLite, through pgx's database/sql
// driver. The differences are the dialect's:
//
//   - `$n` placeholders (rebind), and every TEXT column compares bytewise
//     (COLLATE "C"), as SQLite's do, whatever the database's locale.
//   - One pool serves reads and writes (w and r are the same *sql.DB); pgx
//     prepares and caches each statement per connection, so the store's
//     own statement cache is off.
//   - Transactions run concurrently in READ COMMITTED. Every exactly-once
//     rule is a guarded UPDATE (re-evaluated on the row's newest version
//     after a concurrent writer commits), a unique key, or a row read
//     FOR UPDATE before the transaction acts on it; where a transaction
//     reads rows it means to change, it locks them (the dialect's
//     forUpdate). Lock order is batch → run → the rest where a
//     transaction takes several; a deadlock the database detects anyway
//     (40P01), or a serialization failure (40001), runs the whole
//     transaction again (retryTx).
//   - Errors that mean the server cannot be reached (down, restarting,
//     refusing connections) are reported by Unavailable, which the API
//     turns into a typed internal error with reason database_unavailable;
//     database/sql drops the dead connections and opens new ones when the
//     server is back.
var postgresDialect = dialect{
	name:            "postgres",
	rebind:          rebindDollar,
	forUpdate:       " FOR UPDATE",
	uniqueViolation: func(err error) bool { return pgCode(err) == "23505" },
	retry:           pgRetryable,
	unavailable:     pgUnavailable,
	driverCache:     true,
}

// poolParam is the URL parameter that sizes the pool (as in pgxpool); it
// is taken off the URL before pgx reads it.
const poolParam = "pool_max_conns"

// defaultPoolSize is the pool's size without pool_max_conns: a few
// connections per core of this process, at least 8. The server does the
// work of a query; a connection waits on it and the network meanwhile.
func defaultPoolSize() int { return max(8, 4*runtime.GOMAXPROCS(0)) }

func openPostgres(ctx context.Context, dsn string) (*DB, error) {
	dsn, size, err := takePoolSize(dsn)
	if err != nil {
		return nil, err
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		// pgx's message quotes the URL, password and all when it cannot
		// tell where the password is.
		return nil, fmt.Errorf("postgres URL %s cannot be parsed", safeDSN(dsn))
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(size)
	db.SetMaxIdleConns(size)
	// Connections are renewed now and then (a failover, a server-side
	// setting); idle ones are closed after a while.
	db.SetConnMaxLifetime(30 * time.Minute)
	db.SetConnMaxIdleTime(5 * time.Minute)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open postgres %s: %w", safeDSN(dsn), err)
	}
	s := &DB{w: db, r: db, d: postgresDialect, Now: time.Now}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// safeDSN is the URL without its password, or only its scheme when it is
// not a URL at all.
func safeDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		scheme, _, _ := strings.Cut(dsn, "://")
		return scheme + "://…"
	}
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	return u.String()
}

// takePoolSize removes pool_max_conns from the URL and returns its value
// (or the default).
func takePoolSize(dsn string) (string, int, error) {
	u, err := url.Parse(dsn)
	if err != nil {
		return "", 0, fmt.Errorf("postgres URL %s is not a URL", safeDSN(dsn))
	}
	q := u.Query()
	v := q.Get(poolParam)
	if !q.Has(poolParam) {
		return dsn, defaultPoolSize(), nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > 1000 {
		return "", 0, fmt.Errorf("postgres URL %s: %s must be a number from 1 to 1000", safeDSN(dsn), poolParam)
	}
	q.Del(poolParam)
	u.RawQuery = q.Encode()
	return u.String(), n, nil
}

// pgCode is the SQLSTATE of a PostgreSQL error, or "".
func pgCode(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// pgRetryable: a serialization failure or a deadlock the server broke by
// aborting this transaction. Nothing of it was committed.
func pgRetryable(err error) bool {
	switch pgCode(err) {
	case "40001", "40P01":
		return true
	}
	return false
}

// pgUnavailable reports an error that says the server cannot be reached or
// is going away, rather than anything about the statement: a failed
// connect, a connection lost mid-statement, class 08 (connection
// exception), 57P01–57P03 (shutdown, crash, starting up) and 53300 (too
// many connections).
func pgUnavailable(err error) bool {
	if err == nil {
		return false
	}
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) {
		return true
	}
	if code := pgCode(err); code != "" {
		return strings.HasPrefix(code, "08") || code == "57P01" || code == "57P02" || code == "57P03" || code == "53300"
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, pgconn.ErrConnClosed) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

// Unavailable reports whether err, returned by a store call, means that the
// database server could not be reached (down, restarting, refusing
// connections) rather than anything about the call. Such calls may succeed
// when retried later; a write whose commit was cut off may or may not have
// happened (idempotency keys make the retry safe).
func (s *DB) Unavailable(err error) bool {
	return s.d.unavailable != nil && s.d.unavailable(err)
}

// InvalidText reports whether err is the database refusing a text value the
// caller gave: PostgreSQL's text cannot hold a NUL character (SQLite's can).
// Writes answer bad_request for it themselves (pgBadText), and a lookup by
// such a value finds nothing (notFound); this covers the other reads.
func (s *DB) InvalidText(err error) bool {
	return badText(err)
}

// maxTxAttempts bounds how often retryTx runs a transaction.
const maxTxAttempts = 8

// retryTx runs fn in a transaction on the pool and commits it, again from
// the start when the database aborted it for a retryable reason (see
// dialect.retry). fn must set its results afresh on every call.
func (s *DB) retryTx(ctx context.Context, fn func(*sql.Tx) error) error {
	for attempt := 1; ; attempt++ {
		err := s.txOnce(ctx, fn)
		if err == nil || attempt == maxTxAttempts || !s.d.retry(err) {
			return pgBadText(err)
		}
		// A short random pause, growing with the attempts, so that the
		// transactions that collided do not collide again.
		pause := time.Duration(rand.Int64N(int64(time.Millisecond) << min(attempt, 6)))
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

func (s *DB) txOnce(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if p := recover(); p != nil {
			_ = tx.Rollback()
			panic(p)
		}
	}()
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// execRetry runs a statement outside a transaction (it commits by itself),
// again when the database aborted it as a deadlock victim.
func (s *DB) execRetry(ctx context.Context, run func() (sql.Result, error)) (sql.Result, error) {
	for attempt := 1; ; attempt++ {
		res, err := run()
		if err == nil || s.d.retry == nil || attempt == maxTxAttempts || !s.d.retry(err) || ctx.Err() != nil {
			return res, pgBadText(err)
		}
	}
}

// pgBadText turns PostgreSQL's refusal of a text value (a NUL character,
// which SQLite stores and PostgreSQL's text cannot hold) into the
// bad_request it is: the input, not the server, is at fault.
func pgBadText(err error) error {
	if badText(err) {
		return protocol.Errorf(protocol.CodeBadRequest, "The request holds text that cannot be stored (a NUL character).").With("reason", "invalid_text")
	}
	return err
}

// badText reports PostgreSQL's refusal of a text value:
// character_not_in_repertoire or untranslatable_character.
func badText(err error) bool {
	switch pgCode(err) {
	case "22021", "22P05":
		return true
	}
	return false
}

// rebinds caches rebound queries: the store's queries are a fixed set,
// but the ones built with a variable number of placeholders are not, so
// the cache stops growing at maxRebinds.
var (
	rebinds    sync.Map
	rebindsLen atomic.Int64
)

const maxRebinds = 4096

// rebindDollar turns each ? outside string literals, quoted identifiers and
// comments into $1, $2, ….
func rebindDollar(query string) string {
	if v, ok := rebinds.Load(query); ok {
		return v.(string)
	}
	var b strings.Builder
	b.Grow(len(query) + 16)
	n := 0
	for i := 0; i < len(query); i++ {
		c := query[i]
		switch {
		case c == '\'' || c == '"':
			j := strings.IndexByte(query[i+1:], c)
			if j < 0 {
				b.WriteString(query[i:])
				i = len(query)
				continue
			}
			b.WriteString(query[i : i+j+2])
			i += j + 1
		case c == '-' && i+1 < len(query) && query[i+1] == '-':
			j := strings.IndexByte(query[i:], '\n')
			if j < 0 {
				j = len(query) - i
			}
			b.WriteString(query[i : i+j])
			i += j - 1
		case c == '?':
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
		default:
			b.WriteByte(c)
		}
	}
	out := b.String()
	if rebindsLen.Load() < maxRebinds {
		if _, loaded := rebinds.LoadOrStore(query, out); !loaded {
			rebindsLen.Add(1)
		}
	}
	return out
}

// migrationLock holds PostgreSQL's advisory lock on migrating this
// database's schema (current_schema()), so that replicas starting together
// migrate one after the other. It returns the function that releases it.
func (s *DB) migrationLock(ctx context.Context) (func(), error) {
	conn, err := s.w.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrations lock: %w", err)
	}
	const key = `hashtext('copelf:migrate:' || current_schema())`
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock(`+key+`)`); err != nil {
		conn.Close()
		return nil, fmt.Errorf("migrations lock: %w", err)
	}
	return func() {
		_, _ = conn.ExecContext(context.Background(), `SELECT pg_advisory_unlock(`+key+`)`)
		conn.Close()
	}, nil
}

// checkMigrations fails when the dialects' migrations differ in versions:
// a schema change written for one database only would leave the other
// behind, silently. Each dialect has a folder under migrations/ whose files
// are named <version>_<name>.sql.
func checkMigrations(fsys fs.FS) error {
	dirs, err := fs.ReadDir(fsys, "migrations")
	if err != nil {
		return err
	}
	versions := map[string]map[int]string{} // dialect → version → file
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		files, err := fs.ReadDir(fsys, path.Join("migrations", d.Name()))
		if err != nil {
			return err
		}
		vs := map[int]string{}
		for _, f := range files {
			num, _, ok := strings.Cut(f.Name(), "_")
			v, err := strconv.Atoi(num)
			if !ok || err != nil {
				return fmt.Errorf("migration %s/%s: name must start with a number", d.Name(), f.Name())
			}
			if prev, dup := vs[v]; dup {
				return fmt.Errorf("migrations %s/%s and %s/%s have the same version", d.Name(), prev, d.Name(), f.Name())
			}
			vs[v] = f.Name()
		}
		versions[d.Name()] = vs
	}
	var problems []string
	for a, va := range versions {
		for b, vb := range versions {
			for v, file := range va {
				if _, ok := vb[v]; !ok {
					problems = append(problems, fmt.Sprintf("%s has no migration %04d (%s has %s)", b, v, a, file))
				}
			}
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("migrations differ between databases: %s", strings.Join(problems, "; "))
	}
	return nil
}
