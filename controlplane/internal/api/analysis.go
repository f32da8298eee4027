package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/video"
	"github.com/copelf/copelf/protocol"
)

// Recorded workflows (API.md §4): a video uploaded with the workflow (or
// later, with PUT …/video) is stored, probed for its container and
// duration, and analysed by an analyzer service that claims the workflow,
// downloads the video and posts a definition or an error.

// Defaults of the video settings in Config.
const (
	DefaultVideoIdleTimeout   = 30 * time.Second
	DefaultVideoUploadTimeout = 30 * time.Minute
	DefaultAnalysisTimeout    = 10 * time.Minute
)

// multipartOverhead is what a multipart body may hold beside the video: the
// name and the parts' headers and boundaries.
const multipartOverhead = 1 << 20

// maxNameField bounds the multipart name field (200 characters of UTF-8).
const maxNameField = 4 << 10

var analysisCodeRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

// errUploadTimeout is an upload cut by its read deadline.
var errUploadTimeout = errors.New("upload read deadline exceeded")

// uploadReader reads a request body under the upload's read deadlines: the
// connection's deadline is moved to now+idle as bytes arrive, never past
// the whole upload's deadline, so a stalled or trickling client is cut
// off (http.ResponseController.SetReadDeadline). Where the connection has
// no deadlines (tests with a recorder), the body is read as it is.
type uploadReader struct {
	r        io.Reader
	rc       *http.ResponseController
	idle     time.Duration
	hard     time.Time
	extended time.Time
	ok       bool
}

func (s *Server) newUploadReader(w http.ResponseWriter, body io.Reader) *uploadReader {
	u := &uploadReader{r: body, rc: http.NewResponseController(w), idle: s.cfg.VideoIdleTimeout, hard: time.Now().Add(s.cfg.VideoUploadTimeout)}
	u.ok = u.extend(time.Now()) == nil
	return u
}

func (u *uploadReader) extend(now time.Time) error {
	u.extended = now
	deadline := now.Add(u.idle)
	if deadline.After(u.hard) {
		deadline = u.hard
	}
	return u.rc.SetReadDeadline(deadline)
}

func (u *uploadReader) Read(p []byte) (int, error) {
	n, err := u.r.Read(p)
	if n > 0 && u.ok {
		if now := time.Now(); now.Sub(u.extended) > u.idle/8 {
			_ = u.extend(now)
		}
	}
	if err != nil && isTimeout(err) {
		return n, errUploadTimeout
	}
	return n, err
}

