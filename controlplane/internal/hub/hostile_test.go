package hub_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/protocol"
)

// stillServes checks the server still serves a well-behaved agent end to end.
func (e *env) stillServes() {
	e.t.Helper()
	c, _ := e.connect("healthy", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
	c.close()
}

// expectRefused reads the error frame of a refused connection and its close.
func (c *client) expectRefused(code protocol.Code, reason string, closeCode int) {
	c.t.Helper()
	ce, frames := c.expectClosed()
	if len(frames) != 1 {
		c.t.Fatalf("want one error frame, got %d: %+v", len(frames), frames)
	}
	f, ok := frames[0].(*protocol.ErrorFrame)
	if !ok || f.Code != code || (reason != "" && f.Details["reason"] != reason) {
		c.t.Fatalf("want error %s/%s, got %+v", code, reason, frames[0])
	}
	if ce == nil || ce.Code != closeCode {
		c.t.Fatalf("want close %d, got %v", closeCode, ce)
	}
}

// The hello is refused, with a typed error frame and a close.
func TestHostileHello(t *testing.T) {
	// The default hello timeout (10 s): a hello sent at once is never late
	// however loaded the machine.
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	t.Run("no hello in time", func(t *testing.T) {
		// A hub of its own with a short hello timeout, for the one case
		// that waits it out.
		quick := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second, HelloTimeout: 300 * time.Millisecond}, noLeakCheck())
		c := quick.open()
		c.expectRefused(protocol.CodeTimeout, "", websocket.CloseProtocolError)
	})
	bad := func(mutate func(h *protocol.Hello)) *protocol.Hello {
		h := e.hello("mallory", 1)
		mutate(h)
		return h
	}
	cases := []struct {
		name      string
		send      func(c *client)
		code      protocol.Code
		reason    string
		closeCode int
	}{
		{"wrong token", func(c *client) { c.send(bad(func(h *protocol.Hello) { h.Token = "agt_nope" })) }, protocol.CodeUnauthenticated, "", websocket.ClosePolicyViolation},
		{"api token", func(c *client) { c.send(bad(func(h *protocol.Hello) { h.Token = e.token })) }, protocol.CodeUnauthenticated, "agent_token_required", websocket.ClosePolicyViolation},
		{"protocol 2", func(c *client) { c.send(bad(func(h *protocol.Hello) { h.Protocol = 2 })) }, protocol.CodeBadRequest, "unsupported_protocol", websocket.CloseProtocolError},
		{"ready first", func(c *client) { c.send(&protocol.Ready{Slots: 1}) }, protocol.CodeUnauthenticated, "hello_required", websocket.ClosePolicyViolation},
		{"malformed hello", func(c *client) { c.sendRaw(websocket.TextMessage, []byte(`{"type":"hello",`)) }, protocol.CodeBadRequest, "malformed_frame", websocket.CloseProtocolError},
		{"binary hello", func(c *client) { c.sendRaw(websocket.BinaryMessage, []byte{1, 2, 3}) }, protocol.CodeBadRequest, "malformed_frame", websocket.CloseProtocolError},
		{"invalid agent", func(c *client) { c.send(bad(func(h *protocol.Hello) { h.Agent.Kind = "robot"; h.Agent.Slots = 9999 })) }, protocol.CodeUnprocessableEntity, "", websocket.CloseProtocolError},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := e.open()
			c.t = t
			tc.send(c)
			c.expectRefused(tc.code, tc.reason, tc.closeCode)
		})
	}
	if n := len(e.hub.Agents("")); n != 0 {
		t.Fatalf("%d agents registered", n)
	}
	e.stillServes()
}

