package cli

// Benchmarks of the agent with the real browser executor (startBrowser, as
// Run wires it: one warm Chromium, a pool of one ready session per slot)
// against a minimal control plane in this file, on the fixture site served
// on 127.0.0.1:
//
//	go test -run='^$' -bench=AssignToFirstCommand -benchtime=50x ./agent/internal/cli
//	go test -run='^$' -bench=Throughput -benchtime=12x ./agent/internal/cli
//
// COPELF_BENCH_CPU=1 also logs where Chromium's CPU went, by process type.

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/agent/internal/agent"
	"github.com/copelf/copelf/agent/internal/browser"
	"github.com/copelf/copelf/protocol"
)

// benchWait bounds every wait of a benchmark.
const benchWait = 60 * time.Second

// benchInputs are login-search's inputs as the server sends them (validated
// and defaulted).
var benchInputs = map[string]any{"username": "ada", "password": "hunter2", "query": "chrom"}

// BenchmarkAssignToFirstCommand: from the moment the server writes an
// assign to an idle agent whose pool has a session ready until the browser
// issues the run's first command (the navigate of login-search). The first
// command is timed by a Reporter wrapped around the agent's: the browser
// calls StepStarted(0, 1) right before step 0's first chromedp call, and
// the time is taken when the agent's StepStarted has returned.
//
// Also reported: the wall time of the whole run, from assign to the
// finished event (screenshot upload included).
func BenchmarkAssignToFirstCommand(b *testing.B) {
	e := newBenchEnv(b, "login-search")
	ag := e.startAgent(b, 1)
	defer ag.close(b)
	// Warm-up: the first navigations of a new Chromium are slower.
	for range 3 {
		ag.waitPoolReady(b, 1)
		ag.runOne(b)
	}
	var first, wall []time.Duration
	for b.Loop() {
		ag.waitPoolReady(b, 1)
		f, w := ag.runOne(b)
		first = append(first, f)
		wall = append(wall, w)
	}
	slices.Sort(first)
	slices.Sort(wall)
	b.ReportMetric(msOf(percentile(first, 0.5)), "p50-ms")
	b.ReportMetric(msOf(percentile(first, 0.99)), "p99-ms")
	b.ReportMetric(msOf(first[len(first)-1]), "max-ms")
	b.ReportMetric(msOf(percentile(wall, 0.5)), "run-p50-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkThroughput: fixture runs (login-search) per second with 1, 2
// and 4 runs at once, through the agent (-slots n; the server assigns a run
// the moment one finishes) and through a plain chromedp program doing the
// same steps in n tabs of one warm browser with chromedp's default flags:
//
//   - plain: each tab is reused from run to run, so no browser context is
//     created per run (the cheapest a plain program gets, without the
//     agent's isolation between runs).
//   - plain-fresh: each run in a new incognito browser context created
//     inline, as isolated as the agent's runs.
//
// Each is measured in steady state: the pipeline is full and 2n runs have
// finished (the agent's pool has used up its initial stock) before the
// clock starts; b.N runs are then timed, agent first, then plain, then
// plain-fresh. Reported: runs/s of each, agent/plain, and Chromium's CPU
// time per run (every process of its tree, exited renderers included) and
// the Go process's (the agent and the test server, or the chromedp client).
func BenchmarkThroughput(b *testing.B) {
	for _, n := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("slots=%d", n), func(b *testing.B) {
			e := newBenchEnv(b, "login-search")
			ag := e.agentThroughput(b, n)
			plain := plainThroughput(b, e.siteURL, n, ag.runs, false)
			fresh := plainThroughput(b, e.siteURL, n, ag.runs, true)
			b.ReportMetric(ag.rate(), "agent-runs/s")
			b.ReportMetric(plain.rate(), "plain-runs/s")
			b.ReportMetric(fresh.rate(), "plain-fresh-runs/s")
			b.ReportMetric(ag.rate()/plain.rate(), "agent/plain")
			for _, p := range []struct {
				name string
				ph   phase
			}{{"agent", ag}, {"plain", plain}, {"plain-fresh", fresh}} {
				b.ReportMetric(p.ph.cpu.chromiumMs()/float64(p.ph.runs), p.name+"-chromium-cpu-ms/run")
				b.ReportMetric(p.ph.cpu.goMs()/float64(p.ph.runs), p.name+"-go-cpu-ms/run")
				if os.Getenv("COPELF_BENCH_CPU") != "" {
					b.Logf("%s: Chromium CPU ms/run by process type: %s", p.name, p.ph.cpu.breakdown(p.ph.runs))
				}
			}
			b.ReportMetric(0, "ns/op")
		})
	}
}

