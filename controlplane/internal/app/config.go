// Package app assembles the control plane: flags, logging, the store, the
// API, bootstrap and dev seeding, and the HTTP server's lifetime. The
// copelfd main only calls Run.
package app

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3"

	"github.com/copelf/copelf/controlplane/internal/api"
)

// Config is every setting of copelfd. Each flag has an environment twin:
// -session-ttl ↔ COPELF_SESSION_TTL.
type Config struct {
	Addr            string
	DB              string
	DataDir         string
	Dev             bool
	DevSite         string
	AdminToken      string
	SessionTTL      time.Duration
	LeaseTimeout    time.Duration
	AnalysisTimeout time.Duration
	RunCost         int64
	AllowedOrigins  []string
	StripeKey       string
	StripeWebhook   string
	StripeAPIBase   string
	PricesFile      string
	LogLevel        string
	LogFormat       string
	ShutdownTimeout time.Duration
	// SignInPerAccount and SignInPerAddress bound sign-in attempts.
	SignInPerAccount, SignInPerAddress api.RateLimit

	// Stuck thresholds (GET /v1/queue, metrics): how long work may stay
	// queued, assigned but not accepted, cancelling, awaiting approval or
	// analyzing before it counts as stuck. StuckAnalyzing 0: AnalysisTimeout.
	StuckQueued, StuckAssigned, StuckCancelling, StuckApproval, StuckAnalyzing time.Duration
	// EventsRetention is how long the event log keeps events; EventsPoll
	// how often it reads events other replicas wrote; SSEKeepAlive the idle
	// time before an event stream's keep-alive comment.
	EventsRetention, EventsPoll, SSEKeepAlive time.Duration
	// MetricsAddr, when set, serves /metrics without a token on its own
	// address (on the API's address it needs an operator's token).
	MetricsAddr string
}

