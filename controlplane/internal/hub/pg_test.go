package hub_test

import (
	"os"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
)

// envDB is the database URL of a test env: a copy of the migrated SQLite
// template, or with COPELF_BENCH_DB=postgres a fresh PostgreSQL database
// (on COPELF_TEST_POSTGRES, dropped when the test ends) with the server's
// default durability, so that benchmarks compare like with like.
func envDB(t testing.TB) string {
	t.Helper()
	switch db := os.Getenv("COPELF_BENCH_DB"); db {
	case "", "sqlite":
		return "sqlite://" + migratedDB(t)
	case "postgres":
		return pgtest.Database(t)
	default:
		t.Fatalf("COPELF_BENCH_DB=%q: want sqlite or postgres", db)
		return ""
	}
}
