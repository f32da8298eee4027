// Package metrics holds the control plane's Prometheus metrics, on a
// registry of its own (never the global one). Counters and histograms are
// updated where things happen (the API's middleware, the hub, the event
// feed); gauges of the queue and of stuck work are computed from the
// database when scraped, with a short timeout. No metric has an account id
// (or any other unbounded value) as a label.
//
// Every method is safe on a nil *Metrics (metrics off).
package metrics

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Metrics are the control plane's metrics.
type Metrics struct {
	Registry *prometheus.Registry

	httpRequests *prometheus.CounterVec
	httpDuration *prometheus.HistogramVec
	frames       *prometheus.CounterVec
	framesIn     map[protocol.FrameType]prometheus.Counter
	framesOut    map[protocol.FrameType]prometheus.Counter
	dispatch     prometheus.Histogram
	runsFinished *prometheus.CounterVec
	// SSEClients is the number of open event streams.
	SSEClients     prometheus.Gauge
	eventsAppended prometheus.Counter
	eventsDropped  prometheus.Counter
	appendDuration prometheus.Histogram
	subsDropped    prometheus.Counter
}

// frameTypes are the protocol's frame types; others count as "other".
var frameTypes = []protocol.FrameType{
	protocol.FrameHello, protocol.FrameWelcome, protocol.FrameError, protocol.FrameReady, protocol.FrameAssign,
	protocol.FrameAccept, protocol.FrameReject, protocol.FrameEvent, protocol.FrameAck, protocol.FrameApproval,
	protocol.FrameCancel, protocol.FrameHeartbeat,
}

// New returns metrics on a new registry, with the Go runtime and process
// collectors.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "copelf_http_requests_total", Help: "HTTP requests answered, by method, route pattern and status code.",
		}, []string{"method", "route", "code"}),
		httpDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "copelf_http_request_duration_seconds", Help: "Time to answer HTTP requests (event streams excluded), by route pattern.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"route"}),
		frames: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "copelf_ws_frames_total", Help: "Agent websocket frames, by direction (in: from agents, out: to agents) and frame type.",
		}, []string{"direction", "type"}),
		dispatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "copelf_dispatch_latency_seconds", Help: "From the commit of a queued run to its first assign sent to an agent.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}),
		runsFinished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "copelf_runs_finished_total", Help: "Runs that reached a terminal state, by status and error code (\"\" without an error).",
		}, []string{"status", "code"}),
		SSEClients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "copelf_sse_streams", Help: "Open server-sent event streams.",
		}),
		eventsAppended: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "copelf_events_appended_total", Help: "Events appended to the event log.",
		}),
		eventsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "copelf_events_dropped_total", Help: "Events lost: the log's queue was full or an append failed.",
		}),
		appendDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "copelf_events_append_duration_seconds", Help: "Time of one event log append transaction.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		subsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "copelf_sse_subscribers_dropped_total", Help: "Event streams ended because the client fell behind.",
		}),
	}
	reg.MustRegister(m.httpRequests, m.httpDuration, m.frames, m.dispatch, m.runsFinished, m.SSEClients,
		m.eventsAppended, m.eventsDropped, m.appendDuration, m.subsDropped,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.framesIn = map[protocol.FrameType]prometheus.Counter{}
	m.framesOut = map[protocol.FrameType]prometheus.Counter{}
	for _, t := range frameTypes {
		m.framesIn[t] = m.frames.WithLabelValues("in", string(t))
		m.framesOut[t] = m.frames.WithLabelValues("out", string(t))
	}
	m.framesIn["other"] = m.frames.WithLabelValues("in", "other")
	m.framesIn["malformed"] = m.frames.WithLabelValues("in", "malformed")
	m.framesOut["other"] = m.frames.WithLabelValues("out", "other")
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Timeout: 10 * time.Second})
}

// knownMethods are the method labels; anything else is "other".
var knownMethods = map[string]bool{"GET": true, "HEAD": true, "POST": true, "PUT": true, "PATCH": true, "DELETE": true, "OPTIONS": true}

// HTTPRequest counts one answered request. route is the mux pattern that
// served it ("" or "/" when none did: "other").
func (m *Metrics) HTTPRequest(method, route string, status int, d time.Duration, stream bool) {
	if m == nil {
		return
	}
	if !knownMethods[method] {
		method = "other"
	}
	if route == "" || route == "/" {
		route = "other"
	}
	m.httpRequests.WithLabelValues(method, route, strconv.Itoa(status)).Inc()
	if !stream {
		m.httpDuration.WithLabelValues(route).Observe(d.Seconds())
	}
}

// FrameIn counts a frame from an agent ("malformed" when it did not decode).
func (m *Metrics) FrameIn(t protocol.FrameType) {
	if m == nil {
		return
	}
	c, ok := m.framesIn[t]
	if !ok {
		c = m.framesIn["other"]
	}
	c.Inc()
}

// FrameOut counts a frame sent to an agent.
func (m *Metrics) FrameOut(t protocol.FrameType) {
	if m == nil {
		return
	}
	c, ok := m.framesOut[t]
	if !ok {
		c = m.framesOut["other"]
	}
	c.Inc()
}

// Dispatched observes the time from a run's queuing to its first assign.
func (m *Metrics) Dispatched(d time.Duration) {
	if m == nil {
		return
	}
	m.dispatch.Observe(max(d, 0).Seconds())
}

