package api

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/metrics"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Server-sent events (API.md §10): GET /v1/events and GET /v1/runs/{id}/events.
//
// Every event is
//
//	id: <event id>
//	event: <type>
//	data: {"id":…,"type":…,"accountId":…,"at":…,"data":<the resource as the REST API shows it>}
//
// A stream starts with "retry: 2000". GET /v1/events resumes after
// Last-Event-ID (header, or ?lastEventId=): every later stored event is
// replayed, then the live ones, none twice; without it the stream starts with
// the events after the latest one. A comment line ": keep-alive" is sent
// when the stream has been idle for Config.KeepAlive.

// DefaultKeepAlive is the default idle time before a keep-alive comment.
const DefaultKeepAlive = 15 * time.Second

// sseRetryMs is the reconnection delay the streams announce.
const sseRetryMs = 2000

// sseWriteTimeout bounds one write to a stream: a client that reads nothing
// for that long is dropped.
const sseWriteTimeout = 15 * time.Second

// eventEnvelope is the data line of an event.
type eventEnvelope struct {
	ID        int64           `json:"id"`
	Type      string          `json:"type"`
	AccountID string          `json:"accountId"`
	At        string          `json:"at"`
	Data      json.RawMessage `json:"data"`
}

// sse writes one stream.
type sse struct {
	w    http.ResponseWriter
	rc   *http.ResponseController
	buf  []byte
	sent int64 // the id of the last event written
}

func startSSE(w http.ResponseWriter) *sse {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // proxies must not buffer the stream
	w.WriteHeader(http.StatusOK)
	s := &sse{w: w, rc: http.NewResponseController(w)}
	s.buf = append(s.buf, "retry: "+strconv.Itoa(sseRetryMs)+"\n\n"...)
	return s
}

// event buffers one event; flush sends the buffer.
func (s *sse) event(ev *store.Event) {
	data, _ := json.Marshal(eventEnvelope{ID: ev.ID, Type: ev.Type, AccountID: ev.AccountID, At: ev.CreatedAt.UTC().Format(time.RFC3339Nano), Data: ev.Data})
	s.buf = append(s.buf, "id: "...)
	s.buf = strconv.AppendInt(s.buf, ev.ID, 10)
	s.buf = append(s.buf, "\nevent: "...)
	s.buf = append(s.buf, ev.Type...)
	s.buf = append(s.buf, "\ndata: "...)
	s.buf = append(s.buf, data...)
	s.buf = append(s.buf, "\n\n"...)
	s.sent = max(s.sent, ev.ID)
}

func (s *sse) comment(text string) { s.buf = append(s.buf, ": "+text+"\n\n"...) }

func (s *sse) flush() error {
	if len(s.buf) == 0 {
		return nil
	}
	_ = s.rc.SetWriteDeadline(time.Now().Add(sseWriteTimeout))
	_, err := s.w.Write(s.buf)
	s.buf = s.buf[:0]
	if err == nil {
		err = s.rc.Flush()
	}
	return err
}

// eventTypes reads ?types= (a comma list of run, batch, approval, agent);
// nil means every type.
func eventTypes(q string) (map[string]bool, error) {
	if q == "" {
		return nil, nil
	}
	out := map[string]bool{}
	for _, c := range strings.Split(q, ",") {
		switch strings.TrimSpace(c) {
		case "run":
			out[events.RunUpdated] = true
		case "batch":
			out[events.BatchUpdated] = true
		case "approval":
			out[events.ApprovalUpdated] = true
		case "agent":
			out[events.AgentConnected], out[events.AgentDisconnected], out[events.AgentUpdated] = true, true, true
		default:
			return nil, badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "types", Problem: "must be a comma-separated list of run, batch, approval and agent"})
		}
	}
	return out, nil
}

