package dashboard_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/gorilla/websocket"

	"github.com/copelf/copelf/controlplane/internal/app"
	"github.com/copelf/copelf/protocol"
)

// wait bounds every event wait: generous, the machine is small and busy.
const wait = 45 * time.Second

// server is copelfd started in-process with app.Run on a random port.
type server struct {
	URL   string
	Admin string
}

func startServer(t *testing.T, extra ...string) *server {
	t.Helper()
	admin := fmt.Sprintf("copelf_api_dashboard-admin-%d", time.Now().UnixNano())
	t.Setenv("COPELF_ADMIN_TOKEN", admin)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	errc := make(chan error, 1)
	args := append([]string{"-addr", "127.0.0.1:0", "-db", "sqlite://" + filepath.Join(dir, "copelf.db"),
		"-data-dir", filepath.Join(dir, "data"), "-log-level", "warn"}, extra...)
	go func() { errc <- app.Run(ctx, args, io.Discard, io.Discard, func(a string) { addrc <- a }) }()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-errc:
		cancel()
		t.Fatalf("copelfd: %v", err)
	case <-time.After(wait):
		cancel()
		t.Fatal("copelfd did not start")
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("copelfd: %v", err)
		}
	})
	return &server{URL: "http://" + addr, Admin: admin}
}

// do makes an API request with a bearer token (none when "") and returns the
// status and the decoded body.
func (s *server) do(t *testing.T, method, path, token string, body any, header map[string]string) (int, map[string]any, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, s.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return res.StatusCode, out, res.Header
}

// call is do that fails the test unless the status is want.
func (s *server) call(t *testing.T, method, path, token string, body any, want int) map[string]any {
	t.Helper()
	status, out, _ := s.do(t, method, path, token, body, nil)
	if status != want {
		t.Fatalf("%s %s: %d, want %d: %v", method, path, status, want, out)
	}
	return out
}

// member is an account that signs in with a password.
type member struct {
	ID, Email, Password, Token, AgentToken string
}

var memberSeq struct {
	sync.Mutex
	n int
}

func (s *server) member(t *testing.T, role string) member {
	t.Helper()
	memberSeq.Lock()
	memberSeq.n++
	n := memberSeq.n
	memberSeq.Unlock()
	m := member{Email: fmt.Sprintf("user%d-%d@example.com", n, time.Now().UnixNano()%1e6), Password: "correct horse battery"}
	u := s.call(t, "POST", "/v1/users", s.Admin, map[string]any{"email": m.Email, "password": m.Password, "plan": "pro", "role": role}, 201)
	m.ID = u["id"].(string)
	s.call(t, "POST", "/v1/accounts/"+m.ID+"/credits", s.Admin, map[string]any{"amount": 100, "reason": "test"}, 201)
	// Tokens come from a session made over the API (bearer, so no CSRF).
	sess := s.call(t, "POST", "/v1/sessions", "", map[string]any{"email": m.Email, "password": m.Password}, 201)
	m.Token = s.call(t, "POST", "/v1/tokens", sess["token"].(string), map[string]any{"name": "api", "kind": "api"}, 201)["token"].(string)
	m.AgentToken = s.call(t, "POST", "/v1/tokens", m.Token, map[string]any{"name": "agent", "kind": "agent"}, 201)["token"].(string)
	return m
}

func (s *server) workflow(t *testing.T, token, name, def string) string {
	t.Helper()
	return s.call(t, "POST", "/v1/workflows", token, map[string]any{"name": name, "definition": json.RawMessage(def)}, 201)["id"].(string)
}

func (s *server) run(t *testing.T, token, wf string) string {
	t.Helper()
	return s.call(t, "POST", "/v1/workflows/"+wf+"/runs", token, map[string]any{"inputs": map[string]any{}}, 201)["id"].(string)
}

// waitRun polls a run until cond holds.
func (s *server) waitRun(t *testing.T, token, id, what string, cond func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(wait)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		run := s.call(t, "GET", "/v1/runs/"+id, token, nil, 200)
		if cond(run) {
			return run
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %s not %s within %s: %v", id, what, wait, run)
		}
		<-tick.C
	}
}

// Chromium -----------------------------------------------------------------

// chromium finds the browser; with CI=true a missing browser fails the test.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no Chromium on PATH (make deps installs it)")
	}
	t.Skip("no Chromium on PATH; install the Debian package chromium")
	return ""
}

// browser starts one headless Chromium for the test, with the project's
// flags.
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

