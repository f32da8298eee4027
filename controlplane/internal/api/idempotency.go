package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// recorder keeps a copy of what a handler writes.
type recorder struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (w *recorder) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.body.Write(b)
	return w.ResponseWriter.Write(b)
}

// idempotent honours an Idempotency-Key on a creating POST: the first
// successful response is stored and replayed for the same key and body; the
// same key with another body is conflict. Failed requests are not stored, so
// they may be retried with the same key.
func (s *Server) idempotent(h handlerFunc) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		key := r.Header.Get("Idempotency-Key")
		if key == "" {
			return h(w, r)
		}
		p, err := s.auth(r) // authentication comes first, as on every route
		if err != nil {
			return err
		}
		if len(key) > 255 {
			return badRequest("The Idempotency-Key header is too long.", protocol.FieldProblem{Field: "Idempotency-Key", Problem: "must be at most 255 characters"})
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
		if err != nil {
			return jsonError(err)
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		sum := sha256.New()
		// The query is part of the request (a CSV batch takes its settings there).
		io.WriteString(sum, r.Method+" "+r.URL.Path+"?"+r.URL.Query().Encode()+"\n"+r.Header.Get("Content-Type")+"\n")
		sum.Write(body)
		rec := store.IdempotencyRecord{AccountID: p.AccountID(), Key: key, RequestHash: hex.EncodeToString(sum.Sum(nil))}

		prev, fresh, err := s.store.IdempotencyBegin(r.Context(), rec)
		if err != nil {
			return err
		}
		if !fresh {
			switch {
			case prev.RequestHash != rec.RequestHash:
				return protocol.Errorf(protocol.CodeConflict, "This Idempotency-Key was used with another request.").With("reason", "idempotency_key_reused")
			case !prev.Done:
				return protocol.Errorf(protocol.CodeConflict, "A request with this Idempotency-Key is still in progress.").With("reason", "idempotency_key_in_progress")
			}
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Idempotent-Replayed", "true")
			w.WriteHeader(prev.Status)
			_, err := w.Write(prev.Body)
			return err
		}

		rw := &recorder{ResponseWriter: w}
		if err := h(rw, r); err != nil {
			s.writeError(rw, r, err)
		}
		// The response is written; the key's fate must not depend on the
		// client still listening.
		ctx := r.Context()
		if rw.status >= 200 && rw.status < 300 {
			rec.Done, rec.Status, rec.Body = true, rw.status, rw.body.Bytes()
			if err := s.store.IdempotencyFinish(context.WithoutCancel(ctx), rec); err != nil {
				s.log.WithField("requestId", RequestID(ctx)).WithError(err).Error("store idempotent response")
			}
			return nil
		}
		if err := s.store.IdempotencyAbort(context.WithoutCancel(ctx), rec.AccountID, rec.Key); err != nil {
			s.log.WithField("requestId", RequestID(ctx)).WithError(err).Error("release idempotency key")
		}
		return nil
	}
}
