package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Every error code of the catalog that the API's routes can produce, each on
// a route that produces it (API.md §2, §12). internal is not reachable by
// design; the billing and coupon codes belong to routes this package does not
// serve yet.

// expectErr is expectError plus the rule that an error never shows internals.
func expectErr(t *testing.T, r *response, code protocol.Code) *protocol.Error {
	t.Helper()
	noLeak(t, r.Body)
	return expectError(t, r, code)
}

// userWithPassword creates a user who can sign in with testPassword.
func userWithPassword(t *testing.T, e *env, email string) *store.User {
	t.Helper()
	u, err := e.Store.UserCreate(context.Background(), store.UserCreateParams{Email: email, PasswordHash: passwordHash(), Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestErrorUnauthenticated(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{SessionTTL: time.Hour})
	advance := e.adjustableClock()
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)

	// Every user route refuses a request without a token.
	routes := []struct{ method, path string }{
		{"GET", "/v1/me"}, {"POST", "/v1/users"}, {"DELETE", "/v1/sessions/current"},
		{"POST", "/v1/tokens"}, {"GET", "/v1/tokens"}, {"DELETE", "/v1/tokens/tok_x"},
		{"POST", "/v1/workflows"}, {"GET", "/v1/workflows"}, {"GET", "/v1/workflows/" + wf},
		{"PATCH", "/v1/workflows/" + wf}, {"DELETE", "/v1/workflows/" + wf},
		{"POST", "/v1/workflows/" + wf + "/runs"}, {"POST", "/v1/workflows/" + wf + "/batches"},
		{"GET", "/v1/runs"}, {"GET", "/v1/runs/run_x"}, {"POST", "/v1/runs/run_x/cancel"},
		{"GET", "/v1/approvals"}, {"GET", "/v1/approvals/apr_x"}, {"POST", "/v1/approvals/apr_x/approve"}, {"POST", "/v1/approvals/apr_x/reject"},
		{"GET", "/v1/batches"}, {"GET", "/v1/batches/bat_x"}, {"POST", "/v1/batches/bat_x/start"}, {"POST", "/v1/batches/bat_x/cancel"}, {"GET", "/v1/batches/bat_x/results"},
		{"GET", "/v1/credits"}, {"GET", "/v1/credits/ledger"}, {"POST", "/v1/accounts/" + u.ID + "/credits"},
	}
	for _, rt := range routes {
		t.Run("no token "+rt.method+" "+rt.path, func(t *testing.T) {
			e := e.forT(t)
			expectErr(t, e.do(request{Method: rt.method, Path: rt.path, Body: map[string]any{}}), protocol.CodeUnauthenticated)
		})
	}

	t.Run("unknown or malformed token", func(t *testing.T) {
		e := e.forT(t)
		for _, h := range []string{"Bearer copelf_api_doesnotexist", "Bearer ", "Basic dXNlcjpwYXNz", u.Token, "Bearer" + u.Token} {
			r := e.do(request{Method: "GET", Path: "/v1/me", Header: map[string]string{"Authorization": h}})
			expectErr(t, r, protocol.CodeUnauthenticated)
		}
		r := e.do(request{Method: "GET", Path: "/v1/me", Header: map[string]string{"Cookie": api.SessionCookie + "=copelf_ses_nope"}})
		expectErr(t, r, protocol.CodeUnauthenticated)
	})

	t.Run("revoked token", func(t *testing.T) {
		e := e.forT(t)
		r := e.post("/v1/tokens", u.Token, map[string]any{"name": "ci", "kind": "api"})
		expectStatus(t, r, http.StatusCreated)
		tok := r.Map(t)
		expectStatus(t, e.get("/v1/me", tok["token"].(string)), http.StatusOK)
		expectStatus(t, e.del("/v1/tokens/"+tok["id"].(string), u.Token), http.StatusNoContent)
		expectErr(t, e.get("/v1/me", tok["token"].(string)), protocol.CodeUnauthenticated)
		expectErr(t, e.get("/v1/workflows", tok["token"].(string)), protocol.CodeUnauthenticated)
	})

	t.Run("wrong password", func(t *testing.T) {
		e := e.forT(t)
		userWithPassword(t, e, "grace@example.com")
		for _, body := range []map[string]any{
			{"email": "grace@example.com", "password": "wrong horse"},
			{"email": "nobody@example.com", "password": testPassword},
		} {
			er := expectErr(t, e.post("/v1/sessions", "", body), protocol.CodeUnauthenticated)
			if er.Details["reason"] != "invalid_credentials" {
				t.Fatalf("details %v", er.Details)
			}
		}
	})

	// Last: these move the server's clock.
	t.Run("expired session and token", func(t *testing.T) {
		e := e.forT(t)
		userWithPassword(t, e, "Ada@Example.com")
		r := e.post("/v1/sessions", "", map[string]any{"email": "ada@example.com", "password": testPassword})
		expectStatus(t, r, http.StatusCreated)
		session := r.Map(t)["token"].(string)
		r = e.post("/v1/tokens", u.Token, map[string]any{"name": "short", "kind": "api", "expiresInSeconds": 120})
		expectStatus(t, r, http.StatusCreated)
		short := r.Map(t)["token"].(string)
		expectStatus(t, e.get("/v1/me", session), http.StatusOK)
		expectStatus(t, e.get("/v1/me", short), http.StatusOK)

		advance(time.Hour + time.Second)
		er := expectErr(t, e.get("/v1/me", session), protocol.CodeUnauthenticated)
		if er.Details["reason"] != protocol.ReasonSessionExpired {
			t.Fatalf("expired session details %v, want reason session_expired", er.Details)
		}
		er = expectErr(t, e.do(request{Method: "GET", Path: "/v1/workflows", Header: map[string]string{"Cookie": api.SessionCookie + "=" + session}}), protocol.CodeUnauthenticated)
		if er.Details["reason"] != protocol.ReasonSessionExpired {
			t.Fatalf("expired session cookie details %v", er.Details)
		}
		er = expectErr(t, e.get("/v1/me", short), protocol.CodeUnauthenticated)
		if er.Details["reason"] == protocol.ReasonSessionExpired {
			t.Fatalf("an api token is not a session: %v", er.Details)
		}
		expectStatus(t, e.get("/v1/me", u.Token), http.StatusOK) // no expiry
	})
}

func TestErrorForbidden(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	a := e.newUser(store.RoleMember, store.PlanPro, 10)
	b := e.newUser(store.RoleMember, store.PlanPro, 10)
	free := e.newUser(store.RoleMember, store.PlanFree, 10)
	wfA, runA, aprA := e.pendingApproval(a.Token)
	wfA2 := e.newWorkflow(a.Token)
	batA := e.newBatch(a.Token, wfA2, 1)

	t.Run("another account's resources", func(t *testing.T) {
		e := e.forT(t)
		for _, r := range []*response{
			e.get("/v1/workflows/"+wfA, b.Token),
			e.get("/v1/runs/"+runA, b.Token),
			e.get("/v1/batches/"+batA, b.Token),
			e.get("/v1/approvals/"+aprA, b.Token),
			e.post("/v1/approvals/"+aprA+"/approve", b.Token, nil),
		} {
			expectErr(t, r, protocol.CodeForbidden)
		}
	})

	t.Run("role", func(t *testing.T) {
		e := e.forT(t)
		er := expectErr(t, e.post("/v1/users", b.Token, map[string]any{"email": "x@example.com", "password": "long enough", "role": "admin"}), protocol.CodeForbidden)
		if er.Details["requiredRole"] != "admin" {
			t.Fatalf("details %v", er.Details)
		}
		er = expectErr(t, e.post("/v1/accounts/"+b.ID+"/credits", b.Token, map[string]any{"amount": 100, "reason": "me"}), protocol.CodeForbidden)
		if er.Details["requiredRole"] != "admin" {
			t.Fatalf("details %v", er.Details)
		}
		er = expectErr(t, e.post("/v1/tokens", b.Token, map[string]any{"name": "anz", "kind": "analyzer"}), protocol.CodeForbidden)
		if er.Details["requiredRole"] != "admin" {
			t.Fatalf("details %v", er.Details)
		}
		er = expectErr(t, e.get("/v1/runs?accountId="+a.ID, b.Token), protocol.CodeForbidden)
		if er.Details["requiredRole"] != "operator" {
			t.Fatalf("details %v", er.Details)
		}
	})

	t.Run("plan", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(free.Token)
		er := expectErr(t, e.post("/v1/workflows/"+wf+"/batches", free.Token, batchBody(2)), protocol.CodeForbidden)
		if er.Details["requiredPlan"] != "pro" {
			t.Fatalf("details %v", er.Details)
		}
		er = expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches", Token: free.Token, Body: "username\nada\n",
			Header: map[string]string{"Content-Type": "text/csv"}}), protocol.CodeForbidden)
		if er.Details["requiredPlan"] != "pro" {
			t.Fatalf("details %v", er.Details)
		}
	})

	t.Run("agent and analyzer tokens on user routes", func(t *testing.T) {
		e := e.forT(t)
		r := e.post("/v1/tokens", b.Token, map[string]any{"name": "laptop", "kind": "agent"})
		expectStatus(t, r, http.StatusCreated)
		agent := r.Map(t)["token"].(string)
		r = e.post("/v1/tokens", e.Admin, map[string]any{"name": "analyzer", "kind": "analyzer"})
		expectStatus(t, r, http.StatusCreated)
		analyzer := r.Map(t)["token"].(string)
		for _, tok := range []string{agent, analyzer} {
			for _, r := range []*response{
				e.get("/v1/me", tok),
				e.get("/v1/workflows", tok),
				e.post("/v1/workflows", tok, map[string]any{"name": "x", "definition": json.RawMessage(sampleDefinition)}),
				e.post("/v1/tokens", tok, map[string]any{"name": "escalate", "kind": "api"}),
				e.get("/v1/credits", tok),
			} {
				er := expectErr(t, r, protocol.CodeForbidden)
				if er.Details["tokenKind"] == nil {
					t.Fatalf("details %v", er.Details)
				}
			}
		}
	})
}

func TestErrorWorkflowNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	deleted := e.newWorkflow(u.Token)
	expectStatus(t, e.del("/v1/workflows/"+deleted, u.Token), http.StatusNoContent)
	patch := map[string]any{"name": "renamed"}
	for _, id := range []string{"wf_doesnotexist", deleted, "not-even-an-id"} {
		for _, r := range []*response{
			e.get("/v1/workflows/"+id, u.Token),
			e.patch("/v1/workflows/"+id, u.Token, patch),
			e.del("/v1/workflows/"+id, u.Token),
			e.post("/v1/workflows/"+id+"/runs", u.Token, goodInputs()),
			e.post("/v1/workflows/"+id+"/batches", u.Token, batchBody(1)),
			e.do(request{Method: "POST", Path: "/v1/workflows/" + id + "/runs", Token: u.Token, Body: goodInputs(), Header: map[string]string{"Idempotency-Key": "k-" + id}}),
		} {
			expectErr(t, r, protocol.CodeWorkflowNotFound)
		}
	}
	ids, _ := listIDs(t, e.get("/v1/workflows", u.Token))
	if contains(ids, deleted) {
		t.Fatalf("deleted workflow listed: %v", ids)
	}
}

func TestErrorWorkflowNotReady(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	ctx := context.Background()
	for _, status := range []protocol.WorkflowStatus{protocol.WorkflowAnalyzing, protocol.WorkflowAnalysisFailed} {
		wf, err := e.Store.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "recorded", Status: status})
		if err != nil {
			t.Fatal(err)
		}
		r := e.get("/v1/workflows/"+wf.ID, u.Token)
		expectStatus(t, r, http.StatusOK)
		if m := r.Map(t); m["status"] != string(status) {
			t.Fatalf("workflow %s", r.Body)
		}
		for _, r := range []*response{
			e.post("/v1/workflows/"+wf.ID+"/runs", u.Token, map[string]any{"inputs": map[string]any{}}),
			e.post("/v1/workflows/"+wf.ID+"/batches", u.Token, batchBody(1)),
		} {
			er := expectErr(t, r, protocol.CodeWorkflowNotReady)
			if er.Details["status"] != string(status) {
				t.Fatalf("details %v, want status %s", er.Details, status)
			}
		}
	}
	cr, _ := e.Store.CreditsGet(ctx, u.ID)
	if cr.Held != 0 {
		t.Fatalf("credits held for a refused run: %+v", cr)
	}
}

