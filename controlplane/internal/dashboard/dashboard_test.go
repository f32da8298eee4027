package dashboard_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus/hooks/test"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/dashboard"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// mounted is the API with the dashboard mounted as app.Run mounts it.
func mounted(t *testing.T) *httptest.Server {
	t.Helper()
	st, err := sqlstore.Open(context.Background(), "sqlite://"+filepath.Join(t.TempDir(), "copelf.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	log, _ := test.NewNullLogger()
	srv := api.New(st, log, api.Config{DataDir: t.TempDir()})
	d := dashboard.New()
	for _, p := range dashboard.Patterns {
		srv.Handle(p, d)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return hs
}

func get(t *testing.T, hs *httptest.Server, method, path string, header map[string]string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, hs.URL+path, nil)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	res, err := hs.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res, string(body)
}

// TestServes: the page's routes answer index.html and the static files
// their own types, all with the strict Content-Security-Policy; /v1/… stays
// the API; anything else is the API's not_found envelope.
func TestServes(t *testing.T) {
	t.Parallel()
	hs := mounted(t)
	for _, tc := range []struct{ path, ctype, contains string }{
		{"/", "text/html", `<script type="module" src="/static/js/main.js">`},
		{"/runs/run_abc", "text/html", `<main id="main">`},
		{"/batches/bat_abc", "text/html", `<main id="main">`},
		{"/static/js/main.js", "text/javascript", `import`},
		{"/static/js/store.js", "text/javascript", `EventSource`},
		{"/static/app.css", "text/css", `.timeline`},
	} {
		res, body := get(t, hs, "GET", tc.path, nil)
		if res.StatusCode != 200 || !strings.HasPrefix(res.Header.Get("Content-Type"), tc.ctype) || !strings.Contains(body, tc.contains) {
			t.Errorf("GET %s: %d %q", tc.path, res.StatusCode, res.Header.Get("Content-Type"))
		}
		if res.Header.Get("Content-Security-Policy") != dashboard.ContentSecurityPolicy || res.Header.Get("X-Content-Type-Options") != "nosniff" ||
			res.Header.Get("X-Request-Id") == "" {
			t.Errorf("GET %s: headers %v", tc.path, res.Header)
		}
		// Conditional requests are answered 304 with the ETag.
		if res2, _ := get(t, hs, "GET", tc.path, map[string]string{"If-None-Match": res.Header.Get("ETag")}); res2.StatusCode != http.StatusNotModified {
			t.Errorf("GET %s with its ETag: %d", tc.path, res2.StatusCode)
		}
	}
	for _, p := range []string{"script-src 'self'", "default-src 'none'", "frame-ancestors 'none'"} {
		if !strings.Contains(dashboard.ContentSecurityPolicy, p) {
			t.Errorf("CSP lacks %s", p)
		}
	}
	if strings.Contains(dashboard.ContentSecurityPolicy, "unsafe") || strings.Contains(dashboard.ContentSecurityPolicy, "*") {
		t.Errorf("CSP is not strict: %s", dashboard.ContentSecurityPolicy)
	}
	if res, _ := get(t, hs, "HEAD", "/", nil); res.StatusCode != 200 {
		t.Errorf("HEAD /: %d", res.StatusCode)
	}

	// Not the dashboard's: the envelope, with the request's id.
	for _, tc := range []struct{ method, path string }{
		{"GET", "/static/nope.js"}, {"GET", "/static/js/"}, {"GET", "/static/"}, {"GET", "/runs/"},
		{"GET", "/runs/run_1/extra"}, {"POST", "/"}, {"DELETE", "/runs/run_1"}, {"GET", "/favicon.ico"}, {"GET", "/v1/nope"},
		{"GET", "/static/../index.html"},
	} {
		res, body := get(t, hs, tc.method, tc.path, nil)
		var e protocol.Error
		if err := json.Unmarshal([]byte(body), &e); err != nil || res.StatusCode != 404 || e.Code != protocol.CodeNotFound ||
			e.RequestID == "" || e.RequestID != res.Header.Get("X-Request-Id") || !strings.HasPrefix(res.Header.Get("Content-Type"), "application/json") {
			t.Errorf("%s %s: %d %s", tc.method, tc.path, res.StatusCode, body)
		}
	}
	// The API is still the API.
	if res, body := get(t, hs, "GET", "/v1/me", nil); res.StatusCode != 401 || !strings.Contains(body, `"unauthenticated"`) {
		t.Errorf("GET /v1/me: %d %s", res.StatusCode, body)
	}
}

// TestNoHTMLSinks: the scripts never parse data as HTML.
func TestNoHTMLSinks(t *testing.T) {
	t.Parallel()
	hs := mounted(t)
	for _, name := range []string{"main.js", "dom.js", "api.js", "store.js", "overview.js", "run.js", "batch.js"} {
		_, body := get(t, hs, "GET", "/static/js/"+name, nil)
		for _, sink := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"} {
			if strings.Contains(body, sink) {
				t.Errorf("%s uses %s", name, sink)
			}
		}
	}
}
