package dashboard_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/copelf/copelf/protocol"
)

// approvalDef pauses at step 1 for an approval, then extracts and takes a
// screenshot.
const approvalDef = `{"version":1,"variables":[],"steps":[
{"type":"navigate","url":"http://127.0.0.1/shop"},
{"type":"approval","message":"Ship order #42?"},
{"type":"extract","selector":"h1","output":"title"},
{"type":"screenshot","name":"done"}]}`

// shortDef has three quick steps.
const shortDef = `{"version":1,"variables":[],"steps":[
{"type":"navigate","url":"http://127.0.0.1/shop"},
{"type":"click","selector":"#buy"},
{"type":"assert","selector":"h1","textContains":"Thanks"}]}`

// liveMode fails the test unless the page follows GET /v1/events (not the
// polling fallback of a server without it).
func liveMode(t *testing.T, page context.Context) {
	t.Helper()
	mode := poll[string](t, page, "live mode", `document.body.dataset.live === "connecting" ? false : document.body.dataset.live`)
	if mode != "sse" {
		t.Fatalf("the page is %q, not following the event stream: GET /v1/events is missing or refused", mode)
	}
}

// TestDashboardLive signs in through the page, then watches a run being
// queued (reason no_agent_connected, within a second, without a reload),
// taken by an agent, paused for an approval that is approved from the
// page, and finished; then a run's page with its timeline, outputs and
// screenshot, a failed run's page, and a batch's page with its progress.
// Screenshots of every page are kept.
func TestDashboardLive(t *testing.T) {
	b := browser(t)
	s := startServer(t)
	alice := s.member(t, "member")
	page := tab(t, b)

	do(t, page, "open the dashboard", chromedp.Navigate(s.URL+"/"))
	poll[bool](t, page, "sign-in form", `document.body.dataset.view === "signin" && !!document.querySelector("#email")`)
	screenshot(t, page, "signin")
	signIn(t, page, s, alice)
	liveMode(t, page)
	if who := eval[string](t, page, `document.getElementById("who").textContent`); !strings.Contains(who, alice.Email) {
		t.Fatalf("signed in as %q", who)
	}
	// A marker that a reload would wipe out.
	eval[bool](t, page, `window.__sameDocument = true`)

	// A run queued through the API appears, with its reason, without a
	// reload. The page stamps each run with the moment it learnt of it.
	wf := s.workflow(t, alice.Token, "ship order", approvalDef)
	start := time.Now()
	runID := s.run(t, alice.Token, wf)
	posted := time.Now()
	shownAt := poll[float64](t, page, "queued run on the page", fmt.Sprintf(`(() => {
		const tr = document.querySelector('#queued tr[data-run-id=%q]');
		return tr && tr.querySelector(".reason").textContent === "no_agent_connected" ? Number(tr.dataset.shownAt) : 0 })()`, runID))
	seen := time.UnixMilli(int64(shownAt))
	latency := seen.Sub(start)
	t.Logf("queued run on the page %d ms after the POST was sent (%d ms after its answer)", latency.Milliseconds(), seen.Sub(posted).Milliseconds())
	if latency > time.Second {
		t.Errorf("the queued run took %s to appear (goal ≤ 1 s)", latency)
	}
	if !eval[bool](t, page, `window.__sameDocument === true`) {
		t.Fatal("the page reloaded")
	}
	poll[bool](t, page, "queue depth and reason", `document.querySelector('[data-stat="depth"] .stat-v').textContent === "1"
		&& document.querySelector('[data-stat="reason-no_agent_connected"] .stat-v').textContent === "1"`)
	screenshot(t, page, "overview-queued")

	// An agent connects and takes the run; it runs step 0 and asks for an
	// approval at step 1.
	ag := s.agent(t, alice.AgentToken, "agent-one")
	poll[bool](t, page, "agent online", `document.querySelectorAll("#agents tr[data-agent-id]").length === 1`)
	as := ag.take()
	ag.step(as, 0, protocol.StepSucceeded, 850, nil)
	one := 1
	ag.event(as, protocol.Event{Kind: protocol.EventStepStarted, Step: &one})
	approvalAsked := time.Now()
	ag.event(as, protocol.Event{Kind: protocol.EventApprovalRequested, Step: &one, Message: "Ship order #42?"})
	poll[bool](t, page, "approval on the page", `(() => { const tr = document.querySelector("#approvals tr[data-approval-id]");
		return !!tr && tr.querySelector(".message").textContent === "Ship order #42?" })()`)
	poll[bool](t, page, "run in the running list", fmt.Sprintf(`(() => { const tr = document.querySelector('#running tr[data-run-id=%q]');
		return !!tr && tr.querySelector(".step-text").textContent.includes("1/4") })()`, runID))
	screenshot(t, page, "overview-approval")

	// Approve from the page: the agent is told, and the run goes on.
	do(t, page, "approve", clickNow("#approvals tr[data-approval-id] button.approve"))
	apr := next[*protocol.ApprovalFrame](ag)
	if !apr.Approved || apr.RunID != runID {
		t.Fatalf("approval frame %+v", apr)
	}
	waited := time.Since(approvalAsked).Milliseconds()
	ag.event(as, protocol.Event{Kind: protocol.EventStepFinished, Step: &one, Status: string(protocol.StepSucceeded), DurationMs: &waited})
	ag.step(as, 2, protocol.StepSucceeded, 120, nil)
	s.upload(t, alice.AgentToken, as, "done.png")
	ag.step(as, 3, protocol.StepSucceeded, 640, nil)
	ag.event(as, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunSucceeded), Outputs: map[string]any{"title": "Order #42 <b>shipped</b>"}})
	s.waitRun(t, alice.Token, runID, "succeeded", func(r map[string]any) bool { return r["status"] == "succeeded" })
	poll[bool](t, page, "finished run on the page", fmt.Sprintf(`!!document.querySelector('#recent tr[data-run-id=%q] [data-status="succeeded"]')
		&& document.querySelectorAll("#approvals tr[data-approval-id], #running tr[data-run-id], #queued tr[data-run-id]").length === 0`, runID))

	// The run's page, reached by a link: the timeline has a bar per step,
	// the output is text (not markup) and the screenshot is shown.
	do(t, page, "open the run", clickNow(fmt.Sprintf(`#recent a[href="/runs/%s"]`, runID)))
	poll[bool](t, page, "run page", fmt.Sprintf(`document.body.dataset.view === "run" && !!document.querySelector('#run-page[data-run-id=%q][data-status="succeeded"]')`, runID))
	bars := poll[int](t, page, "timeline bars", `(() => { const bars = [...document.querySelectorAll("#timeline .step .bar")].filter(b => !b.hidden && b.getBoundingClientRect().width > 0); return bars.length })()`)
	if bars != 4 {
		t.Fatalf("%d bars, want 4", bars)
	}
	// Widths follow the durations the agent reported: 850, 120 and 640 ms
	// for steps 0, 2 and 3.
	widths := eval[[]float64](t, page, `[...document.querySelectorAll("#timeline .step .bar")].map(b => b.getBoundingClientRect().width)`)
	if r := widths[0] / widths[2]; !(widths[0] > widths[3] && widths[3] > widths[2]) || r < 850.0/120*0.9 || r > 850.0/120*1.1 {
		t.Errorf("bar widths %v do not follow the step durations", widths)
	}
	if out := eval[string](t, page, `document.querySelector('#outputs tr[data-key="title"] .value').textContent`); out != "Order #42 <b>shipped</b>" {
		t.Fatalf("output %q", out)
	}
	if eval[int](t, page, `document.querySelectorAll("#outputs b").length`) != 0 {
		t.Fatal("an output was rendered as markup")
	}
	poll[bool](t, page, "screenshot shown", `(() => { const img = document.querySelector('#artifacts figure[data-name="done.png"] img'); return !!img && img.complete && img.naturalWidth === 320 })()`)
	if !eval[bool](t, page, `window.__sameDocument === true`) {
		t.Fatal("the page reloaded on a link")
	}
	screenshot(t, page, "run")

	// A failed run, opened by its address: the failed step is marked and
	// the error shown.
	run2 := s.run(t, alice.Token, wf)
	as2 := ag.take()
	ag.step(as2, 0, protocol.StepSucceeded, 700, nil)
	notFound := protocol.Errorf(protocol.CodeUnprocessableEntity, "No element matches #buy.").With("reason", "element_not_found").With("step", 1)
	ag.step(as2, 1, protocol.StepFailed, 5000, notFound)
	ag.event(as2, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunFailed), Error: notFound})
	s.waitRun(t, alice.Token, run2, "failed", func(r map[string]any) bool { return r["status"] == "failed" })
	do(t, page, "open the failed run", chromedp.Navigate(s.URL+"/runs/"+run2))
	poll[bool](t, page, "failed run page", `!!document.querySelector('#run-page[data-status="failed"]')
		&& !!document.querySelector('#timeline .step[data-index="1"][data-status="failed"] .failed-mark')
		&& !!document.querySelector('#timeline .step[data-index="1"] .bar.s-failed')
		&& document.querySelector('#run-error .errorbox').dataset.reason === "element_not_found"`)
	screenshot(t, page, "run-failed")

	// A batch of three: its page shows each iteration and a progress bar
	// that moves as the agent works through them.
	wfB := s.workflow(t, alice.Token, "batch", shortDef)
	bat := s.call(t, "POST", "/v1/workflows/"+wfB+"/batches", alice.Token, map[string]any{"iterations": []any{
		map[string]any{"inputs": map[string]any{}}, map[string]any{"inputs": map[string]any{}}, map[string]any{"inputs": map[string]any{}}}}, 201)["id"].(string)
	s.call(t, "POST", "/v1/batches/"+bat+"/start", alice.Token, nil, 200)
	do(t, page, "back to the overview", chromedp.Click(chromedp.CSS(`a.brand`)))
	poll[bool](t, page, "batch on the overview", fmt.Sprintf(`!!document.querySelector('#batches tr[data-batch-id=%q]')`, bat))
	do(t, page, "open the batch", clickNow(fmt.Sprintf(`#batches a[href="/batches/%s"]`, bat)))
	poll[bool](t, page, "batch page", fmt.Sprintf(`!!document.querySelector('#batch-page[data-batch-id=%q]') && document.querySelectorAll("#iterations tr[data-index]").length === 3`, bat))
	for i := range 3 {
		as := ag.take()
		ag.step(as, 0, protocol.StepSucceeded, 300, nil)
		ag.step(as, 1, protocol.StepSucceeded, 200, nil)
		ag.step(as, 2, protocol.StepSucceeded, 100, nil)
		ag.event(as, protocol.Event{Kind: protocol.EventFinished, Status: string(protocol.RunSucceeded), Outputs: map[string]any{}})
		done := poll[string](t, page, "batch progress", fmt.Sprintf(`(() => { const bar = document.getElementById("batch-bar");
			return bar && Number(bar.value) === %d ? document.getElementById("batch-done").textContent : false })()`, i+1))
		if want := fmt.Sprintf("%d of 3 done", i+1); !strings.Contains(done, want) {
			t.Fatalf("progress %q, want %q", done, want)
		}
		if i == 0 {
			screenshot(t, page, "batch-running")
		}
	}
	poll[bool](t, page, "batch completed", `!!document.querySelector('#batch-page[data-status="completed"]') && document.querySelectorAll('#iterations tr[data-status="succeeded"]').length === 3`)
	screenshot(t, page, "batch")
	do(t, page, "back to the overview", chromedp.Click(chromedp.CSS(`a.brand`)))
	poll[bool](t, page, "overview", `document.body.dataset.view === "overview" && !!document.querySelector("#agents tr[data-agent-id]")`)
	screenshot(t, page, "overview")

	if v := eval[string](t, page, `document.body.dataset.cspViolations || "0"`); v != "0" {
		t.Fatalf("%s Content-Security-Policy violations", v)
	}
}

