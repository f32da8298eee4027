// Package hub is the control plane's side of the agent protocol (API.md §9):
// the websocket endpoint, the registry of connected agents, push dispatch of
// queued runs under leases, and the maintenance loop that expires leases and
// enforces cancel deadlines and timeouts.
//
// Goroutines: one reader (the HTTP handler's) and one writer per connection,
// one dispatcher and one reaper per hub. Close stops them all and waits.
package hub

import (
	"context"
	"encoding/json"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/metrics"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Config holds the hub's settings.
type Config struct {
	// LeaseTimeout bounds accepting an assign and the silence between
	// heartbeats; it is welcome.leaseMs.
	LeaseTimeout time.Duration
	// CancelGrace is how long an agent has to stop a cancelled run before
	// the server ends it; also the grace past a run's timeout.
	CancelGrace time.Duration
	// AllowedOrigins are browser origins allowed to connect; a client with
	// no Origin (a headless agent) is accepted on its token alone.
	AllowedOrigins []string
	// HelloTimeout bounds the wait for the first frame.
	HelloTimeout time.Duration
	// SendQueue is each connection's outgoing queue (at least twice the
	// agent's slots plus 16, so a burst of assigns and acks fits); a client
	// that lets it fill up is disconnected.
	SendQueue int
	// WriteTimeout bounds one frame write.
	WriteTimeout time.Duration
	// SweepInterval is the safety-net dispatch and maintenance period
	// (default LeaseTimeout/4, at most 1 s).
	SweepInterval time.Duration
}

func (c *Config) defaults() {
	if c.LeaseTimeout <= 0 {
		c.LeaseTimeout = 30 * time.Second
	}
	if c.CancelGrace <= 0 {
		c.CancelGrace = c.LeaseTimeout
	}
	if c.HelloTimeout <= 0 {
		c.HelloTimeout = protocol.HelloTimeoutMs * time.Millisecond
	}
	if c.SendQueue <= 0 {
		c.SendQueue = 32
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.SweepInterval <= 0 {
		c.SweepInterval = min(c.LeaseTimeout/4, time.Second)
	}
}

// Authenticator resolves an agent's token.
type Authenticator func(ctx context.Context, token string) (*store.User, *store.Token, error)

// Listener is told about changes the hub makes (for live events).
type Listener interface {
	RunChanged(r *store.Run)
	ApprovalCreated(a *store.Approval)
	AgentChanged(accountID string)
}

// AgentListener, when the Listener implements it, is told which agent
// connected and which disconnected, as GET /v1/agents shows it. A
// connection replaced by a newer one of the same agent is not a disconnect.
type AgentListener interface {
	AgentConnected(a AgentView)
	AgentDisconnected(a AgentView)
}

// agentChanged tells the Listener that c connected or disconnected.
func (h *Hub) agentChanged(c *conn, connected bool) {
	if h.Listener == nil {
		return
	}
	if al, ok := h.Listener.(AgentListener); ok {
		h.mu.Lock()
		v := viewLocked(c)
		h.mu.Unlock()
		if connected {
			al.AgentConnected(v)
		} else {
			al.AgentDisconnected(v)
		}
	}
	h.Listener.AgentChanged(c.accountID)
}

// Hub serves agents.
type Hub struct {
	cfg   Config
	store store.Store
	log   logrus.FieldLogger
	auth  Authenticator
	// Now is the clock.
	Now func() time.Time
	// Listener may be nil.
	Listener Listener
	// Metrics counts frames and dispatch latency; may be nil.
	Metrics *metrics.Metrics

	upgrader websocket.Upgrader

	mu      sync.Mutex
	conns   map[string]*conn            // by server agent id
	byAcct  map[string]map[string]*conn // account → agent id → conn
	pending map[string]bool             // accounts waiting for the dispatcher
	closed  bool

	kick   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// Peers are the other control planes on the same database (package
	// cluster); nil when this one is alone. Set before Start.
	Peers Peers
}

// New returns a hub; call Start before serving.
func New(st store.Store, log logrus.FieldLogger, auth Authenticator, cfg Config) *Hub {
	cfg.defaults()
	h := &Hub{
		cfg: cfg, store: st, log: log, auth: auth, Now: time.Now,
		conns: map[string]*conn{}, byAcct: map[string]map[string]*conn{}, pending: map[string]bool{},
		kick: make(chan struct{}, 1),
	}
	h.upgrader = websocket.Upgrader{
		HandshakeTimeout: 10 * time.Second,
		// Small read buffers, and write buffers only while a frame is
		// being written: an idle agent holds little memory.
		ReadBufferSize:  1024,
		WriteBufferSize: 4096,
		WriteBufferPool: writeBuffers,
		Subprotocols:    []string{protocol.Subprotocol},
		// The origin is checked before Upgrade, with a typed answer.
		CheckOrigin: func(*http.Request) bool { return true },
		Error: func(w http.ResponseWriter, r *http.Request, status int, reason error) {
			writeEnvelope(w, protocol.Errorf(protocol.CodeBadRequest, "The websocket handshake failed: %v.", reason).With("reason", "bad_handshake"))
		},
	}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	return h
}

// writeBuffers are the connections' write buffers, shared.
var writeBuffers = &sync.Pool{}

// track counts a connection's goroutine in the hub's wait group unless the
// hub is closed (Add never races Close's Wait).
func (h *Hub) track() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.wg.Add(1)
	return true
}

// Start gives every live lease a full lease to reconnect (after a restart)
// and starts the dispatcher and the reaper.
func (h *Hub) Start(ctx context.Context) error {
	if err := h.store.RunLeasesExtend(ctx, h.Now().Add(h.cfg.LeaseTimeout)); err != nil {
		return err
	}
	h.wg.Add(2)
	go h.dispatchLoop()
	go h.reapLoop()
	return nil
}

// Close disconnects every agent and stops the loops.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	conns := make([]*conn, 0, len(h.conns))
	for _, c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()
	h.cancel()
	for _, c := range conns {
		c.close(websocket.CloseGoingAway, "server shutting down")
	}
	h.wg.Wait()
}

