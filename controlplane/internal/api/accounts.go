package api

import (
	"context"
	"net/http"
	"net/mail"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// HashPassword hashes a password for storage (bcrypt).
func HashPassword(password string) (string, error) {
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	return string(h), err
}

// dummyHash is compared against when the email is unknown, so that sign-in
// takes as long for unknown emails as for wrong passwords.
var dummyHash, _ = HashPassword("copelf-timing-equaliser")

type userBody struct {
	Email    string     `json:"email"`
	Password string     `json:"password"`
	Role     store.Role `json:"role"`
	Plan     store.Plan `json:"plan"`
}

func (s *Server) createUser(w http.ResponseWriter, r *http.Request) error {
	if _, err := s.authRole(r, store.RoleAdmin); err != nil {
		return err
	}
	var b userBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	var missing []protocol.FieldProblem
	if b.Email == "" {
		missing = append(missing, fieldRequired("email"))
	}
	if b.Password == "" {
		missing = append(missing, fieldRequired("password"))
	}
	if len(missing) > 0 {
		return badRequest("Required fields are missing.", missing...)
	}
	if b.Role == "" {
		b.Role = store.RoleMember
	}
	if b.Plan == "" {
		b.Plan = store.PlanFree
	}
	var bad []protocol.FieldProblem
	if addr, err := mail.ParseAddress(b.Email); err != nil || addr.Address != b.Email || len(b.Email) > 254 {
		bad = append(bad, protocol.FieldProblem{Field: "email", Problem: "must be an email address"})
	}
	if len(b.Password) < 8 || len(b.Password) > 72 {
		bad = append(bad, protocol.FieldProblem{Field: "password", Problem: "must be 8 to 72 bytes long"})
	}
	if !b.Role.Valid() {
		bad = append(bad, protocol.FieldProblem{Field: "role", Problem: "must be member, operator or admin"})
	}
	if !b.Plan.Valid() {
		bad = append(bad, protocol.FieldProblem{Field: "plan", Problem: "must be free or pro"})
	}
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	hash, err := HashPassword(b.Password)
	if err != nil {
		return err
	}
	u, err := s.store.UserCreate(r.Context(), store.UserCreateParams{Email: b.Email, PasswordHash: hash, Role: b.Role, Plan: b.Plan})
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, u)
}

type sessionBody struct {
	Email    string `json:"email"`
	Password string `json:"password"`
}

func (s *Server) createSession(w http.ResponseWriter, r *http.Request) error {
	var b sessionBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	if b.Email == "" || b.Password == "" {
		var missing []protocol.FieldProblem
		if b.Email == "" {
			missing = append(missing, fieldRequired("email"))
		}
		if b.Password == "" {
			missing = append(missing, fieldRequired("password"))
		}
		return badRequest("Required fields are missing.", missing...)
	}
	if err := s.signIn.allow(w, r, b.Email, s.Now()); err != nil {
		return err
	}
	invalid := protocol.Errorf(protocol.CodeUnauthenticated, "The email or password is wrong.").With("reason", "invalid_credentials")
	u, err := s.store.UserGetByEmail(r.Context(), b.Email)
	if err != nil {
		if protocol.ErrorCode(err) != protocol.CodeNotFound {
			return err
		}
		_ = bcrypt.CompareHashAndPassword([]byte(dummyHash), []byte(b.Password))
		return invalid
	}
	if bcrypt.CompareHashAndPassword([]byte(u.PasswordHash), []byte(b.Password)) != nil {
		return invalid
	}
	token := ids.NewToken("ses")
	expires := s.Now().UTC().Add(s.cfg.SessionTTL).Truncate(time.Millisecond)
	if _, err := s.store.TokenCreate(r.Context(), store.TokenCreateParams{UserID: u.ID, Kind: store.TokenSession, Name: "session", Hash: ids.HashToken(token), ExpiresAt: &expires}); err != nil {
		return err
	}
	http.SetCookie(w, &http.Cookie{
		Name: SessionCookie, Value: token, Path: "/", Expires: expires, HttpOnly: true,
		SameSite: http.SameSiteLaxMode, Secure: s.cfg.SecureCookies || r.TLS != nil,
	})
	http.SetCookie(w, &http.Cookie{ // the dashboard's script reads it: not HttpOnly
		Name: CSRFCookie, Value: CSRFToken(token), Path: "/", Expires: expires,
		SameSite: http.SameSiteStrictMode, Secure: s.cfg.SecureCookies || r.TLS != nil,
	})
	return writeJSON(w, http.StatusCreated, map[string]any{"token": token, "expiresAt": expires, "user": u})
}

