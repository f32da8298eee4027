package hub

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// heldRun is what the hub keeps about a run an agent holds.
type heldRun struct {
	leaseID  string
	workflow string // the workflow's name
	def      *protocol.Definition
	secrets  []string // secret input values, scrubbed from recorded events
	accepted bool
}

// refusal is a run an agent rejected.
type refusal struct {
	until  time.Time
	noSlot bool // rejected with reason no_free_slot
}

// rejectNoFreeSlot is the reject reason of an agent that had no room for
// the run (protocol README §4): the server's count of its free slots was
// ahead of the agent's.
const rejectNoFreeSlot = "no_free_slot"

// frameMalformed counts frames that did not decode.
const frameMalformed protocol.FrameType = "malformed"

// conn is one connected agent.
type conn struct {
	h         *Hub
	ws        *websocket.Conn
	log       logrus.FieldLogger
	agentID   string
	accountID string
	info      protocol.AgentInfo
	sessionID string
	send      chan []byte
	done      chan struct{}
	closeOnce sync.Once

	// Guarded by h.mu.
	// rejected remembers runs this agent refused, so that they are not
	// pushed straight back to it (until the time stored, or for a refusal
	// for want of a free slot, until a ready announces one).
	rejected    map[string]refusal
	free        int
	runs        map[string]*heldRun
	connectedAt time.Time
	lastSeen    time.Time
}

// ServeHTTP is the websocket endpoint GET /v1/agents/connect.
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		writeEnvelope(w, protocol.Errorf(protocol.CodeNotFound, "%s is not supported on this route.", r.Method))
		return
	}
	if !h.originAllowed(r.Header.Get("Origin")) {
		writeEnvelope(w, protocol.Errorf(protocol.CodeForbidden, "This origin may not connect agents.").With("reason", "origin_not_allowed"))
		return
	}
	if !websocket.IsWebSocketUpgrade(r) {
		writeEnvelope(w, protocol.Errorf(protocol.CodeBadRequest, "This route takes a websocket upgrade.").With("reason", "websocket_required"))
		return
	}
	if !slices.Contains(websocket.Subprotocols(r), protocol.Subprotocol) {
		writeEnvelope(w, protocol.Errorf(protocol.CodeBadRequest, "The websocket subprotocol must be %s.", protocol.Subprotocol).With("reason", "subprotocol_required"))
		return
	}
	ws, err := h.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader answered
	}
	ws.SetReadLimit(protocol.MaxFrameBytes)
	requestID := w.Header().Get("X-Request-Id")
	if !h.track() {
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseGoingAway, "server shutting down"), time.Now().Add(time.Second))
		ws.Close()
		return
	}
	// The connection outlives the request: served on its own goroutine, it
	// lets net/http free the request's state and buffers.
	go func() {
		defer h.wg.Done()
		h.serveConn(ws, requestID)
	}()
}

// serveConn runs one connection: hello, then the reader loop here and a
// writer goroutine.
func (h *Hub) serveConn(ws *websocket.Conn, requestID string) {
	log := h.log.WithField("requestId", requestID)
	// Close does not wait out a hello: it ends the read.
	stop := context.AfterFunc(h.ctx, func() { ws.Close() })
	c, err := h.hello(ws, log)
	stop()
	if err != nil {
		var pe *protocol.Error
		if !errors.As(err, &pe) {
			log.WithError(err).Error("agent hello failed")
			pe = protocol.NewError(protocol.CodeInternal)
		}
		data, _ := protocol.EncodeFrame(&protocol.ErrorFrame{Code: pe.Code, Message: pe.Message, Details: pe.Details})
		_ = ws.SetWriteDeadline(time.Now().Add(h.cfg.WriteTimeout))
		_ = ws.WriteMessage(websocket.TextMessage, data)
		_ = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(closeCode(pe.Code), truncateReason(pe.Message)), time.Now().Add(time.Second))
		ws.Close()
		return
	}
	c.log.Info("agent connected")
	h.wg.Add(1)
	go c.writeLoop()
	unruly := c.readLoop()
	current := h.unregister(c)
	if unruly {
		// The error frames queued so far explain the close.
		c.closeAfterQueued(websocket.ClosePolicyViolation, "too many malformed frames")
	} else {
		c.close(websocket.CloseNormalClosure, "")
	}
	c.log.Info("agent disconnected")
	if current {
		h.agentChanged(c, false)
	} else if h.Listener != nil {
		h.Listener.AgentChanged(c.accountID)
	}
}