// TestDashboardIsolation: a member's dashboard never shows another
// account's runs or agents, not even by the run's address; an operator's
// shows both accounts.
func TestDashboardIsolation(t *testing.T) {
	b := browser(t)
	s := startServer(t)
	alice, bob, olga := s.member(t, "member"), s.member(t, "member"), s.member(t, "operator")
	alicePage, bobPage, olgaPage := tab(t, b), tab(t, b), tab(t, b)
	signIn(t, alicePage, s, alice)
	signIn(t, bobPage, s, bob)
	signIn(t, olgaPage, s, olga)
	liveMode(t, alicePage)

	// Bob's run, then an agent of Bob's, then Alice's run: once Alice sees
	// her own run, every event before it has reached her page.
	bobWF := s.workflow(t, bob.Token, "bob's", shortDef)
	bobRun := s.run(t, bob.Token, bobWF)
	poll[bool](t, bobPage, "bob's run on bob's page", fmt.Sprintf(`!!document.querySelector('#queued tr[data-run-id=%q]')`, bobRun))
	s.agent(t, bob.AgentToken, "bob-agent")
	poll[bool](t, bobPage, "bob's agent on bob's page", `document.querySelectorAll("#agents tr[data-agent-id]").length === 1`)
	aliceWF := s.workflow(t, alice.Token, "alice's", shortDef)
	aliceRun := s.run(t, alice.Token, aliceWF)
	poll[bool](t, alicePage, "alice's run on alice's page", fmt.Sprintf(`!!document.querySelector('#queued tr[data-run-id=%q]')`, aliceRun))

	for _, secret := range []string{bobRun, bobWF, bob.ID, "bob-agent"} {
		if eval[bool](t, alicePage, fmt.Sprintf(`document.body.textContent.includes(%q)`, secret)) {
			t.Errorf("alice's page shows %s of bob's", secret)
		}
	}
	if n := eval[int](t, alicePage, `document.querySelectorAll("#agents tr[data-agent-id], #running tr[data-run-id], #recent tr[data-run-id]").length`); n != 0 {
		t.Errorf("alice's page lists %d agents or runs that are not hers", n)
	}
	if eval[bool](t, bobPage, fmt.Sprintf(`document.body.textContent.includes(%q)`, aliceRun)) {
		t.Error("bob's page shows alice's run")
	}
	screenshot(t, alicePage, "isolation-member")

	// By its address, Bob's run is refused on Alice's page.
	do(t, alicePage, "open bob's run", chromedp.Navigate(s.URL+"/runs/"+bobRun))
	msg := poll[string](t, alicePage, "refusal", `(() => { const e = document.querySelector("#run-page .error"); return e ? e.textContent : false })()`)
	if !strings.Contains(msg, "another account") || eval[bool](t, alicePage, fmt.Sprintf(`document.body.textContent.includes(%q)`, bobWF)) {
		t.Fatalf("alice's page on bob's run: %q", msg)
	}
	screenshot(t, alicePage, "isolation-refused")

	// An operator sees every account's queue.
	poll[bool](t, olgaPage, "both runs on the operator's page", fmt.Sprintf(`!!document.querySelector('#queued tr[data-run-id=%q], #running tr[data-run-id=%q]') && !!document.querySelector('#queued tr[data-run-id=%q]')`, bobRun, bobRun, aliceRun))
	screenshot(t, olgaPage, "overview-operator")
}

