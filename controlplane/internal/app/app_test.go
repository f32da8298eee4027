package app_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/app"
)

// TestMain fails the package when a test leaves a goroutine behind: every
// Run must stop its server, its store and its connections.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// syncBuffer is a bytes.Buffer that the program and the test may share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// instance is copelfd started in-process by app.Run.
type instance struct {
	URL    string
	Stdout *syncBuffer
	Stderr *syncBuffer

	cancel   context.CancelFunc
	done     chan error
	stopOnce sync.Once
	stopErr  error
}

// baseArgs points the program at dir: a SQLite file and a data directory in
// it, a free loopback port, and quiet logs.
func baseArgs(dir string) []string {
	return []string{
		"-addr", "127.0.0.1:0",
		"-db", "sqlite://" + filepath.Join(dir, "copelf.db"),
		"-data-dir", filepath.Join(dir, "data"),
		"-log-level", "warn",
		"-log-format", "json",
	}
}

// readyTimeout bounds a start: generous, because bcrypt under -race on a
// loaded machine takes seconds.
const readyTimeout = 2 * time.Minute

// startApp runs the program with args until the test ends (or stop).
func startApp(t *testing.T, args ...string) *instance {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	in := &instance{Stdout: &syncBuffer{}, Stderr: &syncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	ready := make(chan string, 1)
	go func() {
		in.done <- app.Run(ctx, args, in.Stdout, in.Stderr, func(addr string) { ready <- addr })
	}()
	select {
	case addr := <-ready:
		in.URL = "http://" + addr
	case err := <-in.done:
		cancel()
		t.Fatalf("Run returned before serving: %v\nstderr:\n%s", err, in.Stderr)
	case <-time.After(readyTimeout):
		cancel()
		t.Fatalf("Run did not become ready within %v\nstderr:\n%s", readyTimeout, in.Stderr)
	}
	t.Cleanup(func() {
		if err := in.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return in
}

// stop cancels Run's context and returns what Run returned; it fails when
// Run takes longer than a few seconds to shut down.
func (in *instance) stop() error {
	in.stopOnce.Do(func() {
		in.cancel()
		select {
		case in.stopErr = <-in.done:
		case <-time.After(30 * time.Second):
			in.stopErr = errors.New("Run did not return within 30s of cancellation")
		}
	})
	return in.stopErr
}

// client is an HTTP client whose idle connections are closed when the test ends.
func client(t *testing.T) *http.Client {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// call sends a JSON request and decodes a JSON object answer.
func call(t *testing.T, c *http.Client, method, url, token string, body any) (int, map[string]any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%s %s: status %d, body is not a JSON object: %v\n%s", method, url, res.StatusCode, err, raw)
		}
	}
	return res.StatusCode, out
}

// expect fails unless status is want.
func expect(t *testing.T, what string, status int, body map[string]any, want int) {
	t.Helper()
	if status != want {
		t.Fatalf("%s: status %d, want %d: %v", what, status, want, body)
	}
}

// tokenRe matches the tokens the program prints.
var tokenRe = regexp.MustCompile(`copelf_(api|agt)_[A-Za-z0-9_-]{43}`)

// readEnvFile reads KEY=VALUE lines.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			out[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// unsetAdminToken makes sure no COPELF_ADMIN_TOKEN from the outside leaks in.
func unsetAdminToken(t *testing.T) {
	t.Setenv("COPELF_ADMIN_TOKEN", "")
	os.Unsetenv("COPELF_ADMIN_TOKEN")
}

func TestDevSeed(t *testing.T) {
	unsetAdminToken(t)
	dir := t.TempDir()
	in := startApp(t, append(baseArgs(dir), "-dev")...)
	c := client(t)

	envPath := filepath.Join(dir, "data", "dev.env")
	fi, err := os.Stat(envPath)
	if err != nil {
		t.Fatalf("dev.env: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("dev.env mode %o, want 600", mode)
	}
	env := readEnvFile(t, envPath)
	for _, k := range []string{"COPELF_SERVER", "COPELF_TOKEN", "COPELF_AGENT_TOKEN", "COPELF_SAMPLE_WORKFLOW"} {
		if env[k] == "" {
			t.Fatalf("dev.env lacks %s:\n%v", k, env)
		}
	}
	if env["COPELF_SERVER"] != in.URL {
		t.Errorf("COPELF_SERVER = %q, want %q", env["COPELF_SERVER"], in.URL)
	}
	out := in.Stdout.String()
	for _, k := range []string{"COPELF_TOKEN", "COPELF_AGENT_TOKEN", "COPELF_SAMPLE_WORKFLOW"} {
		if !strings.Contains(out, env[k]) {
			t.Errorf("stdout does not show %s %q:\n%s", k, env[k], out)
		}
	}

	status, me := call(t, c, "GET", in.URL+"/v1/me", env["COPELF_TOKEN"], nil)
	expect(t, "GET /v1/me with COPELF_TOKEN", status, me, http.StatusOK)
	if me["email"] != "demo@copelf.local" {
		t.Errorf("me.email = %v", me["email"])
	}
	if credits, _ := me["credits"].(map[string]any); credits["balance"] != float64(1000) || credits["held"] != float64(0) {
		t.Errorf("demo credits = %v, want balance 1000, held 0", me["credits"])
	}
	// The agent token is a real token of kind agent: known (not 401), but
	// not allowed on the user API.
	status, body := call(t, c, "GET", in.URL+"/v1/me", env["COPELF_AGENT_TOKEN"], nil)
	expect(t, "GET /v1/me with COPELF_AGENT_TOKEN", status, body, http.StatusForbidden)
	if body["code"] != "forbidden" {
		t.Errorf("agent token on /v1/me: %v", body)
	}

	wf := env["COPELF_SAMPLE_WORKFLOW"]
	status, body = call(t, c, "GET", in.URL+"/v1/workflows/"+wf, env["COPELF_TOKEN"], nil)
	expect(t, "GET sample workflow", status, body, http.StatusOK)
	if body["status"] != "ready" {
		t.Errorf("sample workflow status %v, want ready", body["status"])
	}
	status, run := call(t, c, "POST", in.URL+"/v1/workflows/"+wf+"/runs", env["COPELF_TOKEN"], map[string]any{"inputs": map[string]any{"password": "hunter2"}})
	expect(t, "POST sample run", status, run, http.StatusCreated)
	if run["status"] != "queued" {
		t.Errorf("run status %v, want queued", run["status"])
	}
	if inputs, _ := run["inputs"].(map[string]any); inputs["password"] != "[redacted]" || inputs["username"] != "ada" {
		t.Errorf("run inputs %v: want the secret redacted and the default username", run["inputs"])
	}
	status, credits := call(t, c, "GET", in.URL+"/v1/credits", env["COPELF_TOKEN"], nil)
	expect(t, "GET /v1/credits", status, credits, http.StatusOK)
	if credits["held"] != float64(1) || credits["available"] != float64(999) {
		t.Errorf("credits after one run: %v", credits)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}

	// A second -dev start on the same database seeds nothing twice: the
	// same sample workflow, no second grant, fresh tokens.
	in2 := startApp(t, append(baseArgs(dir), "-dev")...)
	env2 := readEnvFile(t, envPath)
	if env2["COPELF_SAMPLE_WORKFLOW"] != wf {
		t.Errorf("second start: sample workflow %q, want %q", env2["COPELF_SAMPLE_WORKFLOW"], wf)
	}
	if env2["COPELF_TOKEN"] == env["COPELF_TOKEN"] {
		t.Errorf("second start reused the API token")
	}
	status, credits = call(t, c, "GET", in2.URL+"/v1/credits", env2["COPELF_TOKEN"], nil)
	expect(t, "GET /v1/credits after restart", status, credits, http.StatusOK)
	if credits["balance"] != float64(1000) || credits["held"] != float64(1) {
		t.Errorf("credits after a second -dev start: %v, want balance 1000, held 1", credits)
	}
	status, body = call(t, c, "GET", in2.URL+"/v1/workflows?limit=500", env2["COPELF_TOKEN"], nil)
	expect(t, "GET /v1/workflows", status, body, http.StatusOK)
	if items, _ := body["items"].([]any); len(items) != 1 {
		t.Errorf("demo account has %d workflows after two -dev starts, want 1", len(items))
	}
	// The first start's token still works.
	status, me = call(t, c, "GET", in2.URL+"/v1/me", env["COPELF_TOKEN"], nil)
	expect(t, "GET /v1/me with the first start's token", status, me, http.StatusOK)
}

func TestAdminTokenFromEnvironment(t *testing.T) {
	const token = "copelf-test-admin-token-0123456789"
	t.Setenv("COPELF_ADMIN_TOKEN", token)
	dir := t.TempDir()
	in := startApp(t, baseArgs(dir)...)
	c := client(t)

	if out := in.Stdout.String(); strings.Contains(out, "Admin token") || tokenRe.MatchString(out) {
		t.Errorf("with COPELF_ADMIN_TOKEN set, nothing should be generated or printed:\n%s", out)
	}
	status, me := call(t, c, "GET", in.URL+"/v1/me", token, nil)
	expect(t, "GET /v1/me as admin", status, me, http.StatusOK)
	if me["role"] != "admin" {
		t.Fatalf("COPELF_ADMIN_TOKEN is not an admin: %v", me)
	}
	status, u := call(t, c, "POST", in.URL+"/v1/users", token, map[string]any{"email": "ops@example.com", "password": "correct horse", "role": "operator"})
	expect(t, "POST /v1/users", status, u, http.StatusCreated)
	status, body := call(t, c, "GET", in.URL+"/v1/me", "copelf-test-admin-token-wrong", nil)
	expect(t, "GET /v1/me with a wrong token", status, body, http.StatusUnauthorized)
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}

	// Restarting with the same token keeps it working.
	in2 := startApp(t, baseArgs(dir)...)
	status, me = call(t, c, "GET", in2.URL+"/v1/me", token, nil)
	expect(t, "GET /v1/me as admin after restart", status, me, http.StatusOK)
}

func TestGeneratedAdminTokenPrintedOnce(t *testing.T) {
	unsetAdminToken(t)
	dir := t.TempDir()
	c := client(t)

	in := startApp(t, baseArgs(dir)...)
	out := in.Stdout.String()
	if !strings.Contains(out, "Admin token") {
		t.Fatalf("first start without COPELF_ADMIN_TOKEN printed no admin token:\n%s", out)
	}
	tokens := tokenRe.FindAllString(out, -1)
	if len(tokens) != 1 {
		t.Fatalf("first start printed %d tokens, want 1:\n%s", len(tokens), out)
	}
	admin := tokens[0]
	status, me := call(t, c, "GET", in.URL+"/v1/me", admin, nil)
	expect(t, "GET /v1/me with the generated token", status, me, http.StatusOK)
	if me["role"] != "admin" {
		t.Fatalf("generated token is not an admin's: %v", me)
	}
	if strings.Contains(in.Stderr.String(), admin) {
		t.Errorf("the generated admin token appears in the log")
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}

	in2 := startApp(t, baseArgs(dir)...)
	if out := in2.Stdout.String(); strings.Contains(out, "Admin token") || tokenRe.MatchString(out) {
		t.Errorf("second start on the same database printed a token:\n%s", out)
	}
	status, me = call(t, c, "GET", in2.URL+"/v1/me", admin, nil)
	expect(t, "GET /v1/me with the generated token after restart", status, me, http.StatusOK)
}

func TestConfigFlagsAndEnvironment(t *testing.T) {
	unsetAdminToken(t)
	t.Run("defaults", func(t *testing.T) {
		c, err := app.ParseConfig(nil, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if c.Addr != "127.0.0.1:8080" || c.DB != "sqlite://copelf.db" || c.DataDir != "./copelf-data" || c.Dev ||
			c.SessionTTL != 12*time.Hour || c.LeaseTimeout != 30*time.Second || c.AnalysisTimeout != 10*time.Minute ||
			c.RunCost != 1 || len(c.AllowedOrigins) != 0 || c.LogLevel != "info" {
			t.Errorf("defaults: %+v", c)
		}
	})

	tests := []struct {
		name  string
		args  []string
		env   map[string]string
		check func(app.Config) bool
	}{
		{"session-ttl flag", []string{"-session-ttl", "1500ms"}, nil, func(c app.Config) bool { return c.SessionTTL == 1500*time.Millisecond }},
		{"session-ttl env", nil, map[string]string{"COPELF_SESSION_TTL": "1500ms"}, func(c app.Config) bool { return c.SessionTTL == 1500*time.Millisecond }},
		{"lease-timeout env", nil, map[string]string{"COPELF_LEASE_TIMEOUT": "45s"}, func(c app.Config) bool { return c.LeaseTimeout == 45*time.Second }},
		{"analysis-timeout env", nil, map[string]string{"COPELF_ANALYSIS_TIMEOUT": "2m"}, func(c app.Config) bool { return c.AnalysisTimeout == 2*time.Minute }},
		{"run-cost env", nil, map[string]string{"COPELF_RUN_COST": "3"}, func(c app.Config) bool { return c.RunCost == 3 }},
		{"run-cost zero", []string{"-run-cost", "0"}, nil, func(c app.Config) bool { return c.RunCost == 0 }},
		{"addr, db, data-dir env", nil, map[string]string{"COPELF_ADDR": "127.0.0.1:9", "COPELF_DB": "sqlite:///tmp/x.db", "COPELF_DATA_DIR": "/tmp/d"},
			func(c app.Config) bool {
				return c.Addr == "127.0.0.1:9" && c.DB == "sqlite:///tmp/x.db" && c.DataDir == "/tmp/d"
			}},
		{"dev env", nil, map[string]string{"COPELF_DEV": "true"}, func(c app.Config) bool { return c.Dev }},
		{"admin token env", nil, map[string]string{"COPELF_ADMIN_TOKEN": "s3cret"}, func(c app.Config) bool { return c.AdminToken == "s3cret" }},
		{"allowed-origins env", nil, map[string]string{"COPELF_ALLOWED_ORIGINS": "chrome-extension://abc, http://localhost:3000 ,"},
			func(c app.Config) bool {
				return len(c.AllowedOrigins) == 2 && c.AllowedOrigins[0] == "chrome-extension://abc" && c.AllowedOrigins[1] == "http://localhost:3000"
			}},
		{"stripe env", nil, map[string]string{"COPELF_STRIPE_KEY": "sk_test_1", "COPELF_STRIPE_WEBHOOK_SECRET": "whsec_1", "COPELF_STRIPE_API_BASE": "http://127.0.0.1:12111", "COPELF_PRICES": "prices.json"},
			func(c app.Config) bool {
				return c.StripeKey == "sk_test_1" && c.StripeWebhook == "whsec_1" && c.StripeAPIBase == "http://127.0.0.1:12111" && c.PricesFile == "prices.json"
			}},
		{"flag beats env", []string{"-run-cost", "2", "-session-ttl=1h"}, map[string]string{"COPELF_RUN_COST": "5", "COPELF_SESSION_TTL": "1500ms"},
			func(c app.Config) bool { return c.RunCost == 2 && c.SessionTTL == time.Hour }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			c, err := app.ParseConfig(tt.args, io.Discard)
			if err != nil {
				t.Fatalf("ParseConfig(%q) with %v: %v", tt.args, tt.env, err)
			}
			if !tt.check(c) {
				t.Errorf("ParseConfig(%q) with %v: got %+v", tt.args, tt.env, c)
			}
		})
	}

	invalid := []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"duration syntax", []string{"-session-ttl", "soon"}, nil},
		{"duration syntax env", nil, map[string]string{"COPELF_SESSION_TTL": "1500"}},
		{"negative ttl env", nil, map[string]string{"COPELF_SESSION_TTL": "-1s"}},
		{"zero lease", []string{"-lease-timeout", "0s"}, nil},
		{"zero analysis timeout env", nil, map[string]string{"COPELF_ANALYSIS_TIMEOUT": "0s"}},
		{"negative run cost", []string{"-run-cost", "-1"}, nil},
		{"run cost not a number env", nil, map[string]string{"COPELF_RUN_COST": "one"}},
		{"dev not a bool env", nil, map[string]string{"COPELF_DEV": "maybe"}},
		{"unknown flag", []string{"-no-such-flag"}, nil},
		{"positional argument", []string{"serve"}, nil},
	}
	for _, tt := range invalid {
		t.Run("invalid "+tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			if c, err := app.ParseConfig(tt.args, io.Discard); err == nil {
				t.Errorf("ParseConfig(%q) with %v: no error, got %+v", tt.args, tt.env, c)
			}
		})
	}

	t.Run("help", func(t *testing.T) {
		var usage bytes.Buffer
		_, err := app.ParseConfig([]string{"-h"}, &usage)
		if !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("-h: %v, want flag.ErrHelp", err)
		}
		for _, f := range []string{"-addr", "-db", "-data-dir", "-dev", "-session-ttl", "-lease-timeout", "-analysis-timeout", "-run-cost",
			"-allowed-origins", "-stripe-key", "-stripe-webhook-secret", "-stripe-api-base", "-prices"} {
			if !strings.Contains(usage.String(), f+" ") && !strings.Contains(usage.String(), f+"\n") {
				t.Errorf("-h does not list %s:\n%s", f, usage.String())
			}
		}
	})
}

