package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// serverRoutes reads the routes registered in server.go: every
// s.handle("<path>", methods{"<METHOD>": …}) call, path → sorted methods.
func serverRoutes(t *testing.T) map[string][]string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "server.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	routes := map[string][]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok {
			return true
		}
		sel, ok := call.Fun.(*ast.SelectorExpr)
		if !ok || sel.Sel.Name != "handle" || len(call.Args) != 2 {
			return true
		}
		lit, ok := call.Args[0].(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			t.Fatalf("%s: s.handle with a path that is not a literal", fset.Position(call.Pos()))
		}
		path, _ := strconv.Unquote(lit.Value)
		cl, ok := call.Args[1].(*ast.CompositeLit)
		if !ok {
			t.Fatalf("%s: s.handle(%q) without a methods literal", fset.Position(call.Pos()), path)
		}
		for _, el := range cl.Elts {
			kv, ok := el.(*ast.KeyValueExpr)
			key, ok2 := kv.Key.(*ast.BasicLit)
			if !ok || !ok2 {
				t.Fatalf("%s: s.handle(%q) with a method that is not a literal", fset.Position(el.Pos()), path)
			}
			m, _ := strconv.Unquote(key.Value)
			routes[path] = append(routes[path], m)
		}
		sort.Strings(routes[path])
		return true
	})
	if len(routes) < 10 {
		t.Fatalf("found only %d routes in server.go", len(routes))
	}
	return routes
}

// concretePath fills a path template's parameters.
func concretePath(template string) string {
	r := strings.NewReplacer("{id}", "x_unknown", "{accountId}", "usr_unknown")
	return r.Replace(template)
}

func TestOpenAPIDocumentValid(t *testing.T) {
	doc, _ := loadOpenAPI(t) // loads and validates
	if doc.OpenAPI != "3.0.3" {
		t.Errorf("openapi %q, want 3.0.3", doc.OpenAPI)
	}
	opIDs := map[string]string{}
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			where := method + " " + path
			if op.OperationID == "" {
				t.Errorf("%s: no operationId", where)
			} else if prev, dup := opIDs[op.OperationID]; dup {
				t.Errorf("%s: operationId %q also used by %s", where, op.OperationID, prev)
			}
			opIDs[op.OperationID] = where
			for status, ref := range op.Responses.Map() {
				checkErrorResponse(t, where+" "+status, status, ref.Value)
			}
		}
	}
	for name, ref := range doc.Components.Responses {
		if name == "RouteNotFound" || name == "MethodNotSupported" {
			checkErrorResponse(t, "components.responses."+name, "404", ref.Value)
		}
	}
}

// checkErrorResponse checks that a response carries X-Request-Id and, for an
// error status, that it is the envelope restricted to codes of that status.
func checkErrorResponse(t *testing.T, where, status string, res *openapi3.Response) {
	t.Helper()
	if h := res.Headers["X-Request-Id"]; h == nil || !h.Value.Required {
		t.Errorf("%s: no required X-Request-Id header", where)
	}
	code, err := strconv.Atoi(status)
	if err != nil {
		t.Errorf("%s: status %q is not a number (no default responses: every status is listed)", where, status)
		return
	}
	if code < 400 {
		return
	}
	mt := res.Content.Get("application/json")
	if mt == nil || len(res.Content) != 1 {
		t.Errorf("%s: an error must be application/json only", where)
		return
	}
	var codes []string
	envelope := false
	for _, sub := range mt.Schema.Value.AllOf {
		if sub.Ref == "#/components/schemas/Error" {
			envelope = true
			continue
		}
		if p := sub.Value.Properties["code"]; p != nil {
			for _, c := range p.Value.Enum {
				codes = append(codes, c.(string))
			}
		}
	}
	if !envelope || len(codes) == 0 {
		t.Errorf("%s: must be allOf [Error, {code: enum [...]}]", where)
	}
	for _, c := range codes {
		if !protocol.Code(c).Valid() {
			t.Errorf("%s: code %q is not in the catalog", where, c)
		} else if got := protocol.Code(c).HTTPStatus(); got != code {
			t.Errorf("%s: code %q is carried by status %d, not %d", where, c, got, code)
		}
	}
}