// tab opens a tab in a browser context of its own: its own cookies, as
// another person's browser would have.
func tab(t *testing.T, b context.Context) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(b, chromedp.WithNewBrowserContext())
	t.Cleanup(cancel)
	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1280, 900)); err != nil {
		t.Fatalf("tab: %v", err)
	}
	return ctx
}

// do runs actions on the page and fails the test on an error.
func do(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	if err := chromedp.Do(c, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// poll evaluates the JavaScript expression every 20 ms until it is truthy
// and returns its value. The loop runs here, not in the page, so it
// survives navigations.
func poll[T any](t *testing.T, ctx context.Context, what, expr string) T {
	t.Helper()
	deadline := time.Now().Add(wait)
	wrapped := `(() => { const v = (` + expr + `); return v ? JSON.stringify(v) : "" })()`
	var last string
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		c, cancel := context.WithTimeout(ctx, wait)
		got, err := chromedp.Run(c, chromedp.Evaluate[string](wrapped))
		cancel()
		if err == nil && got != "" {
			var v T
			if err := json.Unmarshal([]byte(got), &v); err != nil {
				t.Fatalf("%s: %s: %v", what, got, err)
			}
			return v
		}
		if err != nil {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s (last error: %s; page: %s)", what, wait, last, pageState(ctx))
		}
		<-tick.C
	}
}

// pageState describes the page for a failure message.
func pageState(ctx context.Context) string {
	c, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s, err := chromedp.Run(c, chromedp.Evaluate[string](`location.href + " view=" + document.body.dataset.view + " live=" + document.body.dataset.live + " text: " + document.body.innerText.slice(0, 1500)`))
	if err != nil {
		return err.Error()
	}
	return s
}

// eval evaluates a JavaScript expression (a promise is awaited).
func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	v, err := chromedp.Run(c, chromedp.Evaluate[T](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		t.Fatalf("eval %s: %v", expr, err)
	}
	return v
}

// screenshotDir is where the pages' screenshots go: $COPELF_TEST_ARTIFACTS
// (a relative path is taken from the repository's root; test-artifacts/ is
// ignored by git) when set, else a folder in the system's temporary
// directory (kept after the test, unlike t.TempDir).
func screenshotDir(t *testing.T) string {
	t.Helper()
	base := os.Getenv("COPELF_TEST_ARTIFACTS")
	if base == "" {
		base = filepath.Join(os.TempDir(), "copelf-test-artifacts")
	} else if !filepath.IsAbs(base) { // relative to the repository, not to this package
		_, file, _, _ := runtime.Caller(0)
		base = filepath.Join(filepath.Dir(file), "..", "..", "..", base)
	}
	dir := filepath.Join(base, "dashboard")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// screenshot saves the whole page as name.png.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	buf, err := chromedp.Run(c, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if !bytes.HasPrefix(buf, []byte("\x89PNG")) {
		t.Fatalf("screenshot %s is not a PNG", name)
	}
	p := filepath.Join(screenshotDir(t), name+".png")
	if err := os.WriteFile(p, buf, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", p)
}

// signIn signs in through the page's form and waits for the live overview.
func signIn(t *testing.T, ctx context.Context, s *server, m member) {
	t.Helper()
	do(t, ctx, "open the dashboard", chromedp.Navigate(s.URL+"/"))
	poll[bool](t, ctx, "sign-in form", `document.body.dataset.view === "signin" && !!document.querySelector("#signin #email")`)
	do(t, ctx, "sign in",
		chromedp.SendKeys(chromedp.CSS("#email"), m.Email),
		chromedp.SendKeys(chromedp.CSS("#password"), m.Password),
		chromedp.Click(chromedp.CSS("#signin-submit")),
	)
	poll[bool](t, ctx, "overview after sign-in", `document.body.dataset.view === "overview" && document.body.dataset.ready === "1"`)
}

// A protocol agent ------------------------------------------------------------

// agent is a no-op agent over the real websocket: the test tells it what
// to report, step by step.
type agent struct {
	t      *testing.T
	ws     *websocket.Conn
	wmu    sync.Mutex
	frames chan protocol.Frame
	done   chan struct{}
	seqs   map[string]int64
	mu     sync.Mutex
	held   map[string]bool
}

func (s *server) agent(t *testing.T, token, id string) *agent {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: wait}
	ws, res, err := d.Dial("ws"+strings.TrimPrefix(s.URL, "http")+"/v1/agents/connect", nil)
	if err != nil {
		t.Fatalf("dial: %v (%v)", err, res)
	}
	a := &agent{t: t, ws: ws, frames: make(chan protocol.Frame, 256), done: make(chan struct{}), seqs: map[string]int64{}, held: map[string]bool{}}
	go a.read()
	stop := make(chan struct{})
	var hb sync.WaitGroup
	hb.Add(1)
	go func() { // heartbeats keep the leases of the runs the agent holds
		defer hb.Done()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				a.mu.Lock()
				runs := []string{}
				for r := range a.held {
					runs = append(runs, r)
				}
				a.mu.Unlock()
				if a.write(&protocol.Heartbeat{Runs: runs}) != nil {
					return
				}
			}
		}
	}()
	t.Cleanup(func() {
		close(stop)
		hb.Wait()
		a.ws.Close()
		<-a.done
	})
	a.send(&protocol.Hello{Protocol: protocol.Version, Token: token, Agent: protocol.AgentInfo{ID: id, Name: id, Kind: protocol.AgentHeadless, Version: "test", Slots: 1}})
	next[*protocol.Welcome](a)
	return a
}

