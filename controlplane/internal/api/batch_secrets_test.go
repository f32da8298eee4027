package api_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/events"
	"github.com/copelf/copelf/controlplane/internal/store"
)

// TestBatchSecretsOutliveAnEdit: an input that was secret when the batch was
// created stays redacted after the workflow's definition makes it a plain
// string — in the batch, the batch list, the batch's runs and the
// batch.updated events — and an input made secret later is hidden too.
func TestBatchSecretsOutliveAnEdit(t *testing.T) {
	e := newLiveEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 10)
	r := e.post("/v1/workflows", u.Token, map[string]any{"name": "secret then plain", "definition": json.RawMessage(`{"version":1,"variables":[
		{"name":"pin","type":"secret"},{"name":"note","type":"string"}],
		"steps":[{"type":"type","selector":"#q","text":"{{pin}} {{note}}"}]}`)})
	expectStatus(t, r, http.StatusCreated)
	wf := r.Map(t)["id"].(string)
	const pin, note = "pin-5678", "note-4321"
	r = e.post("/v1/workflows/"+wf+"/batches", u.Token, map[string]any{"iterations": []any{
		map[string]any{"inputs": map[string]any{"pin": pin, "note": note}},
	}})
	expectStatus(t, r, http.StatusCreated)
	bat := r.Map(t)["id"].(string)
	if !bytes.Contains(r.Body, []byte(note)) || bytes.Contains(r.Body, []byte(pin)) {
		t.Fatalf("created batch: %s", r.Body)
	}

	// pin becomes a plain string, note a secret.
	r = e.patch("/v1/workflows/"+wf, u.Token, map[string]any{"definition": json.RawMessage(`{"version":1,"variables":[
		{"name":"pin","type":"string"},{"name":"note","type":"secret"}],
		"steps":[{"type":"type","selector":"#q","text":"{{pin}} {{note}}"}]}`)})
	expectStatus(t, r, http.StatusOK)

	s := e.openStream("/v1/events?types=batch,run", u.Token, nil)
	hidden := func(where string, body []byte) {
		t.Helper()
		for _, v := range []string{pin, note} {
			if bytes.Contains(body, []byte(v)) {
				t.Errorf("%s shows %q: %s", where, v, body)
			}
		}
	}
	r = e.post("/v1/batches/"+bat+"/start", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	hidden("POST start", r.Body)
	var started struct {
		Iterations []struct {
			RunID  string         `json:"runId"`
			Inputs map[string]any `json:"inputs"`
		} `json:"iterations"`
	}
	r.JSON(t, &started)
	if len(started.Iterations) != 1 || started.Iterations[0].Inputs["pin"] != "[redacted]" || started.Iterations[0].Inputs["note"] != "[redacted]" {
		t.Fatalf("started: %s", r.Body)
	}
	hidden("GET batch", e.get("/v1/batches/"+bat, u.Token).Body)
	hidden("GET batches", e.get("/v1/batches", u.Token).Body)
	hidden("GET run", e.get("/v1/runs/"+started.Iterations[0].RunID, u.Token).Body)
	hidden("GET runs", e.get("/v1/runs?batchId="+bat, u.Token).Body)
	// The start publishes the batch and its queued run.
	for seen := map[string]bool{}; !seen[events.BatchUpdated] || !seen[events.RunUpdated]; {
		ev := s.next(false)
		hidden(ev.Type+" event", ev.Data)
		seen[ev.Type] = true
	}
}
