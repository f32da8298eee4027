package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"sync"
)

// maxCachedStmts bounds each pool's statement cache. Queries built with a
// variable number of placeholders may pass it; they then run unprepared.
const maxCachedStmts = 256

// stmtCache keeps one pool's prepared statements by query text, so that
// SQLite parses and plans a statement once per connection instead of on
// every call (parsing was about a fifth of the CPU time of a run creation).
// Prepared statements change nothing else: the same SQL runs with the same
// arguments, in the same transactions.
//
// A statement is prepared on the pool, which needs one of its connections.
// The writer pool has a single connection, held by a transaction while it
// runs, so a query first met inside a transaction runs unprepared and is
// noted; it is prepared before the next transaction begins.
type stmtCache struct {
	mu      sync.Mutex
	stmts   map[string]*sql.Stmt
	pending map[string]bool
	closed  bool
}

// get returns query's prepared statement, or nil.
func (c *stmtCache) get(query string) *sql.Stmt {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stmts[query]
}

// later notes query, met inside a transaction, for preparePending.
func (c *stmtCache) later(query string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed && len(c.stmts)+len(c.pending) < maxCachedStmts {
		if c.pending == nil {
			c.pending = map[string]bool{}
		}
		c.pending[query] = true
	}
}

// prepare returns query's statement on pool, preparing it when it is not
// cached yet and there is room; nil means: run it unprepared. It must not
// be called while the caller holds the only connection of pool.
func (c *stmtCache) prepare(ctx context.Context, pool *sql.DB, query string) *sql.Stmt {
	c.mu.Lock()
	st, ok := c.stmts[query]
	full := c.closed || len(c.stmts) >= maxCachedStmts
	c.mu.Unlock()
	if ok || full {
		return st
	}
	st, err := pool.PrepareContext(ctx, query)
	if err != nil {
		// The unprepared call reports the error, if it is one.
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if prev, ok := c.stmts[query]; ok || c.closed || len(c.stmts) >= maxCachedStmts {
		st.Close()
		return prev
	}
	if c.stmts == nil {
		c.stmts = map[string]*sql.Stmt{}
	}
	c.stmts[query] = st
	return st
}

// preparePending prepares the queries noted by later.
func (c *stmtCache) preparePending(ctx context.Context, pool *sql.DB) {
	c.mu.Lock()
	if len(c.pending) == 0 {
		c.mu.Unlock()
		return
	}
	queries := make([]string, 0, len(c.pending))
	for q := range c.pending {
		queries = append(queries, q)
	}
	clear(c.pending)
	c.mu.Unlock()
	for _, q := range queries {
		c.prepare(ctx, pool, q)
	}
}

// close closes every cached statement; the cache stays empty from then on.
func (c *stmtCache) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	var errs []error
	for _, st := range c.stmts {
		errs = append(errs, st.Close())
	}
	clear(c.stmts)
	clear(c.pending)
	return errors.Join(errs...)
}

// stmt returns a prepared statement for query on q, or nil to run it
// unprepared. q is the read pool, the writer pool, or the write transaction
// in progress (s.tx); any other transaction runs unprepared.
func (s *DB) stmt(ctx context.Context, q querier, query string) *sql.Stmt {
	if s.d.driverCache {
		return nil
	}
	switch q := q.(type) {
	case *sql.Tx:
		if q != s.wtx.Load() {
			return nil
		}
		if st := s.wstmts.get(query); st != nil {
			return q.StmtContext(ctx, st)
		}
		s.wstmts.later(query)
	case *sql.DB:
		switch q {
		case s.w:
			return s.wstmts.prepare(ctx, q, query)
		case s.r:
			return s.rstmts.prepare(ctx, q, query)
		}
	}
	return nil
}

// queryRow is q.QueryRowContext with a cached prepared statement.
func (s *DB) queryRow(ctx context.Context, q querier, query string, args ...any) *sql.Row {
	query = s.q(query)
	if st := s.stmt(ctx, q, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return q.QueryRowContext(ctx, query, args...)
}