// done lifts the deadline for the rest of the request.
func (u *uploadReader) done() {
	if u.ok {
		_ = u.rc.SetReadDeadline(time.Time{})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// uploadFailed maps an error met while reading an upload to the envelope.
func uploadFailed(err error) error {
	var mbe *http.MaxBytesError
	switch {
	case errors.Is(err, errUploadTimeout):
		return protocol.Errorf(protocol.CodeTimeout, "The upload was too slow and has been cut off.").With("reason", "upload_timeout")
	case errors.As(err, &mbe), errors.Is(err, video.ErrTooLarge):
		return videoTooLarge()
	}
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe
	}
	return protocol.Errorf(protocol.CodeBadRequest, "The upload did not complete.").With("reason", "upload_incomplete")
}

func videoTooLarge() *protocol.Error {
	return protocol.Errorf(protocol.CodeBadRequest, "The video is larger than %d bytes (300 MiB).", video.MaxBytes).
		With("reason", "video_too_large").With("limit", video.MaxBytes)
}

// videoStore is the configured video store, or a directory in DataDir.
func videoStore(cfg Config, log logrus.FieldLogger) video.Store {
	if cfg.Videos != nil {
		return cfg.Videos
	}
	d, err := video.NewDir(filepath.Join(cfg.DataDir, "videos"))
	if err != nil {
		log.WithError(err).Error("no video store: uploads will fail")
		return nil
	}
	return d
}

// receiveVideo streams a video into the video store and probes it. A video
// that is too large, too long or not a supported container is refused, and
// nothing of it is kept.
func (s *Server) receiveVideo(ctx context.Context, r io.Reader) (*store.WorkflowVideo, error) {
	if s.cfg.Videos == nil {
		return nil, errors.New("no video store configured")
	}
	body := &bodyReader{r: r}
	key, size, err := s.cfg.Videos.Put(ctx, body, video.MaxBytes)
	switch {
	case errors.Is(err, video.ErrTooLarge):
		return nil, videoTooLarge()
	case err != nil && body.err != nil && errors.Is(err, body.err):
		return nil, uploadFailed(err) // the client's side: too slow, too large, cut short
	case err != nil:
		return nil, err
	}
	info, err := s.probeVideo(ctx, key, size)
	if err != nil {
		s.deleteVideo(ctx, key)
		var ue *video.UnsupportedError
		if errors.As(err, &ue) {
			addLogField(ctx, "videoProblem", ue.Error())
			return nil, protocol.Errorf(protocol.CodeUnprocessableEntity, "The video is not an MP4, MOV or WebM file this server can read (%s).", ue.Reason).
				With("reason", "unsupported_video")
		}
		return nil, err
	}
	if info.Duration > video.MaxDuration {
		s.deleteVideo(ctx, key)
		return nil, protocol.Errorf(protocol.CodeUnprocessableEntity, "The video plays for %s; at most %s is accepted.", info.Duration.Round(time.Second), video.MaxDuration).
			With("reason", "video_too_long").With("durationMs", info.Duration.Milliseconds()).With("maxDurationMs", video.MaxDuration.Milliseconds())
	}
	addLogField(ctx, "videoBytes", size)
	return &store.WorkflowVideo{Key: key, SizeBytes: size, DurationMs: info.Duration.Milliseconds(), Container: string(info.Container)}, nil
}

func (s *Server) probeVideo(ctx context.Context, key string, size int64) (video.Info, error) {
	obj, err := s.cfg.Videos.Open(ctx, key)
	if err != nil {
		return video.Info{}, err
	}
	defer obj.Close()
	return video.Probe(obj, size)
}

// deleteVideo removes a stored video; a failure is logged, not returned:
// the request it belongs to has already succeeded or failed on its own.
func (s *Server) deleteVideo(ctx context.Context, key string) {
	if s.cfg.Videos == nil || key == "" {
		return
	}
	if err := s.cfg.Videos.Delete(context.WithoutCancel(ctx), key); err != nil {
		s.log.WithFields(logrus.Fields{"requestId": RequestID(ctx), "error": err.Error()}).Warn("video not deleted")
	}
}

// createRecordedWorkflow is POST /v1/workflows as multipart/form-data with
// the fields name and video: the video is streamed to the video store
// (never held in memory), probed, and the workflow created analyzing.
func (s *Server) createRecordedWorkflow(w http.ResponseWriter, r *http.Request, p *Principal) (err error) {
	if r.ContentLength > video.MaxBytes+multipartOverhead {
		return videoTooLarge()
	}
	up := s.newUploadReader(w, r.Body)
	defer up.done()
	body := http.MaxBytesReader(w, io.NopCloser(up), video.MaxBytes+multipartOverhead)
	r.Body = body
	mr, err := r.MultipartReader()
	if err != nil {
		return badRequest("The body must be multipart/form-data with the fields name and video.").With("reason", "malformed_multipart")
	}
	var name *string
	var vid *store.WorkflowVideo
	defer func() {
		if err != nil && vid != nil {
			s.deleteVideo(r.Context(), vid.Key)
		}
	}()
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if isUploadError(err) {
				return uploadFailed(err)
			}
			return badRequest("The multipart body is malformed.").With("reason", "malformed_multipart")
		}
		switch field := part.FormName(); field {
		case "name":
			if name != nil {
				return badRequest("The field name is given twice.", protocol.FieldProblem{Field: "name", Problem: "must be given once"})
			}
			raw, err := io.ReadAll(io.LimitReader(part, maxNameField+1))
			if err != nil {
				return uploadFailed(err)
			}
			if len(raw) > maxNameField || !utf8.Valid(raw) {
				return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.",
					[]protocol.FieldProblem{{Field: "name", Problem: "must be 1 to 200 characters of UTF-8 and not blank"}})
			}
			v := string(raw)
			name = &v
		case "video":
			if vid != nil {
				return badRequest("Only one video may be uploaded.", protocol.FieldProblem{Field: "video", Problem: "must be given once"})
			}
			if vid, err = s.receiveVideo(r.Context(), part); err != nil {
				return err
			}
		default:
			return badRequest("The body has an unknown field.", protocol.FieldProblem{Field: field, Problem: "is not a known field"})
		}
	}
	var missing []protocol.FieldProblem
	if name == nil {
		missing = append(missing, fieldRequired("name"))
	}
	if vid == nil {
		missing = append(missing, fieldRequired("video"))
	}
	if len(missing) > 0 {
		return badRequest("Required fields are missing.", missing...)
	}
	if e := checkName(*name); e != nil {
		return e
	}
	wf, err := s.store.WorkflowCreate(r.Context(), store.WorkflowCreateParams{AccountID: p.AccountID(), Name: *name, Status: protocol.WorkflowAnalyzing, Video: vid})
	if err != nil {
		return err
	}
	addLogField(r.Context(), "workflowId", wf.ID)
	return writeJSON(w, http.StatusCreated, viewWorkflow(wf))
}

