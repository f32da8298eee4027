package api_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

func TestPricesList(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{}) // no Stripe: the list answers all the same
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	r := m.get("/v1/billing/prices", u.Token)
	expectStatus(t, r, http.StatusOK)
	var l struct {
		Items      []billing.Price `json:"items"`
		NextCursor *string         `json:"nextCursor"`
	}
	r.JSON(t, &l)
	want := []billing.Price{
		{ID: "pack_100", Credits: 100, Amount: 1000, Currency: "usd", StripePriceID: "price_100", Active: true},
		{ID: "pack_500", Credits: 500, Amount: 4000, Currency: "eur", StripePriceID: "price_500", Active: true},
	}
	if fmt.Sprint(l.Items) != fmt.Sprint(want) || l.NextCursor != nil {
		t.Errorf("prices %+v, want %+v", l.Items, want)
	}
	expectError(t, m.get("/v1/billing/prices", ""), protocol.CodeUnauthenticated)

	// No -prices file: an empty list.
	e := newEnv(t, api.Config{})
	r = e.get("/v1/billing/prices", e.Admin)
	expectStatus(t, r, http.StatusOK)
	if ids, _ := listIDs(t, r); len(ids) != 0 {
		t.Errorf("prices without a file: %v", ids)
	}
}

// Without -stripe-key (and -stripe-webhook-secret) the server runs and the
// billing routes say so.
func TestBillingNotConfigured(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{NoWebhookSecret: true, NoSessions: true})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	before := m.counts(t)
	for _, r := range []*response{
		m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_100"}),
		m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "nope"}),
		m.post("/v1/billing/portal", u.Token, nil),
		m.get("/v1/billing/checkout/cs_test_1", u.Token),
		m.hook(sessionEvent(billing.EventCheckoutCompleted, "cs_test_1", u.ID, "pack_100", "paid"), "t=1,v1=00"),
	} {
		d := expectError(t, r, protocol.CodeCheckoutFailed)
		if d.Details["reason"] != billing.ReasonNotConfigured {
			t.Errorf("%s: details %v", r.Request.URL.Path, d.Details)
		}
	}
	// The body is checked first.
	expectError(t, m.post("/v1/billing/checkout", u.Token, map[string]any{}), protocol.CodeBadRequest)
	expectError(t, m.post("/v1/billing/checkout", "", map[string]any{"priceId": "pack_100"}), protocol.CodeUnauthenticated)
	expectError(t, m.post("/v1/billing/portal", "", nil), protocol.CodeUnauthenticated)
	if after := m.counts(t); after != before {
		t.Errorf("writes: %+v → %+v", before, after)
	}
}

// Signatures that do not verify are refused with nothing written; one of
// several v1 signatures verifying is enough.
func TestWebhookSignatures(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	payload := sessionEvent(billing.EventCheckoutCompleted, "cs_test_sig", u.ID, "pack_100", "paid")
	now := time.Now()
	altered := bytes.Replace(payload, []byte(`"pack_100"`), []byte(`"pack_500"`), 1)
	valid := sign(payload, m.Secret, now)
	_, v1, _ := strings.Cut(valid, ",")
	before := m.counts(t)
	for _, c := range []struct {
		name, header string
		body         []byte
		reason       string
	}{
		{"wrong secret", sign(payload, "whsec_other", now), payload, billing.ReasonInvalidSignature},
		{"altered body", valid, altered, billing.ReasonInvalidSignature},
		{"missing header", "", payload, billing.ReasonMissingSignature},
		{"301 s old", sign(payload, m.Secret, now.Add(-301*time.Second)), payload, billing.ReasonStaleSignature},
		{"no v1", fmt.Sprintf("t=%d,v0=%x", now.Unix(), []byte("x")), payload, billing.ReasonInvalidSignature},
		{"garbage header", "not a signature", payload, billing.ReasonInvalidSignature},
		{"signature of another time", fmt.Sprintf("t=%d,%s", now.Unix()-10, v1), payload, billing.ReasonInvalidSignature},
	} {
		r := m.hook(c.body, c.header)
		d := expectError(t, r, protocol.CodeBadRequest)
		if d.Details["reason"] != c.reason {
			t.Errorf("%s: details %v, want reason %s", c.name, d.Details, c.reason)
		}
		noLeak(t, r.Body)
		if after := m.counts(t); after != before {
			t.Fatalf("%s wrote: %+v → %+v", c.name, before, after)
		}
	}

	// Two v1 values, the first signed with a retired secret: accepted.
	two := sign(payload, "whsec_retired", now) + "," + v1
	r := m.hook(payload, two)
	expectStatus(t, r, http.StatusOK)
	if a := r.Map(t); a["outcome"] != "granted" || a["status"] != "paid" {
		t.Errorf("answer %v", a)
	}
	if c, _ := m.Store.CreditsGet(t.Context(), u.ID); c.Balance != 100 {
		t.Errorf("balance %d, want 100", c.Balance)
	}
	// A signature up to 300 s old is still good (here 200 s, leaving room
	// for a slow machine).
	again := sessionEvent(billing.EventCheckoutCompleted, "cs_test_sig2", u.ID, "pack_500", "paid")
	expectStatus(t, m.hook(again, sign(again, m.Secret, time.Now().Add(-200*time.Second))), http.StatusOK)
	if c, _ := m.Store.CreditsGet(t.Context(), u.ID); c.Balance != 600 {
		t.Errorf("balance %d, want 600", c.Balance)
	}
}

