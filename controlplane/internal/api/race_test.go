package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Races over real HTTP: the rules that must hold exactly once hold however
// many requests arrive together.

type call struct {
	method, path, token string
	body                []byte
	header              map[string]string
}

// race sends every call at once (released together) and returns the results
// in the calls' order.
func (e *env) race(calls []call) []rawResult {
	out := make([]rawResult, len(calls))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			out[i] = e.raw(c.method, c.path, c.token, c.body, c.header)
		}()
	}
	close(start)
	wg.Wait()
	for i, r := range out {
		if r.Err != nil {
			e.t.Fatalf("call %d: %v", i, r.Err)
		}
		if r.Header.Get("X-Request-Id") == "" {
			e.t.Fatalf("call %d: no X-Request-Id", i)
		}
		if r.Status >= 400 {
			if p := envelopeProblem(r.Status, r.Header, r.Body); p != "" {
				e.t.Fatalf("call %d: %s: %s", i, p, r.Body)
			}
		}
	}
	return out
}

// tally counts results by status code or error code.
func tally(results []rawResult) map[string]int {
	n := map[string]int{}
	for _, r := range results {
		if r.Status < 300 {
			n[http.StatusText(r.Status)]++
			continue
		}
		n[string(r.code())]++
	}
	return n
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRaceOneActiveRunPerWorkflow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 100)
	wf := e.newWorkflow(u.Token)
	body := mustMarshal(t, goodInputs())
	calls := make([]call, 50)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/workflows/" + wf + "/runs", token: u.Token, body: body}
	}
	results := e.race(calls)
	got := tally(results)
	if got["Created"] != 1 || got[string(protocol.CodeWorkflowAlreadyRunning)] != 49 {
		t.Fatalf("results %v, want 1 Created and 49 workflow_already_running", got)
	}
	var winner string
	for _, r := range results {
		if r.Status == http.StatusCreated {
			var run struct{ ID string }
			_ = json.Unmarshal(r.Body, &run)
			winner = run.ID
		}
	}
	for _, r := range results {
		if r.Status == http.StatusConflict {
			var er protocol.Error
			_ = json.Unmarshal(r.Body, &er)
			if er.Details["runId"] != winner {
				t.Fatalf("details %v, want runId %s", er.Details, winner)
			}
		}
	}
	runs, _ := listIDs(t, e.get("/v1/runs?workflowId="+wf, u.Token))
	if len(runs) != 1 {
		t.Fatalf("runs %v", runs)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 1.0 || cr["balance"] != 100.0 {
		t.Fatalf("credits %v", cr)
	}
}

func TestRaceCreditsNeverOverspent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 5)
	body := mustMarshal(t, goodInputs())
	calls := make([]call, 30)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/workflows/" + e.newWorkflow(u.Token) + "/runs", token: u.Token, body: body}
	}
	got := tally(e.race(calls))
	if got["Created"] != 5 || got[string(protocol.CodeInsufficientCredits)] != 25 {
		t.Fatalf("results %v, want 5 Created and 25 insufficient_credits", got)
	}
	cr := e.get("/v1/credits", u.Token).Map(t)
	if cr["balance"] != 5.0 || cr["held"] != 5.0 || cr["available"] != 0.0 {
		t.Fatalf("credits %v", cr)
	}
	sum, err := e.Store.LedgerSum(context.Background(), u.ID)
	if err != nil || float64(sum) != cr["balance"] {
		t.Fatalf("ledger sum %d (%v), balance %v", sum, err, cr["balance"])
	}
	runs, _ := listIDs(t, e.get("/v1/runs?status=queued", u.Token))
	if len(runs) != 5 {
		t.Fatalf("queued runs %v", runs)
	}

	// Batches racing runs for the same credits: still never below zero.
	v := e.newUser(store.RoleMember, store.PlanPro, 7)
	calls = calls[:0]
	for i := 0; i < 6; i++ {
		bat := e.newBatch(v.Token, e.newWorkflow(v.Token), 3)
		calls = append(calls, call{method: "POST", path: "/v1/batches/" + bat + "/start", token: v.Token})
		calls = append(calls, call{method: "POST", path: "/v1/workflows/" + e.newWorkflow(v.Token) + "/runs", token: v.Token, body: body})
	}
	results := e.race(calls)
	held := 0.0
	for i, r := range results {
		switch {
		case r.Status == http.StatusOK:
			held += 3
		case r.Status == http.StatusCreated:
			held++
		case r.code() != protocol.CodeInsufficientCredits:
			t.Fatalf("call %d: %d %s", i, r.Status, r.Body)
		}
	}
	cr = e.get("/v1/credits", v.Token).Map(t)
	if cr["held"] != held || cr["balance"] != 7.0 || cr["available"].(float64) < 0 || held > 7 || held < 5 {
		t.Fatalf("credits %v, held by the winners %v", cr, held)
	}
}

func TestRaceIdempotencyKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 100)
	wf := e.newWorkflow(u.Token)
	body := mustMarshal(t, goodInputs())
	calls := make([]call, 10)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/workflows/" + wf + "/runs", token: u.Token, body: body, header: map[string]string{"Idempotency-Key": "once"}}
	}
	results := e.race(calls)
	var first []byte
	fresh := 0
	for i, r := range results {
		switch {
		case r.Status == http.StatusCreated && r.Header.Get("Idempotent-Replayed") == "":
			fresh++
			first = r.Body
		case r.Status == http.StatusCreated:
		case r.Status == http.StatusConflict:
			var er protocol.Error
			_ = json.Unmarshal(r.Body, &er)
			if er.Code != protocol.CodeConflict || er.Details["reason"] != "idempotency_key_in_progress" {
				t.Fatalf("call %d: %s", i, r.Body)
			}
		default:
			t.Fatalf("call %d: %d %s", i, r.Status, r.Body)
		}
	}
	if fresh != 1 {
		t.Fatalf("%d fresh responses, want 1: %v", fresh, tally(results))
	}
	for i, r := range results {
		if r.Header.Get("Idempotent-Replayed") == "true" && string(r.Body) != string(first) {
			t.Fatalf("call %d replayed %s, first %s", i, r.Body, first)
		}
	}
	runs, _ := listIDs(t, e.get("/v1/runs", u.Token))
	if len(runs) != 1 {
		t.Fatalf("runs %v", runs)
	}
	// Once settled, every repeat is a replay.
	r := e.do(request{Method: "POST", Path: "/v1/workflows/" + wf + "/runs", Token: u.Token, Body: body, Header: map[string]string{"Idempotency-Key": "once", "Content-Type": "application/json"}})
	expectStatus(t, r, http.StatusCreated)
	if r.Header.Get("Idempotent-Replayed") != "true" || string(r.Body) != string(first) {
		t.Fatalf("replay %s", r.Body)
	}
}

func TestRaceResolveOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanPro, 100)

	// One approval, approved and rejected at once: exactly one wins.
	_, run, apr := e.pendingApproval(u.Token)
	calls := make([]call, 20)
	for i := range calls {
		action := "/approve"
		if i%2 == 1 {
			action = "/reject"
		}
		calls[i] = call{method: "POST", path: "/v1/approvals/" + apr + action, token: u.Token}
	}
	got := tally(e.race(calls))
	if got["OK"] != 1 || got[string(protocol.CodeConflict)] != 19 {
		t.Fatalf("results %v", got)
	}
	status := e.get("/v1/approvals/"+apr, u.Token).Map(t)["status"]
	runStatus := e.get("/v1/runs/"+run, u.Token).Map(t)["status"]
	if !(status == "approved" && runStatus == "running") && !(status == "rejected" && runStatus == "failed") {
		t.Fatalf("approval %v, run %v", status, runStatus)
	}

	// One queued run cancelled many times: one 200, the rest conflict; the
	// hold is released once.
	wf := e.newWorkflow(u.Token)
	queued := e.newRun(u.Token, wf)
	calls = calls[:10]
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/runs/" + queued + "/cancel", token: u.Token}
	}
	got = tally(e.race(calls))
	if got["OK"] != 1 || got[string(protocol.CodeConflict)] != 9 {
		t.Fatalf("results %v", got)
	}

	// One batch started many times: one 200.
	bat := e.newBatch(u.Token, wf, 4)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/batches/" + bat + "/start", token: u.Token}
	}
	got = tally(e.race(calls))
	if got["OK"] != 1 {
		t.Fatalf("results %v", got)
	}
	if cr := e.get("/v1/credits", u.Token).Map(t); cr["held"] != 4.0 {
		t.Fatalf("credits %v (one batch of four held)", cr)
	}
	sum, err := e.Store.LedgerSum(context.Background(), u.ID)
	if cr := e.get("/v1/credits", u.Token).Map(t); err != nil || float64(sum) != cr["balance"] {
		t.Fatalf("ledger sum %d, credits %v", sum, cr)
	}
}
