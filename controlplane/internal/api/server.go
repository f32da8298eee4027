// Package api is the control plane's JSON HTTP API (API.md §1–§8). Every
// handler returns an error; one place turns errors into the catalog's
// envelope, so no route can answer with a bare string, an HTML page or an
// internal detail.
package api

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/metrics"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/video"
	"github.com/copelf/copelf/protocol"
)

// MaxBodyBytes bounds every JSON request body.
const MaxBodyBytes = 1 << 20

// Config holds the API's settings.
type Config struct {
	// SessionTTL is how long a sign-in session lasts.
	SessionTTL time.Duration
	// RunCost is the credits a run costs.
	RunCost int64
	// SecureCookies marks the session cookie Secure (behind HTTPS).
	SecureCookies bool
	// DataDir holds artifacts (DataDir/artifacts/<runId>/<name>).
	DataDir string
	// MaxArtifactBytes bounds one artifact upload (default 10 MiB).
	MaxArtifactBytes int64

	// Prices are the credit packs on sale (-prices); nil: none.
	Prices *billing.Prices
	// Stripe makes the checkout, customer and portal calls; nil: billing
	// is not configured and those routes answer checkout_failed
	// (details.reason "billing_not_configured").
	Stripe *billing.Stripe
	// Sessions tells the success page whether a Checkout Session is paid;
	// nil: Stripe.
	Sessions billing.SessionStatuser
	// WebhookSecret verifies the webhook's Stripe-Signature; "": the
	// webhook answers checkout_failed (billing_not_configured).
	WebhookSecret string
	// PublicURL is where Stripe sends customers back to (success, cancel
	// and portal return pages); "": the scheme and host of the request.
	PublicURL string

	// Videos keeps uploaded recordings; nil: a directory "videos" in DataDir.
	Videos video.Store
	// AnalysisTimeout is how long a workflow may stay analyzing
	// (default DefaultAnalysisTimeout); see RunAnalysisReaper.
	AnalysisTimeout time.Duration
	// VideoIdleTimeout cuts an upload that brings no byte for this long;
	// VideoUploadTimeout bounds a whole upload (defaults
	// DefaultVideoIdleTimeout, DefaultVideoUploadTimeout).
	VideoIdleTimeout, VideoUploadTimeout time.Duration

	// KeepAlive is the idle time after which an event stream sends a
	// keep-alive comment (default DefaultKeepAlive).
	KeepAlive time.Duration
	// Stuck are the thresholds after which work counts as stuck
	// (GET /v1/queue, metrics); zero durations: never.
	Stuck store.StuckThresholds
	// Metrics are the metrics the middleware and /metrics use; nil: New
	// makes its own.
	Metrics *metrics.Metrics

	// SignInPerAccount and SignInPerAddress bound sign-in attempts per
	// email and per client address (zero: DefaultSignInPerAccount,
	// DefaultSignInPerAddress); past them POST /v1/sessions is rate_limited.
	SignInPerAccount, SignInPerAddress RateLimit
}

// Server serves the API.
type Server struct {
	store store.Store
	log   logrus.FieldLogger
	cfg   Config
	// Now is the clock; tests may replace it.
	Now func() time.Time
	// Hooks are told about state changes (dispatch, events); may be nil.
	Hooks Hooks
	// Agents answers questions about connected agents; may be nil.
	Agents AgentDirectory
	// Events is the event log behind GET /v1/events; nil: those routes
	// answer not_found.
	Events *events.Broker

	metrics *metrics.Metrics
	// feed is the event feed, when NewFeed made one.
	feed *Feed

	mux    *http.ServeMux
	signIn *signInLimiter
}

// Hooks lets other parts of the control plane react to changes made through
// the API, after they are committed.
type Hooks interface {
	RunQueued(ctx context.Context, r *store.Run)
	RunChanged(ctx context.Context, r *store.Run)
	ApprovalResolved(ctx context.Context, a *store.Approval)
}

