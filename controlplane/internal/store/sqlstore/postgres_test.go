package sqlstore_test

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
	"github.com/copelf/copelf/controlplane/internal/store/storetest"
	"github.com/copelf/copelf/protocol"
)

// openPG opens the store at url and closes it when the test ends.
func openPG(t *testing.T, url string) *sqlstore.DB {
	t.Helper()
	db, err := sqlstore.Open(t.Context(), url)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return db
}

// The conformance suite, races included, on PostgreSQL: one database for
// the suite, a fresh schema for each test.
func TestPostgresStore(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.Database(t)
	storetest.Run(t, func(t *testing.T) store.Store {
		return openPG(t, pgtest.Schema(t, dbURL))
	})
}

func TestPostgresOpenURLs(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.Database(t)
	ctx := t.Context()
	// postgresql:// is the same as postgres://, and pool_max_conns sizes the pool.
	alt := "postgresql://" + strings.TrimPrefix(dbURL, "postgres://")
	if strings.Contains(alt, "?") {
		alt += "&pool_max_conns=3"
	} else {
		alt += "?pool_max_conns=3"
	}
	db := openPG(t, alt)
	if _, err := db.UserCreate(ctx, store.UserCreateParams{Email: "alt@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
		t.Fatalf("UserCreate: %v", err)
	}

	for _, bad := range []string{
		strings.Replace(dbURL, "sslmode=disable", "sslmode=disable&pool_max_conns=0", 1),
		"postgres://copelf:hunter2@127.0.0.1:5432/x?sslmode=bogus",
		"postgres://copelf:hunter2@[::1/x",
	} {
		db, err := sqlstore.Open(ctx, bad)
		if err == nil {
			db.Close()
			t.Errorf("Open(%q) = nil error", bad)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("Open(%q) error shows the password: %v", bad, err)
		}
	}

	// A server that does not answer: the error says so, without the password.
	_, err := sqlstore.Open(ctx, "postgres://copelf:hunter2@127.0.0.1:1/x?sslmode=disable&connect_timeout=5")
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("Open of a closed port = %v", err)
	}
	if !db.Unavailable(err) {
		t.Errorf("Unavailable(%v) = false, want true", err)
	}
	if db.Unavailable(protocol.NewError(protocol.CodeConflict)) || db.Unavailable(sql.ErrNoRows) {
		t.Error("Unavailable is true for errors that are not about the server")
	}
}

func TestPostgresMigrationsAreIdempotent(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	url := pgtest.Schema(t, pgtest.Database(t))
	for i := range 3 {
		db, err := sqlstore.Open(ctx, url)
		if err != nil {
			t.Fatalf("open %d: %v", i+1, err)
		}
		if _, err := db.UserCreate(ctx, store.UserCreateParams{Email: fmt.Sprintf("u%d@example.com", i), PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
			t.Fatalf("open %d: UserCreate: %v", i+1, err)
		}
		if err := db.Close(); err != nil {
			t.Fatalf("close %d: %v", i+1, err)
		}
	}
	raw := pgtest.OpenDB(t, url)
	var rows, versions, users int
	if err := raw.QueryRowContext(ctx, `SELECT COUNT(*), COUNT(DISTINCT version) FROM schema_migrations`).Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	if rows == 0 || rows != versions {
		t.Errorf("schema_migrations has %d rows for %d versions", rows, versions)
	}
	if err := raw.QueryRowContext(ctx, `SELECT COUNT(*) FROM users`).Scan(&users); err != nil {
		t.Fatal(err)
	}
	if users != 3 {
		t.Errorf("%d users after three opens, want 3", users)
	}
}

// Replicas that start together on an empty database migrate it once.
func TestPostgresConcurrentMigrations(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	url := pgtest.Schema(t, pgtest.Database(t))
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			db, err := sqlstore.Open(ctx, url)
			if err == nil {
				err = db.Close()
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Errorf("Open: %v", err)
		}
	}
}

