package api_test

import (
	"net/http"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func TestRunCreateSmoke(t *testing.T) {
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 3)
	wf := e.newWorkflow(u.Token)
	r := e.post("/v1/workflows/"+wf+"/runs", u.Token, map[string]any{"inputs": map[string]any{"username": "ada", "password": "s3cret"}})
	expectStatus(t, r, http.StatusCreated)
	run := r.Map(t)
	if run["status"] != "queued" || run["inputs"].(map[string]any)["password"] != api.Redacted {
		t.Fatalf("run: %s", r.Body)
	}
	expectError(t, e.post("/v1/workflows/"+wf+"/runs", u.Token, map[string]any{"inputs": map[string]any{"username": "ada"}}), protocol.CodeWorkflowAlreadyRunning)
}

// Paths not in clean form get the envelope, not the mux's HTML redirect.
func TestUncleanPathsAnswerNotFound(t *testing.T) {
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	for _, p := range []string{"//v1/me", "/v1/./me", "/v1/x/../me", "/v1/me/."} {
		req, _ := http.NewRequest("GET", e.Server.URL+p, nil)
		req.URL.Opaque = p // keep the path as written
		req.Header.Set("Authorization", "Bearer "+u.Token)
		res, err := e.Server.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusNotFound || res.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s: %d %s", p, res.StatusCode, res.Header.Get("Content-Type"))
		}
	}
}