// RunFinished counts a run that reached a terminal state.
func (m *Metrics) RunFinished(status, code string) {
	if m == nil {
		return
	}
	m.runsFinished.WithLabelValues(status, code).Inc()
}

// EventsAppended, EventsDropped and SubscriberDropped make Metrics the
// event broker's events.Observer.
func (m *Metrics) EventsAppended(n int, d time.Duration) {
	if m == nil {
		return
	}
	m.eventsAppended.Add(float64(n))
	m.appendDuration.Observe(d.Seconds())
}

func (m *Metrics) EventsDropped(n int) {
	if m == nil {
		return
	}
	m.eventsDropped.Add(float64(n))
}

func (m *Metrics) SubscriberDropped() {
	if m == nil {
		return
	}
	m.subsDropped.Inc()
}

// QueueSource is what the scrape-time collector reads.
type QueueSource struct {
	Store interface {
		QueueStats(ctx context.Context, p store.QueueStatsParams) (*store.QueueStats, error)
	}
	// Stuck are the thresholds of each state.
	Stuck store.StuckThresholds
	// QueueReason says why an account's queued run with these labels waits
	// (the hub); nil: every waiting run counts as no_agent_connected.
	QueueReason func(accountID string, labels map[string]string) protocol.QueueReason
	// AgentKinds counts the connected agents by kind (the hub); may be nil.
	AgentKinds func() map[string]int
	// Timeout bounds the database reads of one scrape (default 2 s).
	Timeout time.Duration
	Now     func() time.Time
	Log     logrus.FieldLogger
}

// CollectQueue registers the gauges computed at scrape time.
func (m *Metrics) CollectQueue(src QueueSource) {
	if m == nil {
		return
	}
	if src.Timeout <= 0 {
		src.Timeout = 2 * time.Second
	}
	if src.Now == nil {
		src.Now = time.Now
	}
	m.Registry.MustRegister(&queueCollector{src: src})
}

var (
	descDepth = prometheus.NewDesc("copelf_queue_depth", "Queued runs, by queue reason (assigned: claimed by an agent, not accepted yet).", []string{"reason"}, nil)
	descAge   = prometheus.NewDesc("copelf_queue_oldest_age_seconds", "Age of the oldest queued run (0 when none is queued).", nil, nil)
	descStuck = prometheus.NewDesc("copelf_stuck", "Runs (and, for analyzing, workflows) in a state for longer than its threshold, by state.", []string{"state"}, nil)
	descAgent = prometheus.NewDesc("copelf_agents_connected", "Connected agents, by kind.", []string{"kind"}, nil)
	descUp    = prometheus.NewDesc("copelf_queue_stats_up", "1 when the last scrape could read the queue figures from the database.", nil, nil)
)

// Queue reasons reported, in order; "assigned" is the claimed runs.
var reasons = []string{string(protocol.QueueNoAgentConnected), string(protocol.QueueAgentsBusy), string(protocol.QueueNoMatchingAgent), "assigned"}

type queueCollector struct{ src QueueSource }

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descDepth
	ch <- descAge
	ch <- descStuck
	ch <- descAgent
	ch <- descUp
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src.AgentKinds != nil {
		kinds := c.src.AgentKinds()
		for _, k := range []string{string(protocol.AgentHeadless), string(protocol.AgentExtension)} {
			ch <- prometheus.MustNewConstMetric(descAgent, prometheus.GaugeValue, float64(kinds[k]), k)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.src.Timeout)
	defer cancel()
	now := c.src.Now()
	stats, err := c.src.Store.QueueStats(ctx, store.QueueStatsParams{Stuck: c.src.Stuck.Since(now)})
	if err != nil {
		if c.src.Log != nil {
			c.src.Log.WithError(err).Warn("metrics: reading the queue failed")
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, 1)
	depth := map[string]int64{}
	var oldest time.Time
	for _, g := range stats.Groups {
		reason := "assigned"
		if !g.Claimed {
			reason = string(protocol.QueueNoAgentConnected)
			if c.src.QueueReason != nil {
				reason = string(c.src.QueueReason(g.AccountID, g.Labels))
			}
		}
		depth[reason] += g.Count
		if oldest.IsZero() || g.OldestQueuedAt.Before(oldest) {
			oldest = g.OldestQueuedAt
		}
	}
	for _, r := range reasons {
		ch <- prometheus.MustNewConstMetric(descDepth, prometheus.GaugeValue, float64(depth[r]), r)
	}
	age := 0.0
	if !oldest.IsZero() {
		age = max(now.Sub(oldest).Seconds(), 0)
	}
	ch <- prometheus.MustNewConstMetric(descAge, prometheus.GaugeValue, age)
	var total store.StuckCounts
	for _, s := range stats.Stuck {
		total.Queued += s.Queued
		total.Assigned += s.Assigned
		total.Cancelling += s.Cancelling
		total.AwaitingApproval += s.AwaitingApproval
		total.Analyzing += s.Analyzing
	}
	for _, s := range []struct {
		state string
		n     int64
	}{{"queued", total.Queued}, {"assigned", total.Assigned}, {"cancelling", total.Cancelling}, {"awaiting_approval", total.AwaitingApproval}, {"analyzing", total.Analyzing}} {
		ch <- prometheus.MustNewConstMetric(descStuck, prometheus.GaugeValue, float64(s.n), s.state)
	}
}
