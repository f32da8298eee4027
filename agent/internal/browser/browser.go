// Package browser is the headless agent's browser layer: one warm Chromium
// process (Browser), isolated incognito sessions prepared ahead of runs
// (Session, Pool), and the execution of a workflow definition's steps as
// chromedp actions (Session.Run).
//
// Lifetimes:
//   - Browser owns the Chromium process. Its chromedp context is started with
//     a context that has no deadline (the first chromedp Run binds the
//     process to its context); a dead process is replaced on the next
//     NewSession.
//   - Session owns one incognito browser context with one tab. It lives until
//     Close, and serves one run.
//   - Run derives every per-step timeout from the tab's context, never from
//     the browser's first context.
//
// Step semantics (API.md §4, §5): each step waits for its element with
// chromedp's own query loop, under its timeout (step.timeoutMs or 30 s; an
// approval waits for the run timeout only). A timeout before the element
// met its condition (present; visible for click, type and waitFor) is
// element_not_found, any other timeout step_timeout. Failures carry
// details.reason and details.step; secret inputs are redacted from every
// error, output, approval message and log line. See defaultFlags for the
// Chromium flags and why.
package browser

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/sirupsen/logrus"
)

// Options configure a Browser.
type Options struct {
	ExecPath  string         // "" = first of chromium, chromium-browser, google-chrome on PATH
	NoSandbox bool           // also forced when running as root
	Flags     map[string]any // extra Chromium flags (string values are --name=value, true is --name, false removes a default)
	Log       logrus.FieldLogger
}

// ErrNoBrowser is returned by Start when no Chromium binary can be found.
var ErrNoBrowser = errors.New("browser: no chromium, chromium-browser or google-chrome on PATH")

// ErrClosed is returned by operations on a closed Browser or Pool.
var ErrClosed = errors.New("browser: closed")

// execCandidates are the binaries looked up on PATH when Options.ExecPath is empty.
var execCandidates = []string{"chromium", "chromium-browser", "google-chrome"}