func TestErrorWorkflowAlreadyRunning(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)

	wf := e.newWorkflow(u.Token)
	run := e.newRun(u.Token, wf)
	er := expectErr(t, e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs()), protocol.CodeWorkflowAlreadyRunning)
	if er.Details["runId"] != run {
		t.Fatalf("details %v, want runId %s", er.Details, run)
	}
	bat := e.newBatch(u.Token, wf, 2) // creating is fine; starting is not
	er = expectErr(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), protocol.CodeWorkflowAlreadyRunning)
	if er.Details["runId"] != run {
		t.Fatalf("details %v, want runId %s", er.Details, run)
	}

	wf2 := e.newWorkflow(u.Token)
	bat2 := e.newBatch(u.Token, wf2, 2)
	expectStatus(t, e.post("/v1/batches/"+bat2+"/start", u.Token, nil), http.StatusOK)
	er = expectErr(t, e.post("/v1/workflows/"+wf2+"/runs", u.Token, goodInputs()), protocol.CodeWorkflowAlreadyRunning)
	if er.Details["batchId"] != bat2 {
		t.Fatalf("details %v, want batchId %s", er.Details, bat2)
	}
	cr := e.get("/v1/credits", u.Token).Map(t)
	if cr["held"] != 3.0 {
		t.Fatalf("credits %v, want 3 held (one run, one batch of two)", cr)
	}
}

func TestErrorWorkflowHasActiveRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)

	t.Run("active run", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(u.Token)
		run := e.newRun(u.Token, wf)
		for _, r := range []*response{
			e.patch("/v1/workflows/"+wf, u.Token, map[string]any{"name": "renamed"}),
			e.del("/v1/workflows/"+wf, u.Token),
		} {
			er := expectErr(t, r, protocol.CodeWorkflowHasActiveRequests)
			if er.Details["runId"] != run {
				t.Fatalf("details %v", er.Details)
			}
		}
		expectStatus(t, e.post("/v1/runs/"+run+"/cancel", u.Token, nil), http.StatusOK)
		expectStatus(t, e.patch("/v1/workflows/"+wf, u.Token, map[string]any{"name": "renamed"}), http.StatusOK)
	})

	t.Run("pending approval", func(t *testing.T) {
		e := e.forT(t)
		wf, _, apr := e.pendingApproval(u.Token)
		for _, r := range []*response{
			e.patch("/v1/workflows/"+wf, u.Token, map[string]any{"definition": json.RawMessage(sampleDefinition)}),
			e.del("/v1/workflows/"+wf, u.Token),
		} {
			er := expectErr(t, r, protocol.CodeWorkflowHasActiveRequests)
			if !reflect.DeepEqual(er.Details["approvalIds"], []any{apr}) {
				t.Fatalf("details %v, want approvalIds [%s]", er.Details, apr)
			}
		}
		expectStatus(t, e.get("/v1/workflows/"+wf, u.Token), http.StatusOK)
	})

	t.Run("running batch", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(u.Token)
		bat := e.newBatch(u.Token, wf, 1)
		expectStatus(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), http.StatusOK)
		er := expectErr(t, e.del("/v1/workflows/"+wf, u.Token), protocol.CodeWorkflowHasActiveRequests)
		if er.Details["batchId"] != bat {
			t.Fatalf("details %v", er.Details)
		}
	})
}

func TestErrorBatchNotFoundAndCompleted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)

	for _, r := range []*response{
		e.get("/v1/batches/bat_doesnotexist", u.Token),
		e.post("/v1/batches/bat_doesnotexist/start", u.Token, nil),
		e.post("/v1/batches/bat_doesnotexist/cancel", u.Token, nil),
		e.get("/v1/batches/bat_doesnotexist/results", u.Token),
	} {
		expectErr(t, r, protocol.CodeBatchNotFound)
	}

	wf := e.newWorkflow(u.Token)
	bat := e.newBatch(u.Token, wf, 3)
	r := e.post("/v1/batches/"+bat+"/start", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	var started struct {
		Iterations []struct{ RunID string } `json:"iterations"`
	}
	r.JSON(t, &started)
	for _, it := range started.Iterations {
		e.finishRun(it.RunID, protocol.RunSucceeded)
	}
	r = e.get("/v1/batches/"+bat, u.Token)
	if r.Map(t)["status"] != "completed" {
		t.Fatalf("batch %s", r.Body)
	}
	expectErr(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), protocol.CodeBatchAlreadyCompleted)
	expectErr(t, e.post("/v1/batches/"+bat+"/cancel", u.Token, nil), protocol.CodeConflict)
}

func TestErrorInsufficientCredits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{RunCost: 2})
	poor := e.newUser(store.RoleMember, store.PlanPro, 1)
	wf := e.newWorkflow(poor.Token)
	er := expectErr(t, e.post("/v1/workflows/"+wf+"/runs", poor.Token, goodInputs()), protocol.CodeInsufficientCredits)
	if er.Details["required"] != 2.0 || er.Details["available"] != 1.0 {
		t.Fatalf("details %v, want required 2 available 1", er.Details)
	}
	// The refused run left nothing behind: the workflow is free, nothing held.
	expectStatus(t, e.patch("/v1/workflows/"+wf, poor.Token, map[string]any{"name": "still editable"}), http.StatusOK)
	if cr := e.get("/v1/credits", poor.Token).Map(t); cr["held"] != 0.0 || cr["available"] != 1.0 {
		t.Fatalf("credits %v", cr)
	}

	some := e.newUser(store.RoleMember, store.PlanPro, 5)
	wf2 := e.newWorkflow(some.Token)
	bat := e.newBatch(some.Token, wf2, 3)
	er = expectErr(t, e.post("/v1/batches/"+bat+"/start", some.Token, nil), protocol.CodeInsufficientCredits)
	if er.Details["required"] != 6.0 || er.Details["available"] != 5.0 {
		t.Fatalf("details %v, want required 6 available 5", er.Details)
	}
	if b := e.get("/v1/batches/"+bat, some.Token).Map(t); b["status"] != "created" {
		t.Fatalf("batch after refused start: %v", b)
	}
	runs, _ := listIDs(t, e.get("/v1/runs?workflowId="+wf2, some.Token))
	if len(runs) != 0 {
		t.Fatalf("refused batch start created runs %v", runs)
	}
}

