// Package pgtest gives tests a PostgreSQL database, or a schema, of their
// own on the server named by COPELF_TEST_POSTGRES (default
// postgres://postgres@127.0.0.1:5432/test?sslmode=disable, the CI's).
//
// Without a reachable server the tests that ask for one are skipped with a
// message, except under CI=true or COPELF_NEED_POSTGRES=1, where they fail:
// CI runs the PostgreSQL suite or fails.
package pgtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// DefaultURL is the server the tests use when COPELF_TEST_POSTGRES is unset.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// AdminURL is the URL of a database on the test server as a user that may
// create databases.
func AdminURL() string {
	if u := os.Getenv("COPELF_TEST_POSTGRES"); u != "" {
		return u
	}
	return DefaultURL
}

// Required reports whether a missing server fails the tests rather than
// skipping them.
func Required() bool {
	return os.Getenv("CI") == "true" || os.Getenv("COPELF_NEED_POSTGRES") == "1"
}

var reach struct {
	once sync.Once
	err  error
}

// Skip skips t (or fails it, see Required) when the server cannot be
// reached. It checks once per process.
func Skip(t testing.TB) {
	t.Helper()
	reach.once.Do(func() {
		reach.err = exec(AdminURL(), "SELECT 1")
	})
	if reach.err == nil {
		return
	}
	if Required() {
		t.Fatalf("PostgreSQL at %s is unreachable, and CI=true (or COPELF_NEED_POSTGRES=1) requires it: %v", redact(AdminURL()), reach.err)
	}
	t.Skipf("PostgreSQL at %s is unreachable (%v); set COPELF_TEST_POSTGRES to run these tests", redact(AdminURL()), reach.err)
}

// Database creates an empty database copelf_test_<random> and drops it
// (closing whatever is still connected) when t ends. It returns its URL.
func Database(t testing.TB) string {
	t.Helper()
	Skip(t)
	name := "copelf_test_" + random()
	if err := exec(AdminURL(), `CREATE DATABASE `+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := exec(AdminURL(), `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return WithDatabase(AdminURL(), name)
}

// Schema creates an empty schema copelf_<random> in the database at
// dbURL, drops it when t ends, and returns the URL whose connections use
// it (search_path), with synchronous_commit off. Much cheaper than a
// database of its own.
func Schema(t testing.TB, dbURL string) string {
	t.Helper()
	name := "copelf_" + random()
	if err := exec(dbURL, `CREATE SCHEMA `+name); err != nil {
		t.Fatalf("create schema %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := exec(dbURL, `DROP SCHEMA IF EXISTS `+name+` CASCADE`); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("search_path", name)
	// Tests need no durability across a server crash; a commit that does
	// not wait for its WAL flush keeps them fast on a busy disk.
	q.Set("synchronous_commit", "off")
	u.RawQuery = q.Encode()
	return u.String()
}

// WithDatabase is rawURL naming another database.
func WithDatabase(rawURL, name string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		panic(fmt.Sprintf("pgtest: %s is not a URL", redact(rawURL)))
	}
	u.Path = "/" + name
	return u.String()
}

// exec runs one statement on a connection of its own (closed after, so
// that no pool outlives the test).
func exec(rawURL, stmt string) error {
	cfg, err := pgx.ParseConfig(rawURL)
	if err != nil {
		return fmt.Errorf("parse %s: %w", redact(rawURL), err)
	}
	cfg.ConnectTimeout = 5 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db := stdlib.OpenDB(*cfg)
	defer db.Close()
	_, err = db.ExecContext(ctx, stmt)
	return err
}

func random() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func redact(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "(an unparsable URL)"
	}
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	return u.String()
}

// OpenDB opens a plain database/sql pool on rawURL (pgx's driver), for tests
// that look at the database behind the store.
func OpenDB(t testing.TB, rawURL string) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	t.Cleanup(func() { db.Close() })
	return db
}