// FindExecPath returns the first of chromium, chromium-browser and
// google-chrome found on PATH.
func FindExecPath() (string, error) {
	for _, name := range execCandidates {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", ErrNoBrowser
}

// defaultFlags are the Chromium flags on top of chromedp's
// DefaultExecAllocatorOptions (headless, no-first-run,
// disable-background-networking, disable-sync, disable-extensions,
// disable-renderer-backgrounding, disable-background-timer-throttling,
// disable-backgrounding-occluded-windows, disable-hang-monitor,
// disable-breakpad, …, which stay: they keep timers and renderers of our
// windowless tabs at full speed, which is what a run wants).
//
// Each one cuts work that a run never needs without changing what a page
// sees (no flag touches JavaScript, images, fonts, CSS, cookies or storage):
//   - disable-gpu: no GPU process probing; headless renders in software anyway.
//   - disable-component-update: no component updater (would dial out).
//   - disable-domain-reliability, no-pings, disable-client-side-phishing-detection:
//     no background reporting requests.
//   - mute-audio: no audio output stream for pages that play sound.
//   - disable-features: background services that only cost CPU in an agent:
//     optimisation hints, the media router, translation, the autofill
//     server, interest feeds, and the "paint holding" delay that keeps the old
//     page on screen for up to 500 ms after a same-origin navigation
//     (screenshots right after a navigation then show the new page).
//     Three more are costs of the fresh incognito context of every run:
//     each context opens a browser window, for which Chromium preloads the
//     omnibox popup WebUIs (WebUIOmniboxPopup, WebUIOmniboxAimPopup: two
//     chrome://omnibox-popup.top-chrome pages in a renderer process of
//     their own, never shown in a headless window); and after a navigation
//     it starts a spare renderer for the next navigation in the same
//     context (SpareRendererForSitePerProcess), never used since the next
//     run has a context of its own. Without them a run starts one renderer
//     process instead of three.
//   - disable-dev-shm-usage=false when /dev/shm is large: shared memory on
//     tmpfs instead of file-backed temporary files (chromedp turns it on by
//     default for small Docker /dev/shm).
//   - window-size 1280x800: the same viewport for every screenshot.
//
// Deliberately not used: --blink-settings=imagesEnabled=false and
// --disable-javascript (change page behaviour), --single-process and
// --renderer-process-limit (one crashing page would take others down, and
// incognito contexts would share a renderer), --disable-site-isolation-trials
// (a security feature). Measured and dropped: --disable-gpu-vsync with
// --disable-frame-rate-limit (key events became ~3x slower: 28 ms instead of
// 9 ms per typed character), --in-process-gpu (no gain beyond the noise).
// Measured (2 cores, interleaved runs of the two sample workflows): this set
// used ~6% less Chromium CPU than chromedp's defaults with the flags above
// that the agent must have, at the same wall time. The omnibox and spare
// renderer features, measured through the agent (cli BenchmarkThroughput,
// login-search, slots 1 and 2, three interleaved rounds): Chromium CPU per
// run 1.58–1.76 s → 0.65–0.83 s, runs/s 1.09–1.22 → 1.71–2.52.
func defaultFlags() map[string]any {
	f := map[string]any{
		"headless":                               true,
		"disable-gpu":                            true,
		"disable-background-networking":          true,
		"disable-component-update":               true,
		"disable-sync":                           true,
		"no-first-run":                           true,
		"disable-domain-reliability":             true,
		"no-pings":                               true,
		"disable-client-side-phishing-detection": true,
		"mute-audio":                             true,
		"disable-features":                       "Translate,BlinkGenPropertyTrees,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,InterestFeedContentSuggestions,PaintHolding,CertificateTransparencyComponentUpdater,WebUIOmniboxPopup,WebUIOmniboxAimPopup,SpareRendererForSitePerProcess",
		"window-size":                            "1280,800",
	}
	if largeDevShm() {
		f["disable-dev-shm-usage"] = false
	}
	return f
}

// largeDevShm reports whether /dev/shm has room for Chromium's shared memory
// (at least 1 GiB free).
func largeDevShm() bool {
	return devShmFree() >= 1<<30
}

// Browser is one warm Chromium process. If it dies it is restarted for the next session.
type Browser struct {
	opts     Options
	log      logrus.FieldLogger
	execPath string
	flags    map[string]any
	secrets  *secretSet // secrets of the runs in flight, scrubbed from chromedp's own log lines

	mu     sync.Mutex
	cur    *instance
	closed bool

	cleanup sync.WaitGroup // retired instances being torn down
}

// instance is one Chromium process and its chromedp browser context.
type instance struct {
	id          int64
	allocCancel context.CancelFunc
	ctx         context.Context // chromedp context of the first tab; done when the process is gone
	cancel      context.CancelFunc
	pid         int
	closing     atomic.Bool // set before a deliberate shutdown, so that it does not count as a crash
}

// dead reports whether the process is gone or going.
func (in *instance) dead() bool { return in.ctx.Err() != nil }

// crashed reports whether the process went away without being asked to.
func (in *instance) crashed() bool { return in.dead() && !in.closing.Load() }

var instanceSeq atomic.Int64

// Start launches Chromium and waits until it answers. ctx bounds the start
// only; the process lives until Close.
func Start(ctx context.Context, o Options) (*Browser, error) {
	if o.Log == nil {
		o.Log = logrus.StandardLogger()
	}
	path := o.ExecPath
	if path == "" {
		p, err := FindExecPath()
		if err != nil {
			return nil, err
		}
		path = p
	}
	flags := defaultFlags()
	if o.NoSandbox || os.Geteuid() == 0 {
		flags["no-sandbox"] = true
	}
	for k, v := range o.Flags {
		flags[k] = v
	}
	b := &Browser{opts: o, log: o.Log, execPath: path, flags: flags, secrets: newSecretSet()}
	in, err := b.launch(ctx)
	if err != nil {
		return nil, err
	}
	b.cur = in
	return b, nil
}

// chromedpLog adapts chromedp's printf loggers to the FieldLogger, scrubbing
// the secrets of the runs in flight.
func (b *Browser) chromedpLog(level logrus.Level) func(string, ...any) {
	return func(format string, args ...any) {
		msg := b.secrets.scrub(fmt.Sprintf(format, args...))
		e := b.log.WithField("component", "chromedp")
		if level == logrus.WarnLevel {
			e.Warn(msg)
		} else {
			e.Debug(msg)
		}
	}
}

// launch starts a new Chromium process.
func (b *Browser) launch(ctx context.Context) (*instance, error) {
	opts := append([]chromedp.ExecAllocatorOption{}, chromedp.DefaultExecAllocatorOptions[:]...)
	opts = append(opts, chromedp.ExecPath(b.execPath))
	for _, name := range sortedFlagNames(b.flags) {
		opts = append(opts, chromedp.Flag(name, b.flags[name]))
	}
	start := time.Now()
	// The allocator and the browser live on context.Background: the first
	// chromedp Run binds the process to its context, so ctx only bounds
	// the wait below.
	allocCtx, allocCancel := chromedp.NewExecAllocator(context.Background(), opts...)
	bctx, bcancel := chromedp.NewContext(allocCtx,
		chromedp.WithBrowserOption(
			chromedp.WithBrowserLogf(b.chromedpLog(logrus.DebugLevel)),
			chromedp.WithBrowserErrorf(b.chromedpLog(logrus.WarnLevel)),
			chromedp.WithBrowserDebugf(func(string, ...any) {}),
		))
	done := make(chan error, 1)
	go func() { done <- chromedp.Do(bctx) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		bcancel()
		<-done
		err = ctx.Err()
	}
	if err != nil {
		bcancel()
		allocCancel()
		return nil, fmt.Errorf("browser: start %s: %w", b.execPath, err)
	}
	in := &instance{
		id:          instanceSeq.Add(1),
		allocCancel: allocCancel,
		ctx:         bctx,
		cancel:      bcancel,
	}
	if c := chromedp.FromContext(bctx); c != nil && c.Browser != nil && c.Browser.Process() != nil {
		in.pid = c.Browser.Process().Pid
	}
	b.log.WithFields(logrus.Fields{"pid": in.pid, "ms": time.Since(start).Milliseconds()}).Info("browser: chromium started")
	return in, nil
}

// current returns the live instance, starting a new Chromium when the last
// one died.
func (b *Browser) current(ctx context.Context) (*instance, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	if b.cur != nil && !b.cur.dead() {
		return b.cur, nil
	}
	if old := b.cur; old != nil {
		b.log.WithField("pid", old.pid).Warn("browser: chromium died; starting a new one")
		b.retire(old)
		b.cur = nil
	}
	in, err := b.launch(ctx)
	if err != nil {
		return nil, err
	}
	b.cur = in
	return in, nil
}

// retire tears a dead instance down in the background (reaping the process
// and removing its profile directory); Close waits for it.
func (b *Browser) retire(in *instance) {
	b.cleanup.Add(1)
	go func() {
		defer b.cleanup.Done()
		in.cancel()
		in.allocCancel()
	}()
}

// PID is the process id of the current Chromium process (0 when none).
func (b *Browser) PID() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cur == nil {
		return 0
	}
	return b.cur.pid
}