func (a *agent) read() {
	defer close(a.done)
	for {
		_, data, err := a.ws.ReadMessage()
		if err != nil {
			return
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			continue
		}
		switch f := f.(type) {
		case *protocol.Heartbeat, *protocol.Ack:
			continue
		case *protocol.ErrorFrame:
			a.t.Errorf("agent got an error frame: %+v", f)
		}
		a.frames <- f
	}
}

func (a *agent) write(f protocol.Frame) error {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		return err
	}
	a.wmu.Lock()
	defer a.wmu.Unlock()
	return a.ws.WriteMessage(websocket.TextMessage, data)
}

func (a *agent) send(f protocol.Frame) {
	a.t.Helper()
	if err := a.write(f); err != nil {
		a.t.Fatalf("agent write: %v", err)
	}
}

// next waits for the next frame, which must be a T.
func next[T protocol.Frame](a *agent) T {
	a.t.Helper()
	select {
	case f := <-a.frames:
		v, ok := f.(T)
		if !ok {
			a.t.Fatalf("agent: want %T, got %T %+v", v, f, f)
		}
		return v
	case <-a.done:
		a.t.Fatal("agent: the connection ended")
	case <-time.After(wait):
		var zero T
		a.t.Fatalf("agent: no %T within %s", zero, wait)
	}
	panic("unreachable")
}

// take waits for an assign and accepts it.
func (a *agent) take() *protocol.Assign {
	a.t.Helper()
	as := next[*protocol.Assign](a)
	a.mu.Lock()
	a.held[as.RunID] = true
	a.mu.Unlock()
	a.send(&protocol.Accept{RunID: as.RunID, LeaseID: as.LeaseID})
	a.event(as, protocol.Event{Kind: protocol.EventStarted})
	return as
}

// event reports an event of an assigned run with the lease's next seq.
func (a *agent) event(as *protocol.Assign, ev protocol.Event) {
	a.t.Helper()
	a.seqs[as.LeaseID]++
	ev.RunID, ev.LeaseID, ev.Seq = as.RunID, as.LeaseID, a.seqs[as.LeaseID]
	a.send(&ev)
	if ev.Kind == protocol.EventFinished {
		a.mu.Lock()
		delete(a.held, as.RunID)
		a.mu.Unlock()
	}
}

// step reports step i started and finished with status, taking ms.
func (a *agent) step(as *protocol.Assign, i int, status protocol.StepStatus, ms int64, e *protocol.Error) {
	a.t.Helper()
	a.event(as, protocol.Event{Kind: protocol.EventStepStarted, Step: &i})
	a.event(as, protocol.Event{Kind: protocol.EventStepFinished, Step: &i, Status: string(status), DurationMs: &ms, Error: e})
}

// upload puts a PNG artifact for an assigned run, as the agent does.
func (s *server) upload(t *testing.T, token string, as *protocol.Assign, name string) {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 320, 200))
	for y := range 200 {
		for x := range 320 {
			img.Set(x, y, color.RGBA{uint8(x * 255 / 320), uint8(y * 255 / 200), 160, 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("PUT", s.URL+"/v1/runs/"+as.RunID+"/artifacts/"+name, &buf)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("X-Copelf-Lease", as.LeaseID)
	req.Header.Set("Content-Type", "image/png")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 201 {
		t.Fatalf("upload: %d %s", res.StatusCode, body)
	}
}
