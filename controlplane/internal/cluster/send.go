package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// maxPayload bounds one NOTIFY payload: PostgreSQL refuses 8000 bytes and
// more.
const maxPayload = 7900

// maxBatch bounds the signals of one NOTIFY statement.
const maxBatch = 4096

// sendTimeout bounds one NOTIFY statement (with its connect).
const sendTimeout = 5 * time.Second

// message is a NOTIFY payload.
type message struct {
	Origin  string   `json:"origin"`
	Signals []Signal `json:"s"`
}

// encode packs signals into as few payloads as fit under maxPayload.
func encode(origin string, sigs []Signal) []string {
	head, _ := json.Marshal(origin)
	prefix := `{"origin":` + string(head) + `,"s":[`
	var out []string
	buf := []byte(prefix)
	n := 0
	for _, s := range sigs {
		item, err := json.Marshal(s)
		if err != nil || len(prefix)+len(item)+2 > maxPayload {
			continue // ids are short; a signal this long is not ours
		}
		if n > 0 && len(buf)+1+len(item)+2 > maxPayload {
			out = append(out, string(append(buf, ']', '}')))
			buf, n = []byte(prefix), 0
		}
		if n > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, item...)
		n++
	}
	if n > 0 {
		out = append(out, string(append(buf, ']', '}')))
	}
	return out
}

// take removes up to maxBatch pending signals.
func (c *Cluster) take() []Signal {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := min(len(c.pending), maxBatch)
	if n == 0 {
		return nil
	}
	out := make([]Signal, n)
	copy(out, c.pending)
	for _, s := range out {
		delete(c.queued, s)
	}
	rest := copy(c.pending, c.pending[n:])
	clear(c.pending[rest:])
	c.pending = c.pending[:rest]
	if rest == 0 && cap(c.pending) > maxBatch {
		c.pending = nil // give a burst's memory back
	}
	return out
}

// sender owns the connection NOTIFY statements go through.
type sender struct {
	c    *Cluster
	conn *pgx.Conn
}

func (s *sender) close() {
	if s.conn != nil {
		closeConn(s.conn)
		s.conn = nil
	}
}

// send delivers a batch in one statement (one transaction: the payloads
// reach the listeners together, at its commit).
func (s *sender) send(ctx context.Context, batch []Signal) error {
	ctx, cancel := context.WithTimeout(ctx, sendTimeout)
	defer cancel()
	if s.conn == nil {
		conn, err := s.c.connect(ctx)
		if err != nil {
			return err
		}
		s.conn = conn
	}
	_, err := s.conn.Exec(ctx, `SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p`, s.c.cfg.Channel, encode(s.c.cfg.Origin, batch))
	if err != nil && !refused(err) {
		s.close() // the connection may be broken; the next send opens another
	}
	return err
}

// refused reports an error about the statement itself (data or syntax):
// sending the batch again would fail again.
func refused(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || len(pe.Code) < 2 {
		return false
	}
	switch pe.Code[:2] {
	case "22", "42":
		return true
	}
	return false
}

// sendLoop sends the pending signals, a batch at a time, retrying a batch
// with backoff while the database cannot be reached. When the cluster
// closes it makes one last attempt at what is pending.
func (c *Cluster) sendLoop() {
	defer c.wg.Done()
	s := &sender{c: c}
	defer s.close()
	o := &outage{log: c.log, what: "sending signals to the other replicas"}
	bo := c.newBackoff()
	for {
		select {
		case <-c.sendKick:
		case <-c.stopSend:
			c.sendLast(s)
			return
		}
		for batch := c.take(); len(batch) > 0; batch = c.take() {
			for {
				err := s.send(context.Background(), batch)
				if err == nil {
					o.ok()
					bo.Reset()
					break
				}
				if refused(err) {
					c.log.WithError(err).WithField("signals", len(batch)).Error("cluster: the database refused signals; dropped")
					break
				}
				d := bo.NextBackOff()
				o.fail(err, d)
				t := time.NewTimer(d)
				select {
				case <-t.C:
					continue
				case <-c.stopSend:
					t.Stop()
					c.requeue(batch)
					c.sendLast(s)
					return
				}
			}
		}
	}
}

// sendLast makes one attempt, for a few seconds, at the pending signals.
func (c *Cluster) sendLast(s *sender) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for batch := c.take(); len(batch) > 0; batch = c.take() {
		if err := s.send(ctx, batch); err != nil {
			c.log.WithError(err).Warn("cluster: signals not sent before stopping")
			return
		}
	}
}

// requeue puts a batch back in front of the pending signals.
func (c *Cluster) requeue(batch []Signal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	keep := make([]Signal, 0, len(batch)+len(c.pending))
	for _, s := range batch {
		if _, dup := c.queued[s]; !dup {
			c.queued[s] = struct{}{}
			keep = append(keep, s)
		}
	}
	c.pending = append(keep, c.pending...)
}
