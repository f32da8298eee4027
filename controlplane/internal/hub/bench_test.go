package hub_test

// Benchmarks of the hub over real websockets and real SQLite:
//
//	go test -run='^$' -bench=DispatchLatency -benchtime=2000x ./controlplane/internal/hub
//	go test -run='^$' -bench=Lifecycles -benchtime=20000x ./controlplane/internal/hub
//	go test -run='^$' -bench=IdleAgentMemory -benchtime=1x ./controlplane/internal/hub
//
// HUBTEST_HEAPPROFILE=file writes a heap profile while the idle agents are
// connected (run with -memprofilerate=512 for detail).

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// benchEnv is an env for benchmarks: info-level logging (as in production),
// no per-test leak check, and credits for n runs.
func benchEnv(b *testing.B, cfg hub.Config, n int) *env {
	b.Helper()
	e := newEnv(b, cfg, noLeakCheck(), withLogLevel(logrus.InfoLevel))
	if _, err := e.st.CreditsGrant(context.Background(), store.CreditsGrantParams{AccountID: e.user.ID, Amount: int64(n), Kind: store.LedgerGrant, Reason: "bench"}); err != nil {
		b.Fatal(err)
	}
	return e
}

// workflows creates n ready workflows through the store (one active run per
// workflow: each run gets its own).
func (e *env) workflows(n int) []string {
	e.t.Helper()
	out := make([]string, n)
	for i := range out {
		wf, err := e.st.WorkflowCreate(context.Background(), store.WorkflowCreateParams{AccountID: e.user.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: json.RawMessage(defaultDef)})
		if err != nil {
			e.t.Fatal(err)
		}
		out[i] = wf.ID
	}
	return out
}

// queueRun creates a queued run through the store as the API does (same
// parameters, one transaction), without telling the hub.
func (e *env) queueRun(workflowID string) *store.Run {
	r, err := e.st.RunCreate(context.Background(), store.RunCreateParams{
		AccountID: e.user.ID, WorkflowID: workflowID, Inputs: map[string]any{"q": "x"}, Cost: 1,
		Steps: []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}, {Index: 1, Type: protocol.StepExtract, Status: protocol.StepPending}},
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p)
	return sorted[i]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkDispatchLatency: from a queued run's commit (the store write has