// The same event delivered ten times at once, interleaved with the success
// page asking about the same session, grants once.
func TestWebhookConcurrentDeliveries(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	const session = "cs_test_concurrent"
	m.Sessions.set(session, fakeSession{Paid: true, AccountID: u.ID, PriceID: "pack_100"})
	payload := sessionEvent(billing.EventCheckoutCompleted, session, u.ID, "pack_100", "paid")
	sig := sign(payload, m.Secret, time.Now())
	var calls []call
	for i := range 15 {
		if i%3 == 2 {
			calls = append(calls, call{method: "GET", path: "/v1/billing/checkout/" + session, token: u.Token})
			continue
		}
		calls = append(calls, call{method: "POST", path: "/v1/billing/webhook", body: payload, header: map[string]string{"Stripe-Signature": sig}})
	}
	results := m.race(calls)
	granted := 0
	for i, r := range results {
		if r.Status != http.StatusOK {
			t.Fatalf("call %d: %d %s", i, r.Status, r.Body)
		}
		if bytes.Contains(r.Body, []byte(`"outcome":"granted"`)) {
			granted++
		}
	}
	if granted > 1 {
		t.Errorf("%d webhook deliveries say they granted", granted)
	}
	ledger, _, err := m.Store.LedgerList(t.Context(), u.ID, store.Page{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if len(ledger) != 1 || ledger[0].Kind != store.LedgerPurchase || ledger[0].Amount != 100 {
		t.Errorf("ledger %+v, want one purchase of 100", ledger)
	}
	if c := m.counts(t); c.Ledger != 1 || c.Sessions != 1 || c.Balance != 100 {
		t.Errorf("counts %+v", c)
	}
	// The success page reports it.
	r := m.get("/v1/billing/checkout/"+session, u.Token)
	expectStatus(t, r, http.StatusOK)
	if a := r.Map(t); a["status"] != "paid" || a["credited"] != float64(100) || a["balance"] != float64(100) || a["priceId"] != "pack_100" {
		t.Errorf("success page %v", a)
	}
}

// completed (unpaid) then async_payment_succeeded, and the reverse, end in
// the same state with one grant; a failed payment grants nothing.
func TestWebhookOutOfOrder(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{})
	type step struct{ typ, status, outcome string }
	completedUnpaid := step{billing.EventCheckoutCompleted, "unpaid", "recorded"}
	for i, order := range [][]step{
		{completedUnpaid, {billing.EventCheckoutAsyncPaymentSucceed, "paid", "granted"}},
		{{billing.EventCheckoutAsyncPaymentSucceed, "paid", "granted"}, {billing.EventCheckoutCompleted, "unpaid", "already_granted"}},
		{completedUnpaid, {billing.EventCheckoutAsyncPaymentFailed, "unpaid", "recorded"}, {billing.EventCheckoutAsyncPaymentSucceed, "paid", "granted"}},
	} {
		u := m.newUser(store.RoleMember, store.PlanFree, 0)
		session := fmt.Sprintf("cs_test_order_%d", i)
		for _, s := range order {
			payload := sessionEvent(s.typ, session, u.ID, "pack_500", s.status)
			r := m.hook(payload, sign(payload, m.Secret, time.Now()))
			expectStatus(t, r, http.StatusOK)
			if a := r.Map(t); a["outcome"] != s.outcome {
				t.Errorf("order %d, %s: answer %v, want %s", i, s.typ, a, s.outcome)
			}
		}
		rec, err := m.Store.CheckoutGet(t.Context(), session)
		if err != nil || rec.Status != store.CheckoutPaid || rec.AccountID != u.ID || rec.Credits != 500 {
			t.Errorf("order %d: session %+v, %v", i, rec, err)
		}
		c, _ := m.Store.CreditsGet(t.Context(), u.ID)
		ledger, _, _ := m.Store.LedgerList(t.Context(), u.ID, store.Page{})
		if c.Balance != 500 || len(ledger) != 1 {
			t.Errorf("order %d: balance %d, %d entries; want 500 in one", i, c.Balance, len(ledger))
		}
	}

	// A failed asynchronous payment is recorded, and grants nothing; the
	// success page says so.
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	for _, s := range []step{completedUnpaid, {billing.EventCheckoutAsyncPaymentFailed, "unpaid", "recorded"}, completedUnpaid} {
		payload := sessionEvent(s.typ, "cs_test_failed", u.ID, "pack_100", s.status)
		expectStatus(t, m.hook(payload, sign(payload, m.Secret, time.Now())), http.StatusOK)
	}
	m.Sessions.set("cs_test_failed", fakeSession{Paid: false, AccountID: u.ID, PriceID: "pack_100"})
	r := m.get("/v1/billing/checkout/cs_test_failed", u.Token)
	expectStatus(t, r, http.StatusOK)
	if a := r.Map(t); a["status"] != "failed" || a["credited"] != float64(0) || a["balance"] != float64(0) {
		t.Errorf("failed session page %v", a)
	}
}

// Events billing does not act on are acknowledged and change nothing.
func TestWebhookIgnoredAndRefused(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	signed := func(p []byte) string { return sign(p, m.Secret, time.Now()) }
	before := m.counts(t)
	for name, payload := range map[string][]byte{
		"unknown type":    []byte(`{"id":"evt_1","object":"event","type":"customer.created","data":{"object":{"id":"cus_1","object":"customer"}}}`),
		"expired session": sessionEvent("checkout.session.expired", "cs_test_x", u.ID, "pack_100", "unpaid"),
		"no metadata":     []byte(`{"id":"evt_2","object":"event","type":"checkout.session.completed","data":{"object":{"id":"cs_other","object":"checkout.session","payment_status":"paid"}}}`),
		"unknown account": sessionEvent(billing.EventCheckoutCompleted, "cs_test_y", "usr_nobody", "pack_100", "paid"),
		"subscription":    bytes.Replace(sessionEvent(billing.EventCheckoutCompleted, "cs_test_z", u.ID, "pack_100", "paid"), []byte(`"mode":"payment"`), []byte(`"mode":"subscription"`), 1),
	} {
		r := m.hook(payload, signed(payload))
		expectStatus(t, r, http.StatusOK)
		if a := r.Map(t); a["outcome"] != "ignored" || a["received"] != true {
			t.Errorf("%s: answer %v", name, a)
		}
	}
	// Verified but not an event, or a pack nobody configured: refused,
	// nothing written (Stripe retries a refused delivery).
	for name, c := range map[string]struct {
		payload []byte
		code    protocol.Code
	}{
		"not json":        {[]byte(`not json`), protocol.CodeBadRequest},
		"not an event":    {[]byte(`{"object":"charge"}`), protocol.CodeBadRequest},
		"session no id":   {[]byte(`{"id":"evt_3","object":"event","type":"checkout.session.completed","data":{"object":{"object":"checkout.session"}}}`), protocol.CodeBadRequest},
		"bad metadata":    {[]byte(`{"id":"evt_4","object":"event","type":"checkout.session.completed","data":{"object":{"id":"cs_1","object":"checkout.session","metadata":{"accountId":5}}}}`), protocol.CodeBadRequest},
		"no data":         {[]byte(`{"id":"evt_5","object":"event","type":"checkout.session.completed"}`), protocol.CodeBadRequest},
		"unknown pack":    {sessionEvent(billing.EventCheckoutCompleted, "cs_test_p", u.ID, "pack_gone", "paid"), protocol.CodePriceNotFound},
		"body over 1 MiB": {append([]byte(`{"object":"event","pad":"`), bytes.Repeat([]byte("x"), 1<<20)...), protocol.CodeBadRequest},
	} {
		r := m.hook(c.payload, signed(c.payload))
		expectError(t, r, c.code)
		noLeak(t, r.Body)
		if after := m.counts(t); after != before {
			t.Fatalf("%s wrote: %+v → %+v", name, before, after)
		}
	}
	if after := m.counts(t); after != before {
		t.Errorf("writes: %+v → %+v", before, after)
	}
	// A retired pack still fulfils a session paid for it.
	payload := sessionEvent(billing.EventCheckoutCompleted, "cs_test_old", u.ID, "pack_old", "paid")
	expectStatus(t, m.hook(payload, signed(payload)), http.StatusOK)
	if c, _ := m.Store.CreditsGet(t.Context(), u.ID); c.Balance != 50 {
		t.Errorf("balance %d, want 50", c.Balance)
	}
}

// The success page: asks the seam, fulfils a paid session once, and answers
// every code of its route.
func TestCheckoutSuccessPage(t *testing.T) {
	t.Parallel()
	m := newMoneyEnv(t, moneyOpts{})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	other := m.newUser(store.RoleMember, store.PlanFree, 0)
	operator := m.newUser(store.RoleOperator, store.PlanFree, 0)
	page := func(tok, id string) *response { return m.get("/v1/billing/checkout/"+id, tok) }

	m.Sessions.set("cs_test_open", fakeSession{Paid: false, AccountID: u.ID, PriceID: "pack_100"})
	r := page(u.Token, "cs_test_open")
	expectStatus(t, r, http.StatusOK)
	if a := r.Map(t); a["status"] != "pending" || a["credited"] != float64(0) || a["balance"] != float64(0) || a["sessionId"] != "cs_test_open" {
		t.Errorf("open session %v", a)
	}
	if c := m.counts(t); c.Sessions != 0 || c.Ledger != 0 {
		t.Errorf("asking about an unpaid session wrote %+v", c)
	}
	m.Sessions.set("cs_test_open", fakeSession{Paid: true, AccountID: u.ID, PriceID: "pack_100"})
	for range 3 {
		r = page(u.Token, "cs_test_open")
		expectStatus(t, r, http.StatusOK)
		if a := r.Map(t); a["status"] != "paid" || a["credited"] != float64(100) || a["balance"] != float64(100) {
			t.Errorf("paid session %v", a)
		}
	}
	// Operators may look; the pack was granted to its account only once.
	expectStatus(t, page(operator.Token, "cs_test_open"), http.StatusOK)
	if c, _ := m.Store.CreditsGet(t.Context(), u.ID); c.Balance != 100 {
		t.Errorf("balance %d, want 100", c.Balance)
	}
	expectError(t, page(other.Token, "cs_test_open"), protocol.CodeForbidden)
	expectError(t, page(u.Token, "cs_test_unknown"), protocol.CodeNotFound)
	expectError(t, page(u.Token, strings.Repeat("c", 300)), protocol.CodeNotFound)
	m.Sessions.set("cs_test_foreign", fakeSession{Paid: true})
	expectError(t, page(u.Token, "cs_test_foreign"), protocol.CodeNotFound)
	m.Sessions.set("cs_test_gone", fakeSession{Paid: true, AccountID: u.ID, PriceID: "pack_gone"})
	expectError(t, page(u.Token, "cs_test_gone"), protocol.CodePriceNotFound)
	m.Sessions.set("cs_test_down", fakeSession{Err: errors.New("dial tcp: connection refused")})
	if d := expectError(t, page(u.Token, "cs_test_down"), protocol.CodeCheckoutFailed); d.Details["reason"] != billing.ReasonProviderUnreachable {
		t.Errorf("details %v", d.Details)
	}
	expectError(t, page("", "cs_test_open"), protocol.CodeUnauthenticated)
}

// Checkout, customer and portal against stripe-mock.
func TestCheckoutStripeMock(t *testing.T) {
	t.Parallel()
	base := stripeMockURL(t)
	m := newMoneyEnv(t, moneyOpts{StripeBase: base})
	ctx := t.Context()
	u := m.newUser(store.RoleMember, store.PlanFree, 0)

	// The portal needs a customer, which the first checkout creates.
	expectError(t, m.post("/v1/billing/portal", u.Token, nil), protocol.CodeNoStripeCustomer)
	r := m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_100"})
	expectStatus(t, r, http.StatusCreated)
	a := r.Map(t)
	session, _ := a["sessionId"].(string)
	if !strings.HasPrefix(session, "cs_") || !strings.HasPrefix(a["url"].(string), "https://") {
		t.Fatalf("checkout %v", a)
	}
	customer, err := m.Store.AccountStripeCustomer(ctx, u.ID)
	if err != nil || !strings.HasPrefix(customer, "cus_") {
		t.Fatalf("linked customer %q, %v", customer, err)
	}
	if rec, err := m.Store.CheckoutGet(ctx, session); err != nil || rec.Status != store.CheckoutPending || rec.Credits != 100 || rec.AccountID != u.ID {
		t.Errorf("recorded session %+v, %v", rec, err)
	}
	// A second checkout reuses the customer.
	expectStatus(t, m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_500"}), http.StatusCreated)
	if again, _ := m.Store.AccountStripeCustomer(ctx, u.ID); again != customer {
		t.Errorf("customer %q after a second checkout, want %q", again, customer)
	}
	r = m.post("/v1/billing/portal", u.Token, nil)
	expectStatus(t, r, http.StatusOK)
	if url, _ := r.Map(t)["url"].(string); !strings.HasPrefix(url, "https://") {
		t.Errorf("portal %s", r.Body)
	}

	// Unknown and retired packs.
	for _, id := range []string{"pack_gone", "pack_old"} {
		expectError(t, m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": id}), protocol.CodePriceNotFound)
	}
	expectError(t, m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": 5}), protocol.CodeBadRequest)

	// An Idempotency-Key replays the first session.
	rq := request{Method: "POST", Path: "/v1/billing/checkout", Token: u.Token, Body: map[string]any{"priceId": "pack_100"}, Header: map[string]string{"Idempotency-Key": "buy-1"}}
	first := m.do(rq)
	expectStatus(t, first, http.StatusCreated)
	if again := m.do(rq); again.Header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(again.Body, first.Body) {
		t.Errorf("replay %d %s, first %s", again.StatusCode, again.Body, first.Body)
	}

	// Concurrent first checkouts of a new account link one customer.
	fresh := m.newUser(store.RoleMember, store.PlanFree, 0)
	calls := make([]call, 6)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/billing/checkout", token: fresh.Token, body: []byte(`{"priceId":"pack_100"}`)}
	}
	if got := tally(m.race(calls)); got["Created"] != len(calls) {
		t.Fatalf("concurrent checkouts: %v", got)
	}
	if c, _ := m.Store.AccountStripeCustomer(ctx, fresh.ID); !strings.HasPrefix(c, "cus_") {
		t.Errorf("customer after concurrent checkouts %q", c)
	}
	if c := m.counts(t); c.Customers != 2 {
		t.Errorf("%d linked customers, want 2", c.Customers)
	}

	// The success page through the real client: stripe-mock's sessions
	// name no account of ours.
	real := newMoneyEnv(t, moneyOpts{StripeBase: base, NoSessions: true})
	ru := real.newUser(store.RoleMember, store.PlanFree, 0)
	expectError(t, real.get("/v1/billing/checkout/cs_test_any", ru.Token), protocol.CodeNotFound)
}

// Stripe refusing or unreachable is checkout_failed with a reason and none
// of Stripe's words.
func TestCheckoutStripeFailures(t *testing.T) {
	t.Parallel()
	base := stripeMockURL(t)
	// stripe-mock refuses a key that does not look like a test key.
	m := newMoneyEnv(t, moneyOpts{StripeBase: base, StripeKey: "bogus"})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	before := m.counts(t)
	r := m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_100"})
	d := expectError(t, r, protocol.CodeCheckoutFailed)
	if d.Details["reason"] != billing.ReasonProviderRejected {
		t.Errorf("details %v", d.Details)
	}
	if strings.Contains(strings.ToLower(string(r.Body)), "authorization") || strings.Contains(string(r.Body), "sk_") || strings.Contains(string(r.Body), "invalid_request_error") {
		t.Errorf("Stripe internals in %s", r.Body)
	}
	if after := m.counts(t); after != before {
		t.Errorf("a refused checkout wrote: %+v → %+v", before, after)
	}

	// Nobody listening.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + ln.Addr().String()
	ln.Close()
	m = newMoneyEnv(t, moneyOpts{StripeBase: dead})
	u = m.newUser(store.RoleMember, store.PlanFree, 0)
	d = expectError(t, m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_100"}), protocol.CodeCheckoutFailed)
	if d.Details["reason"] != billing.ReasonProviderUnreachable {
		t.Errorf("details %v", d.Details)
	}
	if _, err := m.Store.AccountStripeCustomerLink(context.Background(), u.ID, "cus_linked"); err != nil {
		t.Fatal(err)
	}
	d = expectError(t, m.post("/v1/billing/portal", u.Token, nil), protocol.CodeCheckoutFailed)
	if d.Details["reason"] != billing.ReasonProviderUnreachable {
		t.Errorf("portal details %v", d.Details)
	}
}

// tourMoney makes every success response of the coupon and billing routes
// happen once, for TestOpenAPITour.
func tourMoney(t *testing.T) {
	t.Helper()
	m := newMoneyEnv(t, moneyOpts{StripeBase: stripeMockURL(t)})
	u := m.newUser(store.RoleMember, store.PlanFree, 0)
	expectStatus(t, m.post("/v1/coupons", m.Admin, map[string]any{"code": "tour", "credits": 5, "maxRedemptions": 3,
		"startsAt": "2020-01-01T00:00:00Z", "expiresAt": "2999-01-01T00:00:00Z", "active": true}), http.StatusCreated)
	expectStatus(t, m.get("/v1/coupons?limit=10", m.Admin), http.StatusOK)
	expectStatus(t, m.post("/v1/coupons/redeem", u.Token, map[string]any{"code": "TOUR"}), http.StatusCreated)
	expectStatus(t, m.post("/v1/coupons/tour/deactivate", m.Admin, nil), http.StatusOK)
	expectStatus(t, m.get("/v1/billing/prices", u.Token), http.StatusOK)
	r := m.post("/v1/billing/checkout", u.Token, map[string]any{"priceId": "pack_100"})
	expectStatus(t, r, http.StatusCreated)
	session := r.Map(t)["sessionId"].(string)
	expectStatus(t, m.post("/v1/billing/portal", u.Token, nil), http.StatusOK)
	payload := sessionEvent(billing.EventCheckoutCompleted, session, u.ID, "pack_100", "paid")
	expectStatus(t, m.hook(payload, sign(payload, m.Secret, time.Now())), http.StatusOK)
	m.Sessions.set(session, fakeSession{Paid: true, AccountID: u.ID, PriceID: "pack_100"})
	expectStatus(t, m.get("/v1/billing/checkout/"+session, u.Token), http.StatusOK)
}
