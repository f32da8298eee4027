// Package agent is the headless agent's protocol client (API.md §9): it
// keeps a websocket connection to the control plane, takes the runs the
// server assigns, executes them with an Executor (the browser) and reports
// their progress as events that stay in an outbox until acknowledged.
//
// Lifecycle:
//
//   - New checks the configuration. Run connects and serves until its ctx
//     ends (a hard stop: runs are cancelled, nothing more is reported) or
//     until Stop has drained the agent; it returns an error only when the
//     server refused the agent for good (a bad token, an unsupported
//     protocol version).
//   - Connections are retried forever with exponential backoff and jitter
//     (capped at Config.MaxBackoff), trying the next server URL when one
//     fails. Runs survive reconnects: after welcome, every run the server
//     still lists is resynchronised by resending its unacknowledged events
//     (same lease, same seqs, in order); every run it no longer lists is
//     stopped and forgotten.
//   - Stop drains: ready{0}, running runs get until Stop's ctx ends to
//     finish (then they are cancelled and finish as cancelled), the outbox
//     is flushed (each event acknowledged) within Config.FlushTimeout, and
//     the connection is closed.
//
// Goroutines: per connection one reader and one writer (the writer also
// sends heartbeats), both reporting to one error channel; per run one
// goroutine (plus one per artifact upload, waited for before the run
// reports finished). Run returns only after all of them ended.
package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/gorilla/websocket"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

// Version is the agent's version in hello.agent.version. Builds may set it
// with -ldflags "-X github.com/copelf/copelf/agent/internal/agent.Version=…".
var Version = ""

func version() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// Config holds the agent's settings.
type Config struct {
	// Servers are the control plane's base URLs (http, https, ws or wss),
	// tried in turn when one fails.
	Servers []string
	// Token is the agent token, sent in hello (never logged).
	Token string
	// ID is the agent's own stable id (see LoadOrCreateID); Name is shown
	// to operators.
	ID, Name string
	// Slots is how many runs the agent executes at once (default 1).
	Slots int
	// Labels are matched against the labels runs ask for.
	Labels map[string]string
	// Executor runs the workflows.
	Executor Executor
	// Log receives the agent's logs (default: logrus' standard logger).
	Log logrus.FieldLogger

	// MinBackoff and MaxBackoff bound the reconnect delay (defaults 500 ms
	// and 30 s).
	MinBackoff, MaxBackoff time.Duration
	// FlushTimeout bounds how long Stop waits for the last events to be
	// acknowledged once no run executes any more (default 10 s).
	FlushTimeout time.Duration
	// HelloTimeout bounds the wait for welcome after hello (default 15 s).
	HelloTimeout time.Duration
	// WriteTimeout bounds one frame write (default 10 s).
	WriteTimeout time.Duration
	// Dialer opens websockets (default: a dialer with a 10 s handshake
	// timeout that honours the proxy environment).
	Dialer *websocket.Dialer
	// HTTPClient uploads artifacts (default: a client of its own).
	HTTPClient *http.Client
	// UploadTimeout bounds the retries of one artifact upload (default 2
	// minutes: long enough to ride out a control plane restart).
	UploadTimeout time.Duration
}

// Agent is the protocol client. Its zero value is not usable; call New.
type Agent struct {
	cfg     Config
	log     logrus.FieldLogger
	servers []*url.URL
	dialer  *websocket.Dialer
	http    *http.Client
	ownHTTP bool

	mu        sync.Mutex
	runs      map[string]*run   // runs this agent holds, by run id
	zombies   map[*run]struct{} // dropped runs whose goroutine has not returned yet
	conn      *conn             // the welcomed connection, nil between connections
	base      *url.URL          // server of the current (or last) connection, for uploads
	agentID   string            // the server's agt_ id, from welcome
	draining  bool
	assigned  uint64 // runs taken so far
	lastReady int    // slots last sent in ready on conn; -1: none yet
	runCtx    context.Context
	changed   chan struct{} // poked when runs end, flush, or are dropped

	runsWG     sync.WaitGroup // run goroutines
	started    atomic.Bool
	stopCtx    context.Context // cancelled once Stop has drained: Run returns
	stopCancel context.CancelFunc
	done       chan struct{} // closed when Run returns
}