// bodyReader remembers the error of the body it reads, to tell the
// client's failures from the store's.
type bodyReader struct {
	r   io.Reader
	err error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		b.err = err
	}
	return n, err
}

// isUploadError reports an error of the body itself (size, deadline, a
// client gone) rather than of the multipart syntax.
func isUploadError(err error) bool {
	var mbe *http.MaxBytesError
	return errors.Is(err, errUploadTimeout) || errors.As(err, &mbe) || errors.Is(err, io.ErrUnexpectedEOF)
}

// putVideo is PUT /v1/workflows/{id}/video: the body is the new video. A
// ready or analysis_failed workflow goes back to analyzing; the old video
// is deleted once the new one is recorded.
func (s *Server) putVideo(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	wf, err := s.ownWorkflow(r, p)
	if err != nil {
		return err
	}
	if wf.Status == protocol.WorkflowAnalyzing {
		return protocol.Errorf(protocol.CodeConflict, "The workflow's video is being analyzed.").With("reason", "analyzing").With("status", wf.Status)
	}
	if r.ContentLength > video.MaxBytes {
		return videoTooLarge()
	}
	up := s.newUploadReader(w, r.Body)
	defer up.done()
	vid, err := s.receiveVideo(r.Context(), up)
	if err != nil {
		return err
	}
	updated, previous, err := s.store.WorkflowVideoReplace(r.Context(), store.WorkflowVideoParams{ID: wf.ID, Video: *vid})
	if err != nil {
		s.deleteVideo(r.Context(), vid.Key)
		return err
	}
	s.deleteVideo(r.Context(), previous)
	return writeJSON(w, http.StatusOK, viewWorkflow(updated))
}

// getVideo is GET /v1/workflows/{id}/video, for the workflow's owner and
// for analyzers, with Range and conditional requests.
func (s *Server) getVideo(w http.ResponseWriter, r *http.Request) error {
	wf, err := s.videoReader(r)
	if err != nil {
		return err
	}
	if wf.Video == nil || s.cfg.Videos == nil {
		return protocol.Errorf(protocol.CodeNotFound, "The workflow has no video.")
	}
	obj, err := s.cfg.Videos.Open(r.Context(), wf.Video.Key)
	if errors.Is(err, video.ErrNotFound) {
		return protocol.Errorf(protocol.CodeNotFound, "The workflow has no video.")
	}
	if err != nil {
		return fmt.Errorf("open video: %w", err)
	}
	defer obj.Close()
	w.Header().Set("Content-Type", video.Container(wf.Video.Container).ContentType())
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("ETag", `"`+wf.Video.Key+`"`)
	g := &failureGuard{ResponseWriter: w}
	http.ServeContent(g, r, "", obj.ModTime(), obj)
	switch g.failed {
	case 0, http.StatusNotModified:
		return nil
	case http.StatusRequestedRangeNotSatisfiable:
		return protocol.Errorf(protocol.CodeBadRequest, "The requested range is outside the video.").With("reason", "range_not_satisfiable").With("size", obj.Size())
	case http.StatusPreconditionFailed:
		return protocol.Errorf(protocol.CodeConflict, "The video does not match the request's precondition.").With("reason", "precondition_failed")
	}
	return protocol.Errorf(protocol.CodeBadRequest, "The video request cannot be answered.").With("status", g.failed)
}

