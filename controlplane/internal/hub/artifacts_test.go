package hub_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/hub"
	"github.com/copelf/copelf/protocol"
)

func TestArtifacts(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second}, withAPI(func(c *api.Config) { c.MaxArtifactBytes = 64 << 10 }))
	c, _ := e.connect("shooter", 1)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)

	png := bytes.Repeat([]byte{0x89, 'P', 'N', 'G'}, 1000)
	put := func(token, lease, name string, body []byte) *response {
		h := http.Header{"Content-Type": {"image/png"}}
		if lease != "" {
			h.Set(api.LeaseHeader, lease)
		}
		return e.do("PUT", "/v1/runs/"+run+"/artifacts/"+name, token, body, h)
	}

	res := put(e.agent, a.LeaseID, "shot.png", png)
	if res.status != http.StatusCreated {
		t.Fatalf("upload: %d %s", res.status, res.raw)
	}
	sum := sha256.Sum256(png)
	if res.body["name"] != "shot.png" || res.body["size"] != float64(len(png)) || res.body["sha256"] != hex.EncodeToString(sum[:]) || res.body["contentType"] != "image/png" {
		t.Fatalf("upload answer: %v", res.body)
	}

	list := e.get("/v1/runs/" + run + "/artifacts")
	if items, _ := list["items"].([]any); len(items) != 1 || items[0].(map[string]any)["name"] != "shot.png" {
		t.Fatalf("list: %v", list)
	}
	got := e.do("GET", "/v1/runs/"+run+"/artifacts/shot.png", e.token, nil, nil)
	if got.status != http.StatusOK || !bytes.Equal(got.raw, png) || got.header.Get("Content-Type") != "image/png" {
		t.Fatalf("download: %d, %d bytes, %s", got.status, len(got.raw), got.header.Get("Content-Type"))
	}

	if got.header.Get("Content-Disposition") != "" || !strings.Contains(got.header.Get("Content-Security-Policy"), "sandbox") {
		t.Fatalf("a PNG is shown inline under a sandbox CSP: %v", got.header)
	}

	t.Run("script-bearing types download, sandboxed", func(t *testing.T) {
		for name, ct := range map[string]string{"x.svg": "image/svg+xml", "x.html": "text/html; charset=utf-8"} {
			h := http.Header{"Content-Type": {ct}, api.LeaseHeader: {a.LeaseID}}
			body := []byte(`<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>`)
			if res := e.do("PUT", "/v1/runs/"+run+"/artifacts/"+name, e.agent, body, h); res.status != http.StatusCreated {
				t.Fatalf("upload %s: %d %s", name, res.status, res.raw)
			}
			got := e.do("GET", "/v1/runs/"+run+"/artifacts/"+name, e.token, nil, nil)
			if got.status != http.StatusOK || !strings.HasPrefix(got.header.Get("Content-Disposition"), "attachment") ||
				!strings.Contains(got.header.Get("Content-Security-Policy"), "sandbox") || got.header.Get("X-Content-Type-Options") != "nosniff" {
				t.Fatalf("%s served as %d with %v", name, got.status, got.header)
			}
		}
	})

	t.Run("wrong lease", func(t *testing.T) {
		res := put(e.agent, "lse_aaaaaaaaaaaaaaaaaaaaaaaaaa", "x.png", png)
		wantEnvelope(t, res, http.StatusConflict, protocol.CodeConflict)
		if reasonOf(res.body) != protocol.ReasonLeaseLost {
			t.Fatalf("reason %v", res.body)
		}
	})
	t.Run("no lease", func(t *testing.T) {
		wantEnvelope(t, put(e.agent, "", "x.png", png), http.StatusConflict, protocol.CodeConflict)
	})
	t.Run("api token", func(t *testing.T) {
		wantEnvelope(t, put(e.token, a.LeaseID, "x.png", png), http.StatusForbidden, protocol.CodeForbidden)
	})
	t.Run("no token", func(t *testing.T) {
		wantEnvelope(t, put("", a.LeaseID, "x.png", png), http.StatusUnauthorized, protocol.CodeUnauthenticated)
	})
	t.Run("other account", func(t *testing.T) {
		other := e.newAccount("other@example.com", 10)
		wantEnvelope(t, put(other.agent, a.LeaseID, "x.png", png), http.StatusForbidden, protocol.CodeForbidden)
		// Nor can its user read this run's artifacts.
		res := e.do("GET", "/v1/runs/"+run+"/artifacts/shot.png", other.token, nil, nil)
		if res.status != http.StatusForbidden && res.status != http.StatusNotFound {
			t.Fatalf("other user's download: %d", res.status)
		}
		if bytes.Contains(res.raw, png[:16]) {
			t.Fatal("leaked the artifact")
		}
	})
	t.Run("too large", func(t *testing.T) {
		big := bytes.Repeat([]byte("x"), 64<<10+1)
		res := put(e.agent, a.LeaseID, "big.png", big)
		wantEnvelope(t, res, http.StatusBadRequest, protocol.CodeBadRequest)
		if reasonOf(res.body) != "artifact_too_large" {
			t.Fatalf("reason %v", res.body)
		}
	})
	t.Run("too large, no length", func(t *testing.T) {
		big := io.MultiReader(strings.NewReader(strings.Repeat("x", 64<<10)), strings.NewReader("xx"))
		req, _ := http.NewRequest("PUT", e.srv.URL+"/v1/runs/"+run+"/artifacts/big2.png", big)
		req.Header.Set("Authorization", "Bearer "+e.agent)
		req.Header.Set(api.LeaseHeader, a.LeaseID)
		hres, err := e.srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer hres.Body.Close()
		raw, _ := io.ReadAll(hres.Body)
		if hres.StatusCode != http.StatusBadRequest || !bytes.Contains(raw, []byte("artifact_too_large")) {
			t.Fatalf("%d %s", hres.StatusCode, raw)
		}
	})
	list = e.get("/v1/runs/" + run + "/artifacts")
	if items, _ := list["items"].([]any); len(items) != 3 {
		t.Fatalf("refused uploads were stored: %v", list)
	}
	c.finish(a, protocol.RunSucceeded)
	e.waitStatus(run, protocol.RunSucceeded)
}