func TestErrorBadRequest(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 100)
	wf := e.newWorkflow(u.Token)
	numWF := e.post("/v1/workflows", u.Token, map[string]any{"name": "typed", "definition": json.RawMessage(`{"version":1,
		"variables":[{"name":"n","type":"number"},{"name":"ok","type":"boolean"},{"name":"s","type":"string"}],
		"steps":[{"type":"navigate","url":"http://127.0.0.1/{{s}}"}]}`)}).Map(t)["id"].(string)
	runs := "/v1/workflows/" + wf + "/runs"
	batches := "/v1/workflows/" + numWF + "/batches"
	js := map[string]string{"Content-Type": "application/json"}
	csv := map[string]string{"Content-Type": "text/csv"}
	big := `{"name":"` + strings.Repeat("a", api.MaxBodyBytes+10) + `","definition":{}}`

	cases := []struct {
		name         string
		rq           request
		reason       string   // details.reason, when set
		fields       []string // details.fields[].field, when set
		idempotently bool
	}{
		{name: "malformed JSON", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{"name":`, Header: js}, reason: "malformed_json"},
		{name: "not JSON at all", rq: request{Method: "POST", Path: runs, Body: `inputs=1`, Header: js}, reason: "malformed_json"},
		{name: "empty body", rq: request{Method: "POST", Path: runs, Body: ``, Header: js}, reason: "malformed_json"},
		{name: "empty body without content type", rq: request{Method: "POST", Path: "/v1/tokens"}, reason: "malformed_json"},
		{name: "trailing data", rq: request{Method: "POST", Path: runs, Body: `{"inputs":{"username":"a"}} {}`, Header: js}, reason: "malformed_json"},
		{name: "two objects", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{}{}`, Header: js}, reason: "malformed_json"},
		{name: "wrong type of a field", rq: request{Method: "POST", Path: runs, Body: `{"inputs":"username=ada"}`, Header: js}, fields: []string{"inputs"}},
		{name: "wrong type of name", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{"name":5,"definition":` + sampleDefinition + `}`, Header: js}, fields: []string{"name"}},
		{name: "wrong type of the body", rq: request{Method: "POST", Path: "/v1/tokens", Body: `["api"]`, Header: js}, fields: []string{"body"}},
		{name: "wrong type in the definition", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{"name":"x","definition":{"version":"1","variables":[],"steps":[{"type":"click","selector":7}]}}`, Header: js},
			fields: []string{"definition.steps[0].selector", "definition.version"}},
		{name: "wrong type of amount", rq: request{Method: "POST", Path: "/v1/accounts/" + u.ID + "/credits", Body: `{"amount":"10","reason":"x"}`, Header: js, Token: e.Admin}, fields: []string{"amount"}},
		{name: "unknown field", rq: request{Method: "POST", Path: runs, Body: `{"inputs":{"username":"a"},"input":{}}`, Header: js}, fields: []string{"input"}},
		{name: "unknown field in the definition", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{"name":"x","definition":{"version":1,"steps":[{"type":"click","selector":"#a","xpath":"//a"}]}}`, Header: js},
			fields: []string{"definition.steps[0].xpath"}},
		{name: "missing fields", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{}`, Header: js}, fields: []string{"definition", "name"}},
		{name: "missing grant fields", rq: request{Method: "POST", Path: "/v1/accounts/" + u.ID + "/credits", Body: `{}`, Header: js, Token: e.Admin}, fields: []string{"amount", "reason"}},
		{name: "missing iterations", rq: request{Method: "POST", Path: batches, Body: `{"concurrency":2}`, Header: js}, fields: []string{"iterations"}},
		{name: "body over 1 MiB", rq: request{Method: "POST", Path: "/v1/workflows", Body: big, Header: js}, reason: "body_too_large"},
		{name: "body over 1 MiB with an idempotency key", rq: request{Method: "POST", Path: runs, Body: big, Header: map[string]string{"Content-Type": "application/json", "Idempotency-Key": "big"}}, reason: "body_too_large"},
		{name: "CSV over 1 MiB", rq: request{Method: "POST", Path: batches, Body: "s\n" + strings.Repeat("a", api.MaxBodyBytes+10) + "\n", Header: csv}, reason: "body_too_large"},
		{name: "limit zero", rq: request{Method: "GET", Path: "/v1/workflows?limit=0"}, fields: []string{"limit"}},
		{name: "limit too large", rq: request{Method: "GET", Path: "/v1/runs?limit=501"}, fields: []string{"limit"}},
		{name: "limit not a number", rq: request{Method: "GET", Path: "/v1/batches?limit=ten"}, fields: []string{"limit"}},
		{name: "negative limit", rq: request{Method: "GET", Path: "/v1/credits/ledger?limit=-1"}, fields: []string{"limit"}},
		{name: "cursor garbage", rq: request{Method: "GET", Path: "/v1/workflows?cursor=%21%21%21"}, fields: []string{"cursor"}},
		{name: "cursor of another shape", rq: request{Method: "GET", Path: "/v1/runs?cursor=aGVsbG8"}, fields: []string{"cursor"}},
		{name: "cursor on approvals", rq: request{Method: "GET", Path: "/v1/approvals?cursor=zzz"}, fields: []string{"cursor"}},
		{name: "run status filter", rq: request{Method: "GET", Path: "/v1/runs?status=done"}, fields: []string{"status"}},
		{name: "approval status filter", rq: request{Method: "GET", Path: "/v1/approvals?status=open"}, fields: []string{"status"}},
		{name: "wrong content type", rq: request{Method: "POST", Path: "/v1/workflows", Body: `{"name":"x"}`, Header: map[string]string{"Content-Type": "text/plain"}}, reason: "unsupported_content_type"},
		{name: "form content type", rq: request{Method: "POST", Path: runs, Body: `inputs=1`, Header: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}}, reason: "unsupported_content_type"},
		{name: "CSV on a JSON route", rq: request{Method: "POST", Path: runs, Body: "username\nada\n", Header: csv}, reason: "unsupported_content_type"},
		{name: "unparsable content type", rq: request{Method: "POST", Path: "/v1/tokens", Body: `{}`, Header: map[string]string{"Content-Type": "application/json; charset"}}, reason: "unsupported_content_type"},
		{name: "CSV empty", rq: request{Method: "POST", Path: batches, Body: "", Header: csv}, reason: "malformed_csv"},
		{name: "CSV unterminated quote", rq: request{Method: "POST", Path: batches, Body: "s,n\n\"abc,1\n", Header: csv}, reason: "malformed_csv"},
		{name: "CSV ragged row", rq: request{Method: "POST", Path: batches, Body: "s,n\na,1\nb\n", Header: csv}, reason: "malformed_csv"},
		{name: "CSV bare quote", rq: request{Method: "POST", Path: batches, Body: "s,n\na\"b,1\n", Header: csv}, reason: "malformed_csv"},
		{name: "CSV duplicate column", rq: request{Method: "POST", Path: batches, Body: "s,s\na,b\n", Header: csv}, fields: []string{"header[1]"}},
		{name: "CSV concurrency query", rq: request{Method: "POST", Path: batches + "?concurrency=lots", Body: "s\na\n", Header: csv}, fields: []string{"concurrency"}},
		{name: "CSV stopOnFailure query", rq: request{Method: "POST", Path: batches + "?stopOnFailure=maybe", Body: "s\na\n", Header: csv}, fields: []string{"stopOnFailure"}},
		{name: "idempotency key too long", rq: request{Method: "POST", Path: runs, Body: `{"inputs":{}}`, Header: map[string]string{"Content-Type": "application/json", "Idempotency-Key": strings.Repeat("k", 256)}}, fields: []string{"Idempotency-Key"}},
		{name: "sign out with an API token", rq: request{Method: "DELETE", Path: "/v1/sessions/current"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := e.forT(t)
			if c.rq.Token == "" {
				c.rq.Token = u.Token
			}
			er := expectErr(t, e.do(c.rq), protocol.CodeBadRequest)
			if c.reason != "" && er.Details["reason"] != c.reason {
				t.Fatalf("details %v, want reason %s", er.Details, c.reason)
			}
			if c.fields != nil {
				if got := fieldNames(t, er); !reflect.DeepEqual(got, c.fields) {
					t.Fatalf("fields %v, want %v", got, c.fields)
				}
			}
		})
	}
	// Nothing of the above was created.
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 0.0 {
		t.Fatalf("credits %v", cr)
	}
	if ids, _ := listIDs(t, e.get("/v1/batches", u.Token)); len(ids) != 0 {
		t.Fatalf("batches %v", ids)
	}
}

