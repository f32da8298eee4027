package cluster

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// leaderLock is the session advisory lock whose holder runs maintenance:
// one per schema, as the store's migration lock.
const leaderLock = `hashtext('copelf:maintenance:' || current_schema())`

// leaderLoop takes leadership when no replica holds it and keeps it while
// its connection answers; a failed ping drops it at once (the server
// releases the lock with the session) and the loop connects again.
func (c *Cluster) leaderLoop() {
	defer c.wg.Done()
	o := &outage{log: c.log, what: "the maintenance leadership connection"}
	bo := c.newBackoff()
	for c.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.ctx, 15*time.Second)
		conn, err := c.connect(ctx)
		cancel()
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
		err = c.lead(conn)
		if c.leader.Swap(false) {
			if c.ctx.Err() != nil {
				c.log.Info("cluster: maintenance leadership given up")
			} else {
				c.log.WithError(err).Warn("cluster: maintenance leadership lost")
			}
		}
		closeConn(conn) // releases the lock, if the server still had it
		if c.ctx.Err() == nil && !c.sleep(bo.NextBackOff()) {
			return
		}
	}
}

// lead tries for the lock every LeaderInterval and, once it holds it, pings
// at the same pace; it returns when the connection fails or the cluster
// closes.
func (c *Cluster) lead(conn *pgx.Conn) error {
	for {
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.LeaderInterval+5*time.Second)
		var err error
		if c.leader.Load() {
			err = conn.Ping(ctx)
		} else {
			var got bool
			err = conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(`+leaderLock+`)`).Scan(&got)
			if err == nil && got {
				c.leader.Store(true)
				c.log.Info("cluster: maintenance leadership acquired: this replica runs the lease reaper")
			}
		}
		cancel()
		if err != nil {
			return err
		}
		if !c.sleep(c.cfg.LeaderInterval) {
			return c.ctx.Err()
		}
	}
}