// phase is one timed series of runs.
type phase struct {
	runs    int
	elapsed time.Duration
	cpu     *cpuMeter
}

func (p phase) rate() float64 { return float64(p.runs) / p.elapsed.Seconds() }

// agentThroughput times b.N runs through an agent with n slots (b.Loop).
func (e *benchEnv) agentThroughput(b *testing.B, n int) phase {
	ag := e.startAgent(b, n)
	defer ag.close(b)
	ag.waitPoolReady(b, n)
	for range n {
		ag.assign(b)
	}
	for range 2 * n {
		ag.finished(b)
		ag.assign(b)
	}
	ph := phase{cpu: newCPUMeter()}
	ph.cpu.start()
	for b.Loop() {
		ag.finished(b)
		ph.runs++
		ag.assign(b)
	}
	ph.elapsed = b.Elapsed()
	ph.cpu.stop()
	for range n {
		ag.finished(b)
	}
	return ph
}

// plainThroughput times runs through the plain chromedp program in n tabs.
func plainThroughput(b *testing.B, siteURL string, n, runs int, fresh bool) phase {
	pl := startPlain(b, siteURL, n, fresh)
	defer pl.close()
	for range n {
		pl.next <- struct{}{}
	}
	for range 2 * n {
		pl.finished(b)
		pl.next <- struct{}{}
	}
	ph := phase{runs: runs, cpu: newCPUMeter()}
	ph.cpu.start()
	t0 := time.Now()
	for range runs {
		pl.finished(b)
		pl.next <- struct{}{}
	}
	ph.elapsed = time.Since(t0)
	ph.cpu.stop()
	for range n {
		pl.finished(b)
	}
	return ph
}

// ---------------------------------------------------------------------------
// Fixture site and workflow

type benchEnv struct {
	siteURL string // with a trailing slash
	def     *protocol.Definition
	srv     *benchServer
}

func newBenchEnv(b *testing.B, workflow string) *benchEnv {
	b.Helper()
	if _, err := browser.FindExecPath(); err != nil {
		b.Skip("needs Chromium:", err)
	}
	site := httptest.NewServer(http.FileServer(http.Dir(filepath.Join("..", "..", "..", "testdata", "site"))))
	b.Cleanup(site.Close)
	e := &benchEnv{siteURL: site.URL + "/"}
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "testdata", "workflows", workflow+".json"))
	if err != nil {
		b.Fatal(err)
	}
	if e.def, err = protocol.DecodeDefinition([]byte(strings.ReplaceAll(string(raw), "http://127.0.0.1:0/", e.siteURL))); err != nil {
		b.Fatal(err)
	}
	e.srv = newBenchServer(b)
	return e
}

// ---------------------------------------------------------------------------
// Minimal control plane: welcome, assign on demand, ack every event, take
// artifact uploads.

type benchServer struct {
	srv      *httptest.Server
	conns    chan *benchConn
	failed   chan error     // what the agent did wrong
	handlers sync.WaitGroup // websocket handlers (hijacked: srv.Close does not wait for them)
}

var benchUpgrader = websocket.Upgrader{Subprotocols: []string{protocol.Subprotocol}}

func newBenchServer(b *testing.B) *benchServer {
	s := &benchServer{conns: make(chan *benchConn, 1), failed: make(chan error, 16)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/agents/connect", s.connect)
	mux.HandleFunc("PUT /v1/runs/{id}/artifacts/{name}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusCreated)
	})
	s.srv = httptest.NewServer(mux)
	b.Cleanup(func() {
		s.srv.Close()
		s.handlers.Wait()
	})
	return s
}

// finishedRun is a run's finished event as the server received it.
type finishedRun struct {
	runID   string
	status  string
	err     *protocol.Error
	outputs map[string]any
	at      time.Time
}

// fail reports what the agent did wrong to the benchmark, without blocking.
func (s *benchServer) fail(err error) {
	select {
	case s.failed <- err:
	default:
	}
}