// ParseConfig reads flags, then COPELF_* environment variables for flags not
// given on the command line.
func ParseConfig(args []string, usage io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("copelfd", flag.ContinueOnError)
	fs.SetOutput(usage)
	fs.StringVar(&c.Addr, "addr", "127.0.0.1:8080", "address to listen on")
	fs.StringVar(&c.DB, "db", "sqlite://copelf.db", "database URL: sqlite://FILE")
	fs.StringVar(&c.DataDir, "data-dir", "./copelf-data", "directory for uploads and artifacts")
	fs.BoolVar(&c.Dev, "dev", false, "seed a demo account, credits and a sample workflow, and print their tokens")
	fs.StringVar(&c.DevSite, "dev-site", "testdata/site", "directory served at /demo/ in dev mode (the sample workflow's pages)")
	fs.StringVar(&c.AdminToken, "admin-token", "", "admin bootstrap token (prefer the environment variable COPELF_ADMIN_TOKEN)")
	fs.DurationVar(&c.SessionTTL, "session-ttl", 12*time.Hour, "lifetime of sign-in sessions")
	fs.DurationVar(&c.LeaseTimeout, "lease-timeout", 30*time.Second, "agent lease: accept deadline and heartbeat silence")
	fs.DurationVar(&c.AnalysisTimeout, "analysis-timeout", 10*time.Minute, "how long a workflow may stay analyzing")
	fs.Int64Var(&c.RunCost, "run-cost", 1, "credits per run")
	origins := fs.String("allowed-origins", "", "comma-separated browser origins allowed to open agent websockets")
	fs.StringVar(&c.StripeKey, "stripe-key", "", "Stripe secret key (billing is off without it)")
	fs.StringVar(&c.StripeWebhook, "stripe-webhook-secret", "", "Stripe webhook signing secret")
	fs.StringVar(&c.StripeAPIBase, "stripe-api-base", "", "Stripe API base URL (e.g. stripe-mock)")
	fs.StringVar(&c.PricesFile, "prices", "", "JSON file of credit packs")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.LogFormat, "log-format", "auto", "log format: auto (text on a terminal, JSON otherwise), text, json")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 15*time.Second, "grace period for in-flight requests on SIGTERM")
	c.SignInPerAccount, c.SignInPerAddress = api.DefaultSignInPerAccount, api.DefaultSignInPerAddress
	fs.Var((*rateFlag)(&c.SignInPerAccount), "signin-limit-account", "sign-in attempts per account (email): N at once, then one per duration, as N/duration")
	fs.Var((*rateFlag)(&c.SignInPerAddress), "signin-limit-address", "sign-in attempts per client address, as N/duration")
	fs.DurationVar(&c.StuckQueued, "stuck-queued", 5*time.Minute, "a run queued longer than this counts as stuck (0: never)")
	fs.DurationVar(&c.StuckAssigned, "stuck-assigned", time.Minute, "a run assigned to an agent and not accepted for longer than this counts as stuck (0: never)")
	fs.DurationVar(&c.StuckCancelling, "stuck-cancelling", time.Minute, "a run still running this long after its cancel counts as stuck (0: never)")
	fs.DurationVar(&c.StuckApproval, "stuck-approval", 24*time.Hour, "a run awaiting approval longer than this counts as stuck (0: never)")
	fs.DurationVar(&c.StuckAnalyzing, "stuck-analyzing", 0, "a workflow analyzing longer than this counts as stuck (default: -analysis-timeout)")
	fs.DurationVar(&c.EventsRetention, "events-retention", 24*time.Hour, "how long the event log behind GET /v1/events keeps events")
	fs.DurationVar(&c.EventsPoll, "events-poll", 500*time.Millisecond, "how often the event log is read for events other replicas wrote")
	fs.DurationVar(&c.SSEKeepAlive, "sse-keepalive", 15*time.Second, "idle time before an event stream sends a keep-alive comment")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "also serve /metrics, without a token, on this address (e.g. 127.0.0.1:9090)")
	err := ff.Parse(fs, args, ff.WithEnvVarPrefix("COPELF"))
	if err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	for _, o := range strings.Split(*origins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			c.AllowedOrigins = append(c.AllowedOrigins, o)
		}
	}
	switch {
	case c.SessionTTL <= 0:
		return c, fmt.Errorf("-session-ttl must be positive")
	case c.LeaseTimeout <= 0:
		return c, fmt.Errorf("-lease-timeout must be positive")
	case c.AnalysisTimeout <= 0:
		return c, fmt.Errorf("-analysis-timeout must be positive")
	case c.RunCost < 0:
		return c, fmt.Errorf("-run-cost must not be negative")
	case c.StuckQueued < 0 || c.StuckAssigned < 0 || c.StuckCancelling < 0 || c.StuckApproval < 0 || c.StuckAnalyzing < 0:
		return c, fmt.Errorf("-stuck-* thresholds must not be negative")
	case c.EventsRetention <= 0 || c.EventsPoll <= 0 || c.SSEKeepAlive <= 0:
		return c, fmt.Errorf("-events-retention, -events-poll and -sse-keepalive must be positive")
	}
	if c.StuckAnalyzing == 0 {
		c.StuckAnalyzing = c.AnalysisTimeout
	}
	return c, nil
}

// rateFlag reads a rate limit written N/duration: N at once, then one per
// duration ("10/6s").
type rateFlag api.RateLimit

func (f *rateFlag) String() string {
	if f == nil || f.Burst == 0 {
		return ""
	}
	return fmt.Sprintf("%d/%s", f.Burst, f.Every)
}

func (f *rateFlag) Set(s string) error {
	n, d, ok := strings.Cut(s, "/")
	burst, err := strconv.Atoi(n)
	if !ok || err != nil || burst < 1 {
		return fmt.Errorf("want N/duration with N ≥ 1, such as 10/6s")
	}
	every, err := time.ParseDuration(d)
	if err != nil || every <= 0 {
		return fmt.Errorf("want N/duration with a positive duration, such as 10/6s")
	}
	*f = rateFlag{Burst: burst, Every: every}
	return nil
}
