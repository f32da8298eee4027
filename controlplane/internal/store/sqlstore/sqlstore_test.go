package sqlstore_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/store/storetest"
	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// openFile opens the SQLite store at path and closes it when the test ends.
func openFile(t *testing.T, path string) *sqlstore.DB {
	t.Helper()
	db, err := sqlstore.Open(t.Context(), "sqlite://"+path)
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

func TestStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return openFile(t, filepath.Join(t.TempDir(), "copelf.db"))
	})
}

func TestMigrationsAreIdempotent(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "copelf.db")
	for i := range 3 {
		db, err := sqlstore.Open(ctx, "sqlite://"+path)
		if err != nil {
			t.Fatalf("open %d: %v", i+1, err)
		}
		if _, err := db.UserCreate(ctx, store.UserCreateParams{Email: "u" + string(rune('a'+i)) + "@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
			t.Fatalf("open %d: UserCreate: %v", i+1, err)
		}
		if err := db.Close(); err != nil {
			t.Fatalf("close %d: %v", i+1, err)
		}
	}

	// Every migration is recorded once.
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	var rows, versions int
	if err := raw.QueryRowContext(ctx, `SELECT COUNT(*), COUNT(DISTINCT version) FROM schema_migrations`).Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	if rows == 0 || rows != versions {
		t.Errorf("schema_migrations has %d rows for %d versions", rows, versions)
	}
	var users int
	if err := raw.QueryRowContext(ctx, `SELECT COUNT(*) FROM users`).Scan(&users); err != nil {
		t.Fatal(err)
	}
	if users != 3 {
		t.Errorf("%d users after three opens, want 3", users)
	}
}

func TestDataSurvivesReopen(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "nested", "dir", "copelf.db")

	db, err := sqlstore.Open(ctx, "sqlite://"+path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	u, err := db.UserCreate(ctx, store.UserCreateParams{Email: "keep@example.com", PasswordHash: "h", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.TokenCreate(ctx, store.TokenCreateParams{UserID: u.ID, Kind: store.TokenAPI, Name: "ci", Hash: "hash-keep"}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: 10, Kind: store.LedgerGrant}); err != nil {
		t.Fatal(err)
	}
	wf, err := db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: json.RawMessage(storetest.Definition)})
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
		t.Fatalf("Close: %v", err)
	}

	db = openFile(t, path)
	if got, err := db.UserGetByEmail(ctx, "KEEP@example.com"); err != nil || got.ID != u.ID || !got.CreatedAt.Equal(u.CreatedAt) {
		t.Errorf("user after reopen = %+v, %v", got, err)
	}
	if _, got, err := db.TokenGetByHash(ctx, "hash-keep"); err != nil || got.ID != u.ID {
		t.Errorf("token after reopen: %v, %v", got, err)
	}
	if c, err := db.CreditsGet(ctx, u.ID); err != nil || c != (store.Credits{Balance: 7, Held: 0, Available: 7}) {
		t.Errorf("credits after reopen = %+v, %v", c, err)
	}
	if sum, err := db.LedgerSum(ctx, u.ID); err != nil || sum != 7 {
		t.Errorf("ledger sum after reopen = %d, %v", sum, err)
	}
	got, err := db.RunGet(ctx, run.ID)
	if err != nil || got.Status != protocol.RunRunning || got.LeaseID != "lse_1" || got.CostCharged != 3 || got.Inputs["a"] != "b" || !got.QueuedAt.Equal(run.QueuedAt) {
		t.Errorf("run after reopen = %+v, %v", got, err)
	}
	// The workflow's slot is still taken by the running run.
	_, err = db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID, Cost: 1})
	if code := protocol.ErrorCode(err); code != protocol.CodeWorkflowAlreadyRunning {
		t.Errorf("RunCreate after reopen = %v, want workflow_already_running", err)
	}
	if _, err := db.RunFinish(ctx, store.RunFinishParams{ID: run.ID, LeaseID: "lse_1", Status: protocol.RunSucceeded}); err != nil {
		t.Errorf("RunFinish after reopen: %v", err)
	}
}

// Paths are file names, not URIs: characters that mean something in a URI
// (#, ?, %, spaces) name the file they spell.
func TestOddPath(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "a b#c%20d?e")
	path := filepath.Join(dir, "copelf #1.db")
	db := openFile(t, path)
	if _, err := db.UserCreate(ctx, store.UserCreateParams{Email: "odd@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
		t.Fatalf("UserCreate: %v", err)
	}
	if _, err := db.UserGetByEmail(ctx, "odd@example.com"); err != nil {
		t.Fatalf("UserGetByEmail (read pool): %v", err)
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, m := range matches {
		if filepath.Base(m) == "copelf #1.db" {
			found = true
		}
	}
	if !found {
		t.Errorf("database not at %q; the directory holds %v", path, matches)
	}
}

func TestOpenRefusesOtherURLs(t *testing.T) {
	t.Parallel()
	for _, dsn := range []string{"sqlite://", "mysql://root:secret@localhost/copelf", "copelf.db"} {
		db, err := sqlstore.Open(context.Background(), dsn)
		if err == nil {
			db.Close()
			t.Errorf("Open(%q) = nil error", dsn)
			continue
		}
		if strings.Contains(err.Error(), "secret") {
			t.Errorf("Open(%q) error shows the password: %v", dsn, err)
		}
	}
}