func TestErrorUnprocessable(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 100)
	def := func(vars, steps string) map[string]any {
		return map[string]any{"name": "wf", "definition": json.RawMessage(`{"version":1,"variables":` + vars + `,"steps":` + steps + `}`)}
	}
	click := `[{"type":"click","selector":"#go"}]`

	t.Run("definitions", func(t *testing.T) {
		e := e.forT(t)
		cases := []struct {
			name  string
			body  map[string]any
			field string
		}{
			{"reserved variable name", def(`[{"name":"run","type":"string"}]`, click), "definition.variables[0].name"},
			{"reserved name in another case", def(`[{"name":"a","type":"string"},{"name":"Now","type":"string"}]`, click), "definition.variables[1].name"},
			{"invalid variable name", def(`[{"name":"1abc","type":"string"}]`, click), "definition.variables[0].name"},
			{"unknown variable type", def(`[{"name":"a","type":"date"}]`, click), "definition.variables[0].type"},
			{"unknown step type", def(`[]`, `[{"type":"hover","selector":"#a"}]`), "definition.steps[0].type"},
			{"no steps", def(`[]`, `[]`), "definition.steps"},
			{"wrong version", map[string]any{"name": "wf", "definition": json.RawMessage(`{"version":2,"steps":` + click + `}`)}, "definition.version"},
			{"undeclared reference", def(`[]`, `[{"type":"type","selector":"#a","text":"{{who}}"}]`), "definition.steps[0].text"},
		}
		for _, c := range cases {
			er := expectErr(t, e.post("/v1/workflows", u.Token, c.body), protocol.CodeUnprocessableEntity)
			if !hasField(t, er, c.field) {
				t.Fatalf("%s: fields %v, want %s", c.name, fieldNames(t, er), c.field)
			}
		}
		er := expectErr(t, e.post("/v1/workflows", u.Token, map[string]any{"name": "  ", "definition": json.RawMessage(sampleDefinition)}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "name") {
			t.Fatal(fieldNames(t, er))
		}
		wf := e.newWorkflow(u.Token)
		er = expectErr(t, e.patch("/v1/workflows/"+wf, u.Token, def(`[{"name":"null","type":"string"}]`, click)), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "definition.variables[0].name") {
			t.Fatal(fieldNames(t, er))
		}
	})

	r := e.post("/v1/workflows", u.Token, def(`[{"name":"code","type":"string","required":true,"pattern":"[A-Z]{3}"},
		{"name":"n","type":"number","min":1,"max":10},{"name":"flag","type":"boolean"},{"name":"pin","type":"secret","maxLength":4}]`,
		`[{"type":"type","selector":"#c","text":"{{code}} {{n}} {{flag}} {{pin}}"}]`))
	expectStatus(t, r, http.StatusCreated)
	wf := r.Map(t)["id"].(string)

	t.Run("run inputs", func(t *testing.T) {
		e := e.forT(t)
		cases := []struct {
			name   string
			inputs map[string]any
			fields []string
		}{
			{"required missing", map[string]any{"n": 2}, []string{"inputs.code"}},
			{"required null", map[string]any{"code": nil}, []string{"inputs.code"}},
			{"pattern", map[string]any{"code": "abc"}, []string{"inputs.code"}},
			{"pattern must match the whole value", map[string]any{"code": "XABCX"}, []string{"inputs.code"}},
			{"wrong type string", map[string]any{"code": 123}, []string{"inputs.code"}},
			{"wrong type number", map[string]any{"code": "ABC", "n": "5"}, []string{"inputs.n"}},
			{"wrong type boolean", map[string]any{"code": "ABC", "flag": "yes"}, []string{"inputs.flag"}},
			{"above max", map[string]any{"code": "ABC", "n": 11}, []string{"inputs.n"}},
			{"secret too long", map[string]any{"code": "ABC", "pin": "12345"}, []string{"inputs.pin"}},
			{"unknown input", map[string]any{"code": "ABC", "x": 1}, []string{"inputs.x"}},
			{"several at once", map[string]any{"n": 0, "flag": 1}, []string{"inputs.code", "inputs.flag", "inputs.n"}},
		}
		for _, c := range cases {
			er := expectErr(t, e.post("/v1/workflows/"+wf+"/runs", u.Token, map[string]any{"inputs": c.inputs}), protocol.CodeUnprocessableEntity)
			if got := fieldNames(t, er); !reflect.DeepEqual(got, c.fields) {
				t.Fatalf("%s: fields %v, want %v", c.name, got, c.fields)
			}
			if strings.Contains(string(er.Message), "12345") || strings.Contains(string(mustJSON(er.Details)), "12345") {
				t.Fatalf("a secret value appears in an error: %v", er)
			}
		}
		er := expectErr(t, e.post("/v1/workflows/"+wf+"/runs", u.Token, map[string]any{"inputs": map[string]any{"code": "ABC"}, "queueTimeoutMs": -1}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "queueTimeoutMs") {
			t.Fatal(fieldNames(t, er))
		}
	})

	t.Run("batch inputs", func(t *testing.T) {
		e := e.forT(t)
		body := map[string]any{"iterations": []any{
			map[string]any{"inputs": map[string]any{"code": "ABC"}},
			map[string]any{"inputs": map[string]any{"code": "abc"}},
			map[string]any{"inputs": map[string]any{"code": "ABC", "n": 100}},
		}}
		er := expectErr(t, e.post("/v1/workflows/"+wf+"/batches", u.Token, body), protocol.CodeUnprocessableEntity)
		if got := fieldNames(t, er); !reflect.DeepEqual(got, []string{"iterations[1].inputs.code", "iterations[2].inputs.n"}) {
			t.Fatalf("fields %v", got)
		}
		er = expectErr(t, e.post("/v1/workflows/"+wf+"/batches", u.Token, map[string]any{"iterations": []any{}}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "iterations") {
			t.Fatal(fieldNames(t, er))
		}
		er = expectErr(t, e.post("/v1/workflows/"+wf+"/batches", u.Token, map[string]any{"iterations": []any{map[string]any{"inputs": map[string]any{"code": "ABC"}}}, "concurrency": 0}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "concurrency") {
			t.Fatal(fieldNames(t, er))
		}
		csv := map[string]string{"Content-Type": "text/csv"}
		er = expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches", Token: u.Token, Body: "code,n,flag\nABC,1,true\nABC,x,maybe\n,2,0\n", Header: csv}), protocol.CodeUnprocessableEntity)
		if got := fieldNames(t, er); !reflect.DeepEqual(got, []string{"iterations[1].inputs.flag", "iterations[1].inputs.n", "iterations[2].inputs.code"}) {
			t.Fatalf("fields %v", got)
		}
		er = expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches", Token: u.Token, Body: "code,color\nABC,red\n", Header: csv}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "iterations[0].inputs.color") {
			t.Fatal(fieldNames(t, er))
		}
		er = expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches", Token: u.Token, Body: "code\n", Header: csv}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "iterations") {
			t.Fatal(fieldNames(t, er))
		}
	})

	t.Run("accounts", func(t *testing.T) {
		e := e.forT(t)
		er := expectErr(t, e.post("/v1/users", e.Admin, map[string]any{"email": "not an email", "password": "short", "role": "root", "plan": "gold"}), protocol.CodeUnprocessableEntity)
		if got := fieldNames(t, er); !reflect.DeepEqual(got, []string{"email", "password", "plan", "role"}) {
			t.Fatalf("fields %v", got)
		}
		er = expectErr(t, e.post("/v1/tokens", u.Token, map[string]any{"name": "x", "kind": "root", "expiresInSeconds": 0}), protocol.CodeUnprocessableEntity)
		if got := fieldNames(t, er); !reflect.DeepEqual(got, []string{"expiresInSeconds", "kind"}) {
			t.Fatalf("fields %v", got)
		}
		er = expectErr(t, e.post("/v1/accounts/"+u.ID+"/credits", e.Admin, map[string]any{"amount": 0, "reason": "nothing"}), protocol.CodeUnprocessableEntity)
		if !hasField(t, er, "amount") {
			t.Fatal(fieldNames(t, er))
		}
	})
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func TestErrorNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	run := e.newRun(u.Token, wf)

	t.Run("unknown routes", func(t *testing.T) {
		e := e.forT(t)
		for _, rq := range []request{
			{Method: "GET", Path: "/v1/nothing"},
			{Method: "GET", Path: "/nothing"},
			{Method: "GET", Path: "/v2/workflows"},
			{Method: "GET", Path: "/v1/workflows/"},
			{Method: "POST", Path: "/v1/workflows/" + wf + "/clone"},
			{Method: "GET", Path: "/v1/runs/" + run + "/cancel/now"},
			{Method: "DELETE", Path: "/v1"},
			{Method: "GET", Path: "/v1/nothing", Token: "-"}, // unauthenticated callers get the same answer
			// Unclean paths are not redirected (the mux would answer HTML).
			{Method: "GET", Path: "/v1//me"},
			{Method: "GET", Path: "/v1/./me"},
			{Method: "POST", Path: "/v1/workflows/../workflows"},
			{Method: "GET", Path: "/v1/runs/" + run + "/.."},
		} {
			if rq.Token == "" {
				rq.Token = u.Token
			} else {
				rq.Token = ""
			}
			expectErr(t, e.do(rq), protocol.CodeNotFound)
		}
	})

	t.Run("unknown resources", func(t *testing.T) {
		e := e.forT(t)
		for _, r := range []*response{
			e.get("/v1/runs/run_doesnotexist", u.Token),
			e.post("/v1/runs/run_doesnotexist/cancel", u.Token, nil),
			e.get("/v1/approvals/apr_doesnotexist", u.Token),
			e.post("/v1/approvals/apr_doesnotexist/approve", u.Token, nil),
			e.post("/v1/approvals/apr_doesnotexist/reject", u.Token, map[string]any{"comment": "no"}),
			e.del("/v1/tokens/tok_doesnotexist", u.Token),
			e.del("/v1/tokens/nonsense", u.Token),
			e.post("/v1/accounts/usr_doesnotexist/credits", e.Admin, map[string]any{"amount": 5, "reason": "gift"}),
		} {
			expectErr(t, r, protocol.CodeNotFound)
		}
		// Another user's token is not found either, and stays valid.
		other := e.newUser(store.RoleMember, store.PlanFree, 0)
		tokens := e.get("/v1/tokens", other.Token)
		ids, _ := listIDs(t, tokens)
		expectErr(t, e.del("/v1/tokens/"+ids[0], u.Token), protocol.CodeNotFound)
		expectStatus(t, e.get("/v1/me", other.Token), http.StatusOK)
	})

	t.Run("wrong method", func(t *testing.T) {
		e := e.forT(t)
		cases := []struct{ method, path, allow string }{
			{"PUT", "/v1/workflows", "GET, POST"},
			{"DELETE", "/v1/workflows", "GET, POST"},
			{"POST", "/v1/workflows/" + wf, "DELETE, GET, PATCH"},
			{"PUT", "/v1/workflows/" + wf, "DELETE, GET, PATCH"},
			{"GET", "/v1/workflows/" + wf + "/runs", "POST"},
			{"DELETE", "/v1/runs/" + run, "GET"},
			{"GET", "/v1/runs/" + run + "/cancel", "POST"},
			{"GET", "/v1/approvals/apr_x/approve", "POST"},
			{"PATCH", "/v1/batches/bat_x", "GET"},
			{"POST", "/v1/credits", "GET"},
			{"GET", "/v1/users", "POST"},
			{"GET", "/v1/sessions", "POST"},
			{"OPTIONS", "/v1/me", "GET"},
		}
		for _, c := range cases {
			r := e.do(request{Method: c.method, Path: c.path, Token: u.Token})
			expectErr(t, r, protocol.CodeNotFound)
			if got := r.Header.Get("Allow"); got != c.allow {
				t.Fatalf("%s %s: Allow %q, want %q", c.method, c.path, got, c.allow)
			}
		}
		// HEAD is GET without a body.
		r := e.do(request{Method: "HEAD", Path: "/v1/me", Token: u.Token})
		expectStatus(t, r, http.StatusOK)
		if len(r.Body) != 0 {
			t.Fatalf("HEAD body %q", r.Body)
		}
	})
	// The run was not touched by any of this.
	if m := e.get("/v1/runs/"+run, u.Token).Map(t); m["status"] != "queued" {
		t.Fatalf("run %v", m)
	}
}

func TestErrorConflict(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)

	t.Run("cancel a finished run", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(u.Token)
		run := e.newRun(u.Token, wf)
		expectStatus(t, e.post("/v1/runs/"+run+"/cancel", u.Token, nil), http.StatusOK)
		er := expectErr(t, e.post("/v1/runs/"+run+"/cancel", u.Token, nil), protocol.CodeConflict)
		if er.Details["status"] != "cancelled" {
			t.Fatalf("details %v", er.Details)
		}
		run = e.newRun(u.Token, wf)
		e.finishRun(run, protocol.RunSucceeded)
		expectErr(t, e.post("/v1/runs/"+run+"/cancel", u.Token, nil), protocol.CodeConflict)
		if m := e.get("/v1/runs/"+run, u.Token).Map(t); m["status"] != "succeeded" {
			t.Fatalf("run %v", m)
		}
	})

	t.Run("resolve a resolved approval", func(t *testing.T) {
		e := e.forT(t)
		_, _, apr := e.pendingApproval(u.Token)
		expectStatus(t, e.post("/v1/approvals/"+apr+"/approve", u.Token, nil), http.StatusOK)
		for _, action := range []string{"approve", "reject"} {
			er := expectErr(t, e.post("/v1/approvals/"+apr+"/"+action, u.Token, map[string]any{"comment": "again"}), protocol.CodeConflict)
			if er.Details["status"] != "approved" {
				t.Fatalf("details %v", er.Details)
			}
		}
	})

	t.Run("idempotency key reused with another body", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(u.Token)
		key := map[string]string{"Idempotency-Key": "order-42"}
		r := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/runs", Token: u.Token, Body: goodInputs(), Header: key})
		expectStatus(t, r, http.StatusCreated)
		other := map[string]any{"inputs": map[string]any{"username": "grace"}}
		er := expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/runs", Token: u.Token, Body: other, Header: key}), protocol.CodeConflict)
		if er.Details["reason"] != "idempotency_key_reused" {
			t.Fatalf("details %v", er.Details)
		}
		// The same key on another route is another request too.
		wf2 := e.newWorkflow(u.Token)
		expectErr(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/runs", Token: u.Token, Body: goodInputs(), Header: key}), protocol.CodeConflict)
	})

	t.Run("duplicate email", func(t *testing.T) {
		e := e.forT(t)
		if _, err := e.Store.UserCreate(context.Background(), store.UserCreateParams{Email: "Lin@Example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
			t.Fatal(err)
		}
		body := map[string]any{"email": "lin@example.COM", "password": "long enough", "role": "member"}
		er := expectErr(t, e.post("/v1/users", e.Admin, body), protocol.CodeConflict)
		if strings.Contains(er.Message, "UNIQUE") {
			t.Fatalf("message %q", er.Message)
		}
	})

	t.Run("batch state", func(t *testing.T) {
		e := e.forT(t)
		wf := e.newWorkflow(u.Token)
		bat := e.newBatch(u.Token, wf, 1)
		expectStatus(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), http.StatusOK)
		expectErr(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), protocol.CodeConflict)
		expectStatus(t, e.post("/v1/batches/"+bat+"/cancel", u.Token, nil), http.StatusOK)
		expectErr(t, e.post("/v1/batches/"+bat+"/cancel", u.Token, nil), protocol.CodeConflict)
		expectErr(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), protocol.CodeConflict)
	})
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 10)
	wf := e.newWorkflow(u.Token)

	t.Run("every response carries one", func(t *testing.T) {
		e := e.forT(t)
		seen := map[string]bool{}
		for _, r := range []*response{
			e.get("/v1/me", u.Token),
			e.get("/v1/me", ""),
			e.get("/v1/nothing", u.Token),
			e.do(request{Method: "PUT", Path: "/v1/me", Token: u.Token}),
			e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs()),
			e.del("/v1/workflows/"+e.newWorkflow(u.Token), u.Token),
			e.get("/healthz", ""),
		} {
			id := r.Header.Get("X-Request-Id")
			if !strings.HasPrefix(id, "req_") || seen[id] {
				t.Fatalf("%s %s: X-Request-Id %q", r.Request.Method, r.Request.URL, id)
			}
			seen[id] = true
		}
	})

	t.Run("well-formed ids are kept", func(t *testing.T) {
		e := e.forT(t)
		for _, id := range []string{"a", "trace-123_ABC", strings.Repeat("x", 64), "req_client"} {
			r := e.do(request{Method: "GET", Path: "/v1/workflows/wf_nope", Token: u.Token, Header: map[string]string{"X-Request-Id": id}})
			if got := expectErr(t, r, protocol.CodeWorkflowNotFound).RequestID; got != id || r.Header.Get("X-Request-Id") != id {
				t.Fatalf("sent %q, got header %q body %q", id, r.Header.Get("X-Request-Id"), got)
			}
			r = e.do(request{Method: "GET", Path: "/v1/me", Token: u.Token, Header: map[string]string{"X-Request-Id": id}})
			if got := r.Header.Get("X-Request-Id"); got != id {
				t.Fatalf("sent %q, got %q", id, got)
			}
		}
	})

	t.Run("malformed ids are replaced", func(t *testing.T) {
		e := e.forT(t)
		for _, id := range []string{strings.Repeat("x", 65), "has space", "semi;colon", "dot.ted", "<script>", "ünïcode", "new\tline"} {
			r := e.do(request{Method: "GET", Path: "/v1/runs/run_nope", Token: u.Token, Header: map[string]string{"X-Request-Id": id}})
			er := expectErr(t, r, protocol.CodeNotFound)
			if er.RequestID == id || !strings.HasPrefix(er.RequestID, "req_") || len(er.RequestID) < len("req_")+20 {
				t.Fatalf("sent %q, got %q", id, er.RequestID)
			}
		}
	})

	t.Run("the log line has it", func(t *testing.T) {
		// Straight through the handler: the log line is written before
		// ServeHTTP returns.
		for _, tc := range []struct {
			method, path, token, id string
			status                  int
		}{
			{"GET", "/v1/me", u.Token, "log-ok-1", 200},
			{"GET", "/v1/workflows/wf_nope", u.Token, "log-err-2", 404},
			{"GET", "/v1/me", "", "log-unauth-3", 401},
			{"GET", "/nothing", "", "log-route-4", 404},
		} {
			req := httptest.NewRequest(tc.method, tc.path, nil)
			req.Header.Set("X-Request-Id", tc.id)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			rec := httptest.NewRecorder()
			e.API.ServeHTTP(rec, req)
			if rec.Code != tc.status {
				t.Fatalf("%s: status %d", tc.path, rec.Code)
			}
			found := false
			for _, entry := range e.Logs.AllEntries() {
				if entry.Data["requestId"] == tc.id {
					found = true
					if entry.Data["status"] != tc.status || entry.Data["path"] != tc.path {
						t.Fatalf("log line %v", entry.Data)
					}
				}
			}
			if !found {
				t.Fatalf("no log line with requestId %s", tc.id)
			}
		}
	})
}

