package api_test

import (
	"testing"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
	"github.com/copelf/copelf/protocol"
)

// While the database server cannot be reached, every route that needs it
// answers the typed envelope internal with details.reason
// database_unavailable and Retry-After, and the server serves again by
// itself once the database is back. The outage is a proxy cut between the
// store and PostgreSQL: the server itself is not touched.
func TestDatabaseUnavailable(t *testing.T) {
	t.Parallel()
	proxy := pgtest.NewProxy(t)
	e := newEnvAt(t, proxy.URL(pgtest.Schema(t, pgtest.Database(t))), api.Config{})
	hook, token := e.Logs, e.newUser(store.RoleMember, store.PlanPro, 0).Token
	expectStatus(t, e.get("/v1/me", token), 200)

	proxy.Cut()
	for _, path := range []string{"/v1/me", "/v1/workflows"} {
		r := e.get(path, token)
		env := expectError(t, r, protocol.CodeInternal)
		if env.Details["reason"] != api.ReasonDatabaseUnavailable {
			t.Errorf("GET %s during the outage: details %v, want reason %s", path, env.Details, api.ReasonDatabaseUnavailable)
		}
		if r.Header.Get("Retry-After") == "" {
			t.Errorf("GET %s during the outage: no Retry-After", path)
		}
	}
	// The log line names the request, as for every internal error.
	found := false
	for _, entry := range hook.AllEntries() {
		if entry.Message == "database unavailable" && entry.Data["requestId"] != nil {
			found = true
		}
	}
	if !found {
		t.Error("no log line for the outage")
	}

	proxy.Restore(t)
	expectStatus(t, e.get("/v1/me", token), 200)
	expectStatus(t, e.get("/v1/workflows", token), 200)
}

// PostgreSQL's text cannot hold a NUL character: a lookup by such a value
// finds nothing, as on SQLite, a write of one is bad_request (reason
// invalid_text), and neither is an internal error.
func TestPostgresNULInRequest(t *testing.T) {
	t.Parallel()
	e := newEnvAt(t, pgtest.Schema(t, pgtest.Database(t)), api.Config{})
	token := e.newUser(store.RoleMember, store.PlanPro, 0).Token
	expectError(t, e.get("/v1/workflows/wf_%00", token), protocol.CodeWorkflowNotFound)
	expectError(t, e.get("/v1/runs/run_%00", token), protocol.CodeNotFound)
	for _, r := range []*response{
		e.post("/v1/workflows", token, map[string]any{"name": "a\x00b", "definition": map[string]any{"version": 1, "variables": []any{}, "steps": []any{map[string]any{"type": "navigate", "url": "about:blank"}}}}),
	} {
		env := expectError(t, r, protocol.CodeBadRequest)
		if env.Details["reason"] != "invalid_text" {
			t.Errorf("%s %s: details %v, want reason invalid_text", r.Request.Method, r.Request.URL.Path, env.Details)
		}
	}
}
