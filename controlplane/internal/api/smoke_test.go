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
