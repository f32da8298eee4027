package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/cluster"
	"github.com/copelf/copelf/controlplane/internal/dashboard"
	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/controlplane/internal/metrics"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/video"
)

// Run starts copelfd with args and serves until ctx is cancelled, then shuts
// down gracefully. stdout receives the one-time bootstrap messages; logs go
// to stderr. ready, when not nil, receives the listening address.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer, ready func(addr string)) error {
	cfg, err := ParseConfig(args, stderr)
	if err != nil {
		return err
	}
	log, err := newLogger(cfg, stderr)
	if err != nil {
		return err
	}
	bc, err := billingConfig(cfg, log)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	st, err := openStore(ctx, cfg.DB)
	if err != nil {
		return err
	}
	defer st.Close()
	videos, err := openVideos(cfg.DataDir, log)
	if err != nil {
		return err
	}
	setAsideOrphanVideos(ctx, st, videos, log)
	// Replicas on one PostgreSQL database signal each other and elect the
	// one that runs maintenance; on SQLite this is a no-op.
	cl, err := cluster.New(cfg.DB, log, cluster.Config{})
	if err != nil {
		return err
	}
	defer cl.Close()

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	addr := ln.Addr().String()
	baseURL := "http://" + addr

	if err := bootstrapAdmin(ctx, st, cfg.AdminToken, stdout, log); err != nil {
		return fmt.Errorf("bootstrap admin: %w", err)
	}

	m := metrics.New()
	srv := api.New(st, log, api.Config{SessionTTL: cfg.SessionTTL, RunCost: cfg.RunCost, DataDir: cfg.DataDir,
		Videos: videos, AnalysisTimeout: cfg.AnalysisTimeout,
		Prices: bc.Prices, Stripe: bc.Stripe, WebhookSecret: bc.WebhookSecret,
		SignInPerAccount: cfg.SignInPerAccount, SignInPerAddress: cfg.SignInPerAddress,
		KeepAlive: cfg.SSEKeepAlive, Metrics: m, Stuck: store.StuckThresholds{Queued: cfg.StuckQueued, Assigned: cfg.StuckAssigned,
			Cancelling: cfg.StuckCancelling, AwaitingApproval: cfg.StuckApproval, Analyzing: cfg.StuckAnalyzing}})
	broker := events.New(st, log, events.Config{PollInterval: cfg.EventsPoll, Retention: cfg.EventsRetention})
	broker.Observer = cl.EventsObserver(m)
	if err := broker.Start(ctx); err != nil {
		return fmt.Errorf("start event log: %w", err)
	}
	defer broker.Close()
	srv.Events = broker
	feed := api.NewFeed(srv)
	h := hub.New(st, log, func(ctx context.Context, token string) (*store.User, *store.Token, error) {
		p, err := srv.Authenticate(ctx, token)
		if err != nil {
			return nil, nil, err
		}
		return p.User, p.Token, nil
	}, hub.Config{LeaseTimeout: cfg.LeaseTimeout, AllowedOrigins: cfg.AllowedOrigins})
	h.Listener, h.Metrics, h.Peers = feed, m, cl
	if err := h.Start(ctx); err != nil {
		return fmt.Errorf("start dispatch: %w", err)
	}
	defer h.Close()
	srv.Hooks, srv.Agents = api.ChainHooks(h, feed.Hooks(), cl), h
	cl.Start(cluster.Receiver{Queued: h.Kick, RunChanged: h.Sync, ApprovalResolved: h.SyncApproval, EventsAppended: broker.Wake,
		Resync: func(ctx context.Context) error { broker.Wake(); return h.Resync(ctx) }})
	srv.Handle("/v1/agents/connect", h)
	dash := dashboard.New()
	for _, p := range dashboard.Patterns {
		srv.Handle(p, dash)
	}
	// The analysis reaper runs on every replica: each pass is one guarded
	// UPDATE, and the first fails the analyses a stopped server left behind.
	reaperCtx, stopReaper := context.WithCancel(ctx)
	reaperDone := make(chan struct{})
	go func() { defer close(reaperDone); srv.RunAnalysisReaper(reaperCtx, 0) }()
	defer func() { stopReaper(); <-reaperDone }()
	if cfg.Dev {
		if err := seedDev(ctx, st, cfg, baseURL, stdout); err != nil {
			return fmt.Errorf("dev seed: %w", err)
		}
		if fi, err := os.Stat(cfg.DevSite); err == nil && fi.IsDir() {
			srv.Handle("/demo/", http.StripPrefix("/demo/", http.FileServer(http.Dir(cfg.DevSite))))
		}
	}

	hs := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          nil,
	}
	errc := make(chan error, 2)
	go func() { errc <- hs.Serve(ln) }()
	if cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("-metrics-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", m.Handler())
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := ms.Serve(mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
		defer ms.Close()
		log.WithField("addr", mln.Addr().String()).Info("metrics listening")
	}
	log.WithFields(logrus.Fields{"addr": addr, "db": redactURL(cfg.DB)}).Info("copelfd listening")
	if ready != nil {
		ready(addr)
	}

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	cl.Close()     // another replica takes maintenance leadership at once
	h.Close()      // websocket connections are hijacked: Shutdown does not close them
	broker.Close() // ends the event streams, which Shutdown would wait for
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		log.WithError(err).Warn("graceful shutdown did not finish; closing")
		hs.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}