// GET /v1/agents lists connected agents to their own account only.
func TestAgentsList(t *testing.T) {
	e := newEnv(t, hub.Config{LeaseTimeout: 30 * time.Second})
	h := e.hello("box-1", 3)
	h.Agent.Name, h.Agent.Kind, h.Agent.Labels = "Box one", protocol.AgentExtension, map[string]string{"os": "linux"}
	c, w := e.connectWith(h)
	run := e.runOn(nil)
	a := c.expectAssign(run)
	c.start(a)

	list := e.get("/v1/agents")
	items, _ := list["items"].([]any)
	if len(items) != 1 {
		t.Fatalf("agents: %v", list)
	}
	ag := items[0].(map[string]any)
	want := map[string]any{"id": w.AgentID, "clientId": "box-1", "name": "Box one", "kind": "extension", "slots": float64(3)}
	for k, v := range want {
		if ag[k] != v {
			t.Fatalf("%s = %v, want %v (%v)", k, ag[k], v, ag)
		}
	}
	if !strings.HasPrefix(ag["id"].(string), "agt_") {
		t.Fatalf("id %v", ag["id"])
	}
	if l, _ := ag["labels"].(map[string]any); l["os"] != "linux" || len(l) != 1 {
		t.Fatalf("labels %v", ag["labels"])
	}
	if runs, _ := ag["activeRuns"].([]any); len(runs) != 1 || runs[0] != run {
		t.Fatalf("activeRuns %v", ag["activeRuns"])
	}
	for _, k := range []string{"connectedAt", "lastSeenAt"} {
		s, _ := ag[k].(string)
		if _, err := time.Parse(time.RFC3339, s); err != nil {
			t.Fatalf("%s %q: %v", k, s, err)
		}
	}

	other := e.newAccount("other@example.com", 10)
	res := e.do("GET", "/v1/agents", other.token, nil, nil)
	if res.status != http.StatusOK {
		t.Fatalf("other member: %d %s", res.status, res.raw)
	}
	if items, _ := res.body["items"].([]any); len(items) != 0 {
		t.Fatalf("other member sees %v", items)
	}
	res = e.do("GET", "/v1/agents?accountId="+e.user.ID, other.token, nil, nil)
	wantEnvelope(t, res, http.StatusForbidden, protocol.CodeForbidden)

	c.finish(a, protocol.RunSucceeded)
	c.close()
	e.waitFor("unlisted", func() bool { return len(e.get("/v1/agents")["items"].([]any)) == 0 })
}
