package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
)

// maxGroup bounds how many write transactions share one commit.
const maxGroup = 64

// errClosed answers writes after Close.
var errClosed = errors.New("store closed")

// A groupCommitter runs the write transactions of a single-writer database
// (SQLite) from one goroutine, and commits the transactions that queued up
// while it was busy together: one BEGIN, one COMMIT and one write of each
// dirty page for the whole group instead of one per transaction. This is
// group commit as databases do it for their log.
//
// Each transaction of a group runs inside its own SAVEPOINT: a transaction
// whose function fails (a guard says conflict, a constraint fires) is rolled
// back to its savepoint and reports its error, and the others go on. The
// group is serial — each function sees the writes of those before it, as if
// they had committed one after the other — and nobody hears back before the
// COMMIT that makes their writes durable. Only a failed COMMIT (or a failed
// rollback to a savepoint: an I/O error) fails the whole group, and then
// every transaction of it reports that error and none of them took effect.
type groupCommitter struct {
	db    *DB
	reqs  chan *writeReq // unbuffered: a waiting sender is a queued transaction
	quit  chan struct{}
	done  chan struct{}
	close sync.Once
	// groups counts the commits shared by several transactions.
	groups atomic.Int64
}

type writeReq struct {
	ctx   context.Context
	fn    func(*sql.Tx) error
	err   error
	panic any
	done  chan struct{}
}

func newGroupCommitter(db *DB) *groupCommitter {
	g := &groupCommitter{db: db, reqs: make(chan *writeReq), quit: make(chan struct{}), done: make(chan struct{})}
	go g.loop()
	return g
}

// stop ends the loop after the group in progress; later writes get errClosed.
func (g *groupCommitter) stop() {
	g.close.Do(func() { close(g.quit) })
	<-g.done
}

// run queues fn and waits until its group has committed (or failed).
func (g *groupCommitter) run(ctx context.Context, fn func(*sql.Tx) error) error {
	req := &writeReq{ctx: ctx, fn: fn, done: make(chan struct{})}
	select {
	case g.reqs <- req:
	case <-g.quit:
		return errClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	<-req.done // the function may be running: wait for its outcome
	if req.panic != nil {
		panic(req.panic)
	}
	return req.err
}

func (g *groupCommitter) loop() {
	defer close(g.done)
	batch := make([]*writeReq, 0, maxGroup)
	for {
		select {
		case <-g.quit:
			return
		case r := <-g.reqs:
			batch = append(batch[:0], r)
		}
		// Let the writers woken by the last commit queue their next
		// transaction before the group closes (they are runnable now).
		runtime.Gosched()
	drain:
		for len(batch) < maxGroup {
			select {
			case r := <-g.reqs:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		if len(batch) == 1 {
			r := batch[0]
			r.panic, r.err = g.db.txAlone(r.ctx, r.fn)
			close(r.done)
			continue
		}
		g.groups.Add(1)
		g.commitGroup(batch)
		clear(batch)
	}
}

// commitGroup runs several transactions in one and answers each of them.
func (g *groupCommitter) commitGroup(batch []*writeReq) {
	s := g.db
	ctx := context.Background()
	defer func() {
		for _, r := range batch {
			close(r.done)
		}
	}()
	fail := func(err error) {
		for _, r := range batch {
			if r.err == nil && r.panic == nil {
				r.err = err
			}
		}
	}
	s.wstmts.preparePending(ctx, s.w)
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		fail(fmt.Errorf("begin: %w", err))
		return
	}
	s.wtx.Store(tx)
	defer s.wtx.CompareAndSwap(tx, nil)
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.err = err // gave up before its turn: never ran
			continue
		}
		if _, err := s.exec(ctx, tx, `SAVEPOINT grp`); err != nil {
			_ = tx.Rollback()
			fail(fmt.Errorf("savepoint: %w", err))
			return
		}
		r.panic, r.err = call(r.fn, tx)
		if r.err != nil || r.panic != nil {
			if _, err := s.exec(ctx, tx, `ROLLBACK TO grp`); err != nil {
				_ = tx.Rollback()
				fail(fmt.Errorf("rollback to savepoint: %w", err))
				return
			}
		}
		if _, err := s.exec(ctx, tx, `RELEASE grp`); err != nil {
			_ = tx.Rollback()
			fail(fmt.Errorf("release savepoint: %w", err))
			return
		}
	}
	if err := tx.Commit(); err != nil {
		fail(fmt.Errorf("commit: %w", err))
		return
	}
	if s.ckpt != nil {
		s.ckpt.committed()
	}
}

// call runs fn, turning a panic into a value the caller re-raises.
func call(fn func(*sql.Tx) error, tx *sql.Tx) (p any, err error) {
	defer func() {
		if v := recover(); v != nil {
			p = v
		}
	}()
	return nil, fn(tx)
}