// AgentDirectory knows the connected agents.
type AgentDirectory interface {
	// QueueReason says why a queued run with these required labels waits.
	QueueReason(accountID string, labels map[string]string) protocol.QueueReason
	// List returns connected agents of an account, or of all when "".
	List(accountID string) any
}

// New returns a Server on st.
func New(st store.Store, log logrus.FieldLogger, cfg Config) *Server {
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.DataDir == "" {
		cfg.DataDir = filepath.Join(os.TempDir(), "copelf-data")
	}
	if cfg.MaxArtifactBytes <= 0 {
		cfg.MaxArtifactBytes = 10 << 20
	}
	cfg.Videos = videoStore(cfg, log)
	if cfg.AnalysisTimeout <= 0 {
		cfg.AnalysisTimeout = DefaultAnalysisTimeout
	}
	if cfg.VideoIdleTimeout <= 0 {
		cfg.VideoIdleTimeout = DefaultVideoIdleTimeout
	}
	if cfg.VideoUploadTimeout <= 0 {
		cfg.VideoUploadTimeout = DefaultVideoUploadTimeout
	}
	s := &Server{store: st, log: log, cfg: cfg, Now: time.Now, mux: http.NewServeMux(),
		signIn: newSignInLimiter(cfg.SignInPerAccount, cfg.SignInPerAddress)}
	s.metrics = cfg.Metrics
	if s.metrics == nil {
		s.metrics = metrics.New()
	}
	s.metrics.CollectQueue(metrics.QueueSource{Store: st, Stuck: cfg.Stuck, Log: log, Now: func() time.Time { return s.Now() },
		QueueReason: func(accountID string, labels map[string]string) protocol.QueueReason {
			if s.Agents == nil {
				return protocol.QueueNoAgentConnected
			}
			return s.Agents.QueueReason(accountID, labels)
		},
		AgentKinds: func() map[string]int {
			if k, ok := s.Agents.(interface{ AgentKinds() map[string]int }); ok {
				return k.AgentKinds()
			}
			return nil
		}})
	s.routes()
	return s
}

// Metrics returns the server's metrics (for the hub and a -metrics-addr
// listener).
func (s *Server) Metrics() *metrics.Metrics { return s.metrics }

// handlerFunc is an API handler: it writes a response or returns an error.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

// methods maps HTTP methods to handlers for one path.
type methods map[string]handlerFunc

// handle registers a path. A method the path does not take answers 404
// not_found with an Allow header (API.md §12).
func (s *Server) handle(pattern string, m methods) {
	allowed := make([]string, 0, len(m))
	for k := range m {
		allowed = append(allowed, k)
	}
	sort.Strings(allowed)
	allow := strings.Join(allowed, ", ")
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		h, ok := m[r.Method]
		if !ok && r.Method == http.MethodHead {
			h, ok = m[http.MethodGet]
		}
		if !ok {
			w.Header().Set("Allow", allow)
			s.writeError(w, r, protocol.Errorf(protocol.CodeNotFound, "%s is not supported on this route.", r.Method).With("allow", allowed))
			return
		}
		if err := h(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

// ServeHTTP runs the middleware chain and the routes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.middleware(http.HandlerFunc(s.route)).ServeHTTP(w, r)
}

// route answers paths that are not in clean form with not_found (the mux
// would redirect them with an HTML body), then hands over to the mux.
func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if strings.Contains(p, "//") || strings.Contains(p, "/./") || strings.Contains(p, "/../") ||
		strings.HasSuffix(p, "/.") || strings.HasSuffix(p, "/..") {
		s.writeError(w, r, protocol.Errorf(protocol.CodeNotFound, "No route matches this path."))
		return
	}
	s.mux.ServeHTTP(w, r)
}

// Handle mounts an extra handler (websocket, dashboard) on the API's mux,
// inside its middleware.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

