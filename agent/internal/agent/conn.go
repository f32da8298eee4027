package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"sort"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

// conn is one welcomed connection. Frames are queued by any goroutine (with
// a.mu held or not) and written by the connection's one writer; the queue is
// not bounded (its content is bounded by the outbox), so a queued frame is
// never dropped while the connection lives.
type conn struct {
	a         *Agent
	ws        *websocket.Conn
	log       logrus.FieldLogger
	welcome   *protocol.Welcome
	done      chan struct{}
	closeOnce sync.Once

	qmu   sync.Mutex
	queue [][]byte
	wake  chan struct{}

	// serverErr is the last error frame not about a run.
	serverErr *protocol.Error
}

// send queues a frame; after close it is dropped (the outbox keeps events).
func (c *conn) send(f protocol.Frame) {
	data, err := protocol.EncodeFrame(f)
	if err != nil {
		c.log.WithError(err).Error("encode frame")
		return
	}
	c.sendRaw(data)
}

func (c *conn) sendRaw(data []byte) {
	select {
	case <-c.done:
		return
	default:
	}
	c.qmu.Lock()
	c.queue = append(c.queue, data)
	c.qmu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) pop() []byte {
	c.qmu.Lock()
	defer c.qmu.Unlock()
	if len(c.queue) == 0 {
		return nil
	}
	data := c.queue[0]
	c.queue[0] = nil
	c.queue = c.queue[1:]
	return data
}

// close ends the connection once, with a close frame.
func (c *conn) close(code int) {
	c.closeOnce.Do(func() {
		close(c.done)
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(code, ""), time.Now().Add(time.Second))
		c.ws.Close()
	})
}

func (c *conn) closed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// session dials u, says hello and serves the connection until it fails or
// ctx ends. welcomed reports whether the server took the hello.
func (a *Agent) session(ctx context.Context, u *url.URL) (welcomed bool, err error) {
	ws, err := a.dial(ctx, u)
	if err != nil {
		return false, err
	}
	w, err := a.hello(ctx, ws)
	if err != nil {
		ws.Close()
		return false, err
	}
	c := &conn{a: a, ws: ws, welcome: w, done: make(chan struct{}), wake: make(chan struct{}, 1),
		log: a.log.WithFields(logrus.Fields{"agentId": w.AgentID, "sessionId": w.SessionID, "server": u.Redacted()})}
	c.log.WithField("heldRuns", len(w.Runs)).Info("agent connected")
	a.attach(c, u)

	// One reader, one writer; each reports once. The first to end (or ctx)
	// closes the connection, which ends the other.
	errc := make(chan error, 2)
	go func() { errc <- c.readLoop() }()
	go func() { errc <- c.writeLoop() }()
	pending := 2
	select {
	case err = <-errc:
		pending--
	case <-ctx.Done():
	}
	a.detach(c)
	c.close(websocket.CloseNormalClosure)
	errs := []error{err}
	for ; pending > 0; pending-- {
		errs = append(errs, <-errc)
	}
	err = errors.Join(errs...)
	if ctx.Err() == nil {
		c.log.WithError(err).Warn("agent connection lost")
	}
	return true, err
}

// dial opens the websocket with the copelf.v1 subprotocol. A refused
// handshake returns the server's envelope as a *protocol.Error.
func (a *Agent) dial(ctx context.Context, u *url.URL) (*websocket.Conn, error) {
	d := *a.dialer
	d.Subprotocols = []string{protocol.Subprotocol}
	ws, resp, err := d.DialContext(ctx, connectURL(u), nil)
	if err != nil {
		if resp != nil && resp.StatusCode != 101 {
			defer resp.Body.Close()
			return nil, responseError(resp)
		}
		return nil, fmt.Errorf("connect %s: %w", u.Redacted(), err)
	}
	if ws.Subprotocol() != protocol.Subprotocol {
		ws.Close()
		return nil, protocol.Errorf(protocol.CodeBadRequest, "The server did not agree to subprotocol %s.", protocol.Subprotocol).With("reason", "subprotocol_required")
	}
	ws.SetReadLimit(protocol.MaxFrameBytes)
	return ws, nil
}

