package api

import (
	"net/http"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// listAgents: members see their own connected agents; operators see every
// account's (or one, with ?accountId=).
func (s *Server) listAgents(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	account := p.AccountID()
	if q := r.URL.Query().Get("accountId"); p.Can(store.RoleOperator) {
		account = q
	} else if q != "" && q != p.AccountID() {
		return protocol.Errorf(protocol.CodeForbidden, "Only operators list other accounts' agents.").With("requiredRole", store.RoleOperator)
	}
	var items any = []any{}
	if s.Agents != nil {
		items = s.Agents.List(account)
	}
	return writeJSON(w, http.StatusOK, map[string]any{"items": items, "nextCursor": nil})
}