func closeCode(code protocol.Code) int {
	switch code {
	case protocol.CodeUnauthenticated, protocol.CodeForbidden:
		return websocket.ClosePolicyViolation
	case protocol.CodeInternal:
		return websocket.CloseInternalServerErr
	}
	return websocket.CloseProtocolError
}

func truncateReason(s string) string {
	if len(s) > 120 {
		return s[:120]
	}
	return s
}

// hello reads and checks the first frame, registers the agent and sends welcome.
func (h *Hub) hello(ws *websocket.Conn, log logrus.FieldLogger) (*conn, error) {
	_ = ws.SetReadDeadline(time.Now().Add(h.cfg.HelloTimeout))
	mt, data, err := ws.ReadMessage()
	if err != nil {
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, protocol.Errorf(protocol.CodeTimeout, "No hello within %s.", h.cfg.HelloTimeout)
		}
		return nil, protocol.Errorf(protocol.CodeBadRequest, "The connection ended before hello.")
	}
	if mt != websocket.TextMessage {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "Frames are JSON text messages.").With("reason", "malformed_frame")
	}
	f, err := protocol.DecodeFrame(data)
	if err != nil {
		h.Metrics.FrameIn(frameMalformed)
		return nil, err
	}
	h.Metrics.FrameIn(f.FrameType())
	hello, ok := f.(*protocol.Hello)
	if !ok {
		return nil, protocol.Errorf(protocol.CodeUnauthenticated, "The first frame must be hello.").With("reason", "hello_required")
	}
	if hello.Protocol != protocol.Version {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "Protocol version %d is not supported.", hello.Protocol).
			With("reason", "unsupported_protocol").With("supported", []int{protocol.Version})
	}
	ctx, cancel := context.WithTimeout(h.ctx, 10*time.Second)
	defer cancel()
	user, tok, err := h.auth(ctx, hello.Token)
	if err != nil {
		var pe *protocol.Error
		if errors.As(err, &pe) {
			return nil, protocol.Errorf(protocol.CodeUnauthenticated, "The agent token is not valid.").With("reason", pe.Details["reason"])
		}
		return nil, err
	}
	if tok.Kind != store.TokenAgent {
		return nil, protocol.Errorf(protocol.CodeUnauthenticated, "Agents connect with an agent token.").With("reason", "agent_token_required")
	}
	agent, err := h.store.AgentUpsert(ctx, store.AgentUpsertParams{AccountID: user.AccountID(), ClientID: hello.Agent.ID, Name: hello.Agent.Name,
		Kind: string(hello.Agent.Kind), Version: hello.Agent.Version, Labels: hello.Agent.Labels})
	if err != nil {
		return nil, err
	}
	held, err := h.store.RunHeldList(ctx, agent.ID)
	if err != nil {
		return nil, err
	}
	now := h.Now()
	c := &conn{
		h: h, ws: ws, agentID: agent.ID, accountID: user.AccountID(), info: hello.Agent, sessionID: ids.New(ids.Session),
		send: make(chan []byte, max(h.cfg.SendQueue, 2*hello.Agent.Slots+16)), done: make(chan struct{}), runs: map[string]*heldRun{},
		connectedAt: now, lastSeen: now,
	}
	c.log = log.WithFields(logrus.Fields{"agentId": agent.ID, "accountId": c.accountID, "agentName": hello.Agent.Name})
	welcome := &protocol.Welcome{SessionID: c.sessionID, AgentID: agent.ID, HeartbeatMs: max(h.cfg.LeaseTimeout.Milliseconds()/3, 1),
		LeaseMs: h.cfg.LeaseTimeout.Milliseconds(), Runs: []protocol.HeldRun{}}
	var resend []protocol.Frame
	for _, r := range held {
		hr, err := h.heldFor(ctx, r)
		if err != nil {
			return nil, err
		}
		hr.accepted = r.Status != protocol.RunQueued
		c.runs[r.ID] = hr
		welcome.Runs = append(welcome.Runs, protocol.HeldRun{RunID: r.ID, Attempt: r.Attempt, LeaseID: r.LeaseID, Status: r.Status})
		if r.CancelRequestedAt != nil {
			resend = append(resend, &protocol.Cancel{RunID: r.ID, Reason: "cancel_requested"})
		}
		if r.Status == protocol.RunRunning {
			// An approval resolved while the agent was away.
			aps, _, err := h.store.ApprovalList(ctx, store.ApprovalListParams{RunID: r.ID, Status: protocol.ApprovalApproved, Page: store.Page{Limit: 1}})
			if err == nil && len(aps) > 0 {
				resend = append(resend, &protocol.ApprovalFrame{RunID: r.ID, ApprovalID: aps[0].ID, Approved: true, Comment: aps[0].Comment})
			}
		}
	}
	c.free = max(hello.Agent.Slots-len(held), 0)
	// Queued before the connection is registered: once it is, the
	// dispatcher may push an assign, and welcome must come first.
	c.sendFrame(welcome)
	for _, f := range resend {
		c.sendFrame(f)
	}
	if err := h.register(c); err != nil {
		return nil, err
	}
	h.Kick(c.accountID)
	h.agentChanged(c, true)
	return c, nil
}

