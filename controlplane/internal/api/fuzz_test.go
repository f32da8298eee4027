package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// Fuzzed bodies go through the real handler and a real SQLite store: never a
// panic, never a 500, and every answer is either the envelope (with requestId
// equal to X-Request-Id) or the route's success JSON.
//
//	go test -run='^$' -fuzz=FuzzCreateRun -fuzztime=45s -fuzzminimizetime=100x ./controlplane/internal/api
//
// Each execution writes to SQLite through an instrumented driver (a few
// milliseconds), so the default minimisation of every new input (up to 60 s)
// would use a short run's whole budget; -fuzzminimizetime=100x keeps it
// short. Without it, FuzzCreateWorkflow spends 45 s minimising its first find.

// fuzzDefinition declares a variable of every type with rules.
const fuzzDefinition = `{"version":1,"variables":[
{"name":"username","type":"string","required":true,"pattern":"[a-z]+","maxLength":12},
{"name":"pin","type":"secret","maxLength":8},
{"name":"count","type":"number","min":0,"max":100,"default":1},
{"name":"agree","type":"boolean"}],
"steps":[{"type":"navigate","url":"https://example.com/{{username}}"},{"type":"type","selector":"#pin","text":"{{pin}}"},
{"type":"extract","selector":"#n","output":"n"},{"type":"approval","message":"ok {{count}} {{agree}}"}]}`

// fuzzEnv is one server for a whole fuzz target.
type fuzzEnv struct {
	api   *api.Server
	store *sqlstore.DB
	user  *store.User
	token string
	wf    string
}

func newFuzzEnv(f *testing.F) *fuzzEnv {
	f.Helper()
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(f.TempDir(), "copelf.db"))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { st.Close() })
	log := logrus.New()
	log.SetOutput(io.Discard)
	log.SetLevel(logrus.DebugLevel)
	e := &fuzzEnv{api: api.New(st, log, api.Config{RunCost: 1}), store: st}
	e.user, err = st.UserCreate(ctx, store.UserCreateParams{Email: "fuzz@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		f.Fatal(err)
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: e.user.ID, Amount: 1_000_000_000, Kind: store.LedgerGrant, Reason: "fuzz"}); err != nil {
		f.Fatal(err)
	}
	if e.token, err = api.CreateToken(ctx, st, e.user.ID, store.TokenAPI, "fuzz"); err != nil {
		f.Fatal(err)
	}
	wf, err := st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: e.user.ID, Name: "fuzz", Status: protocol.WorkflowReady, Definition: json.RawMessage(fuzzDefinition)})
	if err != nil {
		f.Fatal(err)
	}
	e.wf = wf.ID
	return e
}

// serve sends one request straight to the handler.
func (e *fuzzEnv) serve(method, path, rawQuery, contentType string, body []byte, header map[string]string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, bytes.NewReader(body))
	req.URL.RawQuery = rawQuery
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Authorization", "Bearer "+e.token)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	e.api.ServeHTTP(rec, req)
	return rec
}

// checkAnswer asserts the universal rules and returns the success body as a
// map (nil for an error).
func checkAnswer(t *testing.T, rec *httptest.ResponseRecorder, success int) map[string]any {
	t.Helper()
	body := rec.Body.Bytes()
	if rec.Code >= 500 {
		t.Fatalf("status %d: %s", rec.Code, body)
	}
	if rec.Header().Get("X-Request-Id") == "" {
		t.Fatal("no X-Request-Id")
	}
	noLeak(t, body)
	if rec.Code >= 400 {
		if p := envelopeProblem(rec.Code, rec.Header(), body); p != "" {
			t.Fatalf("status %d: %s: %s", rec.Code, p, body)
		}
		return nil
	}
	if rec.Code != success {
		t.Fatalf("status %d, want %d or an error: %s", rec.Code, success, body)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("content type %q", ct)
	}
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("success body is not a JSON object: %v: %s", err, body)
	}
	return m
}

// checkRedacted asserts that secret inputs show as "[redacted]".
func checkRedacted(t *testing.T, inputs any, sent []byte) {
	t.Helper()
	in, ok := inputs.(map[string]any)
	if !ok {
		t.Fatalf("inputs %v", inputs)
	}
	if pin, ok := in["pin"]; ok && pin != api.Redacted {
		t.Fatalf("secret shown: %v (sent %q)", pin, sent)
	}
}

