package api

import (
	"net/http"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func (s *Server) ownApproval(r *http.Request, p *Principal) (*store.Approval, error) {
	a, err := s.store.ApprovalGet(r.Context(), r.PathValue("id"))
	if err != nil {
		if protocol.ErrorCode(err) == protocol.CodeNotFound {
			return nil, protocol.Errorf(protocol.CodeNotFound, "The approval does not exist.")
		}
		return nil, err
	}
	addLogField(r.Context(), "runId", a.RunID)
	if err := owns(p, a.AccountID, false); err != nil {
		return nil, err
	}
	return a, nil
}

func (s *Server) getApproval(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	a, err := s.ownApproval(r, p)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, a)
}

func (s *Server) listApprovals(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	status := protocol.ApprovalStatus(r.URL.Query().Get("status"))
	switch status {
	case "", protocol.ApprovalPending, protocol.ApprovalApproved, protocol.ApprovalRejected, protocol.ApprovalExpired:
	default:
		return badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "status", Problem: "must be pending, approved, rejected or expired"})
	}
	items, next, err := s.store.ApprovalList(r.Context(), store.ApprovalListParams{AccountID: p.AccountID(), Status: status, Page: page})
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(items, next))
}

type resolveBody struct {
	Comment string `json:"comment"`
}

func (s *Server) resolveApproval(approved bool) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		p, err := s.auth(r)
		if err != nil {
			return err
		}
		if _, err := s.ownApproval(r, p); err != nil {
			return err
		}
		var b resolveBody
		if r.ContentLength != 0 {
			if err := decodeJSON(w, r, &b); err != nil {
				return err
			}
		}
		if len(b.Comment) > 2000 {
			return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", []protocol.FieldProblem{{Field: "comment", Problem: "must be at most 2000 bytes"}})
		}
		a, err := s.store.ApprovalResolve(r.Context(), store.ApprovalResolveParams{ID: r.PathValue("id"), Approved: approved, By: p.User.ID, Comment: b.Comment})
		if err != nil {
			return err
		}
		if s.Hooks != nil {
			s.Hooks.ApprovalResolved(r.Context(), a)
		}
		return writeJSON(w, http.StatusOK, a)
	}
}
