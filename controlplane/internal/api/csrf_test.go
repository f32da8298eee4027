package api_test

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// signIn makes a user with testPassword and signs in; it returns the user,
// the session token and the CSRF cookie the server set.
func (e *env) signIn(role store.Role) (*store.User, string, *http.Cookie) {
	e.t.Helper()
	email := ids.New("csrf") + "@example.com"
	u, err := e.Store.UserCreate(context.Background(), store.UserCreateParams{Email: email, PasswordHash: cheapHash(), Role: role, Plan: store.PlanPro})
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.Store.CreditsGrant(context.Background(), store.CreditsGrantParams{AccountID: u.ID, Amount: 10, Kind: store.LedgerGrant, Reason: "test"}); err != nil {
		e.t.Fatal(err)
	}
	r := e.post("/v1/sessions", "", map[string]any{"email": email, "password": testPassword})
	expectStatus(e.t, r, http.StatusCreated)
	var csrf *http.Cookie
	for _, c := range r.Cookies() {
		if c.Name == api.CSRFCookie {
			csrf = c
		}
	}
	return u, r.Map(e.t)["token"].(string), csrf
}

// cheapHash is testPassword hashed at bcrypt's lowest cost: these tests
// sign in often, and the cost does not change what they check.
var cheapHash = sync.OnceValue(func() string {
	h, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
	if err != nil {
		panic(err)
	}
	return string(h)
})

// TestCSRF: a state-changing request authenticated by the session cookie
// must carry the session's CSRF token in X-CSRF-Token, or it is forbidden
// (details.reason "csrf") and changes nothing; reads and bearer requests
// need no token.
func TestCSRF(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u, session, csrf := e.signIn(store.RoleMember)

	// Sign-in sets the CSRF cookie: readable by the page's script, bound to
	// the session, strict same-site, with the session's lifetime.
	if csrf == nil || csrf.HttpOnly || csrf.Value != api.CSRFToken(session) || csrf.Path != "/" || csrf.SameSite != http.SameSiteStrictMode || csrf.Expires.IsZero() {
		t.Fatalf("csrf cookie %+v", csrf)
	}
	if csrf.Value == session || len(csrf.Value) < 40 {
		t.Fatalf("csrf token %q", csrf.Value)
	}
	cookie := api.SessionCookie + "=" + session
	withCookie := func(method, path string, body any, header map[string]string) *response {
		h := map[string]string{"Cookie": cookie}
		for k, v := range header {
			h[k] = v
		}
		return e.do(request{Method: method, Path: path, Body: body, Header: h})
	}
	refused := func(r *response) {
		t.Helper()
		er := expectError(t, r, protocol.CodeForbidden)
		if er.Details["reason"] != "csrf" {
			t.Fatalf("details %v", er.Details)
		}
	}

	// Reads need no token.
	expectStatus(t, withCookie("GET", "/v1/me", nil, nil), http.StatusOK)
	expectStatus(t, withCookie("HEAD", "/v1/me", nil, nil), http.StatusOK)

	// An approval is not resolved without the token, nor with a wrong one,
	// nor with another session's token.
	wf := e.newWorkflow(e.newUserToken(u))
	run := e.newRun(e.newUserToken(u), wf)
	e.startRun(run)
	a, err := e.Store.ApprovalCreate(context.Background(), store.ApprovalCreateParams{RunID: run, Step: 1, Message: "Go on?"})
	if err != nil {
		t.Fatal(err)
	}
	_, session2, _ := e.signIn(store.RoleMember)
	for name, h := range map[string]map[string]string{
		"missing":         nil,
		"empty":           {api.CSRFHeader: ""},
		"wrong":           {api.CSRFHeader: "not-the-token"},
		"the session":     {api.CSRFHeader: session},
		"another session": {api.CSRFHeader: api.CSRFToken(session2)},
	} {
		t.Run(name, func(t *testing.T) {
			refused(e.forT(t).do(request{Method: "POST", Path: "/v1/approvals/" + a.ID + "/approve", Header: mergeHeader(map[string]string{"Cookie": cookie}, h)}))
		})
	}
	if got, err := e.Store.ApprovalGet(context.Background(), a.ID); err != nil || got.Status != protocol.ApprovalPending {
		t.Fatalf("approval after refused requests: %+v %v", got, err)
	}
	refused(withCookie("POST", "/v1/tokens", map[string]any{"name": "x", "kind": "api"}, nil))
	refused(withCookie("POST", "/v1/runs/"+run+"/cancel", nil, nil))
	// Sign-out is state-changing too: refused, and the session still works.
	refused(withCookie("DELETE", "/v1/sessions/current", nil, nil))
	expectStatus(t, withCookie("GET", "/v1/me", nil, nil), http.StatusOK)

	// With the token, the same requests go through.
	ok := map[string]string{api.CSRFHeader: csrf.Value}
	expectStatus(t, withCookie("POST", "/v1/approvals/"+a.ID+"/approve", nil, ok), http.StatusOK)
	expectStatus(t, withCookie("POST", "/v1/tokens", map[string]any{"name": "x", "kind": "api"}, ok), http.StatusCreated)

	// The session token as a bearer needs no CSRF token: another site cannot
	// make a browser send an Authorization header.
	expectStatus(t, e.post("/v1/tokens", session, map[string]any{"name": "y", "kind": "api"}), http.StatusCreated)

	// Sign-out with the token clears both cookies.
	r := withCookie("DELETE", "/v1/sessions/current", nil, ok)
	expectNoContent(t, r)
	cleared := map[string]bool{}
	for _, c := range r.Cookies() {
		cleared[c.Name] = c.Value == "" && c.MaxAge < 0
	}
	if !cleared[api.SessionCookie] || !cleared[api.CSRFCookie] {
		t.Fatalf("sign-out cookies %q", r.Header.Values("Set-Cookie"))
	}
}

