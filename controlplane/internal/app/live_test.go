package app_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/copelf/copelf/controlplane/internal/app"
	"github.com/copelf/copelf/protocol"
)

// liveWait bounds every wait for something to arrive.
const liveWait = time.Minute

// sse is an event stream read line by line on its own goroutine.
type sse struct {
	t      *testing.T
	cancel context.CancelFunc
	lines  chan string
	done   chan struct{}
}

func openSSE(t *testing.T, c *http.Client, url, token string) *sse {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := c.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "text/event-stream" {
		cancel()
		res.Body.Close()
		t.Fatalf("GET %s: %d %s", url, res.StatusCode, res.Header.Get("Content-Type"))
	}
	s := &sse{t: t, cancel: cancel, lines: make(chan string, 10_000), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer res.Body.Close()
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() { cancel(); <-s.done })
	return s
}

// event returns the next event's type and data.
func (s *sse) event() (string, map[string]any) {
	s.t.Helper()
	typ := ""
	timeout := time.After(liveWait)
	for {
		select {
		case line := <-s.lines:
			switch {
			case strings.HasPrefix(line, "event: "):
				typ = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				var env struct {
					Data map[string]any `json:"data"`
				}
				if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &env); err != nil {
					s.t.Fatal(err)
				}
				return typ, env.Data
			}
		case <-s.done:
			if len(s.lines) > 0 {
				continue // read what came before the end first
			}
			s.t.Fatal("the stream ended")
		case <-timeout:
			s.t.Fatal("no event in time")
		}
	}
}

// until reads events until one of type typ satisfies ok.
func (s *sse) until(typ string, ok func(map[string]any) bool) map[string]any {
	s.t.Helper()
	for {
		if t, d := s.event(); t == typ && ok(d) {
			return d
		}
	}
}

func (s *sse) ended() {
	s.t.Helper()
	timeout := time.After(liveWait)
	for {
		select {
		case <-s.lines:
		case <-s.done:
			return
		case <-timeout:
			s.t.Fatal("the stream did not end")
		}
	}
}

// agent is a protocol client over the websocket.
type agent struct {
	t  *testing.T
	ws *websocket.Conn
}

func connect(t *testing.T, baseURL, token string) *agent {
	t.Helper()
	d := websocket.Dialer{Subprotocols: []string{protocol.Subprotocol}, HandshakeTimeout: liveWait}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(baseURL, "http")+"/v1/agents/connect", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	a := &agent{t: t, ws: ws}
	a.send(&protocol.Hello{Protocol: protocol.Version, Token: token, Agent: protocol.AgentInfo{ID: "live-agent", Name: "live", Kind: protocol.AgentHeadless, Version: "test", Slots: 1}})
	if f := a.next(); f.FrameType() != protocol.FrameWelcome {
		t.Fatalf("first frame %s", f.FrameType())
	}
	a.send(&protocol.Ready{Slots: 1})
	return a
}

func (a *agent) send(f protocol.Frame) {
	a.t.Helper()
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		a.t.Fatal(err)
	}
	if err := a.ws.WriteMessage(websocket.TextMessage, data); err != nil {
		a.t.Fatal(err)
	}
}

func (a *agent) next() protocol.Frame {
	a.t.Helper()
	_ = a.ws.SetReadDeadline(time.Now().Add(liveWait))
	_, data, err := a.ws.ReadMessage()
	if err != nil {
		a.t.Fatal(err)
	}
	f, err := protocol.DecodeFrame(data)
	if err != nil {
		a.t.Fatal(err)
	}
	return f
}

// await reads frames (skipping acks and heartbeats) until one of type typ.
func (a *agent) await(typ protocol.FrameType) protocol.Frame {
	a.t.Helper()
	for {
		f := a.next()
		if f.FrameType() == typ {
			return f
		}
		if e, ok := f.(*protocol.ErrorFrame); ok {
			a.t.Fatalf("error frame: %s %s", e.Code, e.Message)
		}
	}
}

var metricsAddrRe = regexp.MustCompile(`"addr":"([0-9.:]+)","level":"info","msg":"metrics listening"`)