// benchConn is the agent's connection as the server sees it.
type benchConn struct {
	ws       *websocket.Conn
	wmu      sync.Mutex
	finished chan finishedRun
}

func (s *benchServer) connect(w http.ResponseWriter, r *http.Request) {
	s.handlers.Add(1)
	defer s.handlers.Done()
	ws, err := benchUpgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer ws.Close()
	c := &benchConn{ws: ws, finished: make(chan finishedRun, 1024)}
	_ = ws.SetReadDeadline(time.Now().Add(benchWait))
	_, data, err := ws.ReadMessage()
	if err != nil {
		return
	}
	if f, err := protocol.DecodeFrame(data); err != nil || f.FrameType() != protocol.FrameHello {
		s.fail(fmt.Errorf("first frame: %s (%v)", data, err))
		return
	}
	_ = ws.SetReadDeadline(time.Time{})
	if err := c.send(&protocol.Welcome{SessionID: "ses_benchbenchbench", AgentID: "agt_benchbenchbench", HeartbeatMs: 30_000, LeaseMs: 60_000}); err != nil {
		return
	}
	select {
	case s.conns <- c:
	default:
		s.fail(fmt.Errorf("the agent connected again"))
		return
	}
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			return
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			s.fail(fmt.Errorf("invalid frame %s: %v", data, err))
			continue
		}
		switch f := f.(type) {
		case *protocol.Event:
			if err := c.send(&protocol.Ack{RunID: f.RunID, Seq: f.Seq}); err != nil {
				return
			}
			if f.Kind == protocol.EventFinished {
				// After the ack: the agent frees the slot before it reads
				// the next assign.
				c.finished <- finishedRun{runID: f.RunID, status: f.Status, err: f.Error, outputs: f.Outputs, at: time.Now()}
			}
		case *protocol.Reject:
			s.fail(fmt.Errorf("run %s rejected: %s", f.RunID, f.Reason))
		}
	}
}

func (c *benchConn) send(f protocol.Frame) error {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(benchWait))
	return c.ws.WriteMessage(websocket.TextMessage, data)
}

// ---------------------------------------------------------------------------
// Agent under test

type benchAgent struct {
	e      *benchEnv
	pool   *browser.Pool
	conn   *benchConn
	cancel context.CancelFunc
	errc   chan error
	stop   func() // stops the executor (pool and Chromium)

	seq    int
	mu     sync.Mutex
	sentAt map[string]time.Time // assign written, by run id
	first  map[string]time.Time // first browser command, by run id
}

// startAgent starts the executor as cli.Run does (startBrowser) and an
// agent with n slots, logging at info level as in production (to nowhere).
func (e *benchEnv) startAgent(b *testing.B, slots int) *benchAgent {
	b.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	log.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	ctx := context.Background()
	exec, stop, err := startBrowser(ctx, Config{Slots: slots}, log)
	if err != nil {
		b.Fatal(err)
	}
	ag := &benchAgent{e: e, pool: exec.(browserExecutor).pool, stop: stop, errc: make(chan error, 1),
		sentAt: map[string]time.Time{}, first: map[string]time.Time{}}
	a, err := agent.New(agent.Config{Servers: []string{e.srv.srv.URL}, Token: "bench-token", ID: "bench-agent", Name: "bench",
		Slots: slots, Executor: firstCommandExecutor{inner: exec, ag: ag}, Log: log})
	if err != nil {
		stop()
		b.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	ag.cancel = cancel
	go func() { ag.errc <- a.Run(runCtx) }()
	select {
	case ag.conn = <-e.srv.conns:
	case <-time.After(benchWait):
		ag.close(b)
		b.Fatal("the agent did not connect")
	}
	return ag
}

func (ag *benchAgent) close(b *testing.B) {
	ag.cancel()
	if err := <-ag.errc; err != nil {
		b.Errorf("agent: %v", err)
	}
	ag.stop()
}

func (ag *benchAgent) waitPoolReady(b *testing.B, n int) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), benchWait)
	defer cancel()
	if err := ag.pool.WaitReady(ctx, n); err != nil {
		b.Fatalf("pool: %v", err)
	}
}

