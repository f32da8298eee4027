package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// streamEnvelope is the data of a change event: {"id","type","accountId",
// "at","data"} where data is the resource's API view. Only the fields the
// watches use are read (the server's id is a number, at a timestamp).
type streamEnvelope struct {
	Type      string          `json:"type"`
	AccountID string          `json:"accountId"`
	Data      json.RawMessage `json:"data"`
}

// follower holds an event stream open across cuts: it reconnects with
// Last-Event-ID, after the server's retry: delay, backing off while the
// server cannot be reached.
type follower struct {
	client *Client
	path   string
	// stall: a stream silent this long (no event, no keep-alive comment)
	// is treated as cut.
	stall time.Duration
	// giveUp bounds how long reconnecting may fail before the error is
	// returned.
	giveUp time.Duration
	// onConnect runs after each (re)connection, to resynchronise state
	// from a plain GET; done ends the follow.
	onConnect func(ctx context.Context, first bool) (done bool, err error)
	// onEvent handles one event; done ends the follow.
	onEvent func(ev SSEEvent) (done bool, err error)
	// onCut is told when a stream ended without the follow being done.
	onCut func(err error)
}

// run follows until onConnect or onEvent says done, ctx ends, or the server
// cannot be reached for giveUp. It returns errNoStream when the first
// connection finds no stream at the path.
func (f *follower) run(ctx context.Context) error {
	lastID := ""
	retry := time.Second
	b := backoff.NewExponentialBackOff()
	b.MaxInterval = 30 * time.Second
	b.MaxElapsedTime = f.giveUp
	first := true
	for {
		body, err := f.client.OpenStream(ctx, f.path, lastID)
		if err != nil {
			var apiErr *APIError
			switch {
			case ctx.Err() != nil:
				return ctx.Err()
			case errors.Is(err, errNoStream) && first:
				return errNoStream
			case errors.As(err, &apiErr) && apiErr.Status < 500 && apiErr.Status != 429:
				return err
			}
			wait := b.NextBackOff()
			if wait == backoff.Stop {
				return err
			}
			if f.onCut != nil {
				f.onCut(err)
			}
			if err := sleep(ctx, max(wait, retry)); err != nil {
				return err
			}
			continue
		}
		b.Reset()
		done, err := f.onConnect(ctx, first)
		first = false
		if err != nil || done {
			body.Body.Close()
			return err
		}
		rd := newStallReader(body.Body, f.stall)
		sr := NewSSEReader(rd)
		sr.lastID = lastID
		for {
			ev, rerr := sr.Next()
			lastID = sr.LastEventID()
			if sr.Retry() > 0 {
				retry = sr.Retry()
			}
			if rerr != nil {
				err = rerr
				break
			}
			if done, err := f.onEvent(ev); err != nil || done {
				rd.Close()
				return err
			}
		}
		rd.Close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, errSSETooLarge) {
			return fmt.Errorf("%s: %w", f.path, err)
		}
		if f.onCut != nil {
			f.onCut(err)
		}
		if err := sleep(ctx, retry); err != nil {
			return err
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// stallReader closes its body when no byte arrives for a while, so a read
// blocked on a dead connection returns.
type stallReader struct {
	body  io.ReadCloser
	stall time.Duration
	timer *time.Timer
	once  sync.Once
	mu    sync.Mutex
	timed bool
}

var errStalled = errors.New("event stream went silent")

func newStallReader(body io.ReadCloser, stall time.Duration) *stallReader {
	s := &stallReader{body: body, stall: stall}
	s.timer = time.AfterFunc(stall, func() {
		s.mu.Lock()
		s.timed = true
		s.mu.Unlock()
		s.Close()
	})
	return s
}

func (s *stallReader) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	if n > 0 {
		s.timer.Reset(s.stall)
	}
	if err != nil {
		s.mu.Lock()
		timed := s.timed
		s.mu.Unlock()
		if timed {
			return n, errStalled
		}
	}
	return n, err
}

func (s *stallReader) Close() error {
	s.timer.Stop()
	var err error
	s.once.Do(func() { err = s.body.Close() })
	return err
}
