package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// proxy stands between the CLI and the control plane (the network
// boundary) to see which requests the CLI makes, and to cut or refuse its
// event streams.
type proxy struct {
	URL   string
	srv   *httptest.Server
	rp    *httputil.ReverseProxy
	up    *url.URL
	hc    *http.Client
	mode  string // "pass", "404" (no event streams) or "cut" (the first stream ends after its first event)
	opens chan streamOpen

	mu     sync.Mutex
	gets   map[string]int
	cut    bool
	cutID  string // the id of the last event sent before the cut
	opened []streamOpen
}

type streamOpen struct{ path, lastEventID string }

func newProxy(t testing.TB, s *server, mode string) *proxy {
	up, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{}
	p := &proxy{up: up, mode: mode, gets: map[string]int{}, opens: make(chan streamOpen, 100), hc: &http.Client{Transport: tr}}
	p.rp = httputil.NewSingleHostReverseProxy(up)
	p.rp.Transport = tr
	p.rp.FlushInterval = -1
	p.srv = httptest.NewServer(p)
	p.URL = p.srv.URL
	t.Cleanup(func() {
		p.srv.CloseClientConnections()
		p.srv.Close()
		tr.CloseIdleConnections()
	})
	return p
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/events") {
		p.mu.Lock()
		p.gets[r.Method+" "+r.URL.Path]++
		p.mu.Unlock()
		p.rp.ServeHTTP(w, r)
		return
	}
	open := streamOpen{path: r.URL.RequestURI(), lastEventID: r.Header.Get("Last-Event-ID")}
	p.mu.Lock()
	p.opened = append(p.opened, open)
	cutThis := p.mode == "cut" && !p.cut
	p.cut = p.cut || cutThis
	p.mu.Unlock()
	p.opens <- open
	switch {
	case p.mode == "404":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"code":"not_found","message":"No route matches.","requestId":"req_proxy","details":null}`))
	case cutThis:
		p.cutAfterFirstEvent(w, r)
	default:
		p.rp.ServeHTTP(w, r)
	}
}

// cutAfterFirstEvent forwards a stream until one event has gone through,
// then drops the connection.
func (p *proxy) cutAfterFirstEvent(w http.ResponseWriter, r *http.Request) {
	req, _ := http.NewRequestWithContext(r.Context(), "GET", p.up.String()+r.URL.RequestURI(), nil)
	req.Header = r.Header.Clone()
	res, err := p.hc.Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer res.Body.Close()
	for k, v := range res.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(res.StatusCode)
	br := bufio.NewReader(res.Body)
	data := false
	id := ""
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		w.Write([]byte(line))
		http.NewResponseController(w).Flush()
		switch {
		case strings.HasPrefix(line, "id:"):
			id = strings.TrimSpace(strings.TrimPrefix(line, "id:"))
		case strings.HasPrefix(line, "data:"):
			data = true
		case line == "\n" && data:
			p.mu.Lock()
			p.cutID = id
			p.mu.Unlock()
			panic(http.ErrAbortHandler) // drop the connection mid-stream
		}
	}
}

func (p *proxy) count(key string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.gets[key]
}

// nextOpen waits for the CLI to open a stream.
func (p *proxy) nextOpen(t testing.TB) streamOpen {
	t.Helper()
	select {
	case o := <-p.opens:
		return o
	case <-time.After(wait):
		t.Fatal("the CLI opened no event stream")
	}
	return streamOpen{}
}

// pausedIteration waits until an iteration of a batch (in any order) is
// awaiting approval and returns its run.
func (s *server) pausedIteration(t testing.TB, a *account, batch string) string {
	t.Helper()
	deadline := time.Now().Add(wait)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var b BatchView
		if err := json.Unmarshal(s.call(t, "GET", "/v1/batches/"+batch, a.Token, nil, 200), &b); err != nil {
			t.Fatal(err)
		}
		for _, it := range b.Iterations {
			if it.Status == "awaiting_approval" {
				return it.RunID
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no iteration awaits approval: %+v", b.Iterations)
		}
		<-tick.C
	}
}

// through is the environment of an account talking through the proxy.
func (p *proxy) through(s *server, a *account) cliEnv {
	e := s.as(a)
	e["COPELF_SERVER"] = p.URL
	return e
}

// hasStreams tells whether the server serves event streams.
func (s *server) hasStreams(t testing.TB, a *account) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", s.URL+"/v1/events", nil)
	req.Header.Set("Authorization", "Bearer "+a.Token)
	res, err := httpClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode == http.StatusOK
}

func TestRunsWatchFollowsTheStream(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "free")
	if !s.hasStreams(t, a) {
		t.Skip("the server has no event streams yet")
	}
	ag := s.connectAgent(t, a, "agent-stream", 1)
	releaseApproval, releaseExtract := ag.holdApproval(), ag.holdExtract()
	defer releaseApproval()
	defer releaseExtract()
	p := newProxy(t, s, "cut")

	id := s.createRun(t, a, s.workflow(t, a, true), nil)
	apr := s.pendingApproval(t, a, id)
	// On a terminal, a step's end replaces its running line.
	w := startBG(p.through(s, a), 1, "runs", "watch", id)
	first := p.nextOpen(t)
	if first.path != "/v1/runs/"+id+"/events" || first.lastEventID != "" {
		t.Fatalf("first stream: %+v", first)
	}
	// The proxy cuts the stream after the run's state; the CLI resumes.
	second := p.nextOpen(t)
	p.mu.Lock()
	cutID := p.cutID
	p.mu.Unlock()
	if second.path != first.path || cutID == "" || second.lastEventID != cutID {
		t.Fatalf("the stream was not resumed after event %q: %+v", cutID, second)
	}
	w.waitOutput(t, id+" awaiting_approval")
	approved := w.mark()
	copelf(t, s.as(a), "approvals", "approve", apr)
	// The agent goes on only once the watch has shown the run running
	// again, and keeps step 2 running until the watch has shown that: the
	// step's end replacing its running line is seen whatever the timing.
	w.waitOutputAfter(t, approved, id+" running on ")
	releaseApproval()
	w.waitOutput(t, "  step 2  extract   running\n")
	releaseExtract()
	res := w.result(t)
	wantExit(t, res, ExitOK)
	wantContains(t, "watch", res.stdout, "step 1  approval  succeeded", "step 2  extract   succeeded", id+" succeeded")
	wantContains(t, "watch stderr", res.stderr, "event stream cut")
	wantContains(t, "watch", res.stdout, "  step 2  extract   running\n\x1b[1A\r\x1b[K  step 2  extract   succeeded 5ms\n")
	// Steps and the end are printed once, resumed stream or not. (The run's
	// state line may repeat: the server can deliver a change published
	// before the stream's first state after it, with a later id, and
	// "running" before and after an approval look the same.)
	for _, line := range []string{"step 1  approval  succeeded", "step 2  extract   succeeded", id + " succeeded"} {
		if n := strings.Count(res.stdout, line); n != 1 {
			t.Errorf("%q printed %d times:\n%s", line, n, res.stdout)
		}
	}
	// It followed the stream: one GET per connection, no polling.
	if n := p.count("GET /v1/runs/" + id); n > 3 {
		t.Errorf("the watch polled: %d GETs of the run", n)
	}
}

func TestBatchesWatchResumesTheStream(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "pro")
	if !s.hasStreams(t, a) {
		t.Skip("the server has no event streams yet")
	}
	s.connectAgent(t, a, "agent-batch-stream", 1)
	p := newProxy(t, s, "cut")

	wf := s.workflow(t, a, true)
	id := s.batch(t, a, wf, 1, "succeeded", "succeeded")
	s.call(t, "POST", "/v1/batches/"+id+"/start", a.Token, nil, 200)
	w := startBG(p.through(s, a), -1, "batches", "watch", id)
	first := p.nextOpen(t)
	if !strings.HasPrefix(first.path, "/v1/events?") || !strings.Contains(first.path, "types=run%2Cbatch") && !strings.Contains(first.path, "types=run,batch") {
		t.Fatalf("first stream: %+v", first)
	}
	// Each iteration waits for its approval. The proxy cuts the stream
	// after the first event that follows the first approval; what happens
	// while the CLI is away comes with the resumed stream.
	copelf(t, s.as(a), "approvals", "approve", s.pendingApproval(t, a, s.pausedIteration(t, a, id)))
	second := p.nextOpen(t)
	p.mu.Lock()
	cutID := p.cutID
	p.mu.Unlock()
	if cutID == "" || second.lastEventID != cutID {
		t.Fatalf("the stream was not resumed after event %q: %+v", cutID, second)
	}
	copelf(t, s.as(a), "approvals", "approve", s.pendingApproval(t, a, s.pausedIteration(t, a, id)))
	res := w.result(t)
	wantExit(t, res, ExitOK)
	wantContains(t, "batches watch", res.stdout, id+" completed 2/2 done: succeeded 2")
	wantContains(t, "batches watch stderr", res.stderr, "event stream cut")
}

func TestWatchPollsWithoutStreams(t *testing.T) {
	s := controlPlane(t)
	a := s.newAccount(t, "member", "pro")
	s.connectAgent(t, a, "agent-poll", 1)
	p := newProxy(t, s, "404")

	id := s.createRun(t, a, s.workflow(t, a, true), nil)
	apr := s.pendingApproval(t, a, id)
	w := startBG(p.through(s, a), -1, "-poll", "20ms", "runs", "watch", id)
	if o := p.nextOpen(t); o.path != "/v1/runs/"+id+"/events" {
		t.Fatalf("stream: %+v", o)
	}
	w.waitOutput(t, id+" awaiting_approval")
	copelf(t, s.as(a), "approvals", "approve", apr)
	res := w.result(t)
	wantExit(t, res, ExitOK)
	wantContains(t, "watch", res.stdout, "step 2  extract   succeeded", id+" succeeded")
	if n := p.count("GET /v1/runs/" + id); n < 2 {
		t.Errorf("the watch did not poll: %d GETs", n)
	}

	bid := s.batch(t, a, s.workflow(t, a, false), 1, "succeeded", "failed")
	s.call(t, "POST", "/v1/batches/"+bid+"/start", a.Token, nil, 200)
	res = copelf(t, p.through(s, a), "-poll", "20ms", "batches", "watch", bid)
	wantExit(t, res, ExitFailed)
	wantContains(t, "batches watch", res.stdout, bid+" completed 2/2 done: succeeded 1, failed 1")
}

// BenchmarkWatchEnd measures how long `copelf runs watch` takes to end
// after the run it follows is let go: from the approval (the agent then
// finishes the run at once) to the command's exit, over the event stream
// and by polling every 500 ms (the default).
func BenchmarkWatchEnd(b *testing.B) {
	for _, mode := range []string{"pass", "404"} {
		name := map[string]string{"pass": "stream", "404": "poll"}[mode]
		b.Run(name, func(b *testing.B) {
			s := controlPlane(b)
			a := s.newAccount(b, "member", "free")
			if mode == "pass" && !s.hasStreams(b, a) {
				b.Skip("the server has no event streams")
			}
			s.connectAgent(b, a, "agent-bench-"+name, 1)
			p := newProxy(b, s, mode)
			wf := s.workflow(b, a, true)
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				id := s.createRun(b, a, wf, nil)
				apr := s.pendingApproval(b, a, id)
				w := startBG(p.through(s, a), -1, "runs", "watch", id)
				w.waitOutput(b, id+" awaiting_approval")
				b.StartTimer()
				start := time.Now()
				s.call(b, "POST", "/v1/approvals/"+apr+"/approve", a.Token, nil, 200)
				if r := w.result(b); r.code != ExitOK {
					b.Fatalf("watch: %s", r)
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
		})
	}
}