// heldFor loads what the hub needs to apply a run's events.
func (h *Hub) heldFor(ctx context.Context, r *store.Run) (*heldRun, error) {
	wf, err := h.store.WorkflowGet(ctx, r.WorkflowID)
	if err != nil {
		return nil, err
	}
	var def protocol.Definition
	if err := json.Unmarshal(wf.Definition, &def); err != nil {
		return nil, err
	}
	hr := &heldRun{leaseID: r.LeaseID, workflow: wf.Name, def: &def}
	for _, name := range r.SecretNames {
		if s, ok := r.Inputs[name].(string); ok && s != "" {
			hr.secrets = append(hr.secrets, s)
		}
	}
	return hr, nil
}

// register adds a connection; an older connection of the same agent is closed.
func (h *Hub) register(c *conn) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return protocol.Errorf(protocol.CodeInternal, "The server is shutting down.")
	}
	old := h.conns[c.agentID]
	h.conns[c.agentID] = c
	if h.byAcct[c.accountID] == nil {
		h.byAcct[c.accountID] = map[string]*conn{}
	}
	h.byAcct[c.accountID][c.agentID] = c
	h.mu.Unlock()
	if old != nil {
		old.sendFrame(&protocol.ErrorFrame{Code: protocol.CodeConflict, Message: "Another connection of this agent took over.", Details: map[string]any{"reason": "session_replaced"}})
		old.closeAfterQueued(websocket.ClosePolicyViolation, "session replaced")
	}
	return nil
}

// unregister removes a connection; it reports false when a newer
// connection of the agent had replaced it.
func (h *Hub) unregister(c *conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conns[c.agentID] == c {
		delete(h.conns, c.agentID)
		delete(h.byAcct[c.accountID], c.agentID)
		if len(h.byAcct[c.accountID]) == 0 {
			delete(h.byAcct, c.accountID)
		}
		return true
	}
	return false
}

// sendFrame queues a frame; a client whose queue is full is disconnected.
func (c *conn) sendFrame(f protocol.Frame) {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		c.log.WithError(err).Error("encode frame")
		return
	}
	c.h.Metrics.FrameOut(f.FrameType())
	select {
	case <-c.done:
	case c.send <- data:
	default:
		c.log.Warn("agent too slow: send queue full, disconnecting")
		go c.close(websocket.CloseTryAgainLater, "too slow")
	}
}

