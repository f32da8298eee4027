// Package e2e holds end-to-end tests: the real control plane with real
// agents — the agent binary, or the browser extension's JavaScript client in
// a real Chromium page.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/copelf/copelf/controlplane/internal/app"
)

// repoRoot is the module root (for testdata).
func repoRoot(t testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// server is a control plane started in-process with app.Run.
type server struct {
	URL   string
	Admin string
	stop  func()
}

// startServer runs copelfd in-process on a random port with extra flags.
func startServer(t *testing.T, extra ...string) *server {
	t.Helper()
	admin := "copelf_api_test-admin-" + fmt.Sprint(time.Now().UnixNano())
	t.Setenv("COPELF_ADMIN_TOKEN", admin)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	errc := make(chan error, 1)
	args := append([]string{"-addr", "127.0.0.1:0", "-db", "sqlite://" + filepath.Join(dir, "copelf.db"), "-data-dir", filepath.Join(dir, "data"), "-log-level", "warn"}, extra...)
	go func() { errc <- app.Run(ctx, args, io.Discard, io.Discard, func(a string) { addrc <- a }) }()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-errc:
		t.Fatalf("copelfd: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("copelfd did not start")
	}
	s := &server{URL: "http://" + addr, Admin: admin}
	s.stop = func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("copelfd: %v", err)
		}
	}
	t.Cleanup(s.stop)
	return s
}

// call makes an API request and decodes the JSON answer; it fails the test
// on a status other than want.
func (s *server) call(t *testing.T, method, path, token string, body any, want int) map[string]any {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, _ := json.Marshal(body)
		rd = bytes.NewReader(raw)
	}
	req, _ := http.NewRequest(method, s.URL+path, rd)
	req.Header.Set("Authorization", "Bearer "+token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	if res.StatusCode != want {
		t.Fatalf("%s %s: %d, want %d: %s", method, path, res.StatusCode, want, raw)
	}
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return out
}

// account makes a user with credits and returns its API and agent tokens.
func (s *server) account(t *testing.T, credits int) (id, apiToken, agentToken string) {
	t.Helper()
	email := fmt.Sprintf("u%d@example.com", time.Now().UnixNano())
	u := s.call(t, "POST", "/v1/users", s.Admin, map[string]any{"email": email, "password": "password1", "plan": "pro"}, 201)
	id = u["id"].(string)
	s.call(t, "POST", "/v1/accounts/"+id+"/credits", s.Admin, map[string]any{"amount": credits, "reason": "test"}, 201)
	sess := s.call(t, "POST", "/v1/sessions", "", map[string]any{"email": email, "password": "password1"}, 201)
	apiToken = s.call(t, "POST", "/v1/tokens", sess["token"].(string), map[string]any{"name": "api", "kind": "api"}, 201)["token"].(string)
	agentToken = s.call(t, "POST", "/v1/tokens", apiToken, map[string]any{"name": "agent", "kind": "agent"}, 201)["token"].(string)
	return id, apiToken, agentToken
}

// waitRun polls a run until it is terminal or the deadline passes.
func (s *server) waitRun(t *testing.T, token, runID string, within time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		run := s.call(t, "GET", "/v1/runs/"+runID, token, nil, 200)
		switch run["status"] {
		case "succeeded", "failed", "timed_out", "cancelled":
			return run
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %s still %v after %s: %v", runID, run["status"], within, run)
		}
		<-tick.C
	}
}

// chromium finds the browser; in CI a missing browser fails the test.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no Chromium on PATH (make test installs it)")
	}
	t.Skip("no Chromium on PATH; install the Debian package chromium")
	return ""
}

// browser starts a headless Chromium for chromedp.
func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelC := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelC(); cancelA() })
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

// eventually polls cond every 50 ms until it holds; past within it fails
// the test with what cond last said.
func eventually(t *testing.T, within time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last: %s)", what, within, last)
		}
		<-tick.C
	}
}

// waitRunWhere polls a run until pred holds; a run that ends before that
// fails the test.
func (s *server) waitRunWhere(t *testing.T, token, runID, what string, within time.Duration, pred func(run map[string]any) bool) map[string]any {
	t.Helper()
	var run map[string]any
	eventually(t, within, "run "+runID+" "+what, func() (bool, string) {
		run = s.call(t, "GET", "/v1/runs/"+runID, token, nil, 200)
		if pred(run) {
			return true, ""
		}
		switch run["status"] {
		case "succeeded", "failed", "timed_out", "cancelled":
			t.Fatalf("run %s ended before it was %s: %v", runID, what, run)
		}
		return false, fmt.Sprint(run["status"])
	})
	return run
}

// stepRunning is a waitRunWhere predicate: the run executes step i.
func stepRunning(i int) func(map[string]any) bool {
	return func(run map[string]any) bool {
		steps, _ := run["steps"].([]any)
		return run["status"] == "running" && len(steps) > i && steps[i].(map[string]any)["status"] == "running"
	}
}

// raw makes a request and returns the response (body read and closed) and
// its body.
func (s *server) raw(t *testing.T, method, path, token string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, s.URL+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, body
}

// credits is GET /v1/credits.
type credits struct{ Balance, Held, Available float64 }

func (s *server) credits(t *testing.T, token string) credits {
	t.Helper()
	c := s.call(t, "GET", "/v1/credits", token, nil, 200)
	return credits{Balance: c["balance"].(float64), Held: c["held"].(float64), Available: c["available"].(float64)}
}

// ledger returns the account's ledger entries about runID (every entry
// when runID is empty), following the cursor.
func (s *server) ledger(t *testing.T, token, runID string) []map[string]any {
	t.Helper()
	var out []map[string]any
	cursor := ""
	for {
		path := "/v1/credits/ledger?limit=500"
		if cursor != "" {
			path += "&cursor=" + cursor
		}
		page := s.call(t, "GET", path, token, nil, 200)
		for _, it := range page["items"].([]any) {
			e := it.(map[string]any)
			if runID == "" || e["runId"] == runID {
				out = append(out, e)
			}
		}
		next, _ := page["nextCursor"].(string)
		if next == "" {
			return out
		}
		cursor = next
	}
}

// workflow creates a ready workflow from a definition.
func (s *server) workflow(t *testing.T, token, name string, def any) string {
	t.Helper()
	return s.call(t, "POST", "/v1/workflows", token, map[string]any{"name": name, "definition": def}, 201)["id"].(string)
}

// runWorkflow queues a run and returns its id.
func (s *server) runWorkflow(t *testing.T, token, workflowID string, inputs map[string]any) string {
	t.Helper()
	if inputs == nil {
		inputs = map[string]any{}
	}
	return s.call(t, "POST", "/v1/workflows/"+workflowID+"/runs", token, map[string]any{"inputs": inputs}, 201)["id"].(string)
}

// runError returns a run's error code and details.reason.
func runError(run map[string]any) (code, reason string) {
	e, _ := run["error"].(map[string]any)
	if e == nil {
		return "", ""
	}
	code, _ = e["code"].(string)
	d, _ := e["details"].(map[string]any)
	reason, _ = d["reason"].(string)
	return code, reason
}
