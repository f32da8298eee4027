package sqlstore

import (
	"strings"
	"testing"
	"testing/fstest"
)

func TestRebindDollar(t *testing.T) {
	for in, want := range map[string]string{
		`SELECT 1`: `SELECT 1`,
		`SELECT * FROM t WHERE a = ? AND b IN (?, ?)`: `SELECT * FROM t WHERE a = $1 AND b IN ($2, $3)`,
		`UPDATE t SET a = '?' WHERE b = ?`:            `UPDATE t SET a = '?' WHERE b = $1`,
		`SELECT "odd?col" FROM t WHERE x = ?`:         `SELECT "odd?col" FROM t WHERE x = $1`,
		`SELECT 'it''s ?', ? -- why?` + "\n" + `, ?`:  `SELECT 'it''s ?', $1 -- why?` + "\n" + `, $2`,
		`SELECT balance - held FROM a WHERE id = ?`:   `SELECT balance - held FROM a WHERE id = $1`,
		`SELECT 'unterminated ?`:                      `SELECT 'unterminated ?`,
	} {
		if got := rebindDollar(in); got != want {
			t.Errorf("rebindDollar(%q) = %q, want %q", in, got, want)
		}
		if got := rebindDollar(in); got != want { // cached
			t.Errorf("rebindDollar(%q) again = %q, want %q", in, got, want)
		}
	}
}

// The runner refuses to run when one database's migrations lack a version
// another's have.
func TestCheckMigrations(t *testing.T) {
	file := &fstest.MapFile{Data: []byte("SELECT 1;")}
	for _, tc := range []struct {
		name  string
		files []string
		want  string // "" = no error
	}{
		{"same versions", []string{"sqlite/0001_a.sql", "postgres/0001_a.sql", "sqlite/0002_b.sql", "postgres/0002_b.sql"}, ""},
		{"postgres behind", []string{"sqlite/0001_a.sql", "postgres/0001_a.sql", "sqlite/0005_video.sql"}, "postgres has no migration 0005 (sqlite has 0005_video.sql)"},
		{"sqlite behind", []string{"sqlite/0001_a.sql", "postgres/0001_a.sql", "postgres/0002_b.sql"}, "sqlite has no migration 0002"},
		{"bad name", []string{"sqlite/init.sql", "postgres/0001_a.sql"}, "name must start with a number"},
		{"same version twice", []string{"sqlite/0001_a.sql", "sqlite/0001_b.sql", "postgres/0001_a.sql"}, "have the same version"},
	} {
		fsys := fstest.MapFS{}
		for _, f := range tc.files {
			fsys["migrations/"+f] = file
		}
		err := checkMigrations(fsys)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: err = %v, want one saying %q", tc.name, err, tc.want)
		}
	}
	// The migrations this binary carries agree.
	if err := checkMigrations(migrationsFS); err != nil {
		t.Errorf("embedded migrations: %v", err)
	}
}