// Kick asks the dispatcher to look at an account's queue.
func (h *Hub) Kick(accountID string) {
	h.mu.Lock()
	h.pending[accountID] = true
	h.mu.Unlock()
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// RunQueued is called after a run is committed as queued.
func (h *Hub) RunQueued(_ context.Context, r *store.Run) { h.Kick(r.AccountID) }

// RunChanged is called after a run changed through the API: a cancel is
// pushed to the agent that holds the run.
func (h *Hub) RunChanged(_ context.Context, r *store.Run) {
	if r.Status.Terminal() {
		h.releaseRun(r.ID, true, "cancelled")
		return
	}
	if r.CancelRequestedAt != nil {
		if c := h.holder(r.ID); c != nil {
			c.sendFrame(&protocol.Cancel{RunID: r.ID, Reason: "cancel_requested"})
		}
	}
}

// ApprovalResolved pushes the decision to the agent that holds the run.
func (h *Hub) ApprovalResolved(_ context.Context, a *store.Approval) {
	c := h.holder(a.RunID)
	if c == nil {
		return
	}
	c.sendFrame(&protocol.ApprovalFrame{RunID: a.RunID, ApprovalID: a.ID, Approved: a.Status == protocol.ApprovalApproved, Comment: a.Comment})
	if a.Status != protocol.ApprovalApproved {
		// The run failed server-side; the agent stops it.
		h.releaseRun(a.RunID, false, "")
	}
}

// holder returns the connection holding a run, or nil.
func (h *Hub) holder(runID string) *conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.conns {
		if _, ok := c.runs[runID]; ok {
			return c
		}
	}
	return nil
}

// releaseRun forgets a run its holder no longer runs and gives the slot
// back; with cancel, the agent is told to stop.
func (h *Hub) releaseRun(runID string, cancel bool, reason string) {
	h.mu.Lock()
	var holder *conn
	for _, c := range h.conns {
		if _, ok := c.runs[runID]; ok {
			holder = c
			delete(c.runs, runID)
			c.slotBackLocked()
			break
		}
	}
	h.mu.Unlock()
	if holder == nil {
		return
	}
	if cancel {
		holder.sendFrame(&protocol.Cancel{RunID: runID, Reason: reason})
	}
	h.Kick(holder.accountID)
}

