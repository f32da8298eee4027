// Package cli assembles the headless agent: flags (each with a COPELF_*
// environment twin), logging, the agent id, Chromium and the protocol
// client, and the process lifetime (a cancelled ctx — SIGTERM — drains the
// agent). The copelf-agent main only calls Run.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/peterbourgon/ff/v3"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/agent/internal/agent"
	"github.com/copelf/copelf/agent/internal/browser"
)

// Config is every setting of copelf-agent. Each flag has an environment
// twin: -drain-timeout ↔ COPELF_DRAIN_TIMEOUT; the token is -agent-token ↔
// COPELF_AGENT_TOKEN (prefer the environment: flags show in ps).
type Config struct {
	Servers      []string
	Token        string
	Slots        int
	Labels       map[string]string
	Name         string
	Chrome       string
	ID           string
	StateDir     string
	DrainTimeout time.Duration
	LogLevel     string
	LogFormat    string
}

// ParseConfig reads flags, then COPELF_* environment variables for flags not
// given on the command line.
func ParseConfig(args []string, usage io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("copelf-agent", flag.ContinueOnError)
	fs.SetOutput(usage)
	servers := fs.String("server", "http://127.0.0.1:8080", "control plane URL; a comma-separated list is tried in turn")
	fs.StringVar(&c.Token, "agent-token", "", "agent token (prefer the environment variable COPELF_AGENT_TOKEN)")
	fs.IntVar(&c.Slots, "slots", 1, "runs executed at once")
	labels := fs.String("labels", "", "labels runs can ask for: k=v,k2=v2")
	fs.StringVar(&c.Name, "name", "", "name shown to operators (default: the host name)")
	fs.StringVar(&c.Chrome, "chrome", "", "Chromium binary (default: the first of chromium, chromium-browser, google-chrome on PATH)")
	fs.StringVar(&c.ID, "id", "", "the agent's stable id (default: kept in <state-dir>/agent-id)")
	fs.StringVar(&c.StateDir, "state-dir", "", "directory keeping the agent id (default: <user config dir>/copelf)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long running runs may take to finish before they are cancelled")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.LogFormat, "log-format", "auto", "log format: auto (text on a terminal, JSON otherwise), text, json")
	if err := ff.Parse(fs, args, ff.WithEnvVarPrefix("COPELF")); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	for _, s := range strings.Split(*servers, ",") {
		if s = strings.TrimSpace(s); s != "" {
			c.Servers = append(c.Servers, s)
		}
	}
	var err error
	if c.Labels, err = parseLabels(*labels); err != nil {
		return c, err
	}
	switch {
	case len(c.Servers) == 0:
		return c, errors.New("-server: at least one URL is required")
	case c.Slots < 1 || c.Slots > 256:
		return c, errors.New("-slots must be from 1 to 256")
	case c.DrainTimeout < 0:
		return c, errors.New("-drain-timeout must not be negative")
	case c.ID != "" && !agent.ValidID(c.ID):
		return c, errors.New("-id must be 1 to 128 of [A-Za-z0-9._:-]")
	case c.Token == "":
		return c, errors.New("no agent token: set COPELF_AGENT_TOKEN to an agent token (POST /v1/tokens with kind \"agent\")")
	}
	return c, nil
}

// parseLabels reads k=v,k2=v2.
func parseLabels(s string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			return nil, fmt.Errorf("-labels: %q is not k=v", kv)
		}
		out[k] = strings.TrimSpace(v)
	}
	if len(out) > 32 {
		return nil, errors.New("-labels: at most 32 labels")
	}
	return out, nil
}

// Run starts copelf-agent with args and serves until ctx is cancelled; then
// it drains (running runs get -drain-timeout to finish) and returns nil. It
// returns an error when the configuration is wrong, Chromium cannot start,
// or the server refuses the agent for good (a bad token).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return run(ctx, args, stderr, startBrowser)
}

