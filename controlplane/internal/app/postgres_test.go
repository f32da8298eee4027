package app_test

import (
	"context"
	"encoding/json"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
)

// copelfd -db postgres://… serves on PostgreSQL: acknowledged writes survive
// a SIGKILL (they are PostgreSQL's commits), a restart on the same database
// migrates nothing twice and carries on, and SIGTERM exits 0.
func TestPostgresBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the copelfd binary")
	}
	pgtest.Skip(t)
	unsetAdminToken(t)
	const adminToken = "copelf-postgres-admin-token"
	dbURL := pgtest.Database(t)
	bin := buildCopelfd(t, t.TempDir())
	dir := t.TempDir()
	p := startProcessOn(t, bin, dbURL, dir, adminToken)
	a := newAPIClient(t)

	user := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/users", adminToken,
		map[string]any{"email": "pg@example.com", "password": "pg-password-1", "plan": "pro"})
	userID := user["id"].(string)
	sess := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/sessions", "", map[string]any{"email": "pg@example.com", "password": "pg-password-1"})
	tok := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/tokens", sess["token"].(string), map[string]any{"name": "pg", "kind": "api"})
	token := tok["token"].(string)
	a.must(t, http.StatusCreated, "POST", p.URL+"/v1/accounts/"+userID+"/credits", adminToken, map[string]any{"amount": 10, "reason": "pg"})
	def := json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"}]}`)
	wf := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/workflows", token, map[string]any{"name": "pg", "definition": def})
	run := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/workflows/"+wf["id"].(string)+"/runs", token, map[string]any{"inputs": map[string]any{}})
	p.signal(t, syscall.SIGKILL, 10*time.Second)

	p2 := startProcessOn(t, bin, dbURL, dir, adminToken)
	got := a.must(t, http.StatusOK, "GET", p2.URL+"/v1/runs/"+run["id"].(string), token, nil)
	if got["status"] != "queued" {
		t.Errorf("run after SIGKILL and restart: %v", got["status"])
	}
	a.must(t, http.StatusOK, "POST", p2.URL+"/v1/runs/"+run["id"].(string)+"/cancel", token, nil)
	if code, _ := p2.signal(t, syscall.SIGTERM, 10*time.Second); code != 0 {
		t.Fatalf("exit status %d after SIGTERM (%v)\n%s", code, p2.err, p2.out)
	}

	st, err := sqlstore.Open(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	c, err := st.CreditsGet(context.Background(), userID)
	if err != nil || c.Balance != 10 || c.Held != 0 {
		t.Errorf("credits after a cancelled queued run: %+v, %v; want balance 10, nothing held", c, err)
	}
}