// Close stops Chromium gracefully (killing it after a few seconds) and waits
// until its goroutines and profile directory are gone. Sessions of this
// browser stop working.
func (b *Browser) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	in := b.cur
	b.cur = nil
	b.mu.Unlock()

	var err error
	if in != nil {
		in.closing.Store(true)
		if !in.dead() {
			// Graceful: Browser.close, then wait for the process to exit.
			ctx, cancel := context.WithTimeout(in.ctx, 5*time.Second)
			if cerr := chromedp.Cancel(ctx); cerr != nil &&
				!errors.Is(cerr, context.Canceled) && !errors.Is(cerr, context.DeadlineExceeded) {
				err = cerr
			}
			cancel()
		}
		in.cancel()
		in.allocCancel()
	}
	b.cleanup.Wait()
	return err
}

func sortedFlagNames(m map[string]any) []string {
	// Deterministic order; chromedp keeps the first position of a flag.
	return slices.Sorted(maps.Keys(m))
}

// secretSet counts the secret values of the runs in flight, for scrubbing
// log lines that are not tied to one run.
type secretSet struct {
	mu sync.RWMutex
	n  map[string]int
}

func newSecretSet() *secretSet { return &secretSet{n: make(map[string]int)} }

func (s *secretSet) add(vals []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range vals {
		s.n[v]++
	}
}

func (s *secretSet) remove(vals []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range vals {
		if s.n[v]--; s.n[v] <= 0 {
			delete(s.n, v)
		}
	}
}

func (s *secretSet) scrub(msg string) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if len(s.n) == 0 {
		return msg
	}
	vals := make([]string, 0, len(s.n))
	for v := range s.n {
		vals = append(vals, v)
	}
	return newScrubber(vals).str(msg)
}