// A frame over 1 MiB closes the connection with 1009, before or after hello.
func TestHostileHugeFrame(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	huge := append([]byte(`{"type":"ready","slots":1,"x":"`), bytes.Repeat([]byte("x"), 2<<20)...)
	huge = append(huge, `"}`...)
	for _, afterHello := range []bool{false, true} {
		c := e.open()
		if afterHello {
			c.send(e.hello("big", 1))
			expect[*protocol.Welcome](c)
		}
		// The write may fail once the server has closed; what matters is
		// what the client reads.
		go func() { _ = c.ws.WriteMessage(websocket.TextMessage, huge) }()
		ce, _ := c.expectClosed()
		if ce == nil || ce.Code != websocket.CloseMessageTooBig {
			t.Fatalf("after hello %v: close %v (%v)", afterHello, ce, c.err)
		}
	}
	e.stillServes()
}

// Bad frames after hello are answered with typed errors; the connection
// stays up.
func TestHostileFramesAfterHello(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("sloppy", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)

	def := &protocol.Definition{Version: 1, Steps: []protocol.Step{{Type: protocol.StepNavigate, URL: "about:blank"}}}
	cases := []struct {
		name   string
		send   func()
		code   protocol.Code
		reason string
	}{
		{"unknown type", func() { c.sendRaw(websocket.TextMessage, []byte(`{"type":"gimme"}`)) }, protocol.CodeBadRequest, "unknown_frame_type"},
		{"malformed json", func() { c.sendRaw(websocket.TextMessage, []byte(`{"type":`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"not an object", func() { c.sendRaw(websocket.TextMessage, []byte(`[1,2]`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"no type", func() { c.sendRaw(websocket.TextMessage, []byte(`{"slots":1}`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"unknown field", func() { c.sendRaw(websocket.TextMessage, []byte(`{"type":"ready","slots":1,"sudo":true}`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"wrong type", func() { c.sendRaw(websocket.TextMessage, []byte(`{"type":"ready","slots":"all"}`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"binary", func() { c.sendRaw(websocket.BinaryMessage, []byte(`{"type":"ready","slots":1}`)) }, protocol.CodeBadRequest, "malformed_frame"},
		{"invalid values", func() { c.send(&protocol.Ready{Slots: -1}) }, protocol.CodeUnprocessableEntity, ""},
		{"assign from agent", func() {
			c.send(&protocol.Assign{RunID: run, Attempt: 1, LeaseID: a.LeaseID, Workflow: protocol.AssignedWorkflow{ID: a.Workflow.ID, Definition: def}})
		}, protocol.CodeBadRequest, "unexpected_frame"},
		{"ack from agent", func() { c.send(&protocol.Ack{RunID: run, Seq: 1}) }, protocol.CodeBadRequest, "unexpected_frame"},
		{"cancel from agent", func() { c.send(&protocol.Cancel{RunID: run}) }, protocol.CodeBadRequest, "unexpected_frame"},
		{"second hello", func() { c.send(e.hello("sloppy", 1)) }, protocol.CodeBadRequest, "unexpected_frame"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			defer func() { c.t = e.t }()
			tc.send()
			c.expectError(tc.code, tc.reason)
			c.sync()
		})
	}
	// None of it touched the run; the connection still works.
	c.start(a)
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// A client that sends nothing but garbage is eventually dropped.
func TestHostileGarbageFlood(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("noisy", 1)
	// The server gives up at the 21st.
	for range 21 {
		c.sendRaw(websocket.TextMessage, []byte(`nope`))
	}
	ce, frames := c.expectClosed()
	if ce == nil || ce.Code != websocket.ClosePolicyViolation || len(frames) != 21 {
		t.Fatalf("close %v after %d frames", ce, len(frames))
	}
	for _, f := range frames {
		if ef, ok := f.(*protocol.ErrorFrame); !ok || ef.Code != protocol.CodeBadRequest {
			t.Fatalf("frame %+v", f)
		}
	}
	e.stillServes()
}

// An agent may not touch another account's runs.
func TestHostileOtherAccountsRun(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	victim, _ := e.connect("victim", 1)
	run := e.runOn(nil)
	a := victim.expectAssign(run)
	victim.start(a)

	other := e.newAccount("mallory@example.com", 10)
	h := e.hello("mallory", 1)
	h.Token = other.agent
	m, _ := e.connectWith(h)
	m.send(&protocol.Accept{RunID: run, LeaseID: a.LeaseID})
	if f := m.expectError(protocol.CodeForbidden, ""); f.RunID != run {
		t.Fatalf("runId %q", f.RunID)
	}
	for _, ev := range []protocol.Event{{Kind: protocol.EventStepStarted, Step: intp(0)}, {Kind: protocol.EventFinished, Status: "succeeded"}} {
		m.report(run, a.LeaseID, ev)
		m.expectError(protocol.CodeForbidden, "")
	}
	m.send(&protocol.Reject{RunID: run, LeaseID: a.LeaseID})
	m.expectError(protocol.CodeForbidden, "")
	// A run id that does not exist is answered the same way.
	m.send(&protocol.Accept{RunID: "run_aaaaaaaaaaaaaaaaaaaaaaaaaa", LeaseID: a.LeaseID})
	m.expectError(protocol.CodeForbidden, "")
	// Heartbeats naming the run do not keep its lease.
	before := e.run(run).LeaseExpiresAt
	e.advance(time.Second)
	m.send(&protocol.Heartbeat{Runs: []string{run}})
	m.sync()
	if after := e.run(run).LeaseExpiresAt; !after.Equal(*before) {
		t.Fatalf("lease moved from %v to %v", before, after)
	}
	if r := e.run(run); r.Status != protocol.RunRunning || len(e.history(run)) != 1 {
		t.Fatalf("run changed: %s", r.Status)
	}
	victim.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// upgradeHeaders are a websocket handshake's request headers.
func upgradeHeaders(subprotocol, origin string) http.Header {
	h := http.Header{}
	h.Set("Connection", "Upgrade")
	h.Set("Upgrade", "websocket")
	h.Set("Sec-WebSocket-Version", "13")
	h.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	if subprotocol != "" {
		h.Set("Sec-WebSocket-Protocol", subprotocol)
	}
	if origin != "" {
		h.Set("Origin", origin)
	}
	return h
}

func TestHostileHandshake(t *testing.T) {
	const ext = "chrome-extension://abcdefghijklmnopabcdefghijklmnop"
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second, AllowedOrigins: []string{ext}})

	t.Run("origin not allowed", func(t *testing.T) {
		res := e.do("GET", "/v1/agents/connect", "", nil, upgradeHeaders(protocol.Subprotocol, "https://evil.example"))
		wantEnvelope(t, res, http.StatusForbidden, protocol.CodeForbidden)
		if res.header.Get("Upgrade") != "" {
			t.Fatal("upgraded")
		}
		// The real client sees the same refusal.
		ws, hres, err := e.dial(http.Header{"Origin": {"https://evil.example"}})
		if err == nil {
			ws.Close()
			t.Fatal("dial succeeded")
		}
		if hres == nil || hres.StatusCode != http.StatusForbidden {
			t.Fatalf("dial: %v %v", err, hres)
		}
	})
	t.Run("missing subprotocol", func(t *testing.T) {
		res := e.do("GET", "/v1/agents/connect", "", nil, upgradeHeaders("", ""))
		wantEnvelope(t, res, http.StatusBadRequest, protocol.CodeBadRequest)
		if reasonOf(res.body) != "subprotocol_required" {
			t.Fatalf("reason: %v", res.body)
		}
	})
	t.Run("plain GET", func(t *testing.T) {
		res := e.do("GET", "/v1/agents/connect", "", nil, nil)
		wantEnvelope(t, res, http.StatusBadRequest, protocol.CodeBadRequest)
		if reasonOf(res.body) != "websocket_required" {
			t.Fatalf("reason: %v", res.body)
		}
	})
	t.Run("POST", func(t *testing.T) {
		res := e.do("POST", "/v1/agents/connect", "", []byte("{}"), nil)
		wantEnvelope(t, res, http.StatusNotFound, protocol.CodeNotFound)
		if res.header.Get("Allow") != "GET" {
			t.Fatalf("Allow %q", res.header.Get("Allow"))
		}
	})
	t.Run("bad websocket version", func(t *testing.T) {
		h := upgradeHeaders(protocol.Subprotocol, "")
		h.Set("Sec-WebSocket-Version", "8")
		res := e.do("GET", "/v1/agents/connect", "", nil, h)
		if res.status < 400 || res.status >= 500 || !strings.HasPrefix(res.header.Get("Content-Type"), "application/json") {
			t.Fatalf("%d %s", res.status, res.raw)
		}
		var env map[string]any
		if err := json.Unmarshal(res.raw, &env); err != nil || env["code"] == nil {
			t.Fatalf("not an envelope: %s", res.raw)
		}
	})
	t.Run("allowed origin", func(t *testing.T) {
		ws, _, err := e.dial(http.Header{"Origin": {ext}})
		if err != nil {
			t.Fatal(err)
		}
		c := e.wrap(ws)
		c.t = t
		c.send(e.hello("extension", 1))
		expect[*protocol.Welcome](c)
		c.close()
	})
	t.Run("no origin", func(t *testing.T) {
		c := e.open()
		c.t = t
		c.send(e.hello("headless", 1))
		expect[*protocol.Welcome](c)
		c.close()
	})
	e.stillServes()
}

// An event the store refuses (a step the run does not have) is answered with
// a typed error about the run; nothing changes and its seq is not used up.
func TestHostileInvalidEvent(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("confused", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)
	seq := c.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(7)})
	if f := c.expectError(protocol.CodeUnprocessableEntity, ""); f.RunID != run {
		t.Fatalf("runId %q", f.RunID)
	}
	if n := len(e.history(run)); n != 1 {
		t.Fatalf("history: %d events", n)
	}
	c.seqs[a.LeaseID] = seq - 1
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepStarted, Step: intp(0)})
	// A gap in the seqs is refused.
	c.seqs[a.LeaseID] += 5
	c.report(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(0), Status: "succeeded"})
	c.expectError(protocol.CodeConflict, "sequence_gap")
	c.seqs[a.LeaseID] -= 6
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// An agent's reports are untrusted: secret input values it echoes back are
// redacted before they are stored or shown.
func TestSecretsScrubbedFromReports(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 5 * time.Second})
	c, _ := e.connect("leaky", 1)
	def := `{"version":1,"variables":[{"name":"pw","type":"secret"}],"steps":[{"type":"type","selector":"#pw","text":"{{pw}}"},{"type":"extract","selector":"h1","output":"title"}]}`
	run := e.runOf(e.workflowWith(def), map[string]any{"inputs": map[string]any{"pw": "hunter2"}})
	a := c.expectAssign(run)
	if a.Inputs["pw"] != "hunter2" {
		t.Fatalf("the agent needs the secret: %v", a.Inputs)
	}
	c.start(a)
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(0), Status: "failed",
		Error: protocol.Errorf(protocol.CodeBadRequest, "typed hunter2 into #pw").With("typed", []any{"hunter2", map[string]any{"v": "xhunter2x"}})})
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventStepFinished, Step: intp(1), Status: "succeeded", Output: "Welcome hunter2"})
	c.reportAcked(run, a.LeaseID, protocol.Event{Kind: protocol.EventFinished, Status: "succeeded", Message: "bye hunter2",
		Outputs: map[string]any{"echo": []any{"hunter2", map[string]any{"deep": "hunter2"}}}})
	e.waitStatus(run, protocol.RunSucceeded)
	for _, ev := range e.history(run) {
		if strings.Contains(string(ev.Body), "hunter2") {
			t.Fatalf("event %d stored the secret: %s", ev.Seq, ev.Body)
		}
	}
	res := e.do("GET", "/v1/runs/"+run, e.token, nil, nil)
	if bytes.Contains(res.raw, []byte("hunter2")) {
		t.Fatalf("GET run shows the secret: %s", res.raw)
	}
	if out := e.run(run).Outputs; out["title"] != "Welcome "+protocol.RedactedValue {
		t.Fatalf("outputs %v", out)
	}
}