// lastEventID reads the Last-Event-ID header, or ?lastEventId=.
func lastEventID(r *http.Request) (int64, bool, error) {
	field, v := "Last-Event-ID", r.Header.Get("Last-Event-ID")
	if v == "" {
		field, v = "lastEventId", r.URL.Query().Get("lastEventId")
	}
	if v == "" {
		return 0, false, nil
	}
	id, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || id < 0 {
		return 0, false, badRequest("The last event id is invalid.", protocol.FieldProblem{Field: field, Problem: "must be a non-negative whole number"})
	}
	return id, true, nil
}

// streamAccount is the account a principal's stream or queue view covers:
// members their own; operators every account ("") unless ?accountId= names
// one.
func streamAccount(r *http.Request, p *Principal, what string) (string, error) {
	q := r.URL.Query().Get("accountId")
	if p.Can(store.RoleOperator) {
		return q, nil
	}
	if q != "" && q != p.AccountID() {
		return "", protocol.Errorf(protocol.CodeForbidden, "Only operators see other accounts' %s.", what).With("requiredRole", store.RoleOperator)
	}
	return p.AccountID(), nil
}

func (s *Server) eventsOff() error {
	return protocol.Errorf(protocol.CodeNotFound, "Live events are not enabled on this server.").With("reason", "events_disabled")
}

// streamEvents is GET /v1/events.
func (s *Server) streamEvents(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	account, err := streamAccount(r, p, "events")
	if err != nil {
		return err
	}
	types, err := eventTypes(r.URL.Query().Get("types"))
	if err != nil {
		return err
	}
	after, resume, err := lastEventID(r)
	if err != nil {
		return err
	}
	if s.Events == nil {
		return s.eventsOff()
	}
	if r.Method == http.MethodHead {
		startSSE(w)
		return nil
	}
	filter := events.Filter{AccountID: account, Types: types}
	sub := s.Events.Subscribe(filter)
	defer sub.Close()
	// Without Last-Event-ID the stream starts after the latest stored
	// event, which the tail may not have delivered yet.
	start := sub.From
	if !resume {
		latest, err := s.Events.LatestID(r.Context(), "")
		if err != nil {
			return err
		}
		start = max(start, latest)
	}
	out := startSSE(w)
	out.sent = start
	if resume {
		out.sent = after
		if !s.replay(r, out, filter, after, sub.From, nil) {
			return nil
		}
	}
	s.pump(r, out, sub, nil)
	return nil
}

// pump writes a subscription's events until the client leaves, the broker
// closes, the subscriber falls behind, or stop says the stream is over.
func (s *Server) pump(r *http.Request, out *sse, sub *events.Subscription, stop func(*store.Event) bool) {
	if s.metrics != nil {
		s.metrics.SSEClients.Inc()
		defer s.metrics.SSEClients.Dec()
	}
	if out.flush() != nil {
		return
	}
	keepAlive := s.cfg.KeepAlive
	if keepAlive <= 0 {
		keepAlive = DefaultKeepAlive
	}
	idle := time.NewTimer(keepAlive)
	defer idle.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-sub.Done():
			return
		case <-idle.C:
			out.comment("keep-alive")
		case ev := <-sub.C():
			done := false
			// Write what is queued in one go.
			for more := true; more; {
				if ev.ID > out.sent {
					out.event(ev)
					if stop != nil && stop(ev) {
						done = true
						break
					}
				}
				select {
				case ev = <-sub.C():
				default:
					more = false
				}
			}
			if done {
				_ = out.flush()
				return
			}
		}
		if err := out.flush(); err != nil {
			return
		}
		idle.Reset(keepAlive)
	}
}

