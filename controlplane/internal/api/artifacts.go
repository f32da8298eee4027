package api

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// LeaseHeader carries the agent's lease on artifact uploads.
const LeaseHeader = "X-Copelf-Lease"

var artifactNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

func (s *Server) artifactPath(runID, name string) string {
	return filepath.Join(s.cfg.DataDir, "artifacts", runID, name)
}

// putArtifact stores a file a run produced. Only the agent holding the run's
// current lease may upload (agent token + X-Copelf-Lease).
func (s *Server) putArtifact(w http.ResponseWriter, r *http.Request) error {
	p, err := s.Authenticate(r.Context(), tokenFrom(r))
	if err != nil {
		return err
	}
	if p.Token.Kind != store.TokenAgent {
		return protocol.Errorf(protocol.CodeForbidden, "Artifacts are uploaded with an agent token.").With("tokenKind", p.Token.Kind)
	}
	runID, name := r.PathValue("id"), r.PathValue("name")
	addLogField(r.Context(), "runId", runID)
	if !artifactNameRE.MatchString(name) {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "The artifact name is invalid.",
			[]protocol.FieldProblem{{Field: "name", Problem: "must be 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit"}})
	}
	run, err := s.store.RunGet(r.Context(), runID)
	if err != nil {
		return err
	}
	if run.AccountID != p.AccountID() {
		return protocol.Errorf(protocol.CodeForbidden, "The run belongs to another account.")
	}
	if lease := r.Header.Get(LeaseHeader); lease == "" || lease != run.LeaseID {
		return protocol.Errorf(protocol.CodeConflict, "The lease is not the run's current lease.").With("reason", protocol.ReasonLeaseLost)
	}
	if r.ContentLength > s.cfg.MaxArtifactBytes {
		return tooLarge(s.cfg.MaxArtifactBytes)
	}
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || ct == "" {
		ct = "application/octet-stream"
	} else {
		ct = mt
	}
	dir := filepath.Dir(s.artifactPath(runID, name))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".upload-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	sum := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, sum), http.MaxBytesReader(w, r.Body, s.cfg.MaxArtifactBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return tooLarge(s.cfg.MaxArtifactBytes)
		}
		return protocol.Errorf(protocol.CodeBadRequest, "The upload did not complete.").With("reason", "upload_incomplete")
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), s.artifactPath(runID, name)); err != nil {
		return err
	}
	a := store.Artifact{RunID: runID, Name: name, ContentType: ct, Size: n, SHA256: hex.EncodeToString(sum.Sum(nil))}
	if err := s.store.ArtifactPut(r.Context(), a); err != nil {
		return err
	}
	stored, err := s.store.ArtifactGet(r.Context(), runID, name)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, stored)
}

func tooLarge(limit int64) *protocol.Error {
	return protocol.Errorf(protocol.CodeBadRequest, "The artifact is larger than %d bytes.", limit).With("reason", "artifact_too_large").With("limit", limit)
}

func (s *Server) listArtifacts(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if _, err := s.visibleRun(r, p); err != nil {
		return err
	}
	items, err := s.store.ArtifactList(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(items, ""))
}

func (s *Server) getArtifact(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if _, err := s.visibleRun(r, p); err != nil {
		return err
	}
	runID, name := r.PathValue("id"), r.PathValue("name")
	a, err := s.store.ArtifactGet(r.Context(), runID, name)
	if err != nil {
		if protocol.ErrorCode(err) == protocol.CodeNotFound {
			return protocol.Errorf(protocol.CodeNotFound, "The artifact does not exist.")
		}
		return err
	}
	f, err := os.Open(s.artifactPath(runID, a.Name))
	if err != nil {
		return fmt.Errorf("open artifact: %w", err)
	}
	defer f.Close()
	w.Header().Set("Content-Type", a.ContentType)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	// An artifact is whatever an agent uploaded: on the dashboard's origin
	// it must never run script. Only raster images are shown inline; all
	// else (SVG and HTML included) downloads, and neither may script.
	w.Header().Set("Content-Security-Policy", "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'")
	w.Header().Set("ETag", `"`+a.SHA256+`"`)
	if !inlineArtifact(a.ContentType) {
		w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", a.Name))
	}
	// Range and conditional requests are honoured; their failures are
	// answered with the envelope instead of ServeContent's plain text.
	g := &failureGuard{ResponseWriter: w}
	http.ServeContent(g, r, "", a.CreatedAt, f)
	switch g.failed {
	case 0, http.StatusNotModified:
		return nil
	case http.StatusRequestedRangeNotSatisfiable:
		return protocol.Errorf(protocol.CodeBadRequest, "The requested range is outside the artifact.").With("reason", "range_not_satisfiable").With("size", a.Size)
	case http.StatusPreconditionFailed:
		return protocol.Errorf(protocol.CodeConflict, "The artifact does not match the request's precondition.").With("reason", "precondition_failed")
	}
	return protocol.Errorf(protocol.CodeBadRequest, "The artifact request cannot be answered.").With("status", g.failed)
}

// failureGuard swallows an error status and body written by
// http.ServeContent so that the caller can answer with the envelope.
type failureGuard struct {
	http.ResponseWriter
	failed int
}

func (g *failureGuard) WriteHeader(code int) {
	if code >= 400 {
		g.failed = code
		for _, h := range []string{"Content-Type", "Content-Range", "Content-Length", "Content-Disposition"} {
			g.Header().Del(h)
		}
		return
	}
	g.ResponseWriter.WriteHeader(code)
}

func (g *failureGuard) Write(b []byte) (int, error) {
	if g.failed != 0 {
		return len(b), nil
	}
	return g.ResponseWriter.Write(b)
}

// inlineArtifact reports a content type a browser may show in place: the
// raster image formats, which carry no script.
func inlineArtifact(contentType string) bool {
	mt, _, _ := strings.Cut(strings.ToLower(contentType), ";")
	switch strings.TrimSpace(mt) {
	case "image/png", "image/jpeg", "image/gif", "image/webp":
		return true
	}
	return false
}
