package api

import (
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// workflowView is a workflow as the API shows it.
type workflowView struct {
	ID         string                  `json:"id"`
	Name       string                  `json:"name"`
	Status     protocol.WorkflowStatus `json:"status"`
	Definition json.RawMessage         `json:"definition"`
	Video      *store.WorkflowVideo    `json:"video,omitempty"`
	Analysis   *store.WorkflowAnalysis `json:"analysis,omitempty"`
	CreatedAt  time.Time               `json:"createdAt"`
	UpdatedAt  time.Time               `json:"updatedAt"`
}

func viewWorkflow(w *store.Workflow) workflowView {
	def := w.Definition
	if len(def) == 0 {
		def = json.RawMessage("null")
	}
	return workflowView{ID: w.ID, Name: w.Name, Status: w.Status, Definition: def, Video: w.Video, Analysis: w.Analysis,
		CreatedAt: w.CreatedAt, UpdatedAt: w.UpdatedAt}
}

type workflowBody struct {
	Name       *string         `json:"name"`
	Definition json.RawMessage `json:"definition"`
}

// parseDefinition decodes and validates a definition given in a request,
// with field paths under "definition.", and returns it normalised.
func parseDefinition(raw json.RawMessage) (*protocol.Definition, json.RawMessage, error) {
	def, err := protocol.DecodeDefinition(raw)
	if err != nil {
		var e *protocol.Error
		if errors.As(err, &e) {
			if fields, ok := e.Details["fields"].([]protocol.FieldProblem); ok {
				prefixed := make([]protocol.FieldProblem, len(fields))
				for i, f := range fields {
					prefixed[i] = protocol.FieldProblem{Field: "definition." + f.Field, Problem: f.Problem}
				}
				e = e.With("fields", prefixed)
			}
			return nil, nil, e
		}
		return nil, nil, err
	}
	norm, err := json.Marshal(def)
	if err != nil {
		return nil, nil, err
	}
	return def, norm, nil
}

func checkName(name string) *protocol.Error {
	if strings.TrimSpace(name) == "" || utf8.RuneCountInString(name) > 200 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.",
			[]protocol.FieldProblem{{Field: "name", Problem: "must be 1 to 200 characters and not blank"}})
	}
	return nil
}

func (s *Server) createWorkflow(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); strings.HasPrefix(mt, "multipart/") {
		return s.createRecordedWorkflow(w, r, p)
	}
	var b workflowBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	var missing []protocol.FieldProblem
	if b.Name == nil {
		missing = append(missing, fieldRequired("name"))
	}
	if len(b.Definition) == 0 || string(b.Definition) == "null" {
		missing = append(missing, fieldRequired("definition"))
	}
	if len(missing) > 0 {
		return badRequest("Required fields are missing.", missing...)
	}
	if e := checkName(*b.Name); e != nil {
		return e
	}
	_, norm, err := parseDefinition(b.Definition)
	if err != nil {
		return err
	}
	wf, err := s.store.WorkflowCreate(r.Context(), store.WorkflowCreateParams{AccountID: p.AccountID(), Name: *b.Name, Status: protocol.WorkflowReady, Definition: norm})
	if err != nil {
		return err
	}
	addLogField(r.Context(), "workflowId", wf.ID)
	return writeJSON(w, http.StatusCreated, viewWorkflow(wf))
}

// ownWorkflow loads a live workflow the principal owns: unknown or deleted
// → workflow_not_found; another account's → forbidden.
func (s *Server) ownWorkflow(r *http.Request, p *Principal) (*store.Workflow, error) {
	id := r.PathValue("id")
	addLogField(r.Context(), "workflowId", id)
	wf, err := s.store.WorkflowGet(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if wf.DeletedAt != nil {
		return nil, protocol.NewError(protocol.CodeWorkflowNotFound)
	}
	if err := owns(p, wf.AccountID, false); err != nil {
		return nil, err
	}
	return wf, nil
}

func (s *Server) getWorkflow(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	wf, err := s.ownWorkflow(r, p)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, viewWorkflow(wf))
}

func (s *Server) listWorkflows(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	items, next, err := s.store.WorkflowList(r.Context(), p.AccountID(), page)
	if err != nil {
		return err
	}
	views := make([]workflowView, len(items))
	for i, wf := range items {
		views[i] = viewWorkflow(wf)
	}
	return writeJSON(w, http.StatusOK, listBody(views, next))
}

func (s *Server) updateWorkflow(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if _, err := s.ownWorkflow(r, p); err != nil {
		return err
	}
	var b workflowBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	params := store.WorkflowUpdateParams{ID: r.PathValue("id"), Name: b.Name}
	if b.Name != nil {
		if e := checkName(*b.Name); e != nil {
			return e
		}
	}
	if len(b.Definition) > 0 && string(b.Definition) != "null" {
		_, norm, err := parseDefinition(b.Definition)
		if err != nil {
			return err
		}
		params.Definition = norm
	}
	wf, err := s.store.WorkflowUpdate(r.Context(), params)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, viewWorkflow(wf))
}

func (s *Server) deleteWorkflow(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	wf, err := s.ownWorkflow(r, p)
	if err != nil {
		return err
	}
	if err := s.store.WorkflowDelete(r.Context(), r.PathValue("id")); err != nil {
		return err
	}
	if wf.Video != nil {
		s.deleteVideo(r.Context(), wf.Video.Key)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
