package api_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Tenant isolation: one account never reads, changes or lists another's
// workflows, runs, batches, approvals, ledger or tokens. Operators read and
// cancel every account's runs, and nothing else.

// tenantA is an account with one of everything.
type tenantA struct {
	user
	wf, run, apr     string // a workflow whose run waits for an approval
	batchWF, batch   string // a workflow with a created batch
	queuedWF, queued string // a workflow with a queued run
	runningBatch     string // a started batch
}

const secretName = "Quarterly payroll export"

func newTenantA(e *env) tenantA {
	e.t.Helper()
	a := tenantA{user: e.newUser(store.RoleMember, store.PlanPro, 20)}
	a.wf, a.run, a.apr = e.pendingApproval(a.Token)
	a.batchWF = e.newWorkflow(a.Token)
	a.batch = e.newBatch(a.Token, a.batchWF, 2)
	r := e.post("/v1/workflows", a.Token, map[string]any{"name": secretName, "definition": json.RawMessage(sampleDefinition)})
	expectStatus(e.t, r, http.StatusCreated)
	a.queuedWF = r.Map(e.t)["id"].(string)
	a.queued = e.newRun(a.Token, a.queuedWF)
	wf := e.newWorkflow(a.Token)
	a.runningBatch = e.newBatch(a.Token, wf, 1)
	expectStatus(e.t, e.post("/v1/batches/"+a.runningBatch+"/start", a.Token, nil), http.StatusOK)
	return a
}

// everyRoute lists every route that touches one of a's resources.
func (a tenantA) everyRoute() []request {
	csv := map[string]string{"Content-Type": "text/csv"}
	return []request{
		{Method: "GET", Path: "/v1/workflows/" + a.queuedWF},
		{Method: "PATCH", Path: "/v1/workflows/" + a.batchWF, Body: map[string]any{"name": "mine now"}},
		{Method: "PATCH", Path: "/v1/workflows/" + a.batchWF, Body: map[string]any{"definition": json.RawMessage(sampleDefinition)}},
		{Method: "DELETE", Path: "/v1/workflows/" + a.batchWF},
		{Method: "POST", Path: "/v1/workflows/" + a.batchWF + "/runs", Body: goodInputs()},
		{Method: "POST", Path: "/v1/workflows/" + a.batchWF + "/runs", Body: goodInputs(), Header: map[string]string{"Idempotency-Key": "steal-1"}},
		{Method: "POST", Path: "/v1/workflows/" + a.batchWF + "/batches", Body: batchBody(1)},
		{Method: "POST", Path: "/v1/workflows/" + a.batchWF + "/batches", Body: "username\nmallory\n", Header: csv},
		{Method: "GET", Path: "/v1/runs/" + a.run},
		{Method: "GET", Path: "/v1/runs/" + a.queued},
		{Method: "POST", Path: "/v1/runs/" + a.queued + "/cancel"},
		{Method: "POST", Path: "/v1/runs/" + a.run + "/cancel"},
		{Method: "GET", Path: "/v1/approvals/" + a.apr},
		{Method: "POST", Path: "/v1/approvals/" + a.apr + "/approve"},
		{Method: "POST", Path: "/v1/approvals/" + a.apr + "/reject", Body: map[string]any{"comment": "no"}},
		{Method: "GET", Path: "/v1/batches/" + a.batch},
		{Method: "POST", Path: "/v1/batches/" + a.batch + "/start"},
		{Method: "POST", Path: "/v1/batches/" + a.batch + "/cancel"},
		{Method: "POST", Path: "/v1/batches/" + a.runningBatch + "/cancel"},
		{Method: "GET", Path: "/v1/batches/" + a.batch + "/results"},
		{Method: "GET", Path: "/v1/batches/" + a.runningBatch + "/results?format=csv"},
	}
}

// unchanged checks that a's resources are as newTenantA left them.
func (a tenantA) unchanged(t *testing.T, e *env) {
	t.Helper()
	for path, status := range map[string]string{
		"/v1/workflows/" + a.batchWF:    "ready",
		"/v1/runs/" + a.run:             "awaiting_approval",
		"/v1/runs/" + a.queued:          "queued",
		"/v1/approvals/" + a.apr:        "pending",
		"/v1/batches/" + a.batch:        "created",
		"/v1/batches/" + a.runningBatch: "running",
		"/v1/workflows/" + a.queuedWF:   "ready",
		"/v1/workflows/" + a.wf:         "ready",
	} {
		r := e.get(path, a.Token)
		expectStatus(t, r, http.StatusOK)
		if got := r.Map(t)["status"]; got != status {
			t.Fatalf("%s: status %v, want %s", path, got, status)
		}
	}
	if m := e.get("/v1/workflows/"+a.batchWF, a.Token).Map(t); m["name"] != "wf" {
		t.Fatalf("workflow renamed: %v", m)
	}
	runs, _ := listIDs(t, e.get("/v1/runs?workflowId="+a.batchWF, a.Token))
	batches, _ := listIDs(t, e.get("/v1/batches", a.Token))
	if len(runs) != 0 || len(batches) != 2 {
		t.Fatalf("runs %v, batches %v", runs, batches)
	}
	// 20 credits; held: the waiting run was charged when it started, the
	// queued run and the running batch's run are held.
	if cr := e.get("/v1/credits", a.Token).Map(t); cr["balance"] != 19.0 || cr["held"] != 2.0 {
		t.Fatalf("credits %v", cr)
	}
}