// streamRunEvents is GET /v1/runs/{id}/events: the run's current state,
// then its changes; the stream ends after a terminal state.
func (s *Server) streamRunEvents(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	run, err := s.visibleRun(r, p)
	if err != nil {
		return err
	}
	after, _, err := lastEventID(r)
	if err != nil {
		return err
	}
	if s.Events == nil {
		return s.eventsOff()
	}
	if r.Method == http.MethodHead {
		startSSE(w)
		return nil
	}
	if run.Status.Terminal() {
		return s.replayRunEvents(w, r, run, after)
	}
	sub := s.Events.Subscribe(events.Filter{RunID: run.ID, Types: map[string]bool{events.RunUpdated: true}})
	defer sub.Close()
	// The latest stored event first, then the state: every event up to
	// that id describes a state committed before the read.
	latest, err := s.Events.LatestID(r.Context(), run.ID)
	if err != nil {
		return err
	}
	if run, err = s.store.RunGet(r.Context(), run.ID); err != nil {
		return err
	}
	data, err := json.Marshal(s.viewRun(run))
	if err != nil {
		return err
	}
	out := startSSE(w)
	out.event(&store.Event{ID: latest, Type: events.RunUpdated, AccountID: run.AccountID, SubjectID: run.ID, RunID: run.ID, Data: data, CreatedAt: s.Now()})
	out.sent = max(latest, sub.From)
	if run.Status.Terminal() {
		_ = out.flush()
		return nil
	}
	s.pump(r, out, sub, func(ev *store.Event) bool { return runDataTerminal(ev.Data) })
	return nil
}

// replayRunEvents answers GET /v1/runs/{id}/events for a finished run
// (API.md §12): the run's stored events after Last-Event-ID, then the
// stream closes. When none is left (pruned, or all seen before) and the
// client has not seen the end, the final state is sent as the last event.
func (s *Server) replayRunEvents(w http.ResponseWriter, r *http.Request, run *store.Run, after int64) error {
	latest, err := s.Events.LatestID(r.Context(), run.ID)
	if err != nil {
		return err
	}
	out := startSSE(w)
	out.sent = after
	sawEnd := false
	filter := events.Filter{RunID: run.ID, Types: map[string]bool{events.RunUpdated: true}}
	if !s.replay(r, out, filter, after, latest, func(ev *store.Event) { sawEnd = runDataTerminal(ev.Data) }) {
		return nil
	}
	if !sawEnd && (after < latest || latest == 0) {
		data, err := json.Marshal(s.viewRun(run))
		if err != nil {
			return err
		}
		out.event(&store.Event{ID: latest, Type: events.RunUpdated, AccountID: run.AccountID, SubjectID: run.ID, RunID: run.ID, Data: data, CreatedAt: s.Now()})
	}
	_ = out.flush()
	return nil
}

// replay writes the stored events of filter after id after, up to until, to
// out, flushing every 64 KiB; each, when set, sees every event written. It
// reports false when the replay failed (logged; the stream ends).
func (s *Server) replay(r *http.Request, out *sse, filter events.Filter, after, until int64, each func(*store.Event)) bool {
	err := s.Events.Replay(r.Context(), filter, after, until, func(ev *store.Event) error {
		out.event(ev)
		if each != nil {
			each(ev)
		}
		if len(out.buf) < 64<<10 {
			return nil
		}
		return out.flush()
	})
	if err != nil && r.Context().Err() == nil {
		s.log.WithError(err).WithField("requestId", RequestID(r.Context())).Warn("event stream: replay failed")
	}
	return err == nil
}

// runDataTerminal reports whether a run.updated event's data holds a
// terminal state.
func runDataTerminal(data []byte) bool {
	var v struct {
		Status protocol.RunStatus `json:"status"`
	}
	return json.Unmarshal(data, &v) == nil && v.Status.Terminal()
}

// Feed turns the changes the API and the hub make into events: it is the
// hub's Listener, and Hooks returns its side of the API's hooks. Approvals
// are published as they were at the change; a run's state and a batch's
// progress are read when the event log's writer flushes, once per flush
// however often they changed.
type Feed struct {
	s *Server
	b *events.Broker
	m *metrics.Metrics
	// BatchInterval is the least time between two events of one batch
	// (default DefaultBatchInterval): a batch's event holds every
	// iteration, and its runs may change hundreds of times a second. The
	// last change is always published.
	BatchInterval time.Duration

	mu           sync.Mutex
	runChanges   map[string]int  // changes of each run waiting for the writer
	finished     map[string]bool // runs counted as finished (a bounded set)
	order        []string
	batchLast    map[string]time.Time // when each batch's event was last published
	batchPending map[string]bool      // batches with an event scheduled
}