// The PostgreSQL schema is the SQLite schema: the same tables with the same
// columns, in the same nullability.
func TestPostgresSchemaMirrorsSQLite(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	url := pgtest.Schema(t, pgtest.Database(t))
	openPG(t, url)
	lite := filepath.Join(t.TempDir(), "copelf.db")
	openFile(t, lite)

	pg := pgtest.OpenDB(t, url)
	rows, err := pg.QueryContext(ctx, `SELECT table_name, column_name, is_nullable FROM information_schema.columns
		WHERE table_schema = current_schema() ORDER BY table_name, column_name`)
	if err != nil {
		t.Fatal(err)
	}
	var pgCols []string
	for rows.Next() {
		var table, col, nullable string
		if err := rows.Scan(&table, &col, &nullable); err != nil {
			t.Fatal(err)
		}
		pgCols = append(pgCols, table+"."+col+" null="+nullable)
	}
	rows.Close()

	sl, err := sql.Open("sqlite", "file:"+lite)
	if err != nil {
		t.Fatal(err)
	}
	defer sl.Close()
	rows, err = sl.QueryContext(ctx, `SELECT m.name, p.name, p."notnull", p.pk FROM sqlite_master m, pragma_table_info(m.name) p
		WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.name`)
	if err != nil {
		t.Fatal(err)
	}
	var liteCols []string
	for rows.Next() {
		var table, col string
		var notNull, pk int
		if err := rows.Scan(&table, &col, &notNull, &pk); err != nil {
			t.Fatal(err)
		}
		nullable := "YES"
		if notNull == 1 || pk > 0 {
			nullable = "NO"
		}
		liteCols = append(liteCols, table+"."+col+" null="+nullable)
	}
	rows.Close()
	slices.Sort(pgCols)
	slices.Sort(liteCols)
	if !slices.Equal(pgCols, liteCols) {
		for _, c := range liteCols {
			if !slices.Contains(pgCols, c) {
				t.Errorf("PostgreSQL lacks %s", c)
			}
		}
		for _, c := range pgCols {
			if !slices.Contains(liteCols, c) {
				t.Errorf("SQLite lacks %s", c)
			}
		}
	}
}

// The database refuses what no code path does (migration 0004's triggers).
func TestPostgresLedgerGuards(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	url := pgtest.Schema(t, pgtest.Database(t))
	db := openPG(t, url)
	accountID := seedGuarded(t, db)
	raw := pgtest.OpenDB(t, url)
	wantGuardsRefuse(t, raw, db, accountID,
		`UPDATE ledger SET amount = amount + 1`,
		`DELETE FROM ledger`,
		`TRUNCATE ledger`,
		`UPDATE credit_holds SET status = 'voided'`,
		`UPDATE credit_holds SET status = 'pending'`,
		`UPDATE credit_holds SET amount = 0`,
		`DELETE FROM credit_holds`,
		`UPDATE coupon_redemptions SET account_id = 'usr_other'`,
		`DELETE FROM coupon_redemptions`)
	// A pending hold may still be resolved, once.
	if _, err := raw.ExecContext(ctx, `INSERT INTO credit_holds (id, account_id, run_id, amount, status, created_at) VALUES ('hld_x', $1, 'run_x', 1, 'pending', 0)`, accountID); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.ExecContext(ctx, `UPDATE credit_holds SET status = 'voided' WHERE id = 'hld_x'`); err != nil {
		t.Errorf("resolve a pending hold: %v", err)
	}
	if _, err := raw.ExecContext(ctx, `UPDATE credit_holds SET status = 'captured' WHERE id = 'hld_x'`); err == nil {
		t.Error("a resolved hold was resolved again")
	}
}

