package browser

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// Pool keeps `size` sessions ready; Get returns one at once when ready and
// starts preparing a replacement.
//
// Each of the size preparer goroutines creates one session and offers it to
// Get; once taken, it creates the next. A session whose Chromium died while it
// waited is thrown away by Get, and its preparer's next session starts a new
// Chromium.
type Pool struct {
	b     *Browser
	size  int
	ready chan *Session
	ctx   context.Context
	stop  context.CancelFunc
	wg    sync.WaitGroup

	mu      sync.Mutex
	lastErr error         // last preparation failure, reported by a Get that gives up
	waiting int           // sessions prepared and offered to Get
	changed chan struct{} // closed and replaced when waiting changes
}

// NewPool starts preparing size sessions (at least 1) on b.
func NewPool(b *Browser, size int) *Pool {
	if size < 1 {
		size = 1
	}
	ctx, stop := context.WithCancel(context.Background())
	p := &Pool{b: b, ready: make(chan *Session), size: size, ctx: ctx, stop: stop, changed: make(chan struct{})}
	for range size {
		p.wg.Go(p.prepare)
	}
	return p
}

// prepare creates sessions one after the other and hands them to Get,
// backing off while creation fails (Chromium missing or failing to start).
func (p *Pool) prepare() {
	bo := backoff.WithContext(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	), p.ctx)
	for p.ctx.Err() == nil {
		s, err := p.b.NewSession(p.ctx)
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			p.mu.Lock()
			p.lastErr = err
			p.mu.Unlock()
			p.b.log.WithError(err).Warn("browser: pool could not prepare a session")
			d := bo.NextBackOff()
			if d == backoff.Stop {
				return
			}
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-p.ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		bo.Reset()
		p.offer(1)
		select {
		case p.ready <- s:
			p.offer(-1)
		case <-p.ctx.Done():
			p.offer(-1)
			s.Close()
			return
		}
	}
}

// offer counts sessions offered to Get and wakes WaitReady.
func (p *Pool) offer(delta int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.waiting += delta
	close(p.changed)
	p.changed = make(chan struct{})
}

// Ready returns the number of sessions ready for Get now.
func (p *Pool) Ready() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waiting
}

// WaitReady waits until at least n sessions are ready (n is capped at the
// pool's size), for example before an agent announces its free slots.
func (p *Pool) WaitReady(ctx context.Context, n int) error {
	n = min(n, p.size)
	for {
		p.mu.Lock()
		ok, ch := p.waiting >= n, p.changed
		p.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-p.ctx.Done():
			return ErrClosed
		}
	}
}

// Get returns a ready session, waiting for one when none is ready (bounded
// by ctx). The caller owns the session and must Close it.
func (p *Pool) Get(ctx context.Context) (*Session, error) {
	for {
		select {
		case s := <-p.ready:
			if !s.alive() {
				s.Close() // its Chromium died while it waited; cheap
				continue
			}
			return s, nil
		case <-p.ctx.Done():
			return nil, ErrClosed
		case <-ctx.Done():
			p.mu.Lock()
			last := p.lastErr
			p.mu.Unlock()
			if last != nil {
				return nil, fmt.Errorf("browser: no session ready: %w (last failure: %v)", ctx.Err(), last)
			}
			return nil, ctx.Err()
		}
	}
}

// Close stops preparing sessions and closes the ones that were ready. It
// does not close the Browser.
func (p *Pool) Close() error {
	p.stop()
	p.wg.Wait()
	return nil
}