// videoReader authenticates a download: an analyzer (or admin) reads any
// live workflow's video, an owner their own.
func (s *Server) videoReader(r *http.Request) (*store.Workflow, error) {
	p, err := s.Authenticate(r.Context(), tokenFrom(r))
	if err != nil {
		return nil, err
	}
	if p.Token.Kind == store.TokenAnalyzer {
		if err := analyzerAllowed(r, p); err != nil {
			return nil, err
		}
		return s.liveWorkflow(r)
	}
	if p, err = s.auth(r); err != nil {
		return nil, err
	}
	if p.Can(store.RoleAdmin) {
		return s.liveWorkflow(r)
	}
	return s.ownWorkflow(r, p)
}

// authAnalyzer authenticates an analyzer: a token of kind analyzer, or an
// admin's session or api token.
func (s *Server) authAnalyzer(r *http.Request) (*Principal, error) {
	p, err := s.Authenticate(r.Context(), tokenFrom(r))
	if err != nil {
		return nil, err
	}
	if p.Token.Kind == store.TokenAnalyzer {
		return p, analyzerAllowed(r, p)
	}
	p, err = s.auth(r)
	if err != nil {
		return nil, err
	}
	if !p.Can(store.RoleAdmin) {
		return nil, protocol.Errorf(protocol.CodeForbidden, "Analysis is done with an analyzer token or by an admin.").With("requiredRole", store.RoleAdmin)
	}
	return p, nil
}

// analyzerAllowed checks an analyzer token's principal: the token works only
// while the admin who created it is still an admin (analyzer tokens are
// created by admins; demoting the admin stops their tokens).
func analyzerAllowed(r *http.Request, p *Principal) error {
	addLogField(r.Context(), "userId", p.User.ID)
	if !p.Can(store.RoleAdmin) {
		return protocol.Errorf(protocol.CodeForbidden, "The analyzer token's creator is no longer an admin.").With("requiredRole", store.RoleAdmin)
	}
	return nil
}

// liveWorkflow loads the path's workflow whoever owns it; deleted ones
// are workflow_not_found.
func (s *Server) liveWorkflow(r *http.Request) (*store.Workflow, error) {
	id := r.PathValue("id")
	addLogField(r.Context(), "workflowId", id)
	wf, err := s.store.WorkflowGet(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if wf.DeletedAt != nil {
		return nil, protocol.NewError(protocol.CodeWorkflowNotFound)
	}
	return wf, nil
}

// analysisWorkflowView is a workflow as analyzers see it: with its account.
type analysisWorkflowView struct {
	workflowView
	AccountID string `json:"accountId"`
	// ClaimID names the caller's claim (claim responses only).
	ClaimID string `json:"claimId,omitempty"`
}

// listWaiting is GET /v1/analysis/workflows: the workflows waiting for an
// analyzer, oldest analysis first.
func (s *Server) listWaiting(w http.ResponseWriter, r *http.Request) error {
	if _, err := s.authAnalyzer(r); err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	items, next, err := s.store.WorkflowAnalysisWaiting(r.Context(), page)
	if err != nil {
		return err
	}
	views := make([]analysisWorkflowView, len(items))
	for i, wf := range items {
		views[i] = analysisWorkflowView{workflowView: viewWorkflow(wf), AccountID: wf.AccountID}
	}
	return writeJSON(w, http.StatusOK, listBody(views, next))
}

// claimAnalysis is POST /v1/workflows/{id}/analysis/claim: the caller takes
// the workflow's analysis; of analyzers racing, one gets it and the others
// conflict (details.reason "already_claimed").
func (s *Server) claimAnalysis(w http.ResponseWriter, r *http.Request) error {
	p, err := s.authAnalyzer(r)
	if err != nil {
		return err
	}
	id := r.PathValue("id")
	addLogField(r.Context(), "workflowId", id)
	wf, err := s.store.WorkflowAnalysisClaim(r.Context(), store.WorkflowAnalysisClaimParams{ID: id, ClaimID: ids.New("clm"), By: p.Token.ID})
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, analysisWorkflowView{workflowView: viewWorkflow(wf), AccountID: wf.AccountID, ClaimID: wf.Analysis.ClaimID})
}