// returned and hub.RunQueued is called, as the API does) until the idle
// agent's client has read the assign off its websocket.
func BenchmarkDispatchLatency(b *testing.B) {
	e := benchEnv(b, hub.Config{LeaseTimeout: time.Hour}, b.N)
	c, _ := e.connect("idle", 1)
	wfs := e.workflows(b.N)
	ctx := context.Background()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		r := e.queueRun(wfs[i])
		t0 := time.Now()
		e.hub.RunQueued(ctx, r)
		var it item
		select {
		case it = <-c.frames:
		case <-time.After(wait):
			b.Fatalf("no assign of run %d", i)
		}
		a, ok := it.f.(*protocol.Assign)
		if !ok || a.RunID != r.ID {
			b.Fatalf("got %s", it.raw)
		}
		lat = append(lat, it.at.Sub(t0))
		// Finishing the run gives the agent its slot back.
		b.StopTimer()
		c.start(a)
		c.finish(a, protocol.RunSucceeded)
		c.sync()
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(ms(percentile(lat, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 0.99)), "p99-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkLifecycles: agents × slots no-op protocol clients over real
// websockets. Each accepts its assigns and reports started and finished
// (succeeded) without waiting for acks. A lifecycle is complete when
// finished is acknowledged.
//
//   - queued: the b.N runs are created through the store before the timer
//     starts (dispatch and lifecycle only).
//   - created: a producer creates them through the store during the timed
//     region and calls hub.RunQueued for each, as the API does after commit.
func BenchmarkLifecycles(b *testing.B) {
	for _, mode := range []string{"queued", "created"} {
		// A few agents with several slots each, and a fleet of one-slot
		// agents (more connections writing at once: larger commit groups).
		for _, fleet := range [][2]int{{8, 4}, {32, 1}} {
			b.Run(fmt.Sprintf("%s/agents=%dx%d", mode, fleet[0], fleet[1]), func(b *testing.B) {
				benchLifecycles(b, mode == "created", fleet[0], fleet[1])
			})
		}
	}
}

func benchLifecycles(b *testing.B, live bool, agents, slots int) {
	e := benchEnv(b, hub.Config{LeaseTimeout: time.Minute}, b.N)
	wfs := e.workflows(b.N)
	ctx := context.Background()
	clients := make([]*client, agents)
	for i := range clients {
		// Paused (ready{0}) until the timer starts. The hello announces the
		// capacity: a finished run's slot comes back only up to it.
		clients[i], _ = e.connect(fmt.Sprintf("worker-%d", i), slots)
		clients[i].send(&protocol.Ready{Slots: 0})
		clients[i].sync()
	}
	if !live {
		for _, wf := range wfs {
			e.queueRun(wf)
		}
	}
	var (
		completed atomic.Int64
		failed    atomic.Value
		done      = make(chan struct{})
		stop      = make(chan struct{})
		wg        sync.WaitGroup
	)
	target := int64(b.N)
	ready, _ := protocol.EncodeFrame(&protocol.Ready{Slots: slots})
	begin := make(chan struct{})
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-begin
			// Each worker is its connection's only writer, ready included.
			if err := c.ws.WriteMessage(websocket.TextMessage, ready); err != nil {
				failed.Store(err.Error())
				return
			}
			for {
				var it item
				select {
				case <-stop:
					return
				case it = <-c.frames:
				}
				switch f := it.f.(type) {
				case *protocol.Assign:
					for _, out := range []protocol.Frame{
						&protocol.Accept{RunID: f.RunID, LeaseID: f.LeaseID},
						&protocol.Event{RunID: f.RunID, LeaseID: f.LeaseID, Seq: 1, Kind: protocol.EventStarted},
						&protocol.Event{RunID: f.RunID, LeaseID: f.LeaseID, Seq: 2, Kind: protocol.EventFinished, Status: "succeeded"},
					} {
						data, _ := protocol.EncodeFrame(out)
						if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
							failed.Store(err.Error())
							return
						}
					}
				case *protocol.Ack:
					if f.Seq == 2 && completed.Add(1) == target {
						close(done)
					}
				default:
					failed.Store(string(it.raw))
					return
				}
			}
		}()
	}
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	close(begin)
	if live {
		go func() {
			for _, wf := range wfs {
				r, err := e.st.RunCreate(ctx, store.RunCreateParams{
					AccountID: e.user.ID, WorkflowID: wf, Inputs: map[string]any{"q": "x"}, Cost: 1,
					Steps: []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}, {Index: 1, Type: protocol.StepExtract, Status: protocol.StepPending}},
				})
				if err != nil {
					failed.Store(err.Error())
					return
				}
				e.hub.RunQueued(ctx, r)
			}
		}()
	}
	timeout := time.After(time.Duration(b.N)*50*time.Millisecond + wait)
	select {
	case <-done:
	case <-timeout:
		b.Errorf("%d of %d lifecycles completed", completed.Load(), b.N)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	close(stop)
	wg.Wait()
	if f := failed.Load(); f != nil {
		b.Fatalf("client: %v", f)
	}
	b.ReportMetric(float64(completed.Load())/elapsed.Seconds(), "lifecycles/s")
	// CPU of the whole process (server and clients) per lifecycle: less
	// sensitive than wall time to other load on the machine.
	b.ReportMetric(float64(cpu.Microseconds())/float64(completed.Load()), "cpu-µs/lifecycle")
	b.ReportMetric(0, "ns/op")
	// Every run succeeded, charged once.
	cr, err := e.st.CreditsGet(ctx, e.user.ID)
	if err != nil || cr.Held != 0 || cr.Balance != 100 {
		b.Fatalf("credits after %d runs: %+v %v", b.N, cr, err)
	}
}