// assign sends the next run; the time is taken right before the write.
func (ag *benchAgent) assign(b *testing.B) string {
	b.Helper()
	ag.seq++
	f := &protocol.Assign{RunID: benchID("run", ag.seq), Attempt: 1, LeaseID: benchID("lse", ag.seq), TimeoutMs: 60_000,
		Workflow: protocol.AssignedWorkflow{ID: "wf_benchbenchbench", Name: "login-search", Definition: ag.e.def},
		Inputs:   benchInputs}
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		b.Fatal(err)
	}
	c := ag.conn
	c.wmu.Lock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(benchWait))
	t0 := time.Now()
	err = c.ws.WriteMessage(websocket.TextMessage, data)
	c.wmu.Unlock()
	if err != nil {
		b.Fatal(err)
	}
	ag.mu.Lock()
	ag.sentAt[f.RunID] = t0
	ag.mu.Unlock()
	return f.RunID
}

// finished waits for the next finished run and checks its outcome.
func (ag *benchAgent) finished(b *testing.B) finishedRun {
	b.Helper()
	select {
	case fr := <-ag.conn.finished:
		if fr.status != string(protocol.RunSucceeded) || fr.outputs["firstResult"] != "chromium" {
			b.Fatalf("run %s: %s %+v, outputs %v", fr.runID, fr.status, fr.err, fr.outputs)
		}
		return fr
	case err := <-ag.e.srv.failed:
		b.Fatal(err)
	case <-time.After(benchWait):
		b.Fatal("no run finished")
	}
	return finishedRun{}
}

// runOne runs one run and returns the time from assign to its first
// browser command and to its finished event.
func (ag *benchAgent) runOne(b *testing.B) (first, wall time.Duration) {
	b.Helper()
	id := ag.assign(b)
	fr := ag.finished(b)
	if fr.runID != id {
		b.Fatalf("finished %s, want %s", fr.runID, id)
	}
	ag.mu.Lock()
	defer ag.mu.Unlock()
	t0, t1 := ag.sentAt[id], ag.first[id]
	if t1.IsZero() {
		b.Fatalf("run %s: no first command", id)
	}
	return t1.Sub(t0), fr.at.Sub(t0)
}

// firstCommandExecutor wraps the browser executor to time the first
// browser command of each run.
type firstCommandExecutor struct {
	inner agent.Executor
	ag    *benchAgent
}

func (x firstCommandExecutor) Session(ctx context.Context) (agent.Session, error) {
	s, err := x.inner.Session(ctx)
	if err != nil {
		return nil, err
	}
	return firstCommandSession{Session: s, ag: x.ag}, nil
}

type firstCommandSession struct {
	agent.Session
	ag *benchAgent
}

func (s firstCommandSession) Run(ctx context.Context, spec agent.RunSpec, rep agent.Reporter) agent.Result {
	return s.Session.Run(ctx, spec, &firstCommandReporter{Reporter: rep, ag: s.ag, runID: spec.RunID})
}

type firstCommandReporter struct {
	agent.Reporter
	ag    *benchAgent
	runID string
}

func (r *firstCommandReporter) StepStarted(step, attempt int) {
	r.Reporter.StepStarted(step, attempt)
	if step == 0 && attempt == 1 {
		t := time.Now()
		r.ag.mu.Lock()
		r.ag.first[r.runID] = t
		r.ag.mu.Unlock()
	}
}

// benchID is an id of the server's shape: prefix_ and 16 base32 letters.
func benchID(prefix string, n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz234567"
	var s [16]byte
	for i := len(s) - 1; i >= 0; i-- {
		s[i] = alphabet[n%32]
		n /= 32
	}
	return prefix + "_" + string(s[:])
}

// ---------------------------------------------------------------------------
// Plain chromedp program

// plainRunner runs login-search as a plain chromedp program in n tabs of
// one browser started with chromedp's default flags (and --no-sandbox as
// root, which the agent also needs). Each worker takes a run from next and
// reports its end on done; it reuses one tab, or (fresh) opens a tab in a
// new incognito browser context for each run and closes it afterwards.
type plainRunner struct {
	next    chan struct{}
	done    chan error
	cancel  context.CancelFunc
	workers sync.WaitGroup
}