// Invalid settings stop Run before it listens, with an error.
func TestRunRejectsInvalidSettings(t *testing.T) {
	unsetAdminToken(t)
	cases := []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"bad duration", []string{"-session-ttl", "soon"}, nil},
		{"bad duration env", nil, map[string]string{"COPELF_LEASE_TIMEOUT": "forever"}},
		{"bad log level", []string{"-log-level", "loud"}, nil},
		{"bad run cost env", nil, map[string]string{"COPELF_RUN_COST": "-2"}},
		{"bad log format", []string{"-log-format", "xml"}, nil},
		{"unsupported database", []string{"-db", "mysql://localhost/copelf"}, nil},
		{"bad address", []string{"-addr", "256.0.0.1:1"}, nil},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			dir := t.TempDir()
			args := append(baseArgs(dir), tt.args...)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var stderr syncBuffer
			err := app.Run(ctx, args, io.Discard, &stderr, func(addr string) { t.Errorf("%s: served on %s", tt.name, addr) })
			if err == nil {
				t.Fatalf("Run(%q) with %v: nil error", args, tt.env)
			}
		})
	}
}

// The environment twin reaches the running server: a session lasts
// COPELF_SESSION_TTL and then answers session_expired.
func TestSessionTTLFromEnvironment(t *testing.T) {
	unsetAdminToken(t)
	t.Setenv("COPELF_SESSION_TTL", "1500ms")
	in := startApp(t, append(baseArgs(t.TempDir()), "-dev")...)
	c := client(t)

	before := time.Now()
	status, sess := call(t, c, "POST", in.URL+"/v1/sessions", "", map[string]any{"email": "demo@copelf.local", "password": "copelf-demo"})
	expect(t, "POST /v1/sessions", status, sess, http.StatusCreated)
	after := time.Now()
	expires, err := time.Parse(time.RFC3339Nano, sess["expiresAt"].(string))
	if err != nil {
		t.Fatal(err)
	}
	if lo, hi := before.Add(1500*time.Millisecond-time.Millisecond), after.Add(1500*time.Millisecond); expires.Before(lo) || expires.After(hi) {
		t.Fatalf("expiresAt %v, want between %v and %v", expires, lo, hi)
	}
	token := sess["token"].(string)
	status, me := call(t, c, "GET", in.URL+"/v1/me", token, nil)
	if time.Now().Before(expires) {
		expect(t, "GET /v1/me with a fresh session", status, me, http.StatusOK)
	}

	deadline := time.NewTimer(time.Minute)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		status, body := call(t, c, "GET", in.URL+"/v1/me", token, nil)
		if status == http.StatusUnauthorized {
			details, _ := body["details"].(map[string]any)
			if details["reason"] != "session_expired" {
				t.Fatalf("expired session: %v, want details.reason session_expired", body)
			}
			if time.Now().Before(expires) {
				t.Fatalf("session refused at %v, before its expiry %v", time.Now(), expires)
			}
			return
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			t.Fatalf("session still accepted a minute after a 1500ms TTL: %v", body)
		}
	}
}

func TestGracefulShutdown(t *testing.T) {
	unsetAdminToken(t)
	dir := t.TempDir()
	in := startApp(t, baseArgs(dir)...)
	c := client(t)
	status, body := call(t, c, "GET", in.URL+"/healthz", "", nil)
	expect(t, "GET /healthz", status, body, http.StatusOK)

	start := time.Now()
	if err := in.stop(); err != nil {
		t.Fatalf("Run after cancellation: %v, want nil", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	c.CloseIdleConnections()
	if _, err := c.Get(in.URL + "/healthz"); err == nil {
		t.Errorf("server still answers after Run returned")
	}
	// The database was closed cleanly: it opens again.
	in2 := startApp(t, baseArgs(dir)...)
	status, body = call(t, c, "GET", in2.URL+"/healthz", "", nil)
	expect(t, "GET /healthz after restart", status, body, http.StatusOK)
}
