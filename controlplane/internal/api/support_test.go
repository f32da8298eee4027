package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Helpers shared by errors_test, routes_test, isolation_test, race_test and
// fuzz_test. They build on harness_test.go.

// testPassword is the password of users made by userWithPassword.
const testPassword = "correct horse battery"

// passwordHash is testPassword hashed once: bcrypt is slow under -race.
var passwordHash = sync.OnceValue(func() string {
	h, err := api.HashPassword(testPassword)
	if err != nil {
		panic(err)
	}
	return h
})

// forT returns a copy of e that reports failures on t, for subtests: the
// harness calls e.t.Fatal, which must run on the test's own goroutine.
func (e *env) forT(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

func (e *env) patch(path, token string, body any) *response {
	return e.do(request{Method: "PATCH", Path: path, Token: token, Body: body})
}

func (e *env) del(path, token string) *response {
	return e.do(request{Method: "DELETE", Path: path, Token: token})
}

// goodInputs are valid run inputs for sampleDefinition.
func goodInputs() map[string]any {
	return map[string]any{"inputs": map[string]any{"username": "ada", "password": "s3cret"}}
}

// newRun queues a run of wf through the API and returns its id.
func (e *env) newRun(token, wf string) string {
	e.t.Helper()
	r := e.post("/v1/workflows/"+wf+"/runs", token, goodInputs())
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)["id"].(string)
}

// startRun moves a queued run to running, as an agent would.
func (e *env) startRun(runID string) {
	e.t.Helper()
	if _, err := e.Store.RunStart(context.Background(), store.RunStartParams{ID: runID, AgentID: ids.New(ids.Agent), LeaseID: ids.New(ids.Lease)}); err != nil {
		e.t.Fatal(err)
	}
}

// finishRun starts a queued run and ends it with status.
func (e *env) finishRun(runID string, status protocol.RunStatus) {
	e.t.Helper()
	e.startRun(runID)
	if _, err := e.Store.RunFinish(context.Background(), store.RunFinishParams{ID: runID, Status: status, Outputs: map[string]any{"greeting": "hi " + runID}}); err != nil {
		e.t.Fatal(err)
	}
}

// pendingApproval creates a workflow with a run paused at an approval and
// returns the workflow, run and approval ids.
func (e *env) pendingApproval(token string) (wf, run, apr string) {
	e.t.Helper()
	wf = e.newWorkflow(token)
	run = e.newRun(token, wf)
	e.startRun(run)
	a, err := e.Store.ApprovalCreate(context.Background(), store.ApprovalCreateParams{RunID: run, Step: 1, Message: "Pay the invoice?"})
	if err != nil {
		e.t.Fatal(err)
	}
	return wf, run, a.ID
}

// batchBody is a JSON batch of n valid iterations.
func batchBody(n int) map[string]any {
	its := make([]map[string]any, n)
	for i := range its {
		its[i] = map[string]any{"inputs": map[string]any{"username": "user" + string(rune('a'+i%26)), "password": "pw"}}
	}
	return map[string]any{"iterations": its}
}

// newBatch creates a batch of n iterations on wf and returns its id.
func (e *env) newBatch(token, wf string, n int) string {
	e.t.Helper()
	r := e.post("/v1/workflows/"+wf+"/batches", token, batchBody(n))
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)["id"].(string)
}

// adjustableClock makes the server's clock movable without data races and
// returns the function that moves it forward. Call it before any request.
func (e *env) adjustableClock() func(time.Duration) {
	var offset atomic.Int64
	e.API.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	return func(d time.Duration) { offset.Add(int64(d)) }
}

// fieldNames lists details.fields[].field of an error.
func fieldNames(t *testing.T, e *protocol.Error) []string {
	t.Helper()
	raw, ok := e.Details["fields"].([]any)
	if !ok {
		t.Fatalf("details.fields missing: %#v", e.Details)
	}
	var out []string
	for _, f := range raw {
		m, ok := f.(map[string]any)
		if !ok || m["field"] == nil || m["problem"] == nil || m["problem"] == "" {
			t.Fatalf("details.fields entry %#v is not {field, problem}", f)
		}
		out = append(out, m["field"].(string))
	}
	sort.Strings(out)
	return out
}

