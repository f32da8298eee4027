package api_test

import (
	"bytes"
	"context"
	"encoding/csv"
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

// The happy paths of every route and the shapes clients rely on (API.md §1,
// §3–§8, §12).

// expectEmpty asserts a 204 with no body.
func expectNoContent(t *testing.T, r *response) {
	t.Helper()
	expectStatus(t, r, http.StatusNoContent)
	if len(r.Body) != 0 {
		t.Fatalf("204 with a body: %q", r.Body)
	}
}

// within asserts that a time in a JSON body lies within d of want.
func within(t *testing.T, v any, want time.Time, d time.Duration) time.Time {
	t.Helper()
	s, _ := v.(string)
	got, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("time %v: %v", v, err)
	}
	if got.Location() != time.UTC || !strings.HasSuffix(s, "Z") {
		t.Fatalf("time %q is not UTC", s)
	}
	if diff := got.Sub(want); diff < -d || diff > d {
		t.Fatalf("time %s, want %s ± %s", got, want, d)
	}
	return got
}

// checkShape asserts API.md §1 on a decoded body: every *At field is an
// RFC 3339 UTC time, every id has its type's prefix and at least 96 random
// bits (20 base32 characters).
func checkShape(t *testing.T, v any) {
	t.Helper()
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if strings.HasSuffix(k, "At") && val != nil {
				s, ok := val.(string)
				if _, err := time.Parse(time.RFC3339Nano, s); !ok || err != nil || !strings.HasSuffix(s, "Z") {
					t.Fatalf("%s = %v is not an RFC 3339 UTC time", k, val)
				}
			}
			if id, ok := val.(string); ok && (k == "id" || strings.HasSuffix(k, "Id")) && k != "stripePriceId" && k != "requestId" {
				prefix, rest, found := strings.Cut(id, "_")
				if !found || prefix == "" || len(rest) < 20 {
					t.Fatalf("%s = %q is not a prefixed id with 96 random bits", k, id)
				}
			}
			checkShape(t, val)
		}
	case []any:
		for _, it := range x {
			checkShape(t, it)
		}
	}
}

func TestRoutesUsersAndSessions(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{SessionTTL: 2 * time.Hour})

	// An admin creates a user (bcrypt: keep the number of hashes small).
	r := e.post("/v1/users", e.Admin, map[string]any{"email": "Mae@Example.com", "password": testPassword, "role": "operator", "plan": "pro"})
	expectStatus(t, r, http.StatusCreated)
	u := r.Map(t)
	checkShape(t, u)
	if !strings.HasPrefix(u["id"].(string), "usr_") || u["email"] != "Mae@Example.com" || u["role"] != "operator" || u["plan"] != "pro" || u["createdAt"] == nil {
		t.Fatalf("user %s", r.Body)
	}
	if bytes.Contains(r.Body, []byte("assword")) || bytes.Contains(r.Body, []byte("$2a$")) {
		t.Fatalf("the password hash is shown: %s", r.Body)
	}
	// Emails are unique whatever their case.
	expectError(t, e.post("/v1/users", e.Admin, map[string]any{"email": "mae@example.COM", "password": "another one"}), protocol.CodeConflict)

	// Sign in (the email's case does not matter).
	start := time.Now()
	r = e.post("/v1/sessions", "", map[string]any{"email": "MAE@example.com", "password": testPassword})
	expectStatus(t, r, http.StatusCreated)
	s := r.Map(t)
	token := s["token"].(string)
	if !strings.HasPrefix(token, "copelf_") {
		t.Fatalf("session token %q has no recognisable prefix", token)
	}
	within(t, s["expiresAt"], start.Add(2*time.Hour), time.Minute)
	var cookie *http.Cookie
	for _, c := range r.Cookies() {
		if c.Name == "copelf_session" {
			cookie = c
		}
	}
	if cookie == nil || cookie.Value != token || !cookie.HttpOnly || cookie.SameSite != http.SameSiteLaxMode || cookie.Secure || cookie.Path != "/" {
		t.Fatalf("session cookie %+v (Set-Cookie %q)", cookie, r.Header.Values("Set-Cookie"))
	}

	// Over HTTPS the cookie is Secure as well.
	req := httptest.NewRequest("POST", "https://copelf.example/v1/sessions", strings.NewReader(`{"email":"mae@example.com","password":"`+testPassword+`"}`))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	e.API.ServeHTTP(rec, req)
	if rec.Code != http.StatusCreated {
		t.Fatalf("https sign-in %d %s", rec.Code, rec.Body)
	}
	if c := rec.Result().Cookies(); len(c) != 2 || c[0].Name != "copelf_session" || !c[0].Secure || !c[0].HttpOnly || c[0].SameSite != http.SameSiteLaxMode || c[1].Name != api.CSRFCookie || !c[1].Secure {
		t.Fatalf("https cookie %q", rec.Header().Values("Set-Cookie"))
	}

	// The cookie authenticates, and so does the token as a bearer.
	byCookie := map[string]string{"Cookie": "copelf_session=" + token, api.CSRFHeader: api.CSRFToken(token)}
	r = e.do(request{Method: "GET", Path: "/v1/me", Header: byCookie})
	expectStatus(t, r, http.StatusOK)
	me := r.Map(t)
	checkShape(t, me)
	if me["id"] != u["id"] || me["accountId"] != u["id"] || me["email"] != "Mae@Example.com" || me["role"] != "operator" || me["plan"] != "pro" {
		t.Fatalf("me %s", r.Body)
	}
	if tok := me["token"].(map[string]any); tok["kind"] != "session" || tok["expiresAt"] == nil {
		t.Fatalf("me.token %v", tok)
	}
	if cr := me["credits"].(map[string]any); cr["balance"] != 0.0 || cr["held"] != 0.0 || cr["available"] != 0.0 {
		t.Fatalf("me.credits %v", cr)
	}
	expectStatus(t, e.get("/v1/workflows", token), http.StatusOK)
	// Sessions are not API tokens: they are not listed.
	if ids, _ := listIDs(t, e.get("/v1/tokens", token)); len(ids) != 0 {
		t.Fatalf("tokens %v", ids)
	}

	// Sign out: 204, the cookie is cleared and the session stops working.
	r = e.do(request{Method: "DELETE", Path: "/v1/sessions/current", Header: byCookie})
	expectNoContent(t, r)
	cleared := false
	for _, c := range r.Cookies() {
		cleared = cleared || (c.Name == "copelf_session" && c.Value == "" && c.MaxAge < 0)
	}
	if !cleared {
		t.Fatalf("sign-out did not clear the cookie: %q", r.Header.Values("Set-Cookie"))
	}
	expectError(t, e.do(request{Method: "GET", Path: "/v1/me", Header: byCookie}), protocol.CodeUnauthenticated)
	expectError(t, e.get("/v1/me", token), protocol.CodeUnauthenticated)
	expectError(t, e.do(request{Method: "DELETE", Path: "/v1/sessions/current", Token: token}), protocol.CodeUnauthenticated)
}