// DefaultBatchInterval is the default Feed.BatchInterval.
const DefaultBatchInterval = 250 * time.Millisecond

// NewFeed returns the feed of s (whose Events must be set).
func NewFeed(s *Server) *Feed {
	f := &Feed{s: s, b: s.Events, m: s.metrics, BatchInterval: DefaultBatchInterval, runChanges: map[string]int{},
		finished: map[string]bool{}, batchLast: map[string]time.Time{}, batchPending: map[string]bool{}}
	s.feed = f // the API publishes what no hook carries (a batch's creation)
	return f
}

var (
	_ hub.Listener      = (*Feed)(nil)
	_ hub.AgentListener = (*Feed)(nil)
)

// Run publishes a change of a run: one event per change, holding the run
// as the log's writer reads it when it flushes, not as r holds it. Changes
// to one run are committed by several goroutines (the hub's connections,
// API requests, the reaper) whose publications may reach the log in
// another order than their commits; read at flush time, the states in the
// log only move forward, and a stream never shows a run going back to an
// earlier state. The run is read once per flush however many of its
// changes wait.
func (f *Feed) Run(r *store.Run) { f.RunByID(r.ID) }

func (f *Feed) runItem(r *store.Run) events.Item {
	return events.Item{AccountID: r.AccountID, Type: events.RunUpdated, SubjectID: r.ID, RunID: r.ID, Data: f.s.viewRun(r)}
}

// after publishes what a run's change changes besides the run: its batch,
// its agent, and the finished count.
func (f *Feed) after(r *store.Run) {
	if r.BatchID != "" {
		f.Batch(r.BatchID)
	}
	if r.AgentID != "" {
		f.agent(r.AgentID)
	}
	if r.Status.Terminal() && f.firstFinish(r.ID) && f.m != nil {
		code := ""
		if r.Error != nil {
			code = string(r.Error.Code)
		}
		f.m.RunFinished(string(r.Status), code)
	}
}

// maxFinished bounds the set of runs remembered as counted.
const maxFinished = 8192

func (f *Feed) firstFinish(runID string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.finished[runID] {
		return false
	}
	f.finished[runID] = true
	f.order = append(f.order, runID)
	if len(f.order) > maxFinished {
		delete(f.finished, f.order[0])
		f.order = f.order[1:]
	}
	return true
}

// RunByID publishes a change of the run runID (see Run).
func (f *Feed) RunByID(runID string) {
	f.mu.Lock()
	f.runChanges[runID]++
	f.mu.Unlock()
	// One builder per run and flush (the key): it emits an event for each
	// change counted when it runs, from one read.
	f.b.PublishLazy("run:"+runID, func(ctx context.Context) ([]events.Item, error) {
		// Count first, then read: the state read includes every change
		// counted (each was committed before it was published).
		f.mu.Lock()
		n := f.runChanges[runID]
		delete(f.runChanges, runID)
		f.mu.Unlock()
		if n == 0 {
			return nil, nil // an earlier flush's builder took these changes
		}
		r, err := f.s.store.RunGet(ctx, runID)
		if err != nil {
			return nil, err
		}
		f.after(r)
		it := f.runItem(r)
		items := make([]events.Item, n)
		for i := range items {
			items[i] = it
		}
		return items, nil
	})
}

// Batch publishes a batch's state as it is when the log's writer flushes,
// at most once per BatchInterval: a change within the interval of the last
// event is published when the interval ends.
func (f *Feed) Batch(batchID string) {
	f.mu.Lock()
	if f.batchPending[batchID] {
		f.mu.Unlock()
		return
	}
	now := time.Now()
	wait := time.Until(f.batchLast[batchID].Add(f.BatchInterval))
	if wait <= 0 {
		f.batchLast[batchID] = now
		if len(f.batchLast) > 4096 {
			for id, at := range f.batchLast {
				if now.Sub(at) > f.BatchInterval {
					delete(f.batchLast, id)
				}
			}
		}
		f.mu.Unlock()
		f.publishBatch(batchID)
		return
	}
	f.batchPending[batchID] = true
	f.mu.Unlock()
	time.AfterFunc(wait, func() {
		f.mu.Lock()
		delete(f.batchPending, batchID)
		f.batchLast[batchID] = time.Now()
		f.mu.Unlock()
		f.publishBatch(batchID)
	})
}