// slotBackLocked gives back the slot of a run that left the agent, never
// past the agent's capacity less the runs it still holds. A run listed in
// welcome that the agent did not know (it restarted) was counted free by
// the agent's ready already: when its lease expires, its slot must not come
// back a second time, or the agent is pushed runs it has no room for. An
// undercount lasts until the agent's next ready.
func (c *conn) slotBackLocked() {
	if c.free < c.info.Slots-len(c.runs) {
		c.free++
	}
}

// QueueReason says why a queued run of an account with these required
// labels has not started.
func (h *Hub) QueueReason(accountID string, labels map[string]string) protocol.QueueReason {
	h.mu.Lock()
	defer h.mu.Unlock()
	conns := h.byAcct[accountID]
	if len(conns) == 0 {
		return protocol.QueueNoAgentConnected
	}
	for _, c := range conns {
		if labelsMatch(c.info.Labels, labels) {
			return protocol.QueueAgentsBusy
		}
	}
	return protocol.QueueNoMatchingAgent
}

// AgentView is a connected agent as GET /v1/agents shows it.
type AgentView struct {
	ID          string             `json:"id"`
	ClientID    string             `json:"clientId"`
	Name        string             `json:"name"`
	Kind        protocol.AgentKind `json:"kind"`
	Version     string             `json:"version"`
	AccountID   string             `json:"accountId"`
	Labels      map[string]string  `json:"labels"`
	Slots       int                `json:"slots"`
	FreeSlots   int                `json:"freeSlots"`
	ActiveRuns  []string           `json:"activeRuns"`
	ConnectedAt time.Time          `json:"connectedAt"`
	LastSeenAt  time.Time          `json:"lastSeenAt"`
}

// Agents lists connected agents of an account, or of every account when
// accountID is empty.
func (h *Hub) Agents(accountID string) []AgentView {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := []AgentView{}
	for _, c := range h.conns {
		if accountID != "" && c.accountID != accountID {
			continue
		}
		out = append(out, viewLocked(c))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ConnectedAt.Before(out[j].ConnectedAt) })
	return out
}

// Agent returns a connected agent by its server id.
func (h *Hub) Agent(id string) (AgentView, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.conns[id]
	if !ok {
		return AgentView{}, false
	}
	return viewLocked(c), true
}

// AgentKinds counts the connected agents by kind.
func (h *Hub) AgentKinds() map[string]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]int{}
	for _, c := range h.conns {
		out[string(c.info.Kind)]++
	}
	return out
}

// viewLocked is a connection as GET /v1/agents shows it; h.mu is held.
func viewLocked(c *conn) AgentView {
	runs := make([]string, 0, len(c.runs))
	for id := range c.runs {
		runs = append(runs, id)
	}
	sort.Strings(runs)
	labels := c.info.Labels
	if labels == nil {
		labels = map[string]string{}
	}
	return AgentView{ID: c.agentID, ClientID: c.info.ID, Name: c.info.Name, Kind: c.info.Kind, Version: c.info.Version,
		AccountID: c.accountID, Labels: labels, Slots: c.info.Slots, FreeSlots: max(c.free, 0), ActiveRuns: runs,
		ConnectedAt: c.connectedAt, LastSeenAt: c.lastSeen}
}

// labelsMatch: every label a run requires is on the agent.
func labelsMatch(agent, required map[string]string) bool {
	for k, v := range required {
		if agent[k] != v {
			return false
		}
	}
	return true
}

func (h *Hub) originAllowed(origin string) bool {
	if origin == "" {
		return true
	}
	for _, o := range h.cfg.AllowedOrigins {
		if o == "*" || strings.EqualFold(o, origin) {
			return true
		}
	}
	return false
}

// writeEnvelope answers a refused handshake with the error envelope.
func writeEnvelope(w http.ResponseWriter, e *protocol.Error) {
	out := *e
	out.RequestID = w.Header().Get("X-Request-Id")
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(out.Code.HTTPStatus())
	_ = json.NewEncoder(w).Encode(&out)
}

// List is Agents for the API's directory.
func (h *Hub) List(accountID string) any { return h.Agents(accountID) }