func startPlain(b *testing.B, siteURL string, n int, fresh bool) *plainRunner {
	b.Helper()
	path, err := browser.FindExecPath()
	if err != nil {
		b.Fatal(err)
	}
	opts := append(slices.Clone(chromedp.DefaultExecAllocatorOptions[:]), chromedp.ExecPath(path))
	if os.Geteuid() == 0 {
		opts = append(opts, chromedp.NoSandbox)
	}
	allocCtx, allocCancel := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, bcancel := chromedp.NewContext(allocCtx)
	if err := chromedp.Do(bctx); err != nil {
		bcancel()
		allocCancel()
		b.Fatal(err)
	}
	ctx, stop := context.WithCancel(bctx)
	p := &plainRunner{next: make(chan struct{}, n), done: make(chan error, n)}
	p.cancel = func() { stop(); p.workers.Wait(); bcancel(); allocCancel() }
	for range n {
		var tab context.Context
		if !fresh {
			tab, _ = chromedp.NewContext(ctx)
			if err := chromedp.Do(tab); err != nil {
				p.cancel()
				b.Fatal(err)
			}
		}
		p.workers.Go(func() {
			for {
				select {
				case <-p.next:
				case <-ctx.Done():
					return
				}
				if !fresh {
					p.done <- plainLoginSearch(tab, siteURL)
					continue
				}
				tab, cancel := chromedp.NewContext(ctx, chromedp.WithNewBrowserContext())
				err := chromedp.Do(tab)
				if err == nil {
					err = plainLoginSearch(tab, siteURL)
				}
				if cerr := chromedp.Cancel(tab); err == nil {
					err = cerr
				}
				cancel()
				p.done <- err
			}
		})
	}
	return p
}

func (p *plainRunner) finished(b *testing.B) {
	b.Helper()
	select {
	case err := <-p.done:
		if err != nil {
			b.Fatal(err)
		}
	case <-time.After(benchWait):
		b.Fatal("no plain run finished")
	}
}

func (p *plainRunner) close() { p.cancel() }

// plainLoginSearch is login-search.json written as a chromedp program, with
// the 30 s timeout per step the agent applies.
func plainLoginSearch(tab context.Context, siteURL string) error {
	step := func(a chromedp.Action[chromedp.Void]) error {
		ctx, cancel := context.WithTimeout(tab, 30*time.Second)
		defer cancel()
		return chromedp.Do(ctx, a)
	}
	text := func(sel string) (string, error) {
		ctx, cancel := context.WithTimeout(tab, 30*time.Second)
		defer cancel()
		v, err := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS(sel)))
		return strings.TrimSpace(v), err
	}
	for _, a := range []chromedp.Action[chromedp.Void]{
		chromedp.Navigate(siteURL + "login.html"),
		chromedp.SendKeys(chromedp.CSS("#username"), "ada"),
		chromedp.SendKeys(chromedp.CSS("#password"), "hunter2"),
		chromedp.Click(chromedp.CSS("#login")),
		chromedp.WaitVisible(chromedp.CSS("#welcome")),
	} {
		if err := step(a); err != nil {
			return err
		}
	}
	if v, err := text("#welcome"); err != nil || !strings.Contains(v, "Welcome, ada") {
		return fmt.Errorf("welcome: %q %v", v, err)
	}
	if err := step(chromedp.Steps(
		chromedp.Evaluate[chromedp.Void](`document.querySelector("#search").value = ""`),
		chromedp.SendKeys(chromedp.CSS("#search"), "chrom"),
	)); err != nil {
		return err
	}
	if v, err := text("#results li"); err != nil || v != "chromium" {
		return fmt.Errorf("first result: %q %v", v, err)
	}
	ctx, cancel := context.WithTimeout(tab, 30*time.Second)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	return err
}

// ---------------------------------------------------------------------------
// CPU accounting

// cpuMeter measures the CPU time of this process and of every process it
// started (Chromium's tree) between start and stop. Exited processes count
// once their parent reaped them (cutime): Chromium's zygote reaps its
// renderers at once. With a breakdown it also samples each process every
// 50 ms, by type (browser, renderer, gpu-process, the utility services).
type cpuMeter struct {
	goStart, goStop       time.Duration
	treeStart, treeStop   int64 // clock ticks
	sample                bool
	stopSampling          chan struct{}
	sampled               sync.WaitGroup
	firstTicks, lastTicks map[int]int64
	types                 map[int]string
}

