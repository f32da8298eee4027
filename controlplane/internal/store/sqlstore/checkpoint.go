package sqlstore

import (
	"context"
	"database/sql"
	"sync/atomic"
	"time"
)

const (
	// checkpointEvery is how many commits pass between two background
	// checkpoints (a run creation writes about fifteen WAL frames, so this
	// is close to SQLite's default of a checkpoint per 1000 frames).
	checkpointEvery = 64
	// checkpointIdle is how often a quiet database is checkpointed when
	// anything was committed since the last time.
	checkpointIdle = time.Second
	// writerAutoCheckpoint is the WAL size, in frames, at which the writer
	// checkpoints by itself, inside the commit that crosses it: the backstop
	// for a WAL that the background checkpoints cannot empty under steady
	// writes (only a complete checkpoint lets the WAL start over).
	writerAutoCheckpoint = 10000
)

// checkpointer copies the WAL back into the database file on a connection
// of its own, so that the writer does not wait for it. A checkpoint syncs
// the WAL and then the database file (synchronous=NORMAL), milliseconds or
// more on a busy disk, and SQLite's automatic checkpoint runs inside the
// commit that crosses the threshold, holding the only writer connection
// meanwhile. Durability does not change: a commit is durable against a
// killed process once it is in the WAL, with or without a checkpoint, and
// the WAL is synced about as often as before (at each checkpoint).
type checkpointer struct {
	db      *sql.DB
	commits atomic.Int64
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// newCheckpointer starts the loop on db (one connection); close stops it.
func newCheckpointer(db *sql.DB) *checkpointer {
	c := &checkpointer{db: db, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go c.loop()
	return c
}

// committed counts a commit and wakes the loop every checkpointEvery.
func (c *checkpointer) committed() {
	if c.commits.Add(1)%checkpointEvery == 0 {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
}

func (c *checkpointer) loop() {
	defer close(c.done)
	tick := time.NewTicker(checkpointIdle)
	defer tick.Stop()
	var last int64
	for {
		select {
		case <-c.stop:
			return
		case <-c.kick:
		case <-tick.C:
		}
		if n := c.commits.Load(); n != last {
			last = n
			// PASSIVE never waits for readers or the writer. A checkpoint
			// that fails or stops short is simply done again next time;
			// the writer's automatic checkpoint is the backstop.
			_, _ = c.db.ExecContext(context.Background(), `PRAGMA wal_checkpoint(PASSIVE)`)
		}
	}
}

// close stops the loop and closes its connection.
func (c *checkpointer) close() error {
	close(c.stop)
	<-c.done
	return c.db.Close()
}