// hasField reports whether the error names field in details.fields.
func hasField(t *testing.T, e *protocol.Error, field string) bool {
	t.Helper()
	for _, f := range fieldNames(t, e) {
		if f == field {
			return true
		}
	}
	return false
}

// leakRE matches what an error must never show: SQL, driver names, source
// locations, file paths and stack traces.
var leakRE = regexp.MustCompile(`(?i)sql|\.go:|/work/|goroutine \d|runtime\.|panic`)

// idRE matches the API's random ids, whose letters may spell anything.
var idRE = regexp.MustCompile(`[a-z]{2,3}_[a-z2-7]{26}`)

// noLeak fails when a response body shows internals.
func noLeak(t *testing.T, body []byte) {
	t.Helper()
	body = idRE.ReplaceAll(body, []byte("<id>"))
	if m := leakRE.Find(body); m != nil {
		t.Errorf("body leaks internals (%q): %s", m, body)
	}
	if bytes.Contains(body, []byte("SQLITE")) {
		t.Errorf("body leaks internals: %s", body)
	}
}

// items decodes a list response and returns its ids.
func listIDs(t *testing.T, r *response) ([]string, any) {
	t.Helper()
	var l struct {
		Items      []map[string]any `json:"items"`
		NextCursor any              `json:"nextCursor"`
	}
	r.JSON(t, &l)
	if l.Items == nil {
		t.Fatalf("list without items array: %s", r.Body)
	}
	out := make([]string, len(l.Items))
	for i, it := range l.Items {
		out[i], _ = it["id"].(string)
	}
	return out, l.NextCursor
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// rawResult is an exchange made outside the harness (from goroutines that
// must not call t.Fatal).
type rawResult struct {
	Status int
	Header http.Header
	Body   []byte
	Err    error
}

// raw sends a request with the test server's client without touching t.
func (e *env) raw(method, path, token string, body []byte, header map[string]string) rawResult {
	req, err := http.NewRequest(method, e.Server.URL+path, bytes.NewReader(body))
	if err != nil {
		return rawResult{Err: err}
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := e.Server.Client().Do(req)
	if err != nil {
		return rawResult{Err: err}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return rawResult{Status: res.StatusCode, Header: res.Header, Body: b, Err: err}
}

// code returns the envelope's code of a raw result, "" for a success body.
func (r rawResult) code() protocol.Code {
	var e protocol.Error
	if json.Unmarshal(r.Body, &e) != nil {
		return ""
	}
	return e.Code
}

// envelopeOK reports what is wrong with an error body, "" when it is a
// well-formed envelope whose requestId equals the header.
func envelopeProblem(status int, header http.Header, body []byte) string {
	if ct := header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		return "content type " + ct
	}
	var env map[string]json.RawMessage
	if err := json.Unmarshal(body, &env); err != nil {
		return "not a JSON object: " + err.Error()
	}
	for _, k := range []string{"code", "message", "requestId", "details"} {
		if _, ok := env[k]; !ok {
			return "envelope without " + k
		}
	}
	var e protocol.Error
	if err := json.Unmarshal(body, &e); err != nil {
		return "envelope does not decode: " + err.Error()
	}
	if !e.Code.Valid() {
		return "unknown code " + string(e.Code)
	}
	if e.Code.HTTPStatus() != status {
		return "status does not match the code"
	}
	if e.Message == "" {
		return "empty message"
	}
	if e.RequestID == "" || e.RequestID != header.Get("X-Request-Id") {
		return "requestId differs from X-Request-Id"
	}
	return ""
}

// sameSet reports whether a and b hold the same strings, each once.
func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := make(map[string]int, len(a))
	for _, x := range a {
		seen[x]++
	}
	for _, x := range b {
		if seen[x] != 1 {
			return false
		}
		seen[x]--
	}
	return true
}
