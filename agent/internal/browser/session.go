package browser

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/chromedp/chromedp"
)

// Session is a fresh incognito browser context (own cookies/storage) with one
// blank tab, created ahead of a run so that a run's first browser command
// starts without waiting for a context. A Session serves one run; Close it
// afterwards.
type Session struct {
	b       *Browser
	in      *instance
	ctx     context.Context // chromedp context of the tab; its first Run is done
	cancel  context.CancelFunc
	kill    context.CancelFunc // ends the tab at once, without waiting (see runner.exec)
	created time.Time

	closeOnce sync.Once
	closeErr  error
}

// NewSession creates an incognito browser context and a blank tab in it,
// starting a new Chromium first if the last one died. ctx bounds the
// creation only.
func (b *Browser) NewSession(ctx context.Context) (*Session, error) {
	var lastErr error
	for try := 0; try < 2; try++ {
		in, err := b.current(ctx)
		if err != nil {
			return nil, err
		}
		s, err := b.newSession(ctx, in)
		if err == nil {
			return s, nil
		}
		lastErr = err
		if ctx.Err() != nil || !in.dead() {
			break
		}
		// Chromium died while the context was being created: once more on a new one.
	}
	return nil, lastErr
}

func (b *Browser) newSession(ctx context.Context, in *instance) (*Session, error) {
	// The tab's context must not carry ctx's deadline: its first Run binds the
	// tab to it. ctx still aborts the creation through AfterFunc.
	// kill cancels the tab's parent: chromedp then closes the tab in the
	// background, and every call waiting on the tab returns.
	parent, kill := context.WithCancel(in.ctx)
	sctx, scancel := chromedp.NewContext(parent, chromedp.WithNewBrowserContext())
	stop := context.AfterFunc(ctx, kill)
	err := chromedp.Do(sctx)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		kill()
		scancel()
		return nil, fmt.Errorf("browser: new session: %w", err)
	}
	return &Session{b: b, in: in, ctx: sctx, cancel: scancel, kill: kill, created: time.Now()}, nil
}

// alive reports whether the session's Chromium and tab are still there.
func (s *Session) alive() bool { return s.ctx.Err() == nil }

// Close disposes the browser context (closing its tab). It is safe to call
// more than once and from any goroutine.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		defer s.kill()
		if s.in.dead() {
			s.cancel() // nothing left to dispose
			return
		}
		// Detach, close the tab and dispose the browser context; chromedp
		// bounds each of these by its own timeout.
		err := chromedp.Cancel(s.ctx)
		if err != nil && !errors.Is(err, context.Canceled) && !s.in.dead() {
			s.closeErr = fmt.Errorf("browser: close session: %w", err)
		}
	})
	return s.closeErr
}