func (c *conn) sendError(err error, runID string) {
	var pe *protocol.Error
	switch {
	case errors.As(err, &pe):
	case databaseUnavailable(c.h.store, err):
		// The database server is down or restarting: the agent keeps the
		// frame (no ack) and sends it again; nothing failed here.
		c.log.WithError(err).WithField("runId", runID).Warn("agent frame refused: database unavailable")
		pe = protocol.DatabaseUnavailable()
	default:
		c.log.WithError(err).WithField("runId", runID).Error("agent frame failed")
		pe = protocol.NewError(protocol.CodeInternal)
	}
	c.sendFrame(&protocol.ErrorFrame{Code: pe.Code, Message: pe.Message, Details: pe.Details, RunID: runID})
}

// close ends the connection once: the writer sends a close frame and stops.
func (c *conn) close(code int, reason string) {
	c.closeOnce.Do(func() {
		close(c.done)
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, reason), time.Now().Add(time.Second))
		c.ws.Close()
	})
}

// closeMark is a queued request to close the connection: the writer sends
// the frames queued before it, then the close frame. A JSON frame never
// starts with a zero byte.
func closeMark(code int, reason string) []byte {
	return append([]byte{0, byte(code >> 8), byte(code)}, reason...)
}

// closeAfterQueued ends the connection once the frames queued so far are
// written (an error frame that explains the close reaches the agent).
func (c *conn) closeAfterQueued(code int, reason string) {
	select {
	case <-c.done:
	case c.send <- closeMark(code, reason):
	default:
		c.close(code, reason)
	}
}

// writeLoop is the only writer of frames; it pings to detect dead peers.
func (c *conn) writeLoop() {
	defer c.h.wg.Done()
	ping := time.NewTicker(max(c.h.cfg.LeaseTimeout/3, 100*time.Millisecond))
	defer ping.Stop()
	for {
		select {
		case <-c.done:
			return
		case data := <-c.send:
			if len(data) >= 3 && data[0] == 0 {
				c.close(int(data[1])<<8|int(data[2]), string(data[3:]))
				return
			}
			_ = c.ws.SetWriteDeadline(time.Now().Add(c.h.cfg.WriteTimeout))
			if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		case <-ping.C:
			if err := c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(c.h.cfg.WriteTimeout)); err != nil {
				c.close(websocket.CloseAbnormalClosure, "")
				return
			}
		}
	}
}

// readLoop reads frames until the connection ends. A peer silent for longer
// than the lease (no frame, no pong) is dropped. It reports whether it gave
// up on a peer that sent too many malformed frames.
func (c *conn) readLoop() (unruly bool) {
	deadline := func() { _ = c.ws.SetReadDeadline(time.Now().Add(c.h.cfg.LeaseTimeout + c.h.cfg.LeaseTimeout/2)) }
	deadline()
	c.ws.SetPongHandler(func(string) error { deadline(); return nil })
	bad := 0
	for {
		mt, data, err := c.ws.ReadMessage()
		if err != nil {
			if errors.Is(err, websocket.ErrReadLimit) {
				c.log.Warn("agent frame over the size limit; closing")
			}
			return false
		}
		deadline()
		c.h.mu.Lock()
		c.lastSeen = c.h.Now()
		c.h.mu.Unlock()
		if mt != websocket.TextMessage {
			c.h.Metrics.FrameIn(frameMalformed)
			c.sendError(protocol.Errorf(protocol.CodeBadRequest, "Frames are JSON text messages.").With("reason", "malformed_frame"), "")
			bad++
		} else if f, err := protocol.DecodeFrame(data); err != nil {
			c.h.Metrics.FrameIn(frameMalformed)
			c.sendError(err, "")
			bad++
		} else {
			c.h.Metrics.FrameIn(f.FrameType())
			c.handle(f)
		}
		if bad > 20 {
			c.log.Warn("too many malformed frames; closing")
			return true
		}
	}
}

// databaseUnavailable reports whether the store says err means its database
// server cannot be reached (sqlstore.DB.Unavailable).
func databaseUnavailable(st any, err error) bool {
	u, ok := st.(interface{ Unavailable(error) bool })
	return ok && u.Unavailable(err)
}
