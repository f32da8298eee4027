package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestExtensionPath: the browser extension's JavaScript client, in a real
// headless Chromium page served from an allowed origin, connects with the
// browser's WebSocket API, takes a run, sends its events and finishes it.
// A page from an origin outside the allow-list is refused.
func TestExtensionPath(t *testing.T) {
	page := httptest.NewServer(http.FileServer(http.Dir(filepath.Join(repoRoot(t), "testdata", "extension"))))
	defer page.Close()
	s := startServer(t, "-allowed-origins", page.URL, "-lease-timeout", "10s")
	_, apiToken, agentToken := s.account(t, 10)
	ctx := browser(t)

	open := func(ctx context.Context, base string) string {
		q := url.Values{"server": {s.URL}, "token": {agentToken}, "id": {"ext-" + strings.TrimPrefix(base, "http://")}}
		if err := chromedp.Do(ctx, chromedp.Navigate(base+"/index.html?"+q.Encode())); err != nil {
			t.Fatalf("page: %v", err)
		}
		status, err := chromedp.Run(ctx, chromedp.Poll[string](`(() => { const s = document.getElementById("status").textContent; return s.startsWith("connected") || s.startsWith("failed") ? s : false })()`,
			chromedp.WithPollingTimeout(20*time.Second)))
		if err != nil {
			t.Fatalf("page: %v", err)
		}
		return status
	}
	if status := open(ctx, page.URL); !strings.HasPrefix(status, "connected agt_") {
		t.Fatalf("extension did not connect: %q", status)
	}

	def := json.RawMessage(`{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"},{"type":"extract","selector":"#title","output":"title"}]}`)
	wf := s.call(t, "POST", "/v1/workflows", apiToken, map[string]any{"name": "ext", "definition": def}, 201)["id"].(string)
	run := s.call(t, "POST", "/v1/workflows/"+wf+"/runs", apiToken, map[string]any{}, 201)
	done := s.waitRun(t, apiToken, run["id"].(string), 30*time.Second)
	if done["status"] != "succeeded" || done["outputs"].(map[string]any)["title"] != "Extension agent" {
		t.Fatalf("run: %v", done)
	}
	if done["cost"].(map[string]any)["charged"] != float64(1) {
		t.Fatalf("cost: %v", done["cost"])
	}
	agents := s.call(t, "GET", "/v1/agents", apiToken, nil, 200)["items"].([]any)
	if len(agents) != 1 || agents[0].(map[string]any)["kind"] != "extension" {
		t.Fatalf("agents: %v", agents)
	}

	// The same page from another origin (localhost is not 127.0.0.1) is refused.
	other := strings.Replace(page.URL, "127.0.0.1", "localhost", 1)
	tab, cancel := chromedp.NewContext(ctx)
	defer cancel()
	if status := open(tab, other); !strings.HasPrefix(status, "failed") {
		t.Fatalf("a page from %s connected: %q", other, status)
	}
}
