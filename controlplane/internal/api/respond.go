package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// writeError writes err as the envelope. Errors outside the catalog are
// logged with the request id and shown as internal, without their text.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var e *protocol.Error
	if !errors.As(err, &e) || !e.Code.Valid() {
		log := s.log.WithFields(logrus.Fields{"requestId": RequestID(r.Context()), "error": err.Error()})
		e = protocol.NewError(protocol.CodeInternal)
		switch {
		case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
			// The client went away mid-request (an agent dropping an
			// upload): nothing failed here, and nobody reads the answer.
			log.Info("request abandoned by the client")
		case invalidText(s.store, err):
			// A NUL character in a path or a query, which PostgreSQL's
			// text cannot hold (writes say so themselves).
			log.Info("text the database cannot hold")
			e = protocol.Errorf(protocol.CodeBadRequest, "The request holds text that cannot be stored (a NUL character).").With("reason", "invalid_text")
		case databaseUnavailable(s.store, err):
			// The database server is down or restarting: the request may
			// succeed when retried, and the store reconnects by itself.
			log.Warn("database unavailable")
			e = protocol.DatabaseUnavailable()
			w.Header().Set("Retry-After", "1")
		default:
			log.Error("internal error")
		}
	}
	out := *e
	out.RequestID = RequestID(r.Context())
	if out.Message == "" {
		out.Message = out.Code.DefaultMessage()
	}
	if out.Code == protocol.CodeRateLimited && w.Header().Get("Retry-After") == "" {
		w.Header().Set("Retry-After", "1")
	}
	_ = writeJSON(w, out.Code.HTTPStatus(), &out)
}

// ReasonDatabaseUnavailable is details.reason of the internal error that
// answers a request while the database server cannot be reached.
const ReasonDatabaseUnavailable = protocol.ReasonDatabaseUnavailable

// databaseUnavailable reports whether the store says err means its
// database server cannot be reached (sqlstore.DB.Unavailable).
func databaseUnavailable(st any, err error) bool {
	u, ok := st.(interface{ Unavailable(error) bool })
	return ok && u.Unavailable(err)
}

// invalidText reports whether the store says err is its database refusing
// a text value of the request (sqlstore.DB.InvalidText).
func invalidText(st any, err error) bool {
	u, ok := st.(interface{ InvalidText(error) bool })
	return ok && u.InvalidText(err)
}

// badRequest is a bad_request with details.fields.
func badRequest(msg string, fields ...protocol.FieldProblem) *protocol.Error {
	e := protocol.Errorf(protocol.CodeBadRequest, "%s", msg)
	if len(fields) > 0 {
		e = e.With("fields", fields)
	}
	return e
}

func fieldRequired(field string) protocol.FieldProblem {
	return protocol.FieldProblem{Field: field, Problem: "is required"}
}

// decodeJSON reads a JSON object body into dst, strictly: the body must be
// JSON, within MaxBodyBytes, with no unknown fields and no trailing data.
// Every failure is a bad_request naming the problem.
func decodeJSON(w http.ResponseWriter, r *http.Request, dst any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			return badRequest("The body must be JSON (Content-Type: application/json).").With("reason", "unsupported_content_type")
		}
	}
	body := http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return jsonError(err)
		}
		return badRequest("The body must hold a single JSON value.").With("reason", "malformed_json")
	}
	return nil
}

// jsonError turns a decoding error into a bad_request.
func jsonError(err error) *protocol.Error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return badRequest(fmt.Sprintf("The body is larger than %d bytes.", mbe.Limit)).With("reason", "body_too_large").With("limit", mbe.Limit)
	case errors.Is(err, io.EOF):
		return badRequest("The body is empty; a JSON object is expected.").With("reason", "malformed_json")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("The body is not valid JSON: it ends too early.").With("reason", "malformed_json")
	case errors.As(err, &syn):
		return badRequest("The body is not valid JSON.").With("reason", "malformed_json").With("offset", syn.Offset)
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "body"
		}
		return badRequest("A field has the wrong type.", protocol.FieldProblem{Field: field, Problem: "must be " + jsonKind(typ.Type.Kind().String())})
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		return badRequest("The body has an unknown field.", protocol.FieldProblem{Field: name, Problem: "is not a known field"})
	}
	return badRequest("The body is not valid JSON.").With("reason", "malformed_json")
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64", "float32", "float64":
		return "a number"
	case "slice", "array":
		return "an array"
	case "map", "struct", "ptr":
		return "an object"
	}
	return "of another type"
}