type analysisBody struct {
	ClaimID    *string         `json:"claimId"`
	Definition json.RawMessage `json:"definition"`
	Error      *struct {
		Code    *string `json:"code"`
		Message *string `json:"message"`
	} `json:"error"`
}

// postAnalysis is POST /v1/workflows/{id}/analysis: the claimant posts the
// definition it found (validated like any definition: 422 when invalid) or
// an error. The claim is named by claimId, or else by the caller's token.
func (s *Server) postAnalysis(w http.ResponseWriter, r *http.Request) error {
	p, err := s.authAnalyzer(r)
	if err != nil {
		return err
	}
	if _, err := s.liveWorkflow(r); err != nil {
		return err
	}
	var b analysisBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	hasDef := len(b.Definition) > 0 && string(b.Definition) != "null"
	switch {
	case hasDef && b.Error != nil:
		return badRequest("Post either a definition or an error, not both.",
			protocol.FieldProblem{Field: "definition", Problem: "must not be given with error"}, protocol.FieldProblem{Field: "error", Problem: "must not be given with definition"})
	case !hasDef && b.Error == nil:
		return badRequest("A definition or an error is required.", fieldRequired("definition"), fieldRequired("error"))
	}
	params := store.WorkflowAnalysisFinishParams{ID: r.PathValue("id"), By: p.Token.ID}
	if b.ClaimID != nil {
		params.ClaimID = *b.ClaimID
	}
	if hasDef {
		_, norm, err := parseDefinition(b.Definition)
		if err != nil {
			return err
		}
		params.Definition = norm
	} else {
		if b.Error.Message == nil {
			return badRequest("Required fields are missing.", fieldRequired("error.message"))
		}
		code := "analysis_failed"
		if b.Error.Code != nil {
			code = *b.Error.Code
		}
		var bad []protocol.FieldProblem
		if !analysisCodeRE.MatchString(code) {
			bad = append(bad, protocol.FieldProblem{Field: "error.code", Problem: "must match ^[a-z][a-z0-9_]{0,63}$"})
		}
		if msg := *b.Error.Message; strings.TrimSpace(msg) == "" || utf8.RuneCountInString(msg) > 2000 {
			bad = append(bad, protocol.FieldProblem{Field: "error.message", Problem: "must be 1 to 2000 characters and not blank"})
		}
		if len(bad) > 0 {
			return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
		}
		params.Error = &store.AnalysisError{Code: code, Message: *b.Error.Message}
	}
	wf, err := s.store.WorkflowAnalysisFinish(r.Context(), params)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, analysisWorkflowView{workflowView: viewWorkflow(wf), AccountID: wf.AccountID})
}

// ExpireAnalyses fails every analysis that started more than the analysis
// timeout ago (error code "timeout") and returns the workflows it failed.
// It is one guarded UPDATE: replicas may run it at once.
func (s *Server) ExpireAnalyses(ctx context.Context) ([]string, error) {
	expired, err := s.store.WorkflowAnalysisExpire(ctx, s.Now().Add(-s.cfg.AnalysisTimeout))
	for _, id := range expired {
		s.log.WithFields(logrus.Fields{"workflowId": id, "analysisTimeout": s.cfg.AnalysisTimeout.String()}).Warn("analysis timed out")
	}
	return expired, err
}

// RunAnalysisReaper runs ExpireAnalyses at once (a workflow left analyzing
// by a stopped server is failed when the next one starts) and then every
// interval until ctx is done; interval 0 is a tenth of the analysis
// timeout, between 1 s and 30 s.
func (s *Server) RunAnalysisReaper(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = min(max(s.cfg.AnalysisTimeout/10, time.Second), 30*time.Second)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := s.ExpireAnalyses(ctx); err != nil && ctx.Err() == nil {
			s.log.WithError(err).Error("analysis reaper")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
