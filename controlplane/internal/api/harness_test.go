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
	"github.com/sirupsen/logrus/hooks/test"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// env is a real API server on a real SQLite file, reached over real HTTP.
type env struct {
	t      *testing.T
	Store  *sqlstore.DB
	API    *api.Server
	Server *httptest.Server
	Logs   *test.Hook
	// Admin is an admin's API token.
	Admin string
}

// newEnv starts a server on a new SQLite store; cfg may be zero.
func newEnv(t *testing.T, cfg api.Config) *env {
	t.Helper()
	return newEnvAt(t, "sqlite://"+filepath.Join(t.TempDir(), "copelf.db"), cfg)
}

// newEnvAt starts a server on the store at dsn, with an admin.
func newEnvAt(t *testing.T, dsn string, cfg api.Config) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	if cfg.RunCost == 0 {
		cfg.RunCost = 1
	}
	srv := api.New(st, log, cfg)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	e := &env{t: t, Store: st, API: srv, Server: hs, Logs: hook}
	admin, err := st.UserCreate(ctx, store.UserCreateParams{Email: "admin@example.com", PasswordHash: "x", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	e.Admin, err = api.CreateToken(ctx, st, admin.ID, store.TokenAPI, "admin")
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// user is a test account with an API token.
type user struct {
	*store.User
	Token string
}

// newUser creates a user with a role, plan and credits, and an API token.
func (e *env) newUser(role store.Role, plan store.Plan, credits int64) user {
	e.t.Helper()
	ctx := context.Background()
	u, err := e.Store.UserCreate(ctx, store.UserCreateParams{Email: ids.New("u") + "@example.com", PasswordHash: "x", Role: role, Plan: plan})
	if err != nil {
		e.t.Fatal(err)
	}
	if credits != 0 {
		if _, err := e.Store.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: credits, Kind: store.LedgerGrant, Reason: "test"}); err != nil {
			e.t.Fatal(err)
		}
	}
	tok, err := api.CreateToken(ctx, e.Store, u.ID, store.TokenAPI, "test")
	if err != nil {
		e.t.Fatal(err)
	}
	return user{User: u, Token: tok}
}

// response is a finished HTTP exchange.
type response struct {
	*http.Response
	Body []byte
}

// JSON decodes the body into v.
func (r *response) JSON(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.Body, v); err != nil {
		t.Fatalf("decode %s: %v\n%s", r.Request.URL.Path, err, r.Body)
	}
}

// Map decodes the body as an object.
func (r *response) Map(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	r.JSON(t, &m)
	return m
}

// request describes a call. Body may be nil, a []byte/string (sent as is)
// or any value (sent as JSON).
type request struct {
	Method, Path, Token string
	Body                any
	Header              map[string]string
}

// do sends a request to the server and reads the whole response. Every
// exchange is checked against the OpenAPI document (checkOpenAPI).
func (e *env) do(rq request) *response {
	e.t.Helper()
	var body io.Reader
	contentType := ""
	switch b := rq.Body.(type) {
	case nil:
	case []byte:
		body = bytes.NewReader(b)
	case string:
		body = strings.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		body, contentType = bytes.NewReader(raw), "application/json"
	}
	req, err := http.NewRequest(rq.Method, e.Server.URL+rq.Path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if rq.Token != "" {
		req.Header.Set("Authorization", "Bearer "+rq.Token)
	}
	for k, v := range rq.Header {
		req.Header.Set(k, v)
	}
	res, err := e.Server.Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	out := &response{Response: res, Body: raw}
	checkOpenAPI(e.t, req, out)
	return out
}

// get, post, patch, del are shorthands.
func (e *env) get(path, token string) *response {
	return e.do(request{Method: "GET", Path: path, Token: token})
}
func (e *env) post(path, token string, body any) *response {
	return e.do(request{Method: "POST", Path: path, Token: token, Body: body})
}

// expectError asserts an error envelope: status, code, JSON content type and
// requestId equal to the X-Request-Id header; it returns the envelope.
func expectError(t *testing.T, r *response, code protocol.Code) *protocol.Error {
	t.Helper()
	if r.StatusCode != code.HTTPStatus() {
		t.Fatalf("%s %s: status %d, want %d (%s)\n%s", r.Request.Method, r.Request.URL.Path, r.StatusCode, code.HTTPStatus(), code, r.Body)
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("content type %q, want application/json", ct)
	}
	var e protocol.Error
	r.JSON(t, &e)
	if e.Code != code {
		t.Fatalf("%s %s: code %q, want %q\n%s", r.Request.Method, r.Request.URL.Path, e.Code, code, r.Body)
	}
	if e.Message == "" {
		t.Fatalf("empty message: %s", r.Body)
	}
	if e.RequestID == "" || e.RequestID != r.Header.Get("X-Request-Id") {
		t.Fatalf("requestId %q, X-Request-Id header %q", e.RequestID, r.Header.Get("X-Request-Id"))
	}
	return &e
}

// expectStatus asserts a success status.
func expectStatus(t *testing.T, r *response, status int) {
	t.Helper()
	if r.StatusCode != status {
		t.Fatalf("%s %s: status %d, want %d\n%s", r.Request.Method, r.Request.URL.Path, r.StatusCode, status, r.Body)
	}
}

// sampleDefinition is a small valid definition with a secret variable.
const sampleDefinition = `{"version":1,"variables":[{"name":"username","type":"string","required":true},{"name":"password","type":"secret"}],
"steps":[{"type":"navigate","url":"http://127.0.0.1/login"},{"type":"type","selector":"#user","text":"{{username}}"},{"type":"type","selector":"#pw","text":"{{password}}"}]}`

// newWorkflow creates a ready workflow through the API and returns its id.
func (e *env) newWorkflow(token string) string {
	e.t.Helper()
	r := e.post("/v1/workflows", token, map[string]any{"name": "wf", "definition": json.RawMessage(sampleDefinition)})
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)["id"].(string)
}