// executorFactory starts the executor; stop releases it.
type executorFactory func(ctx context.Context, cfg Config, log logrus.FieldLogger) (exec agent.Executor, stop func(), err error)

func run(ctx context.Context, args []string, stderr io.Writer, newExecutor executorFactory) error {
	cfg, err := ParseConfig(args, stderr)
	if err != nil {
		return err
	}
	log, err := newLogger(cfg, stderr)
	if err != nil {
		return err
	}
	if cfg.ID == "" {
		dir := cfg.StateDir
		if dir == "" {
			if dir, err = agent.DefaultStateDir(); err != nil {
				return err
			}
		}
		if cfg.ID, err = agent.LoadOrCreateID(dir); err != nil {
			return err
		}
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	exec, stopExec, err := newExecutor(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer stopExec()

	a, err := agent.New(agent.Config{Servers: cfg.Servers, Token: cfg.Token, ID: cfg.ID, Name: cfg.Name, Slots: cfg.Slots,
		Labels: cfg.Labels, Executor: exec, Log: log})
	if err != nil {
		return err
	}
	// Run's own context is not ctx: a signal drains the agent (Stop)
	// instead of cutting runs off.
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	errc := make(chan error, 1)
	go func() { errc <- a.Run(runCtx) }()
	log.WithFields(logrus.Fields{"servers": strings.Join(cfg.Servers, ","), "slots": cfg.Slots, "clientId": cfg.ID, "name": cfg.Name}).
		Info("copelf-agent started")

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.WithField("drainTimeout", cfg.DrainTimeout.String()).Info("stopping: draining runs")
	dctx, cancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer cancel()
	if err := a.Stop(dctx); err != nil {
		log.WithError(err).Warn("drain incomplete")
	}
	cancelRun()
	if err := <-errc; err != nil {
		return err
	}
	log.Info("stopped")
	return nil
}

// startBrowser starts Chromium (with --no-sandbox when running as root) and
// a pool of one ready session per slot.
func startBrowser(ctx context.Context, cfg Config, log logrus.FieldLogger) (agent.Executor, func(), error) {
	path := cfg.Chrome
	if path == "" {
		p, err := browser.FindExecPath()
		if err != nil {
			return nil, nil, fmt.Errorf("%w (install Chromium or set -chrome)", err)
		}
		path = p
	}
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	b, err := browser.Start(sctx, browser.Options{ExecPath: path, NoSandbox: os.Geteuid() == 0, Log: log})
	if err != nil {
		return nil, nil, fmt.Errorf("start Chromium %s: %w", path, err)
	}
	log.WithField("chrome", path).Info("Chromium started")
	pool := browser.NewPool(b, cfg.Slots)
	return browserExecutor{pool: pool}, func() {
		pool.Close()
		if err := b.Close(); err != nil {
			log.WithError(err).Warn("close Chromium")
		}
	}, nil
}

// sessionWait bounds the wait for a browser session for one run.
const sessionWait = time.Minute

// browserExecutor adapts browser.Pool to agent.Executor; the agent's run
// types mirror the browser's, so the adapter only converts.
type browserExecutor struct{ pool *browser.Pool }

func (e browserExecutor) Session(ctx context.Context) (agent.Session, error) {
	ctx, cancel := context.WithTimeout(ctx, sessionWait)
	defer cancel()
	s, err := e.pool.Get(ctx)
	if err != nil {
		return nil, err
	}
	return browserSession{s: s}, nil
}

type browserSession struct{ s *browser.Session }

func (s browserSession) Run(ctx context.Context, spec agent.RunSpec, rep agent.Reporter) agent.Result {
	return agent.Result(s.s.Run(ctx, browser.RunSpec(spec), rep))
}

func (s browserSession) Close() error { return s.s.Close() }

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
		return nil, errors.New("-log-format must be auto, text or json")
	}
	return log, nil
}
