package api

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
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

// CSRFCookie holds the CSRF token of the dashboard's session. It is not
// HttpOnly: the page reads it and sends it back in CSRFHeader.
const CSRFCookie = "copelf_csrf"

// CSRFHeader carries the CSRF token on state-changing requests made with the
// session cookie.
const CSRFHeader = "X-CSRF-Token"

// CSRFToken is the CSRF token bound to a session token: an HMAC keyed by the
// session token, so only who holds the session (the server; the browser's
// script cannot read the HttpOnly cookie) can make it, and no server-side
// state or secret is needed. It reveals nothing of the session token.
func CSRFToken(session string) string {
	m := hmac.New(sha256.New, []byte(session))
	m.Write([]byte("copelf csrf v1"))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// tokenFrom returns the bearer token or session cookie of a request.
func tokenFrom(r *http.Request) string {
	tok, _ := credentials(r)
	return tok
}

// credentials returns the request's bearer token, or else its session
// cookie and byCookie true.
func credentials(r *http.Request) (token string, byCookie bool) {
	if h := r.Header.Get("Authorization"); h != "" {
		if scheme, tok, ok := strings.Cut(h, " "); ok && strings.EqualFold(scheme, "Bearer") {
			return strings.TrimSpace(tok), false
		}
		return "", false
	}
	if c, err := r.Cookie(SessionCookie); err == nil {
		return c.Value, true
	}
	return "", false
}

// checkCSRF refuses a state-changing request (any method but GET, HEAD and
// OPTIONS) authenticated by the session cookie unless it carries the
// session's CSRF token in CSRFHeader: another site can make the browser send
// the cookie, but cannot read the token nor set the header.
func checkCSRF(r *http.Request, session string) error {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return nil
	}
	got := r.Header.Get(CSRFHeader)
	if got != "" && hmac.Equal([]byte(got), []byte(CSRFToken(session))) {
		return nil
	}
	return protocol.Errorf(protocol.CodeForbidden, "A request made with the session cookie must carry its CSRF token in the %s header.", CSRFHeader).With("reason", "csrf")
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
	token, byCookie := credentials(r)
	p, err := s.Authenticate(r.Context(), token)
	if err != nil {
		return nil, err
	}
	if k := p.Token.Kind; k != store.TokenSession && k != store.TokenAPI {
		return nil, protocol.Errorf(protocol.CodeForbidden, "A %s token cannot use this route.", k).With("tokenKind", k)
	}
	if byCookie {
		if err := checkCSRF(r, token); err != nil {
			return nil, err
		}
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
