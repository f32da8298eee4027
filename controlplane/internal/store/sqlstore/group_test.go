package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
)

// openGroupTest opens a SQLite store with scratch tables; closeNow closes
// it before the test ends.
func openGroupTest(t *testing.T) (db *DB, closeNow func() error) {
	t.Helper()
	var err error
	db, err = Open(t.Context(), "sqlite://"+filepath.Join(t.TempDir(), "group.db"))
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = db.Close()
		}
	})
	closeNow = func() error { closed = true; return db.Close() }
	if db.group == nil {
		t.Fatal("SQLite store without a group committer")
	}
	for _, q := range []string{
		`CREATE TABLE scratch (n INTEGER PRIMARY KEY)`,
		`CREATE TABLE counter (v INTEGER NOT NULL)`,
		`INSERT INTO counter (v) VALUES (0)`,
	} {
		if _, err := db.w.ExecContext(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	return db, closeNow
}

// Many writers at once: transactions share commits, yet each behaves as if
// it ran alone and serially — a failed or panicking one leaves nothing, the
// others keep their writes, and each sees the writes committed before it.
func TestGroupCommitIsolatesTransactions(t *testing.T) {
	db, _ := openGroupTest(t)
	ctx := t.Context()
	const n = 300
	var (
		wg      sync.WaitGroup
		start   = make(chan struct{})
		mu      sync.Mutex
		kept    = map[int]bool{}
		panics  int
		refusal = errors.New("refused")
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			defer func() {
				if p := recover(); p != nil {
					if p != fmt.Sprint("boom ", i) {
						t.Errorf("writer %d: panic %v, want its own", i, p)
					}
					mu.Lock()
					panics++
					mu.Unlock()
				}
			}()
			err := db.tx(ctx, func(tx *sql.Tx) error {
				var v int
				if err := tx.QueryRowContext(ctx, `SELECT v FROM counter`).Scan(&v); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, `UPDATE counter SET v = ?`, v+1); err != nil {
					return err
				}
				if _, err := tx.ExecContext(ctx, `INSERT INTO scratch (n) VALUES (?)`, i); err != nil {
					return err
				}
				switch {
				case i%7 == 3:
					panic(fmt.Sprint("boom ", i))
				case i%3 == 0:
					return refusal
				}
				return nil
			})
			switch {
			case err == nil:
				mu.Lock()
				kept[i] = true
				mu.Unlock()
			case !errors.Is(err, refusal):
				t.Errorf("writer %d: %v", i, err)
			}
		}()
	}
	close(start)
	wg.Wait()

	want := 0
	for i := range n {
		if i%7 != 3 && i%3 != 0 {
			want++
			if !kept[i] {
				t.Errorf("writer %d should have committed", i)
			}
		}
	}
	if len(kept) != want || panics == 0 {
		t.Fatalf("committed %d (want %d), panics %d", len(kept), want, panics)
	}
	// Read through the read pool: what the writers were told is on disk.
	var rows, v int
	if err := db.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM scratch`).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if err := db.r.QueryRowContext(ctx, `SELECT v FROM counter`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	if rows != want || v != want {
		t.Fatalf("scratch rows %d, counter %d; want %d each (a failed transaction left writes behind, or a lost update)", rows, v, want)
	}
	if db.group.groups.Load() == 0 {
		t.Fatalf("%d concurrent writers never shared a commit", n)
	}
}

// A transaction whose caller gave up before its turn never runs.
func TestGroupCommitSkipsAbandoned(t *testing.T) {
	db, _ := openGroupTest(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	ran := false
	err := db.tx(ctx, func(*sql.Tx) error { ran = true; return nil })
	if !errors.Is(err, context.Canceled) || ran {
		t.Fatalf("err %v, ran %v; want context.Canceled without running", err, ran)
	}
}

func TestGroupCommitAfterClose(t *testing.T) {
	db, closeNow := openGroupTest(t)
	if err := closeNow(); err != nil {
		t.Fatal(err)
	}
	if err := db.tx(t.Context(), func(*sql.Tx) error { return nil }); !errors.Is(err, errClosed) {
		t.Fatalf("write after Close: %v, want errClosed", err)
	}
}