func TestIsolationMember(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	a := newTenantA(e)
	b := e.newUser(store.RoleMember, store.PlanPro, 20)
	bWF := e.newWorkflow(b.Token)
	bRun := e.newRun(b.Token, bWF)

	for _, rq := range a.everyRoute() {
		t.Run(rq.Method+" "+rq.Path, func(t *testing.T) {
			e := e.forT(t)
			rq.Token = b.Token
			r := e.do(rq)
			expectError(t, r, protocol.CodeForbidden)
			if bytes.Contains(r.Body, []byte(secretName)) || bytes.Contains(r.Body, []byte("s3cret")) {
				t.Fatalf("forbidden shows the resource: %s", r.Body)
			}
		})
	}
	a.unchanged(t, e)

	t.Run("lists", func(t *testing.T) {
		e := e.forT(t)
		aIDs := []string{a.wf, a.run, a.apr, a.batchWF, a.batch, a.queuedWF, a.queued, a.runningBatch}
		for _, path := range []string{
			"/v1/workflows", "/v1/runs", "/v1/runs?workflowId=" + a.wf, "/v1/runs?batchId=" + a.runningBatch, "/v1/runs?accountId=" + b.ID,
			"/v1/runs?status=awaiting_approval", "/v1/batches", "/v1/approvals", "/v1/approvals?status=pending", "/v1/credits/ledger", "/v1/tokens",
		} {
			r := e.get(path, b.Token)
			expectStatus(t, r, http.StatusOK)
			ids, _ := listIDs(t, r)
			for _, id := range aIDs {
				if contains(ids, id) || bytes.Contains(r.Body, []byte(id)) {
					t.Fatalf("%s shows A's %s: %s", path, id, r.Body)
				}
			}
			if bytes.Contains(r.Body, []byte(a.ID)) {
				t.Fatalf("%s shows A's account: %s", path, r.Body)
			}
		}
		// B's own things are there.
		if ids, _ := listIDs(t, e.get("/v1/runs", b.Token)); !sameSet(ids, []string{bRun}) {
			t.Fatalf("B's runs %v", ids)
		}
		if ids, _ := listIDs(t, e.get("/v1/workflows", b.Token)); !sameSet(ids, []string{bWF}) {
			t.Fatalf("B's workflows %v", ids)
		}
		// A's tokens are not B's: listing and revoking.
		aTokens, _ := listIDs(t, e.get("/v1/tokens", a.Token))
		bTokens, _ := listIDs(t, e.get("/v1/tokens", b.Token))
		for _, id := range aTokens {
			if contains(bTokens, id) {
				t.Fatalf("B lists A's token %s", id)
			}
			expectError(t, e.del("/v1/tokens/"+id, b.Token), protocol.CodeNotFound)
		}
		expectStatus(t, e.get("/v1/me", a.Token), http.StatusOK)
		// Members cannot ask for another account's runs.
		er := expectError(t, e.get("/v1/runs?accountId="+a.ID, b.Token), protocol.CodeForbidden)
		if er.Details["requiredRole"] != "operator" {
			t.Fatalf("details %v", er.Details)
		}
	})
	// A's own credits are A's: B's activity changed nothing.
	if cr := e.get("/v1/credits", b.Token).Map(t); cr["balance"] != 20.0 || cr["held"] != 1.0 {
		t.Fatalf("B's credits %v", cr)
	}
}

func TestIsolationOperator(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	a := newTenantA(e)
	op := e.newUser(store.RoleOperator, store.PlanPro, 0)

	// Operators read every account's runs…
	for _, run := range []string{a.run, a.queued} {
		r := e.get("/v1/runs/"+run, op.Token)
		expectStatus(t, r, http.StatusOK)
		if m := r.Map(t); m["accountId"] != a.ID || m["inputs"].(map[string]any)["password"] != "[redacted]" {
			t.Fatalf("operator sees %s", r.Body)
		}
	}
	ids, _ := listIDs(t, e.get("/v1/runs?accountId="+a.ID, op.Token))
	if !contains(ids, a.run) || !contains(ids, a.queued) {
		t.Fatalf("operator list for A: %v", ids)
	}
	ids, _ = listIDs(t, e.get("/v1/runs", op.Token))
	if !contains(ids, a.run) {
		t.Fatalf("operator list: %v", ids)
	}

	// …but not A's workflows, batches or approvals.
	for _, rq := range a.everyRoute() {
		if rq.Path == "/v1/runs/"+a.run || rq.Path == "/v1/runs/"+a.queued || rq.Path == "/v1/runs/"+a.queued+"/cancel" || rq.Path == "/v1/runs/"+a.run+"/cancel" {
			continue
		}
		rq.Token = op.Token
		expectError(t, e.do(rq), protocol.CodeForbidden)
	}
	a.unchanged(t, e)

	// …and cancel A's runs: queued at once, running by request.
	r := e.post("/v1/runs/"+a.queued+"/cancel", op.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if m := r.Map(t); m["status"] != "cancelled" {
		t.Fatalf("cancel %s", r.Body)
	}
	r = e.post("/v1/runs/"+a.run+"/cancel", op.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if m := r.Map(t); m["cancelRequested"] != true {
		t.Fatalf("cancel of a waiting run %s", r.Body)
	}
	if cr := e.get("/v1/credits", a.Token).Map(t); cr["held"] != 1.0 {
		t.Fatalf("A's credits after the operator's cancel %v", cr)
	}
}
