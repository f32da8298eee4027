package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// callTimeout bounds one slow receiver call.
const callTimeout = 30 * time.Second

// listenLoop keeps a connection that LISTENs on the channel, reconnecting
// with backoff; each time it listens again it asks for a resync (signals
// sent meanwhile were lost).
func (c *Cluster) listenLoop() {
	defer c.wg.Done()
	o := &outage{log: c.log, what: "listening to the other replicas"}
	bo := c.newBackoff()
	for c.ctx.Err() == nil {
		conn, err := c.listenConn()
		if err != nil {
			if c.ctx.Err() != nil {
				return
			}
			d := bo.NextBackOff()
			o.fail(err, d)
			if !c.sleep(d) {
				return
			}
			continue
		}
		o.ok()
		bo.Reset()
		c.listening.Store(true)
		c.requestResync()
		err = c.listen(conn)
		c.listening.Store(false)
		closeConn(conn)
		if c.ctx.Err() != nil {
			return
		}
		c.log.WithError(err).Warn("cluster: lost the connection that listens to the other replicas; polling every " +
			c.cfg.PollInterval.String() + " until it is back")
	}
}

func (c *Cluster) listenConn() (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(c.ctx, 15*time.Second)
	defer cancel()
	conn, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{c.cfg.Channel}.Sanitize()); err != nil {
		closeConn(conn)
		return nil, err
	}
	return conn, nil
}

// listen handles notifications until the connection fails or the cluster
// closes. With nothing to read for PingInterval it pings the server: a
// connection to a server that went away without a word is found out.
func (c *Cluster) listen(conn *pgx.Conn) error {
	for {
		wctx, cancel := context.WithTimeout(c.ctx, c.cfg.PingInterval)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if c.ctx.Err() != nil {
			return c.ctx.Err()
		}
		if err != nil {
			if !pgconn.Timeout(err) && !errors.Is(err, context.DeadlineExceeded) {
				return err
			}
			pctx, cancel := context.WithTimeout(c.ctx, c.cfg.PingInterval)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return err
			}
			continue
		}
		c.receive(n.Payload)
	}
}

// decode reads a payload; anything else on the channel is ignored.
func decode(payload string) (message, bool) {
	var m message
	if err := json.Unmarshal([]byte(payload), &m); err != nil || m.Origin == "" {
		return message{}, false
	}
	return m, true
}

// receive acts on another replica's payload: fast signals at once, slow
// ones through the worker.
func (c *Cluster) receive(payload string) {
	m, ok := decode(payload)
	if !ok {
		c.log.WithField("bytes", len(payload)).Debug("cluster: ignoring a notification that is not ours")
		return
	}
	if m.Origin == c.cfg.Origin {
		return // the local path acted already
	}
	for _, s := range m.Signals {
		switch s.Kind {
		case KindQueued:
			if c.recv.Queued != nil && s.AccountID != "" {
				c.recv.Queued(s.AccountID)
			}
		case KindEvents:
			if c.recv.EventsAppended != nil {
				c.recv.EventsAppended()
			}
		case KindRun, KindApproval:
			if s.RunID == "" || (s.Kind == KindApproval && s.ApprovalID == "") {
				continue
			}
			select {
			case c.slow <- s:
			default:
				// The worker is far behind: it looks at everything once
				// it catches up.
				c.requestResync()
			}
		}
	}
}

func (c *Cluster) requestResync() {
	select {
	case c.resyncKick <- struct{}{}:
	default:
	}
}

// workLoop makes the receiver's slow calls, one at a time.
func (c *Cluster) workLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.resyncKick:
			if c.recv.Resync != nil {
				c.call("resync", "", func(ctx context.Context) error { return c.recv.Resync(ctx) })
			}
		case s := <-c.slow:
			switch {
			case s.Kind == KindRun && c.recv.RunChanged != nil:
				c.call("run changed", s.RunID, func(ctx context.Context) error { return c.recv.RunChanged(ctx, s.RunID) })
			case s.Kind == KindApproval && c.recv.ApprovalResolved != nil:
				c.call("approval resolved", s.RunID, func(ctx context.Context) error {
					return c.recv.ApprovalResolved(ctx, s.RunID, s.ApprovalID)
				})
			}
		}
	}
}

func (c *Cluster) call(what, runID string, fn func(ctx context.Context) error) {
	ctx, cancel := context.WithTimeout(c.ctx, callTimeout)
	defer cancel()
	if err := fn(ctx); err != nil && c.ctx.Err() == nil {
		l := c.log.WithError(err)
		if runID != "" {
			l = l.WithField("runId", runID)
		}
		if c.listening.Load() {
			l.Warn("cluster: acting on another replica's signal (" + what + ") failed")
		} else {
			// The database is away; the listener's log said so once.
			l.Debug("cluster: " + what + " failed")
		}
		c.resyncLater() // the next poll tries again
	}
}

// resyncLater asks the poller for a resync at its next tick.
func (c *Cluster) resyncLater() { c.retry.Store(true) }

// pollLoop is the fallback: while the listener is down, and after a failed
// call, it asks for a resync every PollInterval.
func (c *Cluster) pollLoop() {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
			if !c.listening.Load() || c.retry.Swap(false) {
				c.requestResync()
			}
		}
	}
}