// TestDashboardCSRF: the page's own requests carry the CSRF token; the
// same request without it — from the page's script, or from a form on
// another origin of the same site, which the browser sends with the session
// cookie — is refused with forbidden (reason csrf) and changes nothing.
func TestDashboardCSRF(t *testing.T) {
	b := browser(t)
	s := startServer(t)
	alice := s.member(t, "member")
	page := tab(t, b)
	signIn(t, page, s, alice)

	if !eval[bool](t, page, `document.cookie.includes("copelf_csrf=") && !document.cookie.includes("copelf_session")`) {
		t.Fatalf("cookies seen by the page: %q", eval[string](t, page, `document.cookie`))
	}
	wf := s.workflow(t, alice.Token, "csrf", shortDef)
	runID := s.run(t, alice.Token, wf)

	// From the page's script without the header.
	got := eval[string](t, page, fmt.Sprintf(`fetch("/v1/runs/%s/cancel", {method: "POST"}).then(async r => r.status + " " + JSON.stringify(await r.json()))`, runID))
	if !strings.HasPrefix(got, "403 ") || !strings.Contains(got, `"code":"forbidden"`) || !strings.Contains(got, `"reason":"csrf"`) || !strings.Contains(got, `"requestId":"req_`) {
		t.Fatalf("cancel without the token: %s", got)
	}

	// From a form on another port of the same host (same site, so the
	// cookie goes along; another origin, so it cannot read the token).
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, `<!doctype html><form id="f" method="POST" action="%s/v1/runs/%s/cancel"></form><script>document.getElementById("f").submit()</script>`, s.URL, runID)
	}))
	defer evil.Close()
	do(t, page, "the other site's page", chromedp.Navigate(evil.URL))
	body := poll[string](t, page, "the form's answer", `location.pathname.endsWith("/cancel") && document.body && document.body.textContent.includes("code") ? document.body.textContent : false`)
	if !strings.Contains(body, `"reason":"csrf"`) {
		t.Fatalf("the cross-origin form got %s", body)
	}
	if r := s.call(t, "GET", "/v1/runs/"+runID, alice.Token, nil, 200); r["status"] != "queued" || r["cancelRequested"] == true {
		t.Fatalf("the refused requests changed the run: %v", r)
	}

	// The page's own button carries the token and works.
	do(t, page, "open the run", chromedp.Navigate(s.URL+"/runs/"+runID))
	poll[bool](t, page, "run page", `!!document.querySelector('#run-page[data-status="queued"] button.cancel')`)
	do(t, page, "cancel", clickNow(`#run-page button.cancel`))
	poll[bool](t, page, "cancelled", `!!document.querySelector('#run-page[data-status="cancelled"]')`)
	s.waitRun(t, alice.Token, runID, "cancelled", func(r map[string]any) bool { return r["status"] == "cancelled" })
}

