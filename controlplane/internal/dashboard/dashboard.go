// Package dashboard serves the web dashboard at "/": HTML, CSS and plain
// JavaScript modules embedded in the binary — no CDN, no build step. The
// page signs in with POST /v1/sessions (session cookie plus CSRF token),
// loads its state from the REST API and keeps it current with the events of
// GET /v1/events. It renders every value as text, never as HTML, and every
// response of the dashboard carries a Content-Security-Policy that allows
// only the server's own origin.
package dashboard

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/protocol"
)

//go:embed static
var static embed.FS

// ContentSecurityPolicy allows scripts, styles, images and connections
// (fetch, EventSource) from the server's own origin only: no inline script
// or style, no other origin, no plugins, no framing.
const ContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// Patterns are the mux patterns the dashboard answers; mount each on the
// API's mux (every /v1/… path stays the API's). The page's own routes
// ("/", "/runs/{id}", "/batches/{id}") all serve index.html; the script
// draws the view the path names.
var Patterns = []string{"GET /{$}", "GET /runs/{id}", "GET /batches/{id}", "GET /static/"}

// file is one embedded file, ready to serve.
type file struct {
	body        []byte
	contentType string
	etag        string
}

// Handler serves the dashboard.
type Handler struct {
	files map[string]*file // by path under static/, e.g. "js/main.js"
	start time.Time
}

// New loads the embedded files.
func New() *Handler {
	h := &Handler{files: map[string]*file{}, start: time.Now()}
	err := fs.WalkDir(static, "static", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		body, err := static.ReadFile(p)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		ct := mime.TypeByExtension(path.Ext(p))
		if ct == "" {
			ct = "application/octet-stream"
		}
		h.files[strings.TrimPrefix(p, "static/")] = &file{body: body, contentType: ct, etag: `"` + hex.EncodeToString(sum[:16]) + `"`}
		return nil
	})
	if err != nil {
		panic("dashboard: embedded files: " + err.Error()) // the binary was built without them
	}
	// Module scripts must be served as JavaScript whatever the system's
	// MIME table says.
	for name, f := range h.files {
		switch path.Ext(name) {
		case ".js":
			f.contentType = "text/javascript; charset=utf-8"
		case ".css":
			f.contentType = "text/css; charset=utf-8"
		case ".html":
			f.contentType = "text/html; charset=utf-8"
		}
	}
	return h
}

// ServeHTTP answers the page's routes with index.html and /static/… with
// the embedded files; anything else is the API's not_found envelope.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Content-Security-Policy", ContentSecurityPolicy)
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("Referrer-Policy", "no-referrer")
	name := "index.html"
	if rest, ok := strings.CutPrefix(r.URL.Path, "/static/"); ok {
		name = rest
	}
	f := h.files[name]
	if f == nil {
		notFound(w, r)
		return
	}
	hd.Set("Content-Type", f.contentType)
	hd.Set("ETag", f.etag)
	// Revalidate every time: a new binary serves new files at the same
	// paths, and a 304 costs little.
	hd.Set("Cache-Control", "no-cache")
	http.ServeContent(w, r, "", h.start, bytes.NewReader(f.body))
}

// notFound writes the API's envelope, with the request's id.
func notFound(w http.ResponseWriter, r *http.Request) {
	e := protocol.Errorf(protocol.CodeNotFound, "No route matches %s.", r.URL.Path)
	e.RequestID = api.RequestID(r.Context())
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusNotFound)
	_ = json.NewEncoder(w).Encode(e)
}