// TestErrorsNeverLeak sends hostile input to every creating route and checks
// every error body for internals.
func TestErrorsNeverLeak(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	bodies := []string{
		`{"name":"x'); DROP TABLE workflows;--","definition":` + sampleDefinition + `}`,
		`{"inputs":{"username":"' OR 1=1 --"}}`,
		`{"iterations":[{"inputs":{"username":"\u0000"}}]}`,
		`{"name":"\ud800"}`,
		`{"inputs":{"username":1e999}}`,
		`{"definition":{"version":1e400}}`,
		`{"a":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`,
		"\xff\xfe",
		`null`,
		`{"inputs":null}`,
		`{"name":null,"definition":null}`,
	}
	paths := []string{"/v1/workflows", "/v1/workflows/" + wf + "/runs", "/v1/workflows/" + wf + "/batches", "/v1/workflows/" + wf,
		"/v1/tokens", "/v1/sessions", "/v1/approvals/apr_'--/approve", "/v1/runs/run_%27%3B--/cancel", "/v1/batches/bat_%00/start"}
	for _, p := range paths {
		for _, b := range bodies {
			for _, m := range []string{"POST", "PATCH"} {
				r := e.do(request{Method: m, Path: p, Token: u.Token, Body: b, Header: map[string]string{"Content-Type": "application/json"}})
				noLeak(t, r.Body)
				if r.StatusCode >= 500 {
					t.Fatalf("%s %s %q: %d %s", m, p, b, r.StatusCode, r.Body)
				}
				if r.StatusCode >= 400 {
					if p := envelopeProblem(r.StatusCode, r.Header, r.Body); p != "" {
						t.Fatalf("%s %s: %s: %s", m, r.Request.URL.Path, p, r.Body)
					}
				}
			}
		}
	}
}