func newCPUMeter() *cpuMeter {
	return &cpuMeter{sample: os.Getenv("COPELF_BENCH_CPU") != "", firstTicks: map[int]int64{}, lastTicks: map[int]int64{}, types: map[int]string{}}
}

func (m *cpuMeter) start() {
	m.goStart, m.treeStart = selfCPU(), treeTicks()
	if !m.sample {
		return
	}
	m.stopSampling = make(chan struct{})
	m.sampled.Go(func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		m.takeSample(true)
		for {
			select {
			case <-t.C:
				m.takeSample(false)
			case <-m.stopSampling:
				m.takeSample(false)
				return
			}
		}
	})
}

func (m *cpuMeter) stop() {
	m.goStop, m.treeStop = selfCPU(), treeTicks()
	if m.sample {
		close(m.stopSampling)
		m.sampled.Wait()
	}
}

func (m *cpuMeter) goMs() float64 { return float64(m.goStop-m.goStart) / float64(time.Millisecond) }

func (m *cpuMeter) chromiumMs() float64 { return ticksMs(m.treeStop - m.treeStart) }

func (m *cpuMeter) takeSample(initial bool) {
	for _, p := range descendants() {
		if _, ok := m.types[p.pid]; !ok {
			m.types[p.pid] = p.kind
			if initial {
				m.firstTicks[p.pid] = p.ticks
			}
		}
		m.lastTicks[p.pid] = p.ticks
	}
}

// breakdown is the sampled CPU ms per run by process type.
func (m *cpuMeter) breakdown(runs int) string {
	by := map[string]int64{}
	for pid, last := range m.lastTicks {
		by[m.types[pid]] += last - m.firstTicks[pid]
	}
	kinds := slices.Collect(maps.Keys(by))
	slices.SortFunc(kinds, func(a, b string) int { return int(by[b] - by[a]) })
	var sb strings.Builder
	for _, k := range kinds {
		fmt.Fprintf(&sb, "%s %.0f; ", k, ticksMs(by[k])/float64(runs))
	}
	return sb.String()
}

// clockTick is USER_HZ (100 on Linux).
const clockTick = 10 * time.Millisecond

func ticksMs(t int64) float64 { return float64(time.Duration(t)*clockTick) / float64(time.Millisecond) }

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type procCPU struct {
	pid   int
	kind  string
	ticks int64 // utime+stime
	reap  int64 // cutime+cstime
}

// descendants lists the processes below this one, from /proc.
func descendants() []procCPU {
	entries, _ := os.ReadDir("/proc")
	parent := map[int]int{}
	stats := map[int]procCPU{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid … utime(14) stime(15) cutime(16) cstime(17)
		s := string(data)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 15 {
			continue
		}
		num := func(k int) int64 { v, _ := strconv.ParseInt(f[k-3], 10, 64); return v }
		parent[pid] = int(num(4))
		stats[pid] = procCPU{pid: pid, ticks: num(14) + num(15), reap: num(16) + num(17)}
	}
	self := os.Getpid()
	var out []procCPU
	for pid, st := range stats {
		for p := parent[pid]; p > 1; p = parent[p] {
			if p == self {
				st.kind = procKind(pid)
				out = append(out, st)
				break
			}
		}
	}
	return out
}

// treeTicks is the CPU of every process below this one, reaped children
// included.
func treeTicks() int64 {
	var t int64
	for _, p := range descendants() {
		t += p.ticks + p.reap
	}
	return t
}

// procKind names a Chromium process by its --type (and utility sub-type).
func procKind(pid int) string {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return "?"
	}
	kind, sub := "browser", ""
	// Chromium rewrites the command lines of its children (setproctitle):
	// arguments are then separated by spaces.
	for _, arg := range strings.FieldsFunc(string(data), func(r rune) bool { return r == 0 || r == ' ' }) {
		if v, ok := strings.CutPrefix(arg, "--type="); ok {
			kind = v
		}
		if v, ok := strings.CutPrefix(arg, "--utility-sub-type="); ok {
			sub = v
		}
	}
	if sub != "" {
		kind += "(" + sub + ")"
	}
	return kind
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(float64(len(sorted)-1)*p)]
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