// hello sends hello and reads the answer: welcome, or an error frame.
func (a *Agent) hello(ctx context.Context, ws *websocket.Conn) (*protocol.Welcome, error) {
	stop := context.AfterFunc(ctx, func() { ws.Close() })
	defer stop()
	slots := a.cfg.Slots
	a.mu.Lock()
	if a.draining {
		slots = 0 // nothing new for a draining agent, not even before its ready{0}
	}
	a.mu.Unlock()
	data, err := protocol.EncodeFrame(&protocol.Hello{Protocol: protocol.Version, Token: a.cfg.Token, Agent: protocol.AgentInfo{
		ID: a.cfg.ID, Name: a.cfg.Name, Kind: protocol.AgentHeadless, Version: version(), Slots: slots, Labels: a.cfg.Labels,
	}})
	if err != nil {
		return nil, err
	}
	_ = ws.SetWriteDeadline(time.Now().Add(a.cfg.WriteTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, data); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	_ = ws.SetReadDeadline(time.Now().Add(a.cfg.HelloTimeout))
	_, data, err = ws.ReadMessage()
	if err != nil {
		return nil, fmt.Errorf("wait for welcome: %w", err)
	}
	f, err := protocol.DecodeFrame(data)
	if err != nil {
		return nil, fmt.Errorf("wait for welcome: %w", err)
	}
	switch f := f.(type) {
	case *protocol.Welcome:
		return f, nil
	case *protocol.ErrorFrame:
		return nil, frameError(f)
	}
	return nil, fmt.Errorf("wait for welcome: got a %s frame", f.FrameType())
}

// attach makes c the agent's connection and resynchronises the runs with
// welcome.runs: runs the server still lists under the same lease resend
// their unacknowledged events in order; the others were taken away.
func (a *Agent) attach(c *conn, u *url.URL) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.conn, a.base, a.agentID, a.lastReady = c, u, c.welcome.AgentID, -1
	held := make(map[string]protocol.HeldRun, len(c.welcome.Runs))
	for _, h := range c.welcome.Runs {
		held[h.RunID] = h
	}
	keep := make([]*run, 0, len(a.runs))
	for id, r := range a.runs {
		if h, ok := held[id]; ok && h.LeaseID == r.leaseID {
			keep = append(keep, r)
			delete(held, id)
			continue
		}
		r.log.Warn("the server no longer lists this run for the agent; stopping it")
		a.dropLocked(r, errTakenAway)
	}
	sort.Slice(keep, func(i, j int) bool { return keep[i].order < keep[j].order })
	for _, r := range keep {
		if len(r.outbox) > 0 {
			r.log.WithFields(logrus.Fields{"from": r.outbox[0].seq, "events": len(r.outbox)}).Info("resending unacknowledged events")
		}
		for _, ev := range r.outbox {
			c.sendRaw(ev.data)
		}
	}
	for id := range held {
		c.log.WithField("runId", id).Info("the server lists a run this agent does not know; its lease will expire")
	}
	a.sendReadyLocked()
}

// detach forgets c as the agent's connection.
func (a *Agent) detach(c *conn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conn == c {
		a.conn = nil
	}
}

// readLoop reads frames until the connection ends. A server silent for
// longer than 1.5 leases (no frame, no ping) is considered gone.
func (c *conn) readLoop() error {
	silence := time.Duration(c.welcome.LeaseMs) * time.Millisecond * 3 / 2
	deadline := func() { _ = c.ws.SetReadDeadline(time.Now().Add(silence)) }
	deadline()
	c.ws.SetPingHandler(func(msg string) error {
		deadline()
		err := c.ws.WriteControl(websocket.PongMessage, []byte(msg), time.Now().Add(c.a.cfg.WriteTimeout))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		return err
	})
	for {
		mt, data, err := c.ws.ReadMessage()
		if err != nil {
			if c.closed() {
				return nil
			}
			if se := c.serverErr; se != nil && (se.Code == protocol.CodeUnauthenticated || reasonOf(se) == reasonSessionReplaced) {
				return fmt.Errorf("%w (%w)", se, err)
			}
			return fmt.Errorf("read: %w", err)
		}
		deadline()
		if mt != websocket.TextMessage {
			c.log.Warn("ignoring a binary message")
			continue
		}
		f, err := protocol.DecodeFrame(data)
		if err != nil {
			c.undecodable(data, err)
			continue
		}
		if err := c.a.handle(c, f); err != nil {
			return err
		}
	}
}