func FuzzCreateWorkflow(f *testing.F) {
	e := newFuzzEnv(f)
	for _, seed := range []struct {
		body, requestID string
	}{
		{`{"name":"Log in","definition":` + sampleDefinition + `}`, ""},
		{`{"name":"typed","definition":` + fuzzDefinition + `}`, "trace-1"},
		{`{"name":"steps","definition":{"version":1,"timeoutMs":60000,"variables":[],"steps":[
			{"type":"navigate","url":"https://example.com"},{"type":"click","selector":"xpath=//a"},{"type":"select","selector":"#s","value":"v"},
			{"type":"check","selector":"#c","checked":true},{"type":"press","key":"Enter"},{"type":"waitFor","selector":"#w","state":"visible"},
			{"type":"sleep","ms":10},{"type":"scroll","y":100},{"type":"extract","selector":"#e","attribute":"href","output":"link"},
			{"type":"assert","selector":"#a","textContains":"ok"},{"type":"screenshot","name":"shot.png","fullPage":true},
			{"type":"approval","message":"Go?","timeoutMs":5000,"retries":2,"optional":true}]}}`, ""},
		{`{"name":"reserved","definition":{"version":1,"variables":[{"name":"run","type":"string"}],"steps":[{"type":"click","selector":"a"}]}}`, "x"},
		{`{"name":"","definition":null}`, ""},
		{`{"name":5}`, strings.Repeat("r", 65)},
		{`{"name":"x","definition":{"version":1,"steps":[{"type":"hover"}]},"extra":true}`, "bad id"},
		{`{"name":"x","definition":"{}"}`, ""},
		{`{"name":"x","definition":{"version":1,"variables":[{"name":"a","type":"number","default":"x","min":5,"max":1}],"steps":[{"type":"type","selector":"#a","text":"{{a}} {{run.id}} {{b}}"}]}}`, ""},
		{`{} {}`, ""},
		{`[`, ""},
		{``, ""},
	} {
		f.Add([]byte(seed.body), seed.requestID)
	}
	f.Fuzz(func(t *testing.T, body []byte, requestID string) {
		rec := e.serve("POST", "/v1/workflows", "", "application/json", body, map[string]string{"X-Request-Id": requestID})
		got := rec.Header().Get("X-Request-Id")
		if ids.ValidRequestID(requestID) != (got == requestID) {
			t.Fatalf("X-Request-Id %q for %q", got, requestID)
		}
		if got != requestID && !strings.HasPrefix(got, "req_") {
			t.Fatalf("generated X-Request-Id %q", got)
		}
		m := checkAnswer(t, rec, http.StatusCreated)
		if m == nil {
			return
		}
		id, _ := m["id"].(string)
		if !strings.HasPrefix(id, "wf_") || m["status"] != "ready" {
			t.Fatalf("created %s", rec.Body)
		}
		// What was accepted reads back the same, and can be replaced by itself.
		def, _ := json.Marshal(m["definition"])
		back := e.serve("GET", "/v1/workflows/"+id, "", "", nil, nil)
		if m2 := checkAnswer(t, back, http.StatusOK); m2 == nil || m2["name"] != m["name"] {
			t.Fatalf("read back %s", back.Body)
		}
		patch := e.serve("PATCH", "/v1/workflows/"+id, "", "application/json", []byte(`{"definition":`+string(def)+`}`), nil)
		if checkAnswer(t, patch, http.StatusOK) == nil {
			t.Fatalf("the stored definition does not validate again: %s", patch.Body)
		}
	})
}

