package api

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/protocol"
)

type ctxKey int

const (
	requestIDKey ctxKey = iota
	principalKey
	logFieldsKey
)

// RequestID returns the request's id.
func RequestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey).(string)
	return id
}

// statusWriter records the status for the log line.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += n
	return n, err
}

// Unwrap lets http.ResponseController reach the connection (SSE, websockets).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack hands the connection to a websocket upgrade.
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil && w.status == 0 {
		w.status = http.StatusSwitchingProtocols
	}
	return c, rw, err
}

// Flush sends buffered data (server-sent events).
func (w *statusWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

// logFields collects fields a handler adds to the request's log line.
type logFields struct{ fields logrus.Fields }

// addLogField adds a field to the request's log line (runId, workflowId…).
func addLogField(ctx context.Context, key string, value any) {
	if lf, ok := ctx.Value(logFieldsKey).(*logFields); ok {
		lf.fields[key] = value
	}
}

// middleware: request id, a log line per request with the id, panic
// recovery into the envelope.
func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		id := r.Header.Get("X-Request-Id")
		if !ids.ValidRequestID(id) {
			id = ids.New(ids.Request)
		}
		w.Header().Set("X-Request-Id", id)
		lf := &logFields{fields: logrus.Fields{}}
		ctx := context.WithValue(r.Context(), requestIDKey, id)
		ctx = context.WithValue(ctx, logFieldsKey, lf)
		r = r.WithContext(ctx)
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.log.WithFields(logrus.Fields{"requestId": id, "panic": fmt.Sprint(p), "stack": string(debug.Stack())}).Error("handler panicked")
				if sw.status == 0 {
					s.writeError(sw, r, protocol.NewError(protocol.CodeInternal))
				}
			}
			entry := s.log.WithFields(lf.fields).WithFields(logrus.Fields{
				"requestId":  id,
				"method":     r.Method,
				"path":       r.URL.Path,
				"status":     sw.status,
				"bytes":      sw.bytes,
				"durationMs": float64(time.Since(start).Microseconds()) / 1000,
			})
			if sw.status >= 500 {
				entry.Warn("request")
			} else {
				entry.Info("request")
			}
			// By the mux pattern that served the request: never a raw path.
			stream := sw.status == http.StatusSwitchingProtocols || strings.HasPrefix(sw.Header().Get("Content-Type"), "text/event-stream")
			s.metrics.HTTPRequest(r.Method, r.Pattern, sw.status, time.Since(start), stream)
		}()
		next.ServeHTTP(sw, r)
	})
}