func (f *Feed) publishBatch(batchID string) {
	f.b.PublishLazy("batch:"+batchID, func(ctx context.Context) ([]events.Item, error) {
		b, err := f.s.store.BatchGet(ctx, batchID)
		if err != nil {
			return nil, err
		}
		current, err := f.s.workflowSecrets(ctx, b.WorkflowID)
		if err != nil {
			return nil, err
		}
		return []events.Item{{AccountID: b.AccountID, Type: events.BatchUpdated, SubjectID: b.ID, Data: viewBatch(b, batchSecrets(b, current))}}, nil
	})
}

// Approval publishes an approval's state.
func (f *Feed) Approval(a *store.Approval) {
	f.b.Publish(events.Item{AccountID: a.AccountID, Type: events.ApprovalUpdated, SubjectID: a.ID, Data: a})
}

// agentLookup finds one connected agent (the hub).
type agentLookup interface {
	Agent(id string) (hub.AgentView, bool)
}

// agent publishes a connected agent's state (slots, runs) at the next flush.
func (f *Feed) agent(agentID string) {
	look, ok := f.s.Agents.(agentLookup)
	if !ok {
		return
	}
	f.b.PublishLazy("agent:"+agentID, func(context.Context) ([]events.Item, error) {
		a, ok := look.Agent(agentID)
		if !ok {
			return nil, nil
		}
		return []events.Item{{AccountID: a.AccountID, Type: events.AgentUpdated, SubjectID: a.ID, Data: a}}, nil
	})
}

// RunChanged is the hub's run change (hub.Listener).
func (f *Feed) RunChanged(r *store.Run) { f.Run(r) }

// ApprovalCreated is the hub's new approval (hub.Listener).
func (f *Feed) ApprovalCreated(a *store.Approval) { f.Approval(a) }

// AgentChanged is covered by AgentConnected and AgentDisconnected.
func (f *Feed) AgentChanged(string) {}

// AgentConnected publishes agent.connected (hub.AgentListener).
func (f *Feed) AgentConnected(a hub.AgentView) {
	f.b.Publish(events.Item{AccountID: a.AccountID, Type: events.AgentConnected, SubjectID: a.ID, Data: a})
}

// AgentDisconnected publishes agent.disconnected (hub.AgentListener).
func (f *Feed) AgentDisconnected(a hub.AgentView) {
	f.b.Publish(events.Item{AccountID: a.AccountID, Type: events.AgentDisconnected, SubjectID: a.ID, Data: a})
}

// Hooks is the feed's side of the API's hooks.
func (f *Feed) Hooks() Hooks { return feedHooks{f} }

type feedHooks struct{ f *Feed }

func (h feedHooks) RunQueued(_ context.Context, r *store.Run)  { h.f.Run(r) }
func (h feedHooks) RunChanged(_ context.Context, r *store.Run) { h.f.Run(r) }
func (h feedHooks) ApprovalResolved(_ context.Context, a *store.Approval) {
	h.f.Approval(a)
	h.f.RunByID(a.RunID) // approved → running, rejected → failed
}

// ChainHooks calls each of hooks in turn.
func ChainHooks(hooks ...Hooks) Hooks { return hookChain(hooks) }

type hookChain []Hooks

func (c hookChain) RunQueued(ctx context.Context, r *store.Run) {
	for _, h := range c {
		h.RunQueued(ctx, r)
	}
}

func (c hookChain) RunChanged(ctx context.Context, r *store.Run) {
	for _, h := range c {
		h.RunChanged(ctx, r)
	}
}

func (c hookChain) ApprovalResolved(ctx context.Context, a *store.Approval) {
	for _, h := range c {
		h.ApprovalResolved(ctx, a)
	}
}