// New checks cfg and returns an agent; call Run to start it.
func New(cfg Config) (*Agent, error) {
	if cfg.Token == "" {
		return nil, fmt.Errorf("%w: no agent token (set COPELF_AGENT_TOKEN)", errConfig)
	}
	if !ValidID(cfg.ID) {
		return nil, fmt.Errorf("%w: agent id %q must be 1 to 128 of [A-Za-z0-9._:-]", errConfig, cfg.ID)
	}
	if cfg.Executor == nil {
		return nil, fmt.Errorf("%w: no executor", errConfig)
	}
	if cfg.Slots == 0 {
		cfg.Slots = 1
	}
	if cfg.Slots < 0 || cfg.Slots > 256 {
		return nil, fmt.Errorf("%w: slots must be from 1 to 256", errConfig)
	}
	if len(cfg.Labels) > 32 {
		return nil, fmt.Errorf("%w: at most 32 labels", errConfig)
	}
	if len(cfg.Servers) == 0 {
		return nil, fmt.Errorf("%w: no server URL", errConfig)
	}
	a := &Agent{cfg: cfg, runs: map[string]*run{}, zombies: map[*run]struct{}{}, lastReady: -1,
		changed: make(chan struct{}, 1), done: make(chan struct{})}
	for _, s := range cfg.Servers {
		u, err := parseServer(s)
		if err != nil {
			return nil, err
		}
		a.servers = append(a.servers, u)
	}
	a.base = a.servers[0]
	defaults := []struct {
		d   *time.Duration
		def time.Duration
	}{
		{&a.cfg.MinBackoff, 500 * time.Millisecond}, {&a.cfg.MaxBackoff, 30 * time.Second},
		{&a.cfg.FlushTimeout, 10 * time.Second}, {&a.cfg.HelloTimeout, 15 * time.Second},
		{&a.cfg.WriteTimeout, 10 * time.Second}, {&a.cfg.UploadTimeout, 2 * time.Minute},
	}
	for _, d := range defaults {
		if *d.d <= 0 {
			*d.d = d.def
		}
	}
	a.cfg.MaxBackoff = max(a.cfg.MaxBackoff, a.cfg.MinBackoff)
	a.log = cfg.Log
	if a.log == nil {
		a.log = logrus.StandardLogger()
	}
	a.log = a.log.WithField("clientId", cfg.ID)
	a.dialer = cfg.Dialer
	if a.dialer == nil {
		a.dialer = &websocket.Dialer{Proxy: http.ProxyFromEnvironment, HandshakeTimeout: 10 * time.Second}
	}
	a.http = cfg.HTTPClient
	if a.http == nil {
		a.http = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		a.ownHTTP = true
	}
	a.stopCtx, a.stopCancel = context.WithCancel(context.Background())
	return a, nil
}

// parseServer checks a server base URL.
func parseServer(s string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("%w: server URL %q: %v", errConfig, s, err)
	}
	switch u.Scheme {
	case "http", "https", "ws", "wss":
	default:
		return nil, fmt.Errorf("%w: server URL %q must be http, https, ws or wss", errConfig, s)
	}
	if u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%w: server URL %q must be scheme://host[:port][/path]", errConfig, s)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// connectURL is the websocket endpoint of a server base URL.
func connectURL(base *url.URL) string {
	u := *base
	switch u.Scheme {
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	}
	u.Path += "/v1/agents/connect"
	return u.String()
}

// httpURL is the HTTP base of a server base URL.
func httpURL(base *url.URL) *url.URL {
	u := *base
	switch u.Scheme {
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	}
	return &u
}

// Run connects to the servers and serves runs until ctx ends or Stop has
// drained the agent; then it cancels whatever still runs and waits for every
// goroutine it started. It returns nil then, and an error when a server
// refused the agent for good (see retryable).
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	defer close(a.done)
	if a.ownHTTP {
		defer a.http.CloseIdleConnections()
	}
	a.mu.Lock()
	a.runCtx = ctx
	a.mu.Unlock()
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(a.stopCtx, cancel)()

	err := a.connectLoop(lctx)

	cause := errAgentStopped
	if err != nil {
		cause = err
	}
	a.mu.Lock()
	for _, r := range a.runs {
		r.stop(cause)
	}
	for r := range a.zombies {
		r.stop(cause)
	}
	a.mu.Unlock()
	a.runsWG.Wait()
	return err
}