// TestDashboardSignInLimit: sign-in attempts through the page's form are
// limited per account: past the limit (-signin-limit-account 3/1h here)
// even the right password is refused with rate_limited, and the page says
// when to retry.
func TestDashboardSignInLimit(t *testing.T) {
	b := browser(t)
	s := startServer(t, "-signin-limit-account", "3/1h")
	alice := s.member(t, "member") // its sign-in over the API is attempt 1
	page := tab(t, b)
	do(t, page, "open the dashboard", chromedp.Navigate(s.URL+"/"))
	poll[bool](t, page, "sign-in form", `!!document.querySelector("#signin #email")`)
	attempt := func(password string) (code, text string) {
		t.Helper()
		eval[bool](t, page, `(document.getElementById("signin-error").dataset.code = "") === ""`)
		do(t, page, "attempt",
			chromedp.SetValue(chromedp.CSS("#email"), alice.Email),
			chromedp.SetValue(chromedp.CSS("#password"), password),
			chromedp.Click(chromedp.CSS("#signin-submit")))
		got := poll[[]string](t, page, "attempt answered", `(() => { const e = document.getElementById("signin-error"); return e && e.dataset.code ? [e.dataset.code, e.textContent] : false })()`)
		return got[0], got[1]
	}
	for i := 2; i <= 3; i++ {
		if code, text := attempt("wrong password " + strconv.Itoa(i)); code != "unauthenticated" || text != "The email or password is wrong." {
			t.Fatalf("attempt %d: %s %q", i, code, text)
		}
	}
	code, text := attempt(alice.Password)
	if code != "rate_limited" || !regexp.MustCompile(`^Too many sign-in attempts; retry in [0-9]+ s\.$`).MatchString(text) {
		t.Fatalf("attempt 4: %s %q", code, text)
	}
	screenshot(t, page, "signin-rate-limited")
	if eval[string](t, page, `document.body.dataset.view`) != "signin" {
		t.Fatal("signed in past the limit")
	}
	// Another account from the same address is not limited by alice's.
	bob := s.member(t, "member")
	signIn(t, page, s, bob)
}

// clickNow clicks the element sel selects in one step inside the page. The
// live views re-render rows and buttons as events arrive, so a node found by
// one DevTools call may be gone by the next (chromedp.Click's "could not
// find node"); a click from the page's own script cannot fall in between.
func clickNow(sel string) chromedp.Action[chromedp.Void] {
	js := fmt.Sprintf(`(() => { const el = document.querySelector(%q); if (!el) return false; el.click(); return true })()`, sel)
	return func(ctx context.Context, t *chromedp.Target) (chromedp.Void, error) {
		ok, err := chromedp.Evaluate[bool](js)(ctx, t)
		if err == nil && !ok {
			err = fmt.Errorf("nothing matches %s", sel)
		}
		return chromedp.Void{}, err
	}
}