// Text compares bytewise, as on SQLite, whatever the database's locale:
// ids and names sort the same on both.
func TestPostgresTextOrder(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	url := pgtest.Schema(t, pgtest.Database(t))
	db := openPG(t, url)
	u, err := db.UserCreate(ctx, store.UserCreateParams{Email: "order@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		t.Fatal(err)
	}
	wf, err := db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if err != nil {
		t.Fatal(err)
	}
	run, err := db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"b", "B", "a_b", "a-b", "ab", "A", "é", "z"}
	for _, n := range names {
		if err := db.ArtifactPut(ctx, store.Artifact{RunID: run.ID, Name: n, ContentType: "text/plain", SHA256: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	raw := pgtest.OpenDB(t, url)
	if _, err := raw.ExecContext(ctx, `UPDATE artifacts SET created_at = 1`); err != nil {
		t.Fatal(err)
	}
	got, err := db.ArtifactList(ctx, run.ID)
	if err != nil {
		t.Fatal(err)
	}
	var gotNames []string
	for _, a := range got {
		gotNames = append(gotNames, a.Name)
	}
	want := slices.Clone(names)
	slices.Sort(want) // bytewise
	if !slices.Equal(gotNames, want) {
		t.Errorf("artifacts in order %q, want %q (bytewise)", gotNames, want)
	}
}

func TestPostgresDataSurvivesReopen(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := pgtest.Schema(t, pgtest.Database(t))
	db, err := sqlstore.Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	u, err := db.UserCreate(ctx, store.UserCreateParams{Email: "keep@example.com", PasswordHash: "h", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: 10, Kind: store.LedgerGrant}); err != nil {
		t.Fatal(err)
	}
	wf, err := db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if err != nil {
		t.Fatal(err)
	}
	run, err := db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID, Inputs: map[string]any{"a": "b"}, Cost: 3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.RunStart(ctx, store.RunStartParams{ID: run.ID, AgentID: "agt_1", LeaseID: "lse_1"}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openPG(t, url)
	if c, err := db.CreditsGet(ctx, u.ID); err != nil || c != (store.Credits{Balance: 7, Held: 0, Available: 7}) {
		t.Errorf("credits after reopen = %+v, %v", c, err)
	}
	got, err := db.RunGet(ctx, run.ID)
	if err != nil || got.Status != protocol.RunRunning || got.LeaseID != "lse_1" || got.CostCharged != 3 || got.Inputs["a"] != "b" || !got.QueuedAt.Equal(run.QueuedAt) {
		t.Errorf("run after reopen = %+v, %v", got, err)
	}
	if _, err := db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID, Cost: 1}); protocol.ErrorCode(err) != protocol.CodeWorkflowAlreadyRunning {
		t.Errorf("RunCreate after reopen = %v, want workflow_already_running", err)
	}
}

// Text PostgreSQL cannot hold (a NUL character; SQLite stores it) is the
// caller's bad_request, not an internal error, on the paths with and
// without a transaction.
func TestPostgresNULText(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	db := openPG(t, pgtest.Schema(t, pgtest.Database(t)))
	_, err := db.UserCreate(ctx, store.UserCreateParams{Email: "nul\x00@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	if code := protocol.ErrorCode(err); code != protocol.CodeBadRequest {
		t.Errorf("UserCreate with a NUL: %v, want bad_request", err)
	}
	u, err := db.UserCreate(ctx, store.UserCreateParams{Email: "nul@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		t.Fatal(err)
	}
	_, err = db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "a\x00b", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if code := protocol.ErrorCode(err); code != protocol.CodeBadRequest {
		t.Errorf("WorkflowCreate with a NUL: %v, want bad_request", err)
	}
	// JSON documents escape it and are stored as they are.
	wf, err := db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if err != nil {
		t.Fatal(err)
	}
	r, err := db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID, Inputs: map[string]any{"a": "x\x00y"}})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := db.RunGet(ctx, r.ID); err != nil || got.Inputs["a"] != "x\x00y" {
		t.Errorf("run inputs with a NUL: %v, %v", got, err)
	}
}