// BenchmarkIdleAgentMemory: the server's heap per connected idle agent.
// The 1,000 clients run in a child process (this test binary re-executed
// as TestHelperIdleAgents), so the parent's heap holds only the server
// side: HeapAlloc after GC with the agents connected, minus before, over
// the count. Goroutine stacks are not heap; they are reported separately.
func BenchmarkIdleAgentMemory(b *testing.B) {
	const n = 1000
	e := benchEnv(b, hub.Config{}, 0) // default lease: pings every 10 s
	// Warm the server's pools with one connection.
	c, _ := e.connect("warmup", 1)
	c.close()
	e.waitFor("warm-up agent gone", func() bool { return len(e.hub.Agents("")) == 0 })
	for range b.N {
		before, goroutines := heapAfterGC()
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperIdleAgents$", "-test.count=1")
		cmd.Env = append(os.Environ(), "HUBTEST_HELPER_URL="+e.wsURL(), "HUBTEST_HELPER_TOKEN="+e.agent, "HUBTEST_HELPER_N="+strconv.Itoa(n))
		cmd.Stderr = os.Stderr
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err != nil || line != "ready\n" {
			b.Fatalf("helper: %q %v", line, err)
		}
		e.waitFor("all agents registered", func() bool { return len(e.hub.Agents("")) == n })
		after, goroutinesAfter := heapAfterGC()
		if path := os.Getenv("HUBTEST_HEAPPROFILE"); path != "" {
			// What the connected agents hold: go tool pprof -sample_index=inuse_space.
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			if err := pprof.WriteHeapProfile(f); err != nil {
				b.Fatal(err)
			}
			f.Close()
		}
		stdin.Close()
		go io.Copy(io.Discard, stdout)
		if err := cmd.Wait(); err != nil {
			b.Fatalf("helper: %v", err)
		}
		e.waitFor("agents gone", func() bool { return len(e.hub.Agents("")) == 0 })
		b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/n, "heap-B/agent")
		b.ReportMetric(float64(int64(after.StackInuse)-int64(before.StackInuse))/n, "stack-B/agent")
		b.ReportMetric(float64(goroutinesAfter-goroutines)/n, "goroutines/agent")
	}
	b.ReportMetric(0, "ns/op")
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func heapAfterGC() (runtime.MemStats, int) {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m, runtime.NumGoroutine()
}

// TestHelperIdleAgents is BenchmarkIdleAgentMemory's client process: it
// connects HUBTEST_HELPER_N agents, prints "ready", and holds them idle
// (answering pings) until its stdin closes.
func TestHelperIdleAgents(t *testing.T) {
	url := os.Getenv("HUBTEST_HELPER_URL")
	if url == "" {
		t.Skip("the client process of BenchmarkIdleAgentMemory")
	}
	n, _ := strconv.Atoi(os.Getenv("HUBTEST_HELPER_N"))
	token := os.Getenv("HUBTEST_HELPER_TOKEN")
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: wait, ReadBufferSize: 512, WriteBufferSize: 512}
	conns := make([]*websocket.Conn, 0, n)
	var wg sync.WaitGroup
	defer func() {
		for _, ws := range conns {
			ws.Close()
		}
		wg.Wait()
	}()
	for i := range n {
		ws, _, err := d.Dial(url, nil)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, ws)
		hello, _ := protocol.EncodeFrame(&protocol.Hello{Protocol: protocol.Version, Token: token,
			Agent: protocol.AgentInfo{ID: fmt.Sprintf("idle-%04d", i), Name: "idle", Kind: protocol.AgentHeadless, Version: "bench", Slots: 1}})
		if err := ws.WriteMessage(websocket.TextMessage, hello); err != nil {
			t.Fatal(err)
		}
		_ = ws.SetReadDeadline(time.Now().Add(wait))
		if _, data, err := ws.ReadMessage(); err != nil {
			t.Fatal(err)
		} else if f, err := protocol.DecodeFrame(data); err != nil {
			t.Fatal(err)
		} else if _, ok := f.(*protocol.Welcome); !ok {
			t.Fatalf("got %s", data)
		}
		_ = ws.SetReadDeadline(time.Time{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					return
				}
			}
		}()
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}