// billingConfig reads the -prices file and sets up Stripe. Without
// -stripe-key (or -stripe-webhook-secret) the server runs and the billing
// routes answer checkout_failed (billing_not_configured).
func billingConfig(cfg Config, log logrus.FieldLogger) (api.Config, error) {
	var out api.Config
	prices, err := billing.LoadPrices(cfg.PricesFile)
	if err != nil {
		return out, fmt.Errorf("-prices: %w", err)
	}
	out.Prices, out.WebhookSecret = prices, cfg.StripeWebhook
	if cfg.StripeKey != "" {
		out.Stripe = billing.NewStripe(billing.StripeConfig{Key: cfg.StripeKey, APIBase: cfg.StripeAPIBase})
	} else {
		log.Info("billing is off: no -stripe-key")
	}
	if cfg.StripeKey != "" && cfg.StripeWebhook == "" {
		log.Warn("-stripe-webhook-secret is not set: Stripe's webhook is refused; paid checkouts are granted only from the success page")
	}
	return out, nil
}

// openVideos opens the video store in the data directory and removes the
// temporary files of uploads a stopped server left behind.
func openVideos(dataDir string, log logrus.FieldLogger) (*video.Dir, error) {
	videos, err := video.NewDir(filepath.Join(dataDir, "videos"))
	if err != nil {
		return nil, err
	}
	if n, err := videos.RemoveStaleUploads(time.Hour); err != nil {
		log.WithError(err).Warn("stale video uploads not removed")
	} else if n > 0 {
		log.WithField("count", n).Info("removed stale video uploads")
	}
	return videos, nil
}

// Orphaned videos: a workflow deleted while its new video was being stored,
// or a crash between storing a video and recording it, leaves a video no
// workflow uses. At start, those older than orphanGrace (longer than an
// upload may take, so none another replica is storing right now) are set
// aside in video.OrphanDir, and deleted orphanKeep later: started by
// mistake against the wrong database, the program moves videos there
// instead of losing them.
const (
	orphanGrace = time.Hour
	orphanKeep  = 7 * 24 * time.Hour
)

func setAsideOrphanVideos(ctx context.Context, st store.Store, videos *video.Dir, log logrus.FieldLogger) {
	keys, err := videos.Keys(orphanGrace)
	if err == nil && len(keys) > 0 {
		var used map[string]bool
		if used, err = st.WorkflowVideoKeysInUse(ctx, keys); err == nil {
			moved := 0
			for _, k := range keys {
				if !used[k] && videos.SetAside(k) == nil {
					moved++
				}
			}
			if moved > 0 {
				log.WithField("count", moved).WithField("dir", filepath.Join(videos.Root(), video.OrphanDir)).
					Warn("set aside videos no workflow uses; they are deleted after 7 days (move them back if this database is not the one they belong to)")
			}
		}
	}
	if err != nil {
		log.WithError(err).Warn("orphaned videos not set aside")
	}
	if n, err := videos.PurgeSetAside(orphanKeep); err != nil {
		log.WithError(err).Warn("set-aside videos not purged")
	} else if n > 0 {
		log.WithField("count", n).Info("deleted videos set aside more than 7 days ago")
	}
}

func openStore(ctx context.Context, dsn string) (store.Store, error) {
	return sqlstore.Open(ctx, dsn)
}

func redactURL(s string) string {
	if i := strings.Index(s, "@"); i >= 0 {
		if j := strings.Index(s, "://"); j >= 0 && j < i {
			return s[:j+3] + "…" + s[i:]
		}
	}
	return s
}

func newLogger(cfg Config, w io.Writer) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(w)
	lvl, err := logrus.ParseLevel(cfg.LogLevel)
	if err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	log.SetLevel(lvl)
	format := cfg.LogFormat
	if format == "auto" {
		format = "json"
		if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			format = "text"
		}
	}
	switch format {
	case "json":
		log.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	case "text":
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: "15:04:05.000"})
	default:
		return nil, fmt.Errorf("-log-format must be auto, text or json")
	}
	return log, nil
}