func FuzzCreateRun(f *testing.F) {
	e := newFuzzEnv(f)
	for _, seed := range []struct {
		body string
		key  string
	}{
		{`{"inputs":{"username":"ada","pin":"1234","count":5,"agree":true}}`, ""},
		{`{"inputs":{"username":"ada"},"labels":{"os":"linux"},"queueTimeoutMs":60000}`, "key-1"},
		{`{"inputs":{"username":"ADA","count":101,"agree":"yes","pin":"123456789"}}`, ""},
		{`{"inputs":{"username":null,"x":1}}`, ""},
		{`{"inputs":{"username":"ada","count":1e400}}`, ""},
		{`{"inputs":"ada"}`, "key-2"},
		{`{"inputs":{},"queueTimeoutMs":-1,"labels":{"":"x"}}`, ""},
		{`{"inputs":{"username":"ada"}} trailing`, ""},
		{`null`, ""},
		{``, ""},
		{`{"input":{}}`, strings.Repeat("k", 256)},
	} {
		f.Add([]byte(seed.body), seed.key)
	}
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, body []byte, key string) {
		var header map[string]string
		if key != "" {
			header = map[string]string{"Idempotency-Key": key}
		}
		rec := e.serve("POST", "/v1/workflows/"+e.wf+"/runs", "", "application/json", body, header)
		m := checkAnswer(t, rec, http.StatusCreated)
		if rec.Code == http.StatusConflict || m == nil {
			return
		}
		id, _ := m["id"].(string)
		if !strings.HasPrefix(id, "run_") || m["workflowId"] != e.wf {
			t.Fatalf("created %s", rec.Body)
		}
		checkRedacted(t, m["inputs"], body)
		if rec.Header().Get("Idempotent-Replayed") == "true" {
			return
		}
		if m["status"] != "queued" {
			t.Fatalf("created %s", rec.Body)
		}
		// Free the workflow for the next input.
		if _, err := e.store.RunCancel(ctx, id); err != nil {
			t.Fatal(err)
		}
		got := e.serve("GET", "/v1/runs/"+id, "", "", nil, nil)
		if m := checkAnswer(t, got, http.StatusOK); m == nil || m["status"] != "cancelled" {
			t.Fatalf("run %s", got.Body)
		} else {
			checkRedacted(t, m["inputs"], body)
		}
	})
}

func FuzzCreateBatch(f *testing.F) {
	e := newFuzzEnv(f)
	for _, seed := range []struct {
		body  string
		csv   bool
		query string
	}{
		{`{"iterations":[{"inputs":{"username":"ada","pin":"1"}},{"inputs":{"username":"bob","count":3}}],"concurrency":2,"stopOnFailure":true}`, false, ""},
		{`{"iterations":[]}`, false, ""},
		{`{"iterations":[{"inputs":{"username":"ADA"}},{"inputs":null},{}]}`, false, ""},
		{`{"iterations":{"inputs":{}},"concurrency":"2"}`, false, ""},
		{`{"concurrency":1000,"iterations":[{"inputs":{"username":"a"}}]}`, false, ""},
		{"username,pin,count,agree\nada,1234,5,true\nbob,,,0\n", true, "concurrency=3&stopOnFailure=true"},
		{"\ufeffusername,count\r\n\"ada\",\"7\"\r\n", true, ""},
		{"username,count\nada,x\nBOB,2\n", true, ""},
		{"username,username\na,b\n", true, ""},
		{"username,extra\nada,1\n", true, ""},
		{"username,\nada,\n", true, ""},
		{"username\n\"ada\n", true, "concurrency=0"},
		{"username\nada\nbob,1\n", true, "concurrency=x"},
		{"", true, "stopOnFailure=maybe"},
	} {
		f.Add([]byte(seed.body), seed.csv, seed.query)
	}
	f.Fuzz(func(t *testing.T, body []byte, csv bool, query string) {
		ct := "application/json"
		if csv {
			ct = "text/csv"
		}
		rec := e.serve("POST", "/v1/workflows/"+e.wf+"/batches", query, ct, body, nil)
		m := checkAnswer(t, rec, http.StatusCreated)
		if m == nil {
			return
		}
		id, _ := m["id"].(string)
		its, _ := m["iterations"].([]any)
		if !strings.HasPrefix(id, "bat_") || m["status"] != "created" || len(its) == 0 {
			t.Fatalf("created %s", rec.Body)
		}
		for i, it := range its {
			it := it.(map[string]any)
			if it["index"] != float64(i) || it["status"] != "pending" {
				t.Fatalf("iteration %d: %v", i, it)
			}
			checkRedacted(t, it["inputs"], body)
		}
		if c, _ := m["concurrency"].(float64); c < 1 || c > 100 {
			t.Fatalf("concurrency %v", m["concurrency"])
		}
	})
}