func (s *Server) routes() {
	// Everything unknown: not_found.
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, r, protocol.Errorf(protocol.CodeNotFound, "No route matches %s.", r.URL.Path))
	})
	s.handle("/healthz", methods{"GET": s.healthz})
	s.handle("/metrics", methods{"GET": s.getMetrics})
	s.handle("/v1/openapi.yaml", methods{"GET": s.openapi})

	s.handle("/v1/users", methods{"POST": s.createUser})
	s.handle("/v1/sessions", methods{"POST": s.createSession})
	s.handle("/v1/sessions/current", methods{"DELETE": s.deleteSession})
	s.handle("/v1/tokens", methods{"POST": s.createToken, "GET": s.listTokens})
	s.handle("/v1/tokens/{id}", methods{"DELETE": s.revokeToken})
	s.handle("/v1/me", methods{"GET": s.me})

	s.handle("/v1/workflows", methods{"POST": s.createWorkflow, "GET": s.listWorkflows})
	s.handle("/v1/workflows/{id}", methods{"GET": s.getWorkflow, "PATCH": s.updateWorkflow, "DELETE": s.deleteWorkflow})
	s.handle("/v1/workflows/{id}/video", methods{"GET": s.getVideo, "PUT": s.putVideo})
	s.handle("/v1/workflows/{id}/analysis", methods{"POST": s.postAnalysis})
	s.handle("/v1/workflows/{id}/analysis/claim", methods{"POST": s.claimAnalysis})
	s.handle("/v1/analysis/workflows", methods{"GET": s.listWaiting})
	s.handle("/v1/workflows/{id}/runs", methods{"POST": s.idempotent(s.createRun)})
	s.handle("/v1/workflows/{id}/batches", methods{"POST": s.idempotent(s.createBatch)})

	s.handle("/v1/runs", methods{"GET": s.listRuns})
	s.handle("/v1/runs/{id}", methods{"GET": s.getRun})
	s.handle("/v1/runs/{id}/cancel", methods{"POST": s.cancelRun})
	s.handle("/v1/runs/{id}/artifacts", methods{"GET": s.listArtifacts})
	s.handle("/v1/runs/{id}/artifacts/{name}", methods{"GET": s.getArtifact, "PUT": s.putArtifact})
	s.handle("/v1/runs/{id}/events", methods{"GET": s.streamRunEvents})
	s.handle("/v1/agents", methods{"GET": s.listAgents})
	s.handle("/v1/queue", methods{"GET": s.getQueue})
	s.handle("/v1/events", methods{"GET": s.streamEvents})

	s.handle("/v1/approvals", methods{"GET": s.listApprovals})
	s.handle("/v1/approvals/{id}", methods{"GET": s.getApproval})
	s.handle("/v1/approvals/{id}/approve", methods{"POST": s.resolveApproval(true)})
	s.handle("/v1/approvals/{id}/reject", methods{"POST": s.resolveApproval(false)})

	s.handle("/v1/batches", methods{"GET": s.listBatches})
	s.handle("/v1/batches/{id}", methods{"GET": s.getBatch})
	s.handle("/v1/batches/{id}/start", methods{"POST": s.startBatch})
	s.handle("/v1/batches/{id}/cancel", methods{"POST": s.cancelBatch})
	s.handle("/v1/batches/{id}/results", methods{"GET": s.batchResults})

	s.handle("/v1/credits", methods{"GET": s.getCredits})
	s.handle("/v1/credits/ledger", methods{"GET": s.listLedger})
	s.handle("/v1/accounts/{accountId}/credits", methods{"POST": s.idempotent(s.grantCredits)})

	s.handle("/v1/coupons", methods{"POST": s.idempotent(s.createCoupon), "GET": s.listCoupons})
	s.handle("/v1/coupons/redeem", methods{"POST": s.idempotent(s.redeemCoupon)})
	s.handle("/v1/coupons/{code}/deactivate", methods{"POST": s.deactivateCoupon})

	s.handle("/v1/billing/prices", methods{"GET": s.listPrices})
	s.handle("/v1/billing/checkout", methods{"POST": s.idempotent(s.createCheckout)})
	s.handle("/v1/billing/checkout/{sessionId}", methods{"GET": s.checkoutStatus})
	s.handle("/v1/billing/portal", methods{"POST": s.billingPortal})
	s.handle("/v1/billing/webhook", methods{"POST": s.webhook})
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