// TestLiveRunThroughAgent: copelfd with an agent speaking the protocol. A
// run's stream shows it queued, running, awaiting approval, running again
// and succeeded, then ends; the account's stream shows the agent, the
// approval opened and approved; -metrics-addr serves the counters without a
// token; shutdown ends the open streams and leaves nothing running.
func TestLiveRunThroughAgent(t *testing.T) {
	unsetAdminToken(t)
	dir := t.TempDir()
	in := startApp(t, append(baseArgs(dir), "-dev", "-log-level", "info", "-metrics-addr", "127.0.0.1:0", "-sse-keepalive", "1s")...)
	env := readEnvFile(t, filepath.Join(dir, "data", "dev.env"))
	token := env["COPELF_TOKEN"]
	c := client(t)
	m := metricsAddrRe.FindStringSubmatch(in.Stderr.String())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", in.Stderr)
	}

	all := openSSE(t, c, in.URL+"/v1/events", token)
	status, wf := call(t, c, "POST", in.URL+"/v1/workflows", token, map[string]any{"name": "approve me",
		"definition": map[string]any{"version": 1, "steps": []any{map[string]any{"type": "approval", "message": "go on?"}}}})
	expect(t, "create workflow", status, wf, http.StatusCreated)
	status, run := call(t, c, "POST", in.URL+"/v1/workflows/"+wf["id"].(string)+"/runs", token, map[string]any{"inputs": map[string]any{}})
	expect(t, "create run", status, run, http.StatusCreated)
	runID := run["id"].(string)
	one := openSSE(t, c, in.URL+"/v1/runs/"+runID+"/events", token)
	if _, d := one.event(); d["status"] != "queued" {
		t.Fatalf("first state %v", d)
	}

	a := connect(t, in.URL, env["COPELF_AGENT_TOKEN"])
	all.until("agent.connected", func(d map[string]any) bool { return d["clientId"] == "live-agent" })
	as := a.await(protocol.FrameAssign).(*protocol.Assign)
	a.send(&protocol.Accept{RunID: as.RunID, LeaseID: as.LeaseID})
	step := 0
	a.send(&protocol.Event{RunID: runID, LeaseID: as.LeaseID, Seq: 1, Kind: protocol.EventStarted})
	// The event log reads the run when it flushes: started and
	// approval_requested applied before one flush would both show
	// awaiting_approval. The next event goes once running has shown.
	one.until("run.updated", func(d map[string]any) bool { return d["status"] == "running" })
	a.send(&protocol.Event{RunID: runID, LeaseID: as.LeaseID, Seq: 2, Kind: protocol.EventApprovalRequested, Step: &step, Message: "go on?"})
	one.until("run.updated", func(d map[string]any) bool { return d["status"] == "awaiting_approval" })
	apr := all.until("approval.updated", func(d map[string]any) bool { return d["runId"] == runID && d["status"] == "pending" })
	status, body := call(t, c, "POST", in.URL+"/v1/approvals/"+apr["id"].(string)+"/approve", token, nil)
	expect(t, "approve", status, body, http.StatusOK)
	all.until("approval.updated", func(d map[string]any) bool { return d["id"] == apr["id"] && d["status"] == "approved" })
	one.until("run.updated", func(d map[string]any) bool { return d["status"] == "running" })
	a.await(protocol.FrameApproval)
	a.send(&protocol.Event{RunID: runID, LeaseID: as.LeaseID, Seq: 3, Kind: protocol.EventFinished, Status: string(protocol.RunSucceeded)})
	one.until("run.updated", func(d map[string]any) bool { return d["status"] == "succeeded" })
	one.ended()
	all.until("run.updated", func(d map[string]any) bool { return d["id"] == runID && d["status"] == "succeeded" })

	// Metrics without a token on -metrics-addr.
	res, err := c.Get("http://" + m[1] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(res.Body)
	res.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("metrics: %d %v", res.StatusCode, err)
	}
	find := func(name string, labels map[string]string) float64 {
		for _, s := range fams[name].GetMetric() {
			match := true
			for k, v := range labels {
				found := false
				for _, lp := range s.GetLabel() {
					found = found || lp.GetName() == k && lp.GetValue() == v
				}
				match = match && found
			}
			if match {
				if s.Counter != nil {
					return s.GetCounter().GetValue()
				}
				if s.Histogram != nil {
					return float64(s.GetHistogram().GetSampleCount())
				}
				return s.GetGauge().GetValue()
			}
		}
		return -1
	}
	if v := find("copelf_runs_finished_total", map[string]string{"status": "succeeded"}); v != 1 {
		t.Errorf("runs finished succeeded = %v", v)
	}
	if v := find("copelf_dispatch_latency_seconds", nil); v != 1 {
		t.Errorf("dispatch latency count = %v", v)
	}
	if v := find("copelf_ws_frames_total", map[string]string{"direction": "in", "type": "event"}); v != 3 {
		t.Errorf("event frames in = %v", v)
	}
	// The API's /metrics needs no token either (API.md §12).
	if res, err := c.Get(in.URL + "/metrics"); err != nil {
		t.Error(err)
	} else {
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Errorf("GET /metrics without a token: %d", res.StatusCode)
		}
	}

	// Shutdown ends the account's stream.
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	all.ended()
}

// TestLiveFlags: the live settings are flags with COPELF_* twins; the
// analyzing threshold defaults to -analysis-timeout; bad values are refused.
func TestLiveFlags(t *testing.T) {
	t.Setenv("COPELF_STUCK_APPROVAL", "90m")
	t.Setenv("COPELF_EVENTS_RETENTION", "2h")
	c, err := app.ParseConfig([]string{"-stuck-queued", "2m", "-sse-keepalive", "3s", "-analysis-timeout", "7m", "-metrics-addr", "127.0.0.1:9100"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.StuckQueued != 2*time.Minute || c.StuckApproval != 90*time.Minute || c.EventsRetention != 2*time.Hour || c.SSEKeepAlive != 3*time.Second ||
		c.StuckAnalyzing != 7*time.Minute || c.StuckAssigned != time.Minute || c.StuckCancelling != time.Minute || c.EventsPoll != 500*time.Millisecond ||
		c.MetricsAddr != "127.0.0.1:9100" {
		t.Errorf("config %+v", c)
	}
	for _, args := range [][]string{{"-stuck-queued", "-1s"}, {"-events-poll", "0"}, {"-sse-keepalive", "0s"}, {"-events-retention", "-1h"}} {
		if _, err := app.ParseConfig(args, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}
