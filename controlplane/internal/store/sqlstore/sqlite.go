package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// sqliteDialect: `?` placeholders, no row locks (the single writer holds the
// database lock for the whole transaction, taken at BEGIN IMMEDIATE).
var sqliteDialect = dialect{
	name: "sqlite",
	uniqueViolation: func(err error) bool {
		var se *sqlite.Error
		return errors.As(err, &se) && (se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY)
	},
}

func openSQLite(ctx context.Context, file string) (*DB, error) {
	if file == "" {
		return nil, fmt.Errorf("sqlite URL needs a file path")
	}
	if dir := filepath.Dir(file); dir != "." {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create database directory: %w", err)
		}
	}
	// synchronous=NORMAL in WAL mode: a committed transaction survives a
	// killed process (it is in the WAL file); only an OS crash or power loss
	// may lose the last commits.
	params := url.Values{}
	params.Add("_pragma", "busy_timeout(10000)")
	params.Add("_pragma", "journal_mode(WAL)")
	params.Add("_pragma", "synchronous(NORMAL)")
	params.Add("_pragma", "foreign_keys(ON)")
	// Checkpoints run in the background (checkpointer); the writer's own
	// automatic checkpoint stays as a backstop at a larger WAL.
	params.Add("_pragma", fmt.Sprintf("wal_autocheckpoint(%d)", writerAutoCheckpoint))
	params.Set("_txlock", "immediate")
	w, err := sql.Open("sqlite", sqliteURI(file, params))
	if err != nil {
		return nil, err
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	if err := w.PingContext(ctx); err != nil {
		w.Close()
		return nil, fmt.Errorf("open sqlite: %w", err)
	}

	rp := url.Values{}
	rp.Add("_pragma", "busy_timeout(10000)")
	rp.Add("_pragma", "query_only(1)")
	r, err := sql.Open("sqlite", sqliteURI(file, rp))
	if err != nil {
		w.Close()
		return nil, err
	}
	n := max(2, runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)

	cp := url.Values{}
	cp.Add("_pragma", "busy_timeout(10000)")
	c, err := sql.Open("sqlite", sqliteURI(file, cp))
	if err != nil {
		w.Close()
		r.Close()
		return nil, err
	}
	c.SetMaxOpenConns(1)
	c.SetMaxIdleConns(1)

	db := &DB{w: w, r: r, d: sqliteDialect, Now: time.Now, ckpt: newCheckpointer(c)}
	if err := db.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	db.group = newGroupCommitter(db)
	return db, nil
}

// sqliteURI is the SQLite URI of a file path with query parameters. The path
// is percent-encoded where a URI would read it otherwise ('?' starts the
// query, '#' a fragment, '%' an escape), so the database is the file the path
// names; an absolute path gets an empty authority ("file:///…").
func sqliteURI(file string, params url.Values) string {
	var b strings.Builder
	b.WriteString("file:")
	if strings.HasPrefix(file, "/") {
		b.WriteString("//")
	}
	for i := 0; i < len(file); i++ {
		switch c := file[i]; {
		case c == '?' || c == '#' || c == '%' || c < 0x20 || c == 0x7f:
			fmt.Fprintf(&b, "%%%02X", c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteString("?")
	b.WriteString(params.Encode())
	return b.String()
}
