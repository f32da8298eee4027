package api

import (
	"context"
	"net/http"
	"strings"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// SessionCookie is the dashboard's session cookie.
const SessionCookie = "copelf_session"

// Principal is who makes a request.
type Principal struct {
	User  *store.User
	Token *store.Token
}

// AccountID is the principal's account.
func (p *Principal) AccountID() string { return p.User.AccountID() }

// Can reports whether the principal's role is at least role.
func (p *Principal) Can(role store.Role) bool { return p.User.Role.AtLeast(role) }

// tokenFrom returns the bearer token or session cookie of a request.
func tokenFrom(r *http.Request) string {
	if h := r.Header.Get("Authorization"); h != "" {
		if scheme, tok, ok := strings.Cut(h, " "); ok && strings.EqualFold(scheme, "Bearer") {
			return strings.TrimSpace(tok)
		}
		return ""
	}
	if c, err := r.Cookie(SessionCookie); err == nil {
		return c.Value
	}
	return ""
}

// Authenticate resolves a token to its principal: unknown, revoked or
// expired tokens are unauthenticated (an expired session says so).
func (s *Server) Authenticate(ctx context.Context, token string) (*Principal, error) {
	if token == "" {
		return nil, protocol.Errorf(protocol.CodeUnauthenticated, "A bearer token or session cookie is required.")
	}
	tok, user, err := s.store.TokenGetByHash(ctx, ids.HashToken(token))
	if err != nil {
		if protocol.ErrorCode(err) == protocol.CodeUnauthenticated {
			return nil, protocol.Errorf(protocol.CodeUnauthenticated, "The token is not valid.")
		}
		return nil, err
	}
	if tok.ExpiresAt != nil && !s.Now().Before(*tok.ExpiresAt) {
		reason := "token_expired"
		if tok.Kind == store.TokenSession {
			reason = protocol.ReasonSessionExpired
		}
		return nil, protocol.Errorf(protocol.CodeUnauthenticated, "The token has expired.").With("reason", reason)
	}
	return &Principal{User: user, Token: tok}, nil
}

// auth authenticates a request for the user API: session and api tokens.
// Agent tokens may only connect agents and upload artifacts; analyzer tokens
// only serve analysis.
func (s *Server) auth(r *http.Request) (*Principal, error) {
	if p, ok := r.Context().Value(principalKey).(*Principal); ok {
		return p, nil
	}
	p, err := s.Authenticate(r.Context(), tokenFrom(r))
	if err != nil {
		return nil, err
	}
	if k := p.Token.Kind; k != store.TokenSession && k != store.TokenAPI {
		return nil, protocol.Errorf(protocol.CodeForbidden, "A %s token cannot use this route.", k).With("tokenKind", k)
	}
	addLogField(r.Context(), "userId", p.User.ID)
	*r = *r.WithContext(context.WithValue(r.Context(), principalKey, p))
	return p, nil
}

// authRole authenticates and requires a role.
func (s *Server) authRole(r *http.Request, role store.Role) (*Principal, error) {
	p, err := s.auth(r)
	if err != nil {
		return nil, err
	}
	if !p.Can(role) {
		return nil, protocol.Errorf(protocol.CodeForbidden, "This needs the %s role.", role).With("requiredRole", role)
	}
	return p, nil
}

// owns checks that a resource of accountID may be read (operators read every
// account) or changed (only its owner, or an admin when admin is true) by p.
func owns(p *Principal, accountID string, readOnlyAsOperator bool) error {
	if accountID == p.AccountID() {
		return nil
	}
	if readOnlyAsOperator && p.Can(store.RoleOperator) {
		return nil
	}
	return protocol.Errorf(protocol.CodeForbidden, "The resource belongs to another account.")
}