// connectLoop keeps one connection at a time until ctx ends or a server
// refuses the agent for good.
func (a *Agent) connectLoop(ctx context.Context) error {
	expo := newBackoff(a.cfg.MinBackoff, a.cfg.MaxBackoff)
	next := 0
	var server string
	err := backoff.RetryNotify(func() error {
		u := a.servers[next%len(a.servers)]
		server = u.Redacted()
		welcomed, err := a.session(ctx, u)
		if ctx.Err() != nil {
			return nil
		}
		var pe *protocol.Error
		replaced := errors.As(err, &pe) && reasonOf(pe) == reasonSessionReplaced
		if welcomed && !replaced {
			// A connection that got as far as welcome resets the backoff;
			// the same server is tried again first. (Not when another
			// process with this agent id took over: two agents sharing an
			// id would otherwise take turns at full speed.)
			expo.Reset()
		} else if !welcomed {
			next++
		}
		if err == nil {
			err = errors.New("connection closed")
		}
		return classify(err)
	}, backoff.WithContext(expo, ctx), func(err error, d time.Duration) {
		a.log.WithError(err).WithFields(logrus.Fields{"server": server, "retryIn": d.Round(time.Millisecond).String()}).
			Warn("agent disconnected; reconnecting")
	})
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return &permanentError{server: server, err: err}
	}
	return nil
}

// Stop drains the agent: it takes no new runs (ready{0}), lets running runs
// finish until ctx ends, then cancels those still running (they finish as
// cancelled), waits up to Config.FlushTimeout for every event to be
// acknowledged, and makes Run return. It returns an error when events were
// left unacknowledged (the server will end those runs when their leases
// expire).
func (a *Agent) Stop(ctx context.Context) error {
	a.mu.Lock()
	a.draining = true
	a.sendReadyLocked()
	n := len(a.runs)
	a.mu.Unlock()
	a.log.WithField("runs", n).Info("agent draining")

	if !a.waitFor(ctx, func() bool { return a.executingLocked() == 0 }) {
		a.mu.Lock()
		n := a.executingLocked()
		for _, r := range a.runs {
			if !r.execDone {
				r.stop(errDrainTimeout)
			}
		}
		a.mu.Unlock()
		a.log.WithField("runs", n).Warn("drain grace period over; cancelling runs")
	}
	fctx, cancel := context.WithTimeout(context.Background(), a.cfg.FlushTimeout)
	flushed := a.waitFor(fctx, func() bool { return len(a.runs) == 0 && len(a.zombies) == 0 })
	cancel()
	var err error
	if !flushed {
		a.mu.Lock()
		ids := slices.Sorted(maps.Keys(a.runs))
		a.mu.Unlock()
		err = fmt.Errorf("agent: events of %d runs not acknowledged before stopping: %s", len(ids), strings.Join(ids, ", "))
	}
	a.stopCancel()
	if a.started.Load() {
		<-a.done
	}
	if err == nil {
		a.log.Info("agent drained")
	}
	return err
}

// waitFor waits until cond (called with a.mu held) is true, ctx ends, or
// Run has returned (nothing will change any more).
func (a *Agent) waitFor(ctx context.Context, cond func() bool) bool {
	for {
		a.mu.Lock()
		ok := cond()
		a.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-a.changed:
		case <-ctx.Done():
			return false
		case <-a.done:
			return false
		}
	}
}

// pokeLocked wakes a waitFor.
func (a *Agent) pokeLocked() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// executingLocked counts run goroutines that have not returned.
func (a *Agent) executingLocked() int {
	n := len(a.zombies)
	for _, r := range a.runs {
		if !r.execDone {
			n++
		}
	}
	return n
}

// freeLocked is the free capacity the agent announces in ready.
func (a *Agent) freeLocked() int {
	if a.draining {
		return 0
	}
	return max(a.cfg.Slots-len(a.runs)-len(a.zombies), 0)
}

// sendReadyLocked sends ready when the free capacity differs from what the
// current connection was last told.
func (a *Agent) sendReadyLocked() {
	if a.conn == nil {
		return
	}
	free := a.freeLocked()
	if free == a.lastReady {
		return
	}
	a.lastReady = free
	a.conn.send(&protocol.Ready{Slots: free})
}

// heldRunsLocked lists the runs whose leases the heartbeat keeps.
func (a *Agent) heldRunsLocked() []string {
	return slices.Sorted(maps.Keys(a.runs))
}

// Stop causes.
var (
	errAgentStopped = errors.New("agent stopped")
	errDrainTimeout = errors.New("agent draining: grace period over")
	errTakenAway    = errors.New("the server no longer lists the run for this agent")
	errLeaseLost    = errors.New("the run's lease was lost")
	errRunRefused   = errors.New("the server refused the run's events")
)

// CancelError is the cause of a run context cancelled by the server.
type CancelError struct{ Reason string }

func (e *CancelError) Error() string { return "run cancelled by the server: " + e.Reason }