// TestErrorRunCheckOrder: when several errors apply to POST runs, the first of
// auth, workflow exists, owner, ready, inputs valid, no active run or batch,
// credits wins (API.md §5).
func TestErrorRunCheckOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	ctx := context.Background()
	a := e.newUser(store.RoleMember, store.PlanPro, 1)
	b := e.newUser(store.RoleMember, store.PlanPro, 0)
	analyzing, err := e.Store.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: a.ID, Name: "recording", Status: protocol.WorkflowAnalyzing})
	if err != nil {
		t.Fatal(err)
	}
	busy := e.newWorkflow(a.Token)
	e.newRun(a.Token, busy) // takes a's only credit
	deleted := e.newWorkflow(a.Token)
	expectStatus(t, e.del("/v1/workflows/"+deleted, a.Token), http.StatusNoContent)
	bad := map[string]any{"inputs": map[string]any{"nope": 1}}
	long := map[string]string{"Idempotency-Key": strings.Repeat("k", 300)}

	cases := []struct {
		name string
		rq   request
		want protocol.Code
	}{
		{"auth before everything", request{Path: "/v1/workflows/wf_nope/runs", Body: bad}, protocol.CodeUnauthenticated},
		{"auth before the idempotency key", request{Path: "/v1/workflows/wf_nope/runs", Body: bad, Header: long}, protocol.CodeUnauthenticated},
		{"auth before the body", request{Path: "/v1/workflows/" + busy + "/runs", Body: "{"}, protocol.CodeUnauthenticated},
		{"exists before owner", request{Path: "/v1/workflows/" + deleted + "/runs", Token: b.Token, Body: bad}, protocol.CodeWorkflowNotFound},
		{"owner before ready", request{Path: "/v1/workflows/" + analyzing.ID + "/runs", Token: b.Token, Body: bad}, protocol.CodeForbidden},
		{"ready before inputs", request{Path: "/v1/workflows/" + analyzing.ID + "/runs", Token: a.Token, Body: bad}, protocol.CodeWorkflowNotReady},
		{"inputs before the active run", request{Path: "/v1/workflows/" + busy + "/runs", Token: a.Token, Body: bad}, protocol.CodeUnprocessableEntity},
		{"active run before credits", request{Path: "/v1/workflows/" + busy + "/runs", Token: a.Token, Body: goodInputs()}, protocol.CodeWorkflowAlreadyRunning},
		{"credits last", request{Path: "/v1/workflows/" + e.newWorkflow(a.Token) + "/runs", Token: a.Token, Body: goodInputs()}, protocol.CodeInsufficientCredits},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := e.forT(t)
			c.rq.Method = "POST"
			expectErr(t, e.do(c.rq), c.want)
		})
	}

	// A batch whose workflow was deleted after it was created cannot start.
	wf := e.newWorkflow(a.Token)
	bat := e.newBatch(a.Token, wf, 1)
	expectStatus(t, e.del("/v1/workflows/"+wf, a.Token), http.StatusNoContent)
	expectErr(t, e.post("/v1/batches/"+bat+"/start", a.Token, nil), protocol.CodeWorkflowNotFound)
}