func TestRoutesTokens(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)

	start := time.Now()
	r := e.post("/v1/tokens", u.Token, map[string]any{"name": "ci", "kind": "api"})
	expectStatus(t, r, http.StatusCreated)
	created := r.Map(t)
	checkShape(t, created)
	id, token := created["id"].(string), created["token"].(string)
	if !strings.HasPrefix(id, "tok_") || !strings.HasPrefix(token, "copelf_api_") || len(token) < 40 || created["name"] != "ci" || created["kind"] != "api" || created["expiresAt"] != nil {
		t.Fatalf("token %s", r.Body)
	}
	expectStatus(t, e.get("/v1/me", token), http.StatusOK)

	r = e.post("/v1/tokens", u.Token, map[string]any{"name": "laptop", "kind": "agent", "expiresInSeconds": 3600})
	expectStatus(t, r, http.StatusCreated)
	agent := r.Map(t)
	if !strings.HasPrefix(agent["token"].(string), "copelf_agt_") || agent["kind"] != "agent" {
		t.Fatalf("agent token %s", r.Body)
	}
	within(t, agent["expiresAt"], start.Add(time.Hour), time.Minute)

	// The list never shows a token or its hash.
	r = e.get("/v1/tokens", u.Token)
	expectStatus(t, r, http.StatusOK)
	ids, next := listIDs(t, r)
	if !contains(ids, id) || !contains(ids, agent["id"].(string)) || next != nil {
		t.Fatalf("tokens %s", r.Body)
	}
	if bytes.Contains(r.Body, []byte(token)) || bytes.Contains(r.Body, []byte(agent["token"].(string))) || bytes.Contains(r.Body, []byte(`"token"`)) || bytes.Contains(r.Body, []byte(`"hash"`)) {
		t.Fatalf("the list shows secrets: %s", r.Body)
	}
	var list struct{ Items []map[string]any }
	r.JSON(t, &list)
	for _, it := range list.Items {
		if it["name"] == nil || it["kind"] == nil || it["createdAt"] == nil {
			t.Fatalf("token item %v", it)
		}
	}

	// Revoking: 204, then the token stops working and leaves the list.
	expectNoContent(t, e.del("/v1/tokens/"+id, u.Token))
	expectError(t, e.get("/v1/me", token), protocol.CodeUnauthenticated)
	ids, _ = listIDs(t, e.get("/v1/tokens", u.Token))
	if contains(ids, id) {
		t.Fatalf("revoked token listed: %v", ids)
	}
	expectError(t, e.del("/v1/tokens/"+id, u.Token), protocol.CodeNotFound)
}