func mergeHeader(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// newUserToken makes an API token for u.
func (e *env) newUserToken(u *store.User) string {
	e.t.Helper()
	tok, err := api.CreateToken(context.Background(), e.Store, u.ID, store.TokenAPI, "test")
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

// TestSignInRateLimit: sign-in attempts are limited per account (the email,
// whatever its case) and per client address with rate_limited, 429 and
// Retry-After; the limits come back with time, and a limited attempt does
// not check the password (a right password is refused too).
func TestSignInRateLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{
		// Periods far longer than the test takes: only the server's clock,
		// moved by the test, refills the buckets.
		SignInPerAccount: api.RateLimit{Burst: 3, Every: 10 * time.Minute},
		SignInPerAddress: api.RateLimit{Burst: 8, Every: time.Hour},
	})
	advance := e.adjustableClock()
	mk := func() string {
		email := ids.New("rl") + "@example.com"
		if _, err := e.Store.UserCreate(context.Background(), store.UserCreateParams{Email: email, PasswordHash: cheapHash(), Role: store.RoleMember, Plan: store.PlanFree}); err != nil {
			t.Fatal(err)
		}
		return email
	}
	signIn := func(email, password string) *response {
		return e.post("/v1/sessions", "", map[string]any{"email": email, "password": password})
	}
	limited := func(r *response, scope string) {
		t.Helper()
		er := expectError(t, r, protocol.CodeRateLimited)
		if r.StatusCode != http.StatusTooManyRequests || er.Details["reason"] != "sign_in_attempts" || er.Details["scope"] != scope {
			t.Fatalf("%d %v", r.StatusCode, er.Details)
		}
		ra, err := strconv.Atoi(r.Header.Get("Retry-After"))
		if err != nil || ra < 1 || float64(ra) != er.Details["retryAfterSeconds"] {
			t.Fatalf("Retry-After %q, details %v", r.Header.Get("Retry-After"), er.Details)
		}
	}

	// Per account: three wrong passwords, then even the right one waits.
	ada := mk()
	for range 3 {
		expectError(t, signIn(ada, "wrong password"), protocol.CodeUnauthenticated)
	}
	limited(signIn(ada, testPassword), "account")
	limited(signIn(strings.ToUpper(ada), testPassword), "account") // the same account, another case
	// Another account from the same address is not limited by ada's.
	bob := mk()
	expectStatus(t, signIn(bob, testPassword), http.StatusCreated)
	// Ten minutes later ada may try again.
	advance(10*time.Minute + time.Second)
	expectStatus(t, signIn(ada, testPassword), http.StatusCreated)

	// Per address: eight attempts on eight accounts, then the ninth waits,
	// whatever the account; an hour later one more is allowed.
	advance(24 * time.Hour)
	for range 8 {
		expectError(t, signIn(mk(), "wrong password"), protocol.CodeUnauthenticated)
	}
	limited(signIn(mk(), testPassword), "address")
	advance(time.Hour)
	expectStatus(t, signIn(mk(), testPassword), http.StatusCreated)
	limited(signIn(mk(), testPassword), "address")

	// Malformed requests do not count: they never reach the password check.
	advance(24 * time.Hour)
	for range 10 {
		expectError(t, e.post("/v1/sessions", "", map[string]any{"email": ada}), protocol.CodeBadRequest)
	}
	expectStatus(t, signIn(ada, testPassword), http.StatusCreated)
}