func TestOpenAPIErrorCodesAreTheCatalog(t *testing.T) {
	doc, _ := loadOpenAPI(t)
	var inDoc []string
	for _, v := range doc.Components.Schemas["Error"].Value.Properties["code"].Value.Enum {
		inDoc = append(inDoc, v.(string))
	}
	var catalog []string
	for _, c := range protocol.Codes() {
		catalog = append(catalog, string(c))
	}
	sort.Strings(inDoc)
	sort.Strings(catalog)
	if !slices.Equal(inDoc, catalog) {
		t.Errorf("Error.code enum %v\nprotocol.Codes()  %v", inDoc, catalog)
	}
	// The status table in ErrorCode's description matches the catalog.
	desc := doc.Components.Schemas["ErrorCode"].Value.Description
	for _, c := range protocol.Codes() {
		if want := fmt.Sprintf("%s %d", c, c.HTTPStatus()); !strings.Contains(strings.Join(strings.Fields(desc), " "), want) {
			t.Errorf("ErrorCode description lacks %q", want)
		}
	}
}

func TestOpenAPIRoutesMatchServer(t *testing.T) {
	doc, _ := loadOpenAPI(t)
	server := serverRoutes(t)
	documented := map[string][]string{}
	for path, item := range doc.Paths.Map() {
		documented[path] = methodsOf(item)
	}
	for path, methods := range server {
		if got, ok := documented[path]; !ok {
			t.Errorf("server.go serves %s %v; the document lacks the path", path, methods)
		} else if !slices.Equal(got, methods) {
			t.Errorf("%s: server.go takes %v, the document %v", path, methods, got)
		}
	}
	for path, methods := range documented {
		if _, ok := server[path]; !ok {
			t.Errorf("the document has %s %v; server.go does not serve it", path, methods)
		}
	}

	// The running server agrees: every route answers something other than
	// not_found without a token, and a method it does not take is not_found
	// with the route's methods in Allow. checkOpenAPI validates each answer.
	e := newEnv(t, api.Config{})
	for path, methods := range server {
		p := concretePath(path)
		for _, m := range methods {
			r := e.do(request{Method: m, Path: p})
			if r.StatusCode == http.StatusNotFound {
				t.Errorf("%s %s without a token: 404 %s", m, p, r.Body)
			}
		}
		other := "PUT"
		for _, m := range []string{"PUT", "PATCH", "DELETE", "POST"} {
			if !slices.Contains(methods, m) {
				other = m
				break
			}
		}
		r := e.do(request{Method: other, Path: p})
		expectError(t, r, protocol.CodeNotFound)
		if got, want := r.Header.Get("Allow"), strings.Join(methods, ", "); got != want {
			t.Errorf("%s %s: Allow %q, want %q", other, p, got, want)
		}
	}
}

func TestOpenAPIServed(t *testing.T) {
	e := newEnv(t, api.Config{})
	want, err := os.ReadFile(openapiFile)
	if err != nil {
		t.Fatal(err)
	}
	r := e.get("/v1/openapi.yaml", "")
	expectStatus(t, r, http.StatusOK)
	if ct := r.Header.Get("Content-Type"); ct != "application/yaml" {
		t.Errorf("Content-Type %q", ct)
	}
	if !bytes.Equal(r.Body, want) {
		t.Errorf("served document differs from %s", openapiFile)
	}
	if r := e.do(request{Method: "HEAD", Path: "/v1/openapi.yaml"}); r.StatusCode != http.StatusOK || len(r.Body) != 0 {
		t.Errorf("HEAD: %d, %d bytes", r.StatusCode, len(r.Body))
	}
	expectError(t, e.post("/v1/openapi.yaml", "", nil), protocol.CodeNotFound)
}

// tourDefinition uses every step type and variable type, so that the
// normalised definition the server answers exercises every Step variant.
const tourDefinition = `{"version":1,"timeoutMs":600000,
"variables":[
  {"name":"username","type":"string","required":true,"pattern":"[a-z]+","maxLength":20},
  {"name":"password","type":"secret","required":true},
  {"name":"count","type":"number","min":0,"max":10,"default":3},
  {"name":"remember","type":"boolean","default":false}],
"steps":[
  {"type":"navigate","url":"https://example.com/login","timeoutMs":5000,"retries":2},
  {"type":"click","selector":"#start","optional":true},
  {"type":"type","selector":"#user","text":"{{username}}","clear":true},
  {"type":"type","selector":"#pw","text":"{{password}}"},
  {"type":"select","selector":"#country","value":"fr"},
  {"type":"check","selector":"#remember","checked":false},
  {"type":"press","key":"Enter"},
  {"type":"waitFor","selector":"xpath=//main","state":"attached"},
  {"type":"sleep","ms":10},
  {"type":"scroll","y":0},
  {"type":"scroll","selector":"#footer"},
  {"type":"extract","selector":"#price","attribute":"data-value","output":"price"},
  {"type":"assert","selector":"#title","textContains":"Welcome"},
  {"type":"assert","selector":"#user","equals":""},
  {"type":"screenshot","name":"done-{{run.id}}","fullPage":true},
  {"type":"approval","message":"Pay {{count}} items?"}]}`

