package browser

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/copelf/copelf/protocol"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"go.uber.org/goleak"
)

// Tests share one Browser (a tab and an incognito context per test) and one
// fixture server, as chromedp's own tests do; TestMain checks that nothing
// leaks once both are closed.
var (
	shared  *Browser
	siteURL string // with a trailing slash
	logs    *logtest.Hook
	logger  *logrus.Logger
)

const placeholderOrigin = "http://127.0.0.1:0/"

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if _, err := FindExecPath(); err != nil {
		if os.Getenv("CI") == "true" {
			fmt.Fprintln(os.Stderr, "FAIL: no Chromium binary (chromium, chromium-browser, google-chrome) on PATH; CI must have one (make deps)")
			return 1
		}
		fmt.Fprintln(os.Stderr, "SKIP: agent/internal/browser tests need Chromium (chromium, chromium-browser or google-chrome on PATH)")
		return 0
	}
	logger, logs = logtest.NewNullLogger()
	logger.SetLevel(logrus.DebugLevel)

	srv := httptest.NewServer(siteHandler())
	siteURL = srv.URL + "/"

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	b, err := Start(ctx, Options{Log: logger})
	cancel()
	if err != nil {
		srv.Close()
		fmt.Fprintln(os.Stderr, "FAIL: start the shared browser:", err)
		return 1
	}
	shared = b

	code := m.Run()

	if err := shared.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: close the shared browser:", err)
		code = 1
	}
	srv.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "FAIL: leaked goroutines:", err)
			code = 1
		}
	}
	return code
}

// siteHandler serves testdata/site.
func siteHandler() http.Handler {
	return http.FileServer(http.Dir(filepath.Join("..", "..", "..", "testdata", "site")))
}

// loadWorkflow reads testdata/workflows/<name>.json with the placeholder
// origin replaced by the fixture server, and decodes it strictly.
func loadWorkflow(t testing.TB, name string) *protocol.Definition {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "testdata", "workflows", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	return decode(t, strings.ReplaceAll(string(raw), placeholderOrigin, siteURL))
}

// decode decodes a definition, replacing the placeholder origin.
func decode(t testing.TB, js string) *protocol.Definition {
	t.Helper()
	d, err := protocol.DecodeDefinition([]byte(strings.ReplaceAll(js, placeholderOrigin, siteURL)))
	if err != nil {
		t.Fatalf("definition: %v\n%s", err, js)
	}
	return d
}

// steps builds a definition from step objects (JSON, comma-separated) and variables.
func steps(t testing.TB, vars, stepsJSON string) *protocol.Definition {
	t.Helper()
	if vars == "" {
		vars = "[]"
	}
	return decode(t, `{"version":1,"variables":`+vars+`,"steps":[`+stepsJSON+`]}`)
}

// ---------------------------------------------------------------------------
// Recording reporter

type stepStart struct{ step, attempt int }

type stepEnd struct {
	step       int
	status     protocol.StepStatus
	durationMs int64
	attempts   int
	output     any
	err        *protocol.Error
}

type artifact struct {
	contentType string
	data        []byte
}

type recorder struct {
	mu        sync.Mutex
	starts    []stepStart
	ends      []stepEnd
	artifacts map[string]artifact
	approvals []string

	onStart func(step, attempt int)                                               // called outside the lock
	approve func(ctx context.Context, step int, msg string) (bool, string, error) // default: approve
}

func (r *recorder) StepStarted(step, attempt int) {
	r.mu.Lock()
	r.starts = append(r.starts, stepStart{step, attempt})
	r.mu.Unlock()
	if r.onStart != nil {
		r.onStart(step, attempt)
	}
}

func (r *recorder) StepFinished(step int, status protocol.StepStatus, durationMs int64, attempts int, output any, err *protocol.Error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends = append(r.ends, stepEnd{step, status, durationMs, attempts, output, err})
}

func (r *recorder) ApprovalRequested(ctx context.Context, step int, message string) (bool, string, error) {
	r.mu.Lock()
	r.approvals = append(r.approvals, message)
	r.mu.Unlock()
	if r.approve != nil {
		return r.approve(ctx, step, message)
	}
	return true, "", nil
}

func (r *recorder) Artifact(name, contentType string, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.artifacts == nil {
		r.artifacts = map[string]artifact{}
	}
	r.artifacts[name] = artifact{contentType, data}
}

func (r *recorder) end(step int) (stepEnd, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.ends {
		if e.step == step {
			return e, true
		}
	}
	return stepEnd{}, false
}

// ---------------------------------------------------------------------------
// Helpers

// newSession opens a session on the shared browser, closed at cleanup.
func newSession(t testing.TB) *Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := shared.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close session: %v", err)
		}
	})
	return s
}

type runOpt func(*RunSpec)

func withInputs(in map[string]any) runOpt { return func(s *RunSpec) { s.Inputs = in } }

// runDef runs def in a new session of the shared browser; inputs are
// validated and defaulted as the server does.
func runDef(t testing.TB, def *protocol.Definition, rec *recorder, opts ...runOpt) Result {
	t.Helper()
	return runIn(t, newSession(t), context.Background(), def, rec, opts...)
}

func runIn(t testing.TB, s *Session, ctx context.Context, def *protocol.Definition, rec *recorder, opts ...runOpt) Result {
	t.Helper()
	spec := RunSpec{RunID: "run_test", Definition: def}
	for _, o := range opts {
		o(&spec)
	}
	in, err := def.ValidateInputs(spec.Inputs)
	if err != nil {
		t.Fatalf("inputs: %v", err)
	}
	spec.Inputs = in
	if rec == nil {
		rec = &recorder{}
	}
	return s.Run(ctx, spec, rec)
}

// wantSucceeded fails the test unless res succeeded.
func wantSucceeded(t testing.TB, res Result) {
	t.Helper()
	if res.Status != protocol.RunSucceeded || res.Error != nil {
		t.Fatalf("run: status %s, error %+v", res.Status, res.Error)
	}
}

// wantFailure checks a failed run's status, code, reason and step.
func wantFailure(t testing.TB, res Result, status protocol.RunStatus, code protocol.Code, reason string, step int) {
	t.Helper()
	if res.Status != status {
		t.Fatalf("status = %s, want %s (error %+v)", res.Status, status, res.Error)
	}
	if res.Error == nil {
		t.Fatalf("no error, want %s/%s", code, reason)
	}
	if res.Error.Code != code {
		t.Errorf("code = %s, want %s (%s)", res.Error.Code, code, res.Error.Message)
	}
	if got := res.Error.Details["reason"]; got != reason {
		t.Errorf("details.reason = %v, want %s (%s)", got, reason, res.Error.Message)
	}
	if got := res.Error.Details["step"]; got != step {
		t.Errorf("details.step = %v, want %d", got, step)
	}
}

var pngMagic = []byte("\x89PNG\r\n\x1a\n")

func wantPNG(t testing.TB, rec *recorder, name string) {
	t.Helper()
	rec.mu.Lock()
	a, ok := rec.artifacts[name]
	rec.mu.Unlock()
	if !ok {
		t.Fatalf("no artifact %q (have %v)", name, artifactNames(rec))
	}
	if a.contentType != "image/png" || !bytes.HasPrefix(a.data, pngMagic) || len(a.data) < 100 {
		t.Fatalf("artifact %q: %s, %d bytes, not a PNG", name, a.contentType, len(a.data))
	}
}

func artifactNames(rec *recorder) []string {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var names []string
	for n := range rec.artifacts {
		names = append(names, n)
	}
	return names
}