func (s *Server) deleteSession(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if p.Token.Kind != store.TokenSession {
		return protocol.Errorf(protocol.CodeBadRequest, "Only a session token can sign out; revoke API tokens with DELETE /v1/tokens/{id}.")
	}
	if err := s.store.TokenRevoke(r.Context(), p.User.ID, p.Token.ID); err != nil {
		return err
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteLaxMode})
	http.SetCookie(w, &http.Cookie{Name: CSRFCookie, Value: "", Path: "/", MaxAge: -1, SameSite: http.SameSiteStrictMode})
	w.WriteHeader(http.StatusNoContent)
	return nil
}

type tokenBody struct {
	Name             string          `json:"name"`
	Kind             store.TokenKind `json:"kind"`
	ExpiresInSeconds *int64          `json:"expiresInSeconds"`
}

// maxTokenLifetime bounds expiresInSeconds (ten years).
const maxTokenLifetime = 10 * 365 * 24 * time.Hour

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	var b tokenBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	if b.Name == "" || b.Kind == "" {
		var missing []protocol.FieldProblem
		if b.Name == "" {
			missing = append(missing, fieldRequired("name"))
		}
		if b.Kind == "" {
			missing = append(missing, fieldRequired("kind"))
		}
		return badRequest("Required fields are missing.", missing...)
	}
	var bad []protocol.FieldProblem
	switch b.Kind {
	case store.TokenAPI, store.TokenAgent:
	case store.TokenAnalyzer:
		if !p.Can(store.RoleAdmin) {
			return protocol.Errorf(protocol.CodeForbidden, "Analyzer tokens are created by admins.").With("requiredRole", store.RoleAdmin)
		}
	default:
		bad = append(bad, protocol.FieldProblem{Field: "kind", Problem: "must be api, agent or analyzer"})
	}
	if len(b.Name) > 200 {
		bad = append(bad, protocol.FieldProblem{Field: "name", Problem: "must be at most 200 characters"})
	}
	var expires *time.Time
	if b.ExpiresInSeconds != nil {
		d := time.Duration(*b.ExpiresInSeconds) * time.Second
		if *b.ExpiresInSeconds <= 0 || d > maxTokenLifetime {
			bad = append(bad, protocol.FieldProblem{Field: "expiresInSeconds", Problem: "must be between 1 and 315360000"})
		} else {
			t := s.Now().UTC().Add(d).Truncate(time.Millisecond)
			expires = &t
		}
	}
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	token := ids.NewToken(tokenPrefix(b.Kind))
	t, err := s.store.TokenCreate(r.Context(), store.TokenCreateParams{UserID: p.User.ID, Kind: b.Kind, Name: b.Name, Hash: ids.HashToken(token), ExpiresAt: expires})
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, map[string]any{"id": t.ID, "token": token, "name": t.Name, "kind": t.Kind, "createdAt": t.CreatedAt, "expiresAt": t.ExpiresAt})
}

func tokenPrefix(k store.TokenKind) string {
	switch k {
	case store.TokenAgent:
		return "agt"
	case store.TokenAnalyzer:
		return "anz"
	case store.TokenSession:
		return "ses"
	}
	return "api"
}

// CreateToken makes a token for a user outside a request (bootstrap, dev seed).
func CreateToken(ctx context.Context, st store.Store, userID string, kind store.TokenKind, name string) (string, error) {
	token := ids.NewToken(tokenPrefix(kind))
	_, err := st.TokenCreate(ctx, store.TokenCreateParams{UserID: userID, Kind: kind, Name: name, Hash: ids.HashToken(token)})
	return token, err
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	items, err := s.store.TokenList(r.Context(), p.User.ID)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(items, ""))
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	id := r.PathValue("id")
	if !strings.HasPrefix(id, ids.Token+"_") {
		return protocol.Errorf(protocol.CodeNotFound, "The token does not exist.")
	}
	if err := s.store.TokenRevoke(r.Context(), p.User.ID, id); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) me(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	credits, err := s.store.CreditsGet(r.Context(), p.AccountID())
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, map[string]any{
		"id": p.User.ID, "email": p.User.Email, "role": p.User.Role, "plan": p.User.Plan, "accountId": p.AccountID(),
		"createdAt": p.User.CreatedAt, "credits": credits,
		"token": map[string]any{"id": p.Token.ID, "kind": p.Token.Kind, "expiresAt": p.Token.ExpiresAt},
	})
}

// listBody is the list envelope: {"items": [...], "nextCursor": "..."|null}.
func listBody[T any](items []T, next string) map[string]any {
	if items == nil {
		items = []T{}
	}
	var nc any
	if next != "" {
		nc = next
	}
	return map[string]any{"items": items, "nextCursor": nc}
}
