package api

import (
	"net/http"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func (s *Server) getCredits(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	c, err := s.store.CreditsGet(r.Context(), p.AccountID())
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, c)
}

func (s *Server) listLedger(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	items, next, err := s.store.LedgerList(r.Context(), p.AccountID(), page)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(items, next))
}

type grantBody struct {
	Amount *int64 `json:"amount"`
	Reason string `json:"reason"`
}

// maxGrant bounds one grant or adjustment.
const maxGrant = 1_000_000_000

func (s *Server) grantCredits(w http.ResponseWriter, r *http.Request) error {
	p, err := s.authRole(r, store.RoleAdmin)
	if err != nil {
		return err
	}
	var b grantBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	var missing []protocol.FieldProblem
	if b.Amount == nil {
		missing = append(missing, fieldRequired("amount"))
	}
	if b.Reason == "" {
		missing = append(missing, fieldRequired("reason"))
	}
	if len(missing) > 0 {
		return badRequest("Required fields are missing.", missing...)
	}
	var bad []protocol.FieldProblem
	if *b.Amount == 0 || *b.Amount > maxGrant || *b.Amount < -maxGrant {
		bad = append(bad, protocol.FieldProblem{Field: "amount", Problem: "must be a non-zero whole number within ±1000000000"})
	}
	if len(b.Reason) > 500 {
		bad = append(bad, protocol.FieldProblem{Field: "reason", Problem: "must be at most 500 bytes"})
	}
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	accountID := r.PathValue("accountId")
	if _, err := s.store.UserGet(r.Context(), accountID); err != nil {
		if protocol.ErrorCode(err) == protocol.CodeNotFound {
			return protocol.Errorf(protocol.CodeNotFound, "The account does not exist.")
		}
		return err
	}
	entry, err := s.store.CreditsGrant(r.Context(), store.CreditsGrantParams{AccountID: accountID, Amount: *b.Amount, Kind: store.LedgerGrant, Reason: b.Reason})
	if err != nil {
		return err
	}
	s.log.WithField("requestId", RequestID(r.Context())).WithField("adminId", p.User.ID).WithField("accountId", accountID).WithField("amount", *b.Amount).Info("credits granted")
	c, err := s.store.CreditsGet(r.Context(), accountID)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, map[string]any{"entry": entry, "credits": c})
}