// undecodable handles a frame DecodeFrame refused. An assign the agent
// cannot take (e.g. a definition of a newer version) is rejected at once,
// so that the run goes back to the queue instead of waiting for its lease
// to expire; anything else is logged and ignored.
func (c *conn) undecodable(data []byte, err error) {
	var head struct {
		Type    protocol.FrameType `json:"type"`
		RunID   string             `json:"runId"`
		LeaseID string             `json:"leaseId"`
	}
	_ = json.Unmarshal(data, &head)
	if head.Type != protocol.FrameAssign || head.RunID == "" || head.LeaseID == "" {
		c.log.WithError(err).Warn("ignoring a frame the agent cannot decode")
		return
	}
	rej := &protocol.Reject{RunID: head.RunID, LeaseID: head.LeaseID, Reason: RejectUnsupportedDefinition}
	if rej.Validate() != nil {
		c.log.WithError(err).Warn("ignoring an assign the agent cannot decode")
		return
	}
	c.log.WithError(err).WithField("runId", head.RunID).Error("rejecting an assign the agent cannot take")
	c.send(rej)
}

// writeLoop is the connection's only writer of data frames; it also sends a
// heartbeat every welcome.heartbeatMs listing the runs the agent holds.
func (c *conn) writeLoop() error {
	hb := time.NewTicker(time.Duration(c.welcome.HeartbeatMs) * time.Millisecond)
	defer hb.Stop()
	for {
		select {
		case <-c.done:
			return nil
		case <-hb.C:
			c.a.mu.Lock()
			runs := c.a.heldRunsLocked()
			c.a.mu.Unlock()
			c.send(&protocol.Heartbeat{Runs: runs})
		case <-c.wake:
		}
		for data := c.pop(); data != nil; data = c.pop() {
			_ = c.ws.SetWriteDeadline(time.Now().Add(c.a.cfg.WriteTimeout))
			if err := c.ws.WriteMessage(websocket.TextMessage, data); err != nil {
				if c.closed() {
					return nil
				}
				return fmt.Errorf("write: %w", err)
			}
		}
	}
}

// handle applies one frame from the server. An error ends the connection
// (and a reconnect resynchronises every run).
func (a *Agent) handle(c *conn, f protocol.Frame) error {
	switch f := f.(type) {
	case *protocol.Assign:
		a.assign(c, f)
	case *protocol.Ack:
		a.ack(f)
	case *protocol.Cancel:
		a.cancel(f)
	case *protocol.ApprovalFrame:
		a.approval(f)
	case *protocol.ErrorFrame:
		return a.serverError(c, f)
	case *protocol.Heartbeat:
		// The server's answer to ours; the read deadline moved already.
	default:
		c.log.WithField("type", f.FrameType()).Warn("ignoring an unexpected frame")
	}
	return nil
}

// errResync ends a connection so that the next welcome resynchronises.
var errResync = errors.New("resynchronising runs with the server")

// serverError handles an error frame.
func (a *Agent) serverError(c *conn, f *protocol.ErrorFrame) error {
	pe := frameError(f)
	reason := reasonOf(pe)
	log := c.log.WithFields(logrus.Fields{"code": pe.Code, "reason": reason})
	if f.RunID == "" {
		log.WithField("message", pe.Message).Warn("the server reported an error")
		c.serverErr = pe
		return nil
	}
	log = log.WithField("runId", f.RunID)
	switch {
	case pe.Code == protocol.CodeConflict && (reason == protocol.ReasonLeaseLost || reason == reasonRunFinished):
		log.Warn("the server no longer takes this run from the agent; stopping it")
		a.dropRun(f.RunID, errLeaseLost)
	case pe.Code == protocol.CodeConflict && reason == reasonSequenceGap, pe.Code == protocol.CodeInternal:
		// An event was not applied (a transient failure): reconnect, and
		// welcome resends what is unacknowledged, in order.
		log.WithField("message", pe.Message).Warn("an event was not applied; reconnecting to resend")
		return fmt.Errorf("%w: %w", errResync, pe)
	case pe.Code == protocol.CodeForbidden, pe.Code == protocol.CodeBadRequest, pe.Code == protocol.CodeUnprocessableEntity:
		// The server will never apply this run's events: stop it; its
		// lease expires server-side.
		log.WithField("message", pe.Message).Error("the server refused this run's frames; stopping it")
		a.dropRun(f.RunID, errRunRefused)
	default:
		// E.g. an accept refused (timeout, workflow_not_ready): the server
		// forgot the run and answers its next event with lease_lost.
		log.WithField("message", pe.Message).Warn("the server refused a frame of this run")
	}
	return nil
}