// TestOpenAPITour makes every documented success response happen at least
// once, so that each success schema is checked against a real response.
func TestOpenAPITour(t *testing.T) {
	e := newEnv(t, api.Config{DataDir: t.TempDir()})
	ctx := context.Background()
	st := e.Store
	expect := func(r *response, status int) map[string]any {
		t.Helper()
		expectStatus(t, r, status)
		if len(r.Body) == 0 || r.Header.Get("Content-Type") != "application/json" {
			return nil
		}
		return r.Map(t)
	}
	start := func(runID string) (lease string) {
		t.Helper()
		lease = ids.New(ids.Lease)
		if _, err := st.RunStart(ctx, store.RunStartParams{ID: runID, AgentID: ids.New(ids.Agent), LeaseID: lease}); err != nil {
			t.Fatal(err)
		}
		return lease
	}
	finish := func(runID string, status protocol.RunStatus, outputs map[string]any, runErr *protocol.Error) {
		t.Helper()
		run, err := st.RunGet(ctx, runID)
		if err != nil {
			t.Fatal(err)
		}
		steps := run.Steps
		now := time.Now().UTC().Truncate(time.Millisecond)
		d := int64(12)
		steps[0] = store.StepRecord{Index: 0, Type: steps[0].Type, Status: protocol.StepSucceeded, StartedAt: &now, DurationMs: &d, Attempts: 1}
		if runErr != nil {
			steps[1] = store.StepRecord{Index: 1, Type: steps[1].Type, Status: protocol.StepFailed, StartedAt: &now, DurationMs: &d, Attempts: 2, Error: runErr}
		}
		if _, err := st.RunFinish(ctx, store.RunFinishParams{ID: runID, Status: status, Outputs: outputs, Error: runErr, Steps: steps}); err != nil {
			t.Fatal(err)
		}
	}

	// Meta.
	expect(e.get("/healthz", ""), http.StatusOK)
	expectStatus(t, e.get("/v1/openapi.yaml", ""), http.StatusOK)
	expect(e.do(request{Method: "HEAD", Path: "/v1/me", Token: e.Admin}), http.StatusOK)

	// Accounts: a pro user made by the admin signs in with the cookie, makes
	// and revokes a token, and signs out.
	const password = "tour password 1"
	email := ids.New("tour") + "@example.com"
	u := expect(e.post("/v1/users", e.Admin, map[string]any{"email": email, "password": password, "role": "member", "plan": "pro"}), http.StatusCreated)
	userID := u["id"].(string)
	expect(e.post("/v1/accounts/"+userID+"/credits", e.Admin, map[string]any{"amount": 100, "reason": "tour"}), http.StatusCreated)
	grant := request{Method: "POST", Path: "/v1/accounts/" + userID + "/credits", Token: e.Admin, Body: map[string]any{"amount": -1, "reason": "adjust"}, Header: map[string]string{"Idempotency-Key": "tour-grant"}}
	expect(e.do(grant), http.StatusCreated)
	if r := e.do(grant); r.Header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("grant replay: %d %v", r.StatusCode, r.Header)
	}
	sess := expect(e.post("/v1/sessions", "", map[string]any{"email": email, "password": password}), http.StatusCreated)
	cookie := map[string]string{"Cookie": api.SessionCookie + "=" + sess["token"].(string), api.CSRFHeader: api.CSRFToken(sess["token"].(string))}
	me := expect(e.do(request{Method: "GET", Path: "/v1/me", Header: cookie}), http.StatusOK)
	if me["id"] != userID {
		t.Fatalf("me: %v", me)
	}
	tok := expect(e.do(request{Method: "POST", Path: "/v1/tokens", Header: cookie, Body: map[string]any{"name": "ci", "kind": "api", "expiresInSeconds": 3600}}), http.StatusCreated)
	token := tok["token"].(string)
	agentTok := expect(e.post("/v1/tokens", token, map[string]any{"name": "agent", "kind": "agent"}), http.StatusCreated)
	expect(e.get("/v1/tokens", token), http.StatusOK)
	expect(e.del("/v1/tokens/"+agentTok["id"].(string), token), http.StatusNoContent)
	expect(e.do(request{Method: "DELETE", Path: "/v1/sessions/current", Header: cookie}), http.StatusNoContent)

	// Workflows.
	wfBody := map[string]any{"name": "tour", "definition": json.RawMessage(tourDefinition)}
	wf := expect(e.post("/v1/workflows", token, wfBody), http.StatusCreated)["id"].(string)
	expect(e.get("/v1/workflows?limit=1", token), http.StatusOK)
	expect(e.get("/v1/workflows/"+wf, token), http.StatusOK)
	expect(e.patch("/v1/workflows/"+wf, token, map[string]any{"name": "tour 2"}), http.StatusOK)
	expect(e.patch("/v1/workflows/"+wf, token, map[string]any{"definition": json.RawMessage(tourDefinition)}), http.StatusOK)
	gone := expect(e.post("/v1/workflows", token, wfBody), http.StatusCreated)["id"].(string)
	expect(e.del("/v1/workflows/"+gone, token), http.StatusNoContent)

	// Runs: queued (with an idempotent replay), approved, rejected, cancelled
	// while queued and while running.
	inputs := map[string]any{"inputs": map[string]any{"username": "ada", "password": "s3cret"}, "labels": map[string]string{"os": "linux"}, "queueTimeoutMs": 60000}
	create := request{Method: "POST", Path: "/v1/workflows/" + wf + "/runs", Token: token, Body: inputs, Header: map[string]string{"Idempotency-Key": "tour-run"}}
	run := expect(e.do(create), http.StatusCreated)["id"].(string)
	if r := e.do(create); r.StatusCode != http.StatusCreated || r.Header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("run replay: %d %v", r.StatusCode, r.Header)
	}
	expect(e.get("/v1/runs?status=queued&workflowId="+wf, token), http.StatusOK)
	expect(e.get("/v1/runs/"+run, token), http.StatusOK)
	start(run)
	apr, err := st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: run, Step: 15, Message: "Pay 3 items?"})
	if err != nil {
		t.Fatal(err)
	}
	expect(e.get("/v1/approvals?status=pending", token), http.StatusOK)
	expect(e.get("/v1/approvals/"+apr.ID, token), http.StatusOK)
	expect(e.post("/v1/approvals/"+apr.ID+"/approve", token, nil), http.StatusOK)
	apr, err = st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: run, Step: 15, Message: "Really?"})
	if err != nil {
		t.Fatal(err)
	}
	expect(e.post("/v1/approvals/"+apr.ID+"/reject", token, map[string]any{"comment": "no"}), http.StatusOK)
	if failed := expect(e.get("/v1/runs/"+run, token), http.StatusOK); failed["status"] != "failed" {
		t.Errorf("rejected run: %v", failed)
	}
	run2 := expect(e.post("/v1/workflows/"+wf+"/runs", token, inputs), http.StatusCreated)["id"].(string)
	expect(e.post("/v1/runs/"+run2+"/cancel", token, nil), http.StatusOK)
	run3 := expect(e.post("/v1/workflows/"+wf+"/runs", token, inputs), http.StatusCreated)["id"].(string)
	lease := start(run3)
	if c := expect(e.post("/v1/runs/"+run3+"/cancel", token, nil), http.StatusOK); c["cancelRequested"] != true {
		t.Errorf("cancel of a running run: %v", c)
	}

	// Artifacts: uploaded by the run's agent, read by its owner whole, in
	// part and conditionally. Agents: none connected.
	agentToken := expect(e.post("/v1/tokens", token, map[string]any{"name": "uploader", "kind": "agent"}), http.StatusCreated)["token"].(string)
	png := []byte("\x89PNG\r\n\x1a\nnot really")
	art := expect(e.do(request{Method: "PUT", Path: "/v1/runs/" + run3 + "/artifacts/done.png", Token: agentToken, Body: png,
		Header: map[string]string{"Content-Type": "image/png", api.LeaseHeader: lease}}), http.StatusCreated)
	expect(e.get("/v1/runs/"+run3+"/artifacts", token), http.StatusOK)
	if r := e.get("/v1/runs/"+run3+"/artifacts/done.png", token); r.StatusCode != http.StatusOK || !bytes.Equal(r.Body, png) {
		t.Errorf("artifact: %d %q", r.StatusCode, r.Body)
	}
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/runs/" + run3 + "/artifacts/done.png", Token: token, Header: map[string]string{"Range": "bytes=0-3"}}), http.StatusPartialContent)
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/runs/" + run3 + "/artifacts/done.png", Token: token,
		Header: map[string]string{"If-None-Match": `"` + art["sha256"].(string) + `"`}}), http.StatusNotModified)
	expect(e.get("/v1/agents", token), http.StatusOK)
	finish(run3, protocol.RunCancelled, nil, nil)

	// Batches: JSON and CSV, started, finished with outputs and an error,
	// results as JSON and CSV, and a cancelled one.
	batchBody := map[string]any{"iterations": []any{
		map[string]any{"inputs": map[string]any{"username": "ada", "password": "a"}},
		map[string]any{"inputs": map[string]any{"username": "bob", "password": "b", "count": 2}},
	}, "concurrency": 2, "stopOnFailure": false}
	bat := expect(e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches", Token: token, Body: batchBody, Header: map[string]string{"Idempotency-Key": "tour-batch"}}), http.StatusCreated)["id"].(string)
	csvBatch := expect(e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/batches?concurrency=2&stopOnFailure=true", Token: token,
		Body: "username,password,remember\ncy,c,true\n", Header: map[string]string{"Content-Type": "text/csv"}}), http.StatusCreated)["id"].(string)
	expect(e.get("/v1/batches?limit=10", token), http.StatusOK)
	started := expect(e.post("/v1/batches/"+bat+"/start", token, nil), http.StatusOK)
	its := started["iterations"].([]any)
	r0, r1 := its[0].(map[string]any)["runId"].(string), its[1].(map[string]any)["runId"].(string)
	start(r0)
	start(r1)
	finish(r0, protocol.RunSucceeded, map[string]any{"price": "=1+1", "n": 2.5}, nil)
	finish(r1, protocol.RunFailed, nil, protocol.Errorf(protocol.CodeNotFound, "No element matches #price.").With("reason", protocol.ReasonElementNotFound).With("step", 1))
	expect(e.get("/v1/batches/"+bat, token), http.StatusOK)
	expect(e.get("/v1/batches/"+bat+"/results", token), http.StatusOK)
	csv := e.get("/v1/batches/"+bat+"/results?format=csv", token)
	expectStatus(t, csv, http.StatusOK)
	if !strings.HasPrefix(string(csv.Body), "index,runId,status,errorCode,errorReason,n,price\n") {
		t.Errorf("results CSV:\n%s", csv.Body)
	}
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/batches/" + bat + "/results", Token: token, Header: map[string]string{"Accept": "text/csv"}}), http.StatusOK)
	expect(e.post("/v1/batches/"+csvBatch+"/cancel", token, nil), http.StatusOK)

	// Recorded workflows: an upload, the analyzer's queue, claim, download
	// (whole, a range, not modified) and result, and a new video.
	recording, recCT := multipartUpload(t, strPtr("tour recording"), "tour.mp4", readTestVideo(t, "sample-20s.mp4"))
	rec := expect(e.do(request{Method: "POST", Path: "/v1/workflows", Token: token, Body: recording, Header: map[string]string{"Content-Type": recCT}}), http.StatusCreated)["id"].(string)
	analyzer := expect(e.post("/v1/tokens", e.Admin, map[string]any{"name": "tour analyzer", "kind": "analyzer"}), http.StatusCreated)["token"].(string)
	expect(e.get("/v1/analysis/workflows?limit=5", analyzer), http.StatusOK)
	claimID := expect(e.post("/v1/workflows/"+rec+"/analysis/claim", analyzer, nil), http.StatusOK)["claimId"].(string)
	videoETag := e.get("/v1/workflows/"+rec+"/video", analyzer).Header.Get("ETag")
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/workflows/" + rec + "/video", Token: analyzer, Header: map[string]string{"Range": "bytes=0-99"}}), http.StatusPartialContent)
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/workflows/" + rec + "/video", Token: token, Header: map[string]string{"If-None-Match": videoETag}}), http.StatusNotModified)
	expect(e.post("/v1/workflows/"+rec+"/analysis", analyzer, map[string]any{"claimId": claimID, "definition": json.RawMessage(tourDefinition)}), http.StatusOK)
	expect(e.do(request{Method: "PUT", Path: "/v1/workflows/" + rec + "/video", Token: token, Body: readTestVideo(t, "sample-20s.webm"), Header: map[string]string{"Content-Type": "video/webm"}}), http.StatusOK)

	// Credits.
	expect(e.get("/v1/credits", token), http.StatusOK)
	expect(e.get("/v1/credits/ledger?limit=2", token), http.StatusOK)

	// Coupons and billing (stripe-mock; skipped with how to install it when missing).
	tourMoney(t)

	// Live events, the queue and metrics (live_test.go).
	tourLive(t)

	// Every documented success response has been seen.
	doc, _ := loadOpenAPI(t)
	for path, item := range doc.Paths.Map() {
		for method, op := range item.Operations() {
			for status := range op.Responses.Map() {
				if status < "400" {
					if _, ok := observed.Load(method + " " + path + " " + status); !ok {
						t.Errorf("%s %s never answered %s", method, path, status)
					}
				}
			}
		}
	}
}