func TestRoutesWorkflows(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)

	r := e.post("/v1/workflows", u.Token, map[string]any{"name": "Log in", "definition": json.RawMessage(sampleDefinition)})
	expectStatus(t, r, http.StatusCreated)
	wf := r.Map(t)
	checkShape(t, wf)
	id := wf["id"].(string)
	if !strings.HasPrefix(id, "wf_") || wf["name"] != "Log in" || wf["status"] != "ready" || wf["createdAt"] == nil || wf["updatedAt"] == nil {
		t.Fatalf("workflow %s", r.Body)
	}
	def := wf["definition"].(map[string]any)
	if def["version"] != 1.0 || len(def["steps"].([]any)) != 3 || len(def["variables"].([]any)) != 2 {
		t.Fatalf("definition %v", def)
	}
	step := def["steps"].([]any)[1].(map[string]any)
	if step["type"] != "type" || step["selector"] != "#user" || step["text"] != "{{username}}" {
		t.Fatalf("steps are flat objects: %v", step)
	}

	r = e.get("/v1/workflows/"+id, u.Token)
	expectStatus(t, r, http.StatusOK)
	if got := r.Map(t); !reflect.DeepEqual(got, wf) {
		t.Fatalf("get %v, created %v", got, wf)
	}

	// PATCH renames, or replaces the definition.
	r = e.patch("/v1/workflows/"+id, u.Token, map[string]any{"name": "Sign in"})
	expectStatus(t, r, http.StatusOK)
	if got := r.Map(t); got["name"] != "Sign in" || !reflect.DeepEqual(got["definition"], wf["definition"]) {
		t.Fatalf("renamed %s", r.Body)
	}
	r = e.patch("/v1/workflows/"+id, u.Token, map[string]any{"definition": json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"https://example.com/"}]}`)})
	expectStatus(t, r, http.StatusOK)
	if got := r.Map(t); got["name"] != "Sign in" || len(got["definition"].(map[string]any)["steps"].([]any)) != 1 || got["status"] != "ready" {
		t.Fatalf("redefined %s", r.Body)
	}

	// Pagination: newest first, limit, cursor, nextCursor null at the end.
	made := []string{id}
	for i := 0; i < 4; i++ {
		made = append(made, e.newWorkflow(u.Token))
	}
	var seen []string
	cursor := ""
	pages := 0
	for {
		path := "/v1/workflows?limit=2"
		if cursor != "" {
			path += "&cursor=" + cursor
		}
		r := e.get(path, u.Token)
		expectStatus(t, r, http.StatusOK)
		ids, next := listIDs(t, r)
		pages++
		seen = append(seen, ids...)
		if next == nil {
			if len(ids) != 1 {
				t.Fatalf("last page %v", ids)
			}
			break
		}
		if len(ids) != 2 || pages > 3 {
			t.Fatalf("page %d: %v, next %v", pages, ids, next)
		}
		cursor = next.(string)
	}
	if !sameSet(seen, made) {
		t.Fatalf("pages %v, created %v", seen, made)
	}
	all, next := listIDs(t, e.get("/v1/workflows", u.Token))
	if len(all) != 5 || next != nil {
		t.Fatalf("default page %v %v", all, next)
	}

	// DELETE: 204, then gone from GET and from the list.
	expectNoContent(t, e.del("/v1/workflows/"+id, u.Token))
	expectError(t, e.get("/v1/workflows/"+id, u.Token), protocol.CodeWorkflowNotFound)
	all, _ = listIDs(t, e.get("/v1/workflows", u.Token))
	if len(all) != 4 || contains(all, id) {
		t.Fatalf("after delete %v", all)
	}
	// An account with none gets an empty array, not null.
	other := e.newUser(store.RoleMember, store.PlanFree, 0)
	if r := e.get("/v1/workflows", other.Token); !bytes.Contains(r.Body, []byte(`"items":[]`)) || !bytes.Contains(r.Body, []byte(`"nextCursor":null`)) {
		t.Fatalf("empty list %s", r.Body)
	}
}

func TestRoutesRuns(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 5)
	wf := e.newWorkflow(u.Token)

	r := e.post("/v1/workflows/"+wf+"/runs", u.Token, goodInputs())
	expectStatus(t, r, http.StatusCreated)
	run := r.Map(t)
	checkShape(t, run)
	id := run["id"].(string)
	if !strings.HasPrefix(id, "run_") || run["workflowId"] != wf || run["status"] != "queued" || run["attempt"] != 0.0 || run["queuedAt"] == nil {
		t.Fatalf("run %s", r.Body)
	}
	if in := run["inputs"].(map[string]any); in["username"] != "ada" || in["password"] != "[redacted]" {
		t.Fatalf("inputs %v", in)
	}
	if out, ok := run["outputs"].(map[string]any); !ok || len(out) != 0 {
		t.Fatalf("outputs %v", run["outputs"])
	}
	steps := run["steps"].([]any)
	if len(steps) != 3 {
		t.Fatalf("steps %v", steps)
	}
	for i, s := range steps {
		s := s.(map[string]any)
		if s["index"] != float64(i) || s["status"] != "pending" || s["type"] == nil {
			t.Fatalf("step %d: %v", i, s)
		}
	}
	if c := run["cost"].(map[string]any); c["reserved"] != 1.0 || c["charged"] != 0.0 {
		t.Fatalf("cost %v", c)
	}
	if q := run["queue"].(map[string]any); q["reason"] != "no_agent_connected" || q["since"] == nil {
		t.Fatalf("queue %v", q)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["balance"] != 5.0 || cr["held"] != 1.0 || cr["available"] != 4.0 {
		t.Fatalf("credits after queueing %v", cr)
	}
	// The agent gets the real secret; no response shows it.
	stored, err := e.Store.RunGet(context.Background(), id)
	if err != nil || stored.Inputs["password"] != "s3cret" {
		t.Fatalf("stored run %+v %v", stored, err)
	}

	r = e.get("/v1/runs/"+id, u.Token)
	expectStatus(t, r, http.StatusOK)
	if got := r.Map(t); got["inputs"].(map[string]any)["password"] != "[redacted]" || got["id"] != id {
		t.Fatalf("get %s", r.Body)
	}
	checkNoSecret := func(r *response) {
		t.Helper()
		if bytes.Contains(r.Body, []byte("s3cret")) {
			t.Fatalf("a secret shows in %s: %s", r.Request.URL, r.Body)
		}
	}
	checkNoSecret(r)

	// Cancel while queued: 200 cancelled, the hold is released.
	r = e.post("/v1/runs/"+id+"/cancel", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if got := r.Map(t); got["status"] != "cancelled" || got["finishedAt"] == nil || got["queue"] != nil {
		t.Fatalf("cancelled %s", r.Body)
	}
	checkNoSecret(r)
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["balance"] != 5.0 || cr["held"] != 0.0 || cr["available"] != 5.0 {
		t.Fatalf("credits after cancel %v", cr)
	}

	// Defaults are applied; optional inputs without default are left out.
	r = e.post("/v1/workflows", u.Token, map[string]any{"name": "defaults", "definition": json.RawMessage(`{"version":1,"variables":[
		{"name":"city","type":"string","default":"Oslo"},{"name":"count","type":"number","default":3},{"name":"fast","type":"boolean","default":false},
		{"name":"note","type":"string"}],"steps":[{"type":"navigate","url":"https://example.com/{{city}}/{{count}}/{{fast}}/{{note}}"}]}`)})
	expectStatus(t, r, http.StatusCreated)
	wf2 := r.Map(t)["id"].(string)
	r = e.post("/v1/workflows/"+wf2+"/runs", u.Token, map[string]any{"inputs": map[string]any{"count": 7}})
	expectStatus(t, r, http.StatusCreated)
	run2 := r.Map(t)
	if in := run2["inputs"].(map[string]any); !reflect.DeepEqual(in, map[string]any{"city": "Oslo", "count": 7.0, "fast": false}) {
		t.Fatalf("inputs with defaults %v", in)
	}
	// An empty object, or no inputs at all, is fine when nothing is required.
	expectStatus(t, e.post("/v1/runs/"+run2["id"].(string)+"/cancel", u.Token, nil), http.StatusOK)
	expectStatus(t, e.post("/v1/workflows/"+wf2+"/runs", u.Token, map[string]any{}), http.StatusCreated)

	// A third run that succeeds on the first workflow.
	id3 := e.newRun(u.Token, wf)
	e.finishRun(id3, protocol.RunSucceeded)

	// Lists: redacted, filtered by workflow and status.
	r = e.get("/v1/runs", u.Token)
	expectStatus(t, r, http.StatusOK)
	checkNoSecret(r)
	all, next := listIDs(t, r)
	if len(all) != 4 || next != nil {
		t.Fatalf("runs %v", all)
	}
	var list struct{ Items []map[string]any }
	r.JSON(t, &list)
	for _, it := range list.Items {
		if it["workflowId"] == wf && it["inputs"].(map[string]any)["password"] != "[redacted]" {
			t.Fatalf("listed run %v", it)
		}
	}
	filters := []struct {
		query string
		want  []string
	}{
		{"workflowId=" + wf, []string{id3, id}},
		{"workflowId=" + wf + "&status=cancelled", []string{id}},
		{"workflowId=" + wf + "&status=succeeded", []string{id3}},
		{"status=queued", nil},
		{"workflowId=wf_other", nil},
	}
	for _, f := range filters {
		got, _ := listIDs(t, e.get("/v1/runs?"+f.query, u.Token))
		if f.query == "status=queued" {
			if len(got) != 1 {
				t.Fatalf("%s: %v", f.query, got)
			}
			continue
		}
		if !sameSet(got, f.want) {
			t.Fatalf("%s: %v, want %v", f.query, got, f.want)
		}
	}
	page, next := listIDs(t, e.get("/v1/runs?limit=3", u.Token))
	if len(page) != 3 || next == nil {
		t.Fatalf("runs page %v %v", page, next)
	}
	rest, next := listIDs(t, e.get("/v1/runs?limit=3&cursor="+next.(string), u.Token))
	if len(rest) != 1 || next != nil || contains(page, rest[0]) {
		t.Fatalf("second page %v %v", rest, next)
	}

	// The finished run shows its charge and outputs.
	r = e.get("/v1/runs/"+id3, u.Token)
	got := r.Map(t)
	checkShape(t, got)
	checkShape(t, e.get("/v1/runs", u.Token).Map(t))
	if got["status"] != "succeeded" || got["cost"].(map[string]any)["charged"] != 1.0 || got["outputs"].(map[string]any)["greeting"] == nil || got["startedAt"] == nil {
		t.Fatalf("finished run %s", r.Body)
	}
}

func TestRoutesApprovals(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 5)

	wf1, run1, apr1 := e.pendingApproval(u.Token)
	_, run2, apr2 := e.pendingApproval(u.Token)

	r := e.get("/v1/approvals?status=pending", u.Token)
	expectStatus(t, r, http.StatusOK)
	ids, _ := listIDs(t, r)
	if !sameSet(ids, []string{apr2, apr1}) {
		t.Fatalf("pending %v, want [%s %s]", ids, apr2, apr1)
	}
	r = e.get("/v1/approvals/"+apr1, u.Token)
	expectStatus(t, r, http.StatusOK)
	a := r.Map(t)
	checkShape(t, a)
	if a["id"] != apr1 || a["runId"] != run1 || a["workflowId"] != wf1 || a["step"] != 1.0 || a["message"] != "Pay the invoice?" || a["status"] != "pending" || a["createdAt"] == nil {
		t.Fatalf("approval %s", r.Body)
	}
	if m := e.get("/v1/runs/"+run1, u.Token).Map(t); m["status"] != "awaiting_approval" {
		t.Fatalf("run %v", m)
	}

	// Approve: 200, the run goes back to running.
	r = e.post("/v1/approvals/"+apr1+"/approve", u.Token, map[string]any{"comment": "go ahead"})
	expectStatus(t, r, http.StatusOK)
	a = r.Map(t)
	checkShape(t, a)
	if a["status"] != "approved" || a["resolvedBy"] != u.ID || a["resolvedAt"] == nil || a["comment"] != "go ahead" {
		t.Fatalf("approved %s", r.Body)
	}
	if m := e.get("/v1/runs/"+run1, u.Token).Map(t); m["status"] != "running" {
		t.Fatalf("run after approval %v", m)
	}

	// Reject without a body: 200, the run fails with approval_rejected.
	r = e.post("/v1/approvals/"+apr2+"/reject", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if a := r.Map(t); a["status"] != "rejected" {
		t.Fatalf("rejected %s", r.Body)
	}
	r = e.get("/v1/runs/"+run2, u.Token)
	m := r.Map(t)
	if m["status"] != "failed" || m["finishedAt"] == nil {
		t.Fatalf("run after rejection %s", r.Body)
	}
	runErr := m["error"].(map[string]any)
	if runErr["code"] == nil || runErr["message"] == nil || runErr["details"].(map[string]any)["reason"] != "approval_rejected" {
		t.Fatalf("run error %v", runErr)
	}

	for status, want := range map[string][]string{"pending": nil, "approved": {apr1}, "rejected": {apr2}, "": {apr2, apr1}} {
		path := "/v1/approvals"
		if status != "" {
			path += "?status=" + status
		}
		got, _ := listIDs(t, e.get(path, u.Token))
		if !sameSet(got, want) {
			t.Fatalf("status=%s: %v, want %v", status, got, want)
		}
	}
	// Both runs started, so both were charged; nothing is held.
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["balance"] != 3.0 || cr["held"] != 0.0 {
		t.Fatalf("credits %v", cr)
	}
}

func TestRoutesBatches(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	r := e.post("/v1/workflows", u.Token, map[string]any{"name": "typed", "definition": json.RawMessage(`{"version":1,"variables":[
		{"name":"name","type":"string","required":true},{"name":"n","type":"number"},{"name":"flag","type":"boolean"},{"name":"pin","type":"secret"}],
		"steps":[{"type":"type","selector":"#q","text":"{{name}} {{n}} {{flag}} {{pin}}"},{"type":"extract","selector":"#out","output":"greeting"}]}`)})
	expectStatus(t, r, http.StatusCreated)
	wf := r.Map(t)["id"].(string)

	// JSON.
	r = e.post("/v1/workflows/"+wf+"/batches", u.Token, map[string]any{"iterations": []any{
		map[string]any{"inputs": map[string]any{"name": "ada", "pin": "1234"}},
		map[string]any{"inputs": map[string]any{"name": "bob", "n": 2}},
	}, "stopOnFailure": true})
	expectStatus(t, r, http.StatusCreated)
	b := r.Map(t)
	checkShape(t, b)
	jsonBatch := b["id"].(string)
	if !strings.HasPrefix(jsonBatch, "bat_") || b["workflowId"] != wf || b["status"] != "created" || b["concurrency"] != 1.0 || b["stopOnFailure"] != true {
		t.Fatalf("batch %s", r.Body)
	}
	if c := b["counts"].(map[string]any); c["total"] != 2.0 || c["pending"] != 2.0 {
		t.Fatalf("counts %v", c)
	}
	its := b["iterations"].([]any)
	first := its[0].(map[string]any)
	if len(its) != 2 || first["index"] != 0.0 || first["status"] != "pending" || first["runId"] != nil || first["inputs"].(map[string]any)["pin"] != "[redacted]" {
		t.Fatalf("iterations %v", its)
	}
	if bytes.Contains(r.Body, []byte("1234")) {
		t.Fatalf("secret shown: %s", r.Body)
	}

	// CSV with a header row: values typed per variable; query parameters.
	csvBody := "name,n,flag,pin\r\nada,42,true,9999\r\n\"Smith, Jo\",-1.5,FALSE,\r\n\"say \"\"hi\"\"\",,1,x\r\n"
	r = e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches?concurrency=2", Token: u.Token, Body: csvBody, Header: map[string]string{"Content-Type": "text/csv; charset=utf-8"}})
	expectStatus(t, r, http.StatusCreated)
	var cb struct {
		ID          string
		Concurrency int
		Iterations  []struct {
			Index  int
			Inputs map[string]any
			Status string
		}
	}
	r.JSON(t, &cb)
	want := []map[string]any{
		{"name": "ada", "n": 42.0, "flag": true, "pin": "[redacted]"},
		{"name": "Smith, Jo", "n": -1.5, "flag": false},
		{"name": `say "hi"`, "flag": true, "pin": "[redacted]"},
	}
	if cb.Concurrency != 2 || len(cb.Iterations) != 3 {
		t.Fatalf("csv batch %s", r.Body)
	}
	for i, it := range cb.Iterations {
		if it.Index != i || !reflect.DeepEqual(it.Inputs, want[i]) || it.Status != "pending" {
			t.Fatalf("iteration %d: %+v, want inputs %v", i, it, want[i])
		}
	}

	// Start: every iteration's run is queued and credits are held for all.
	r = e.post("/v1/batches/"+cb.ID+"/start", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	var started struct {
		Status     string
		StartedAt  *time.Time
		Counts     map[string]int
		Iterations []struct {
			RunID  string
			Status string
			Inputs map[string]any
		}
	}
	r.JSON(t, &started)
	if started.Status != "running" || started.StartedAt == nil || started.Counts["queued"] != 3 || started.Counts["total"] != 3 {
		t.Fatalf("started %s", r.Body)
	}
	for _, it := range started.Iterations {
		if !strings.HasPrefix(it.RunID, "run_") || it.Status != "queued" {
			t.Fatalf("iteration %+v", it)
		}
	}
	if bytes.Contains(r.Body, []byte("9999")) {
		t.Fatalf("secret shown: %s", r.Body)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 3.0 || cr["available"] != 7.0 {
		t.Fatalf("credits %v", cr)
	}
	runs, _ := listIDs(t, e.get("/v1/runs?batchId="+cb.ID, u.Token))
	if len(runs) != 3 {
		t.Fatalf("batch runs %v", runs)
	}
	run0 := e.get("/v1/runs/"+started.Iterations[0].RunID, u.Token).Map(t)
	if run0["batchId"] != cb.ID || run0["iteration"] != 0.0 || run0["inputs"].(map[string]any)["pin"] != "[redacted]" {
		t.Fatalf("batch run %v", run0)
	}

	// Two runs finish; results as JSON and CSV.
	e.finishRun(started.Iterations[0].RunID, protocol.RunSucceeded)
	e.startRun(started.Iterations[1].RunID)
	if _, err := e.Store.RunFinish(context.Background(), store.RunFinishParams{ID: started.Iterations[1].RunID, Status: protocol.RunFailed,
		Error:   protocol.Errorf(protocol.CodeTimeout, "Step 0 timed out.").With("reason", protocol.ReasonStepTimeout).With("step", 0),
		Outputs: map[string]any{"greeting": "=cmd()"}}); err != nil {
		t.Fatal(err)
	}
	r = e.get("/v1/batches/"+cb.ID+"/results", u.Token)
	expectStatus(t, r, http.StatusOK)
	var res struct {
		BatchID string
		Status  string
		Items   []struct {
			Index   int
			RunID   string
			Status  string
			Outputs map[string]any
			Error   *protocol.Error
		}
	}
	r.JSON(t, &res)
	if res.BatchID != cb.ID || len(res.Items) != 3 || res.Items[0].Status != "succeeded" || res.Items[0].Outputs["greeting"] != "hi "+started.Iterations[0].RunID ||
		res.Items[1].Status != "failed" || res.Items[1].Error == nil || res.Items[1].Error.Code != protocol.CodeTimeout || res.Items[2].Status != "queued" || res.Items[2].Outputs == nil {
		t.Fatalf("results %s", r.Body)
	}
	for _, rq := range []request{
		{Method: "GET", Path: "/v1/batches/" + cb.ID + "/results?format=csv", Token: u.Token},
		{Method: "GET", Path: "/v1/batches/" + cb.ID + "/results", Token: u.Token, Header: map[string]string{"Accept": "text/csv"}},
	} {
		r = e.do(rq)
		expectStatus(t, r, http.StatusOK)
		if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
			t.Fatalf("content type %q", ct)
		}
		rows, err := csv.NewReader(bytes.NewReader(r.Body)).ReadAll()
		if err != nil {
			t.Fatalf("csv %v: %s", err, r.Body)
		}
		wantRows := [][]string{
			{"index", "runId", "status", "errorCode", "errorReason", "greeting"},
			{"0", started.Iterations[0].RunID, "succeeded", "", "", "hi " + started.Iterations[0].RunID},
			{"1", started.Iterations[1].RunID, "failed", "timeout", "step_timeout", "'=cmd()"},
			{"2", started.Iterations[2].RunID, "queued", "", "", ""},
		}
		if !reflect.DeepEqual(rows, wantRows) {
			t.Fatalf("csv rows %q, want %q", rows, wantRows)
		}
	}

	// Cancel: 200, the queued run is cancelled and its hold released.
	r = e.post("/v1/batches/"+cb.ID+"/cancel", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if m := r.Map(t); m["status"] != "cancelled" || m["iterations"].([]any)[2].(map[string]any)["status"] != "cancelled" {
		t.Fatalf("cancelled %s", r.Body)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 0.0 || cr["balance"] != 8.0 {
		t.Fatalf("credits after cancel %v (two runs charged)", cr)
	}
	// A batch not yet started cancels too.
	r = e.post("/v1/batches/"+jsonBatch+"/cancel", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if m := r.Map(t); m["status"] != "cancelled" {
		t.Fatalf("cancelled %s", r.Body)
	}

	// Listed, newest first, with iterations.
	r = e.get("/v1/batches", u.Token)
	ids, _ := listIDs(t, r)
	if !sameSet(ids, []string{cb.ID, jsonBatch}) {
		t.Fatalf("batches %v", ids)
	}
	if bytes.Contains(r.Body, []byte("9999")) || bytes.Contains(r.Body, []byte("1234")) {
		t.Fatalf("secret shown: %s", r.Body)
	}
	checkShape(t, e.get("/v1/batches", u.Token).Map(t))
	checkShape(t, e.get("/v1/batches/"+cb.ID+"/results", u.Token).Map(t))
	if g := e.get("/v1/batches/"+cb.ID, u.Token).Map(t); g["finishedAt"] == nil || len(g["iterations"].([]any)) != 3 {
		t.Fatalf("batch %v", g)
	}
}

func TestRoutesCredits(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)

	r := e.get("/v1/credits", u.Token)
	expectStatus(t, r, http.StatusOK)
	if !reflect.DeepEqual(r.Map(t), map[string]any{"balance": 0.0, "held": 0.0, "available": 0.0}) {
		t.Fatalf("credits %s", r.Body)
	}

	r = e.post("/v1/accounts/"+u.ID+"/credits", e.Admin, map[string]any{"amount": 10, "reason": "welcome"})
	expectStatus(t, r, http.StatusCreated)
	g := r.Map(t)
	checkShape(t, g)
	entry := g["entry"].(map[string]any)
	if entry["kind"] != "grant" || entry["amount"] != 10.0 || !strings.HasPrefix(entry["id"].(string), "led_") || g["credits"].(map[string]any)["balance"] != 10.0 {
		t.Fatalf("grant %s", r.Body)
	}
	r = e.post("/v1/accounts/"+u.ID+"/credits", e.Admin, map[string]any{"amount": -3, "reason": "adjustment"})
	expectStatus(t, r, http.StatusCreated)
	expectError(t, e.post("/v1/accounts/"+u.ID+"/credits", u.Token, map[string]any{"amount": 1000, "reason": "mine"}), protocol.CodeForbidden)

	wf := e.newWorkflow(u.Token)
	run := e.newRun(u.Token, wf)
	e.finishRun(run, protocol.RunSucceeded)

	if cr := e.get("/v1/credits", u.Token).Map(t); cr["balance"] != 6.0 || cr["held"] != 0.0 || cr["available"] != 6.0 {
		t.Fatalf("credits %v", cr)
	}
	r = e.get("/v1/credits/ledger", u.Token)
	expectStatus(t, r, http.StatusOK)
	checkShape(t, r.Map(t))
	var ledger struct {
		Items      []map[string]any
		NextCursor *string
	}
	r.JSON(t, &ledger)
	if len(ledger.Items) != 3 || ledger.NextCursor != nil {
		t.Fatalf("ledger %s", r.Body)
	}
	sum := 0.0
	kinds := map[string]bool{}
	for _, it := range ledger.Items {
		sum += it["amount"].(float64)
		kinds[it["kind"].(string)] = true
		if it["id"] == nil || it["createdAt"] == nil {
			t.Fatalf("entry %v", it)
		}
		if it["kind"] == "run_charge" && (it["runId"] != run || it["amount"] != -1.0) {
			t.Fatalf("charge %v", it)
		}
	}
	if sum != 6 || !kinds["grant"] || !kinds["run_charge"] {
		t.Fatalf("ledger sums to %v: %s", sum, r.Body)
	}
	page, next := listIDs(t, e.get("/v1/credits/ledger?limit=2", u.Token))
	if len(page) != 2 || next == nil {
		t.Fatalf("ledger page %v %v", page, next)
	}
}

func TestRoutesIdempotency(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	path := "/v1/workflows/" + wf + "/runs"
	key := map[string]string{"Idempotency-Key": "run-2024-001"}

	// A failed request does not keep the key.
	expectError(t, e.do(request{Method: "POST", Path: path, Token: u.Token, Body: map[string]any{"inputs": map[string]any{}}, Header: key}), protocol.CodeUnprocessableEntity)

	first := e.do(request{Method: "POST", Path: path, Token: u.Token, Body: goodInputs(), Header: key})
	expectStatus(t, first, http.StatusCreated)
	if first.Header.Get("Idempotent-Replayed") != "" {
		t.Fatal("the first response is not a replay")
	}
	again := e.do(request{Method: "POST", Path: path, Token: u.Token, Body: goodInputs(), Header: key})
	expectStatus(t, again, http.StatusCreated)
	if again.Header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(again.Body, first.Body) || !strings.HasPrefix(again.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("replay %v %s, first %s", again.Header, again.Body, first.Body)
	}
	if again.Header.Get("X-Request-Id") == first.Header.Get("X-Request-Id") {
		t.Fatal("a replay is another request with its own id")
	}
	runs, _ := listIDs(t, e.get("/v1/runs?workflowId="+wf, u.Token))
	if len(runs) != 1 {
		t.Fatalf("runs %v", runs)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 1.0 {
		t.Fatalf("credits %v", cr)
	}
	er := expectError(t, e.do(request{Method: "POST", Path: path, Token: u.Token, Body: map[string]any{"inputs": map[string]any{"username": "eve"}}, Header: key}), protocol.CodeConflict)
	if er.Details["reason"] != "idempotency_key_reused" {
		t.Fatalf("details %v", er.Details)
	}
	// Keys belong to an account: another account's same key is a new request.
	v := e.newUser(store.RoleMember, store.PlanPro, 10)
	wfV := e.newWorkflow(v.Token)
	expectStatus(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wfV + "/runs", Token: v.Token, Body: goodInputs(), Header: key}), http.StatusCreated)

	// Batches too, JSON and CSV.
	wf2 := e.newWorkflow(u.Token)
	bkey := map[string]string{"Idempotency-Key": "batch-1"}
	b1 := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/batches", Token: u.Token, Body: batchBody(2), Header: bkey})
	expectStatus(t, b1, http.StatusCreated)
	b2 := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/batches", Token: u.Token, Body: batchBody(2), Header: bkey})
	expectStatus(t, b2, http.StatusCreated)
	if !bytes.Equal(b1.Body, b2.Body) || b2.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("batch replay %s", b2.Body)
	}
	csvKey := map[string]string{"Idempotency-Key": "batch-csv", "Content-Type": "text/csv"}
	c1 := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/batches?concurrency=2", Token: u.Token, Body: "username\nada\n", Header: csvKey})
	expectStatus(t, c1, http.StatusCreated)
	c2 := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/batches?concurrency=2", Token: u.Token, Body: "username\nada\n", Header: csvKey})
	if c2.Header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(c1.Body, c2.Body) {
		t.Fatalf("csv replay %s", c2.Body)
	}
	// The query is part of the request: other parameters are another request.
	er = expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows/" + wf2 + "/batches?concurrency=5", Token: u.Token, Body: "username\nada\n", Header: csvKey}), protocol.CodeConflict)
	if er.Details["reason"] != "idempotency_key_reused" {
		t.Fatalf("details %v", er.Details)
	}
	batches, _ := listIDs(t, e.get("/v1/batches", u.Token))
	if len(batches) != 2 {
		t.Fatalf("batches %v", batches)
	}

	// Admin grants replay as well: credited once.
	gkey := map[string]string{"Idempotency-Key": "grant-7"}
	for i := 0; i < 2; i++ {
		expectStatus(t, e.do(request{Method: "POST", Path: "/v1/accounts/" + v.ID + "/credits", Token: e.Admin, Body: map[string]any{"amount": 5, "reason": "promo"}, Header: gkey}), http.StatusCreated)
	}
	if cr := e.get("/v1/credits", v.Token).Map(t); cr["balance"] != 15.0 {
		t.Fatalf("credits after a replayed grant %v", cr)
	}
}

// TestRoutesStatuses: creating routes answer 201, actions 200, DELETE 204
// with an empty body.
func TestRoutesStatuses(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	wf := e.newWorkflow(u.Token)
	run := e.newRun(u.Token, wf)
	expectStatus(t, e.post("/v1/runs/"+run+"/cancel", u.Token, nil), http.StatusOK)
	bat := e.newBatch(u.Token, wf, 1)
	expectStatus(t, e.post("/v1/batches/"+bat+"/start", u.Token, nil), http.StatusOK)
	expectStatus(t, e.post("/v1/batches/"+bat+"/cancel", u.Token, nil), http.StatusOK)
	_, _, apr := e.pendingApproval(u.Token)
	expectStatus(t, e.post("/v1/approvals/"+apr+"/approve", u.Token, nil), http.StatusOK)
	_, _, apr = e.pendingApproval(u.Token)
	expectStatus(t, e.post("/v1/approvals/"+apr+"/reject", u.Token, map[string]any{"comment": "no"}), http.StatusOK)

	r := e.post("/v1/tokens", u.Token, map[string]any{"name": "x", "kind": "api"})
	expectStatus(t, r, http.StatusCreated)
	expectNoContent(t, e.del("/v1/tokens/"+r.Map(t)["id"].(string), u.Token))
	expectNoContent(t, e.del("/v1/workflows/"+e.newWorkflow(u.Token), u.Token))
	r = e.get("/healthz", "")
	expectStatus(t, r, http.StatusOK)
}
