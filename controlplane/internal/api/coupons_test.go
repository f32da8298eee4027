package api_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// newCoupon creates a coupon through the API as the admin.
func (e *env) newCoupon(body map[string]any) map[string]any {
	e.t.Helper()
	r := e.post("/v1/coupons", e.Admin, body)
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)
}

func TestCouponAdmin(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	member := e.newUser(store.RoleMember, store.PlanFree, 0)
	operator := e.newUser(store.RoleOperator, store.PlanPro, 0)

	starts := time.Now().UTC().Add(-time.Hour).Truncate(time.Millisecond)
	expires := starts.Add(72 * time.Hour)
	c := e.newCoupon(map[string]any{"code": "Welcome-10", "credits": 10, "maxRedemptions": 50,
		"startsAt": starts.Format(time.RFC3339Nano), "expiresAt": expires.Format(time.RFC3339Nano), "active": true})
	if c["code"] != "WELCOME-10" || c["credits"] != float64(10) || c["maxRedemptions"] != float64(50) || c["redeemed"] != float64(0) || c["active"] != true ||
		!strings.HasPrefix(c["id"].(string), "cpn_") || c["startsAt"] != starts.Format(time.RFC3339Nano) {
		t.Errorf("created %v", c)
	}
	plain := e.newCoupon(map[string]any{"code": "plain", "credits": 1})
	if plain["active"] != true || plain["maxRedemptions"] != nil || plain["startsAt"] != nil || plain["expiresAt"] != nil {
		t.Errorf("defaults %v", plain)
	}

	// The same code in another case is taken.
	d := expectError(t, e.post("/v1/coupons", e.Admin, map[string]any{"code": "welcome-10", "credits": 5}), protocol.CodeConflict)
	if d.Details["field"] != "code" {
		t.Errorf("conflict details %v", d.Details)
	}
	// Malformed, missing and invalid fields.
	for _, bad := range []struct {
		body  any
		code  protocol.Code
		field string
	}{
		{map[string]any{"credits": 5}, protocol.CodeBadRequest, "code"},
		{map[string]any{"code": "x"}, protocol.CodeBadRequest, "credits"},
		{map[string]any{"code": "x", "credits": "5"}, protocol.CodeBadRequest, "credits"},
		{map[string]any{"code": "x", "credits": 5, "startsAt": "tomorrow"}, protocol.CodeBadRequest, "startsAt"},
		{map[string]any{"code": "x", "credits": 5, "extra": 1}, protocol.CodeBadRequest, "extra"},
		{map[string]any{"code": "two words", "credits": 5}, protocol.CodeUnprocessableEntity, "code"},
		{map[string]any{"code": strings.Repeat("x", 65), "credits": 5}, protocol.CodeUnprocessableEntity, "code"},
		{map[string]any{"code": "x", "credits": 0}, protocol.CodeUnprocessableEntity, "credits"},
		{map[string]any{"code": "x", "credits": 5, "maxRedemptions": 0}, protocol.CodeUnprocessableEntity, "maxRedemptions"},
		{map[string]any{"code": "x", "credits": 5, "startsAt": expires.Format(time.RFC3339), "expiresAt": starts.Format(time.RFC3339)}, protocol.CodeUnprocessableEntity, "expiresAt"},
	} {
		got := expectError(t, e.post("/v1/coupons", e.Admin, bad.body), bad.code)
		if !hasField(t, got, bad.field) {
			t.Errorf("%v: fields %v, want %s", bad.body, got.Details["fields"], bad.field)
		}
	}

	// Admins only; members and operators are forbidden, anonymous callers
	// unauthenticated.
	for _, tok := range []string{member.Token, operator.Token} {
		expectError(t, e.post("/v1/coupons", tok, map[string]any{"code": "mine", "credits": 5}), protocol.CodeForbidden)
		expectError(t, e.get("/v1/coupons", tok), protocol.CodeForbidden)
		expectError(t, e.post("/v1/coupons/plain/deactivate", tok, nil), protocol.CodeForbidden)
	}
	expectError(t, e.post("/v1/coupons", "", map[string]any{"code": "anon", "credits": 5}), protocol.CodeUnauthenticated)
	expectError(t, e.get("/v1/coupons", ""), protocol.CodeUnauthenticated)

	// List in pages (newest first; the store's tests check the order).
	r := e.get("/v1/coupons?limit=1", e.Admin)
	expectStatus(t, r, http.StatusOK)
	first, next := listIDs(t, r)
	if len(first) != 1 || next == nil {
		t.Fatalf("first page %v next %v", first, next)
	}
	r = e.get("/v1/coupons?limit=1&cursor="+next.(string), e.Admin)
	expectStatus(t, r, http.StatusOK)
	second, last := listIDs(t, r)
	if !sameSet(append(first, second...), []string{c["id"].(string), plain["id"].(string)}) || last != nil {
		t.Errorf("pages %v, %v (next %v)", first, second, last)
	}
	expectError(t, e.get("/v1/coupons?cursor=nope", e.Admin), protocol.CodeBadRequest)

	// Deactivate by code in any case; twice is the same answer.
	for range 2 {
		r := e.post("/v1/coupons/welcome-10/deactivate", e.Admin, nil)
		expectStatus(t, r, http.StatusOK)
		if m := r.Map(t); m["active"] != false || m["id"] != c["id"] {
			t.Errorf("deactivated %v", m)
		}
	}
	expectError(t, e.post("/v1/coupons/nope/deactivate", e.Admin, nil), protocol.CodeCouponNotFound)
	expectError(t, e.post("/v1/coupons/redeem", member.Token, map[string]any{"code": "WELCOME-10"}), protocol.CodeCouponInactive)
}

// Every coupon code on its route, in the order of precedence.
func TestCouponRedeemCodes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	u := e.newUser(store.RoleMember, store.PlanFree, 3)
	now := time.Now().UTC()
	e.newCoupon(map[string]any{"code": "GIFT", "credits": 20})
	e.newCoupon(map[string]any{"code": "off", "credits": 20, "active": false})
	e.newCoupon(map[string]any{"code": "soon", "credits": 20, "startsAt": now.Add(time.Hour).Format(time.RFC3339)})
	e.newCoupon(map[string]any{"code": "old", "credits": 20, "expiresAt": now.Add(-time.Hour).Format(time.RFC3339)})
	e.newCoupon(map[string]any{"code": "one", "credits": 20, "maxRedemptions": 1})
	e.newCoupon(map[string]any{"code": "offold", "credits": 20, "active": false, "expiresAt": now.Add(-time.Hour).Format(time.RFC3339)})
	redeem := func(tok, code string) *response {
		return e.post("/v1/coupons/redeem", tok, map[string]any{"code": code})
	}

	r := redeem(u.Token, "gift")
	expectStatus(t, r, http.StatusCreated)
	if m := r.Map(t); m["credited"] != float64(20) || m["balance"] != float64(23) || len(m) != 2 {
		t.Errorf("redeemed %v", m)
	}
	expectError(t, redeem(u.Token, "nope"), protocol.CodeCouponNotFound)
	expectError(t, redeem(u.Token, "two words"), protocol.CodeCouponNotFound)
	if d := expectError(t, redeem(u.Token, "OFF"), protocol.CodeCouponInactive); d.Details["reason"] != "deactivated" {
		t.Errorf("off: details %v", d.Details)
	}
	if d := expectError(t, redeem(u.Token, "Soon"), protocol.CodeCouponInactive); d.Details["reason"] != "not_started" {
		t.Errorf("soon: details %v", d.Details)
	}
	expectError(t, redeem(u.Token, "old"), protocol.CodeCouponExpired)
	expectError(t, redeem(u.Token, "offold"), protocol.CodeCouponInactive)
	expectError(t, redeem(u.Token, "GIFT"), protocol.CodeCouponAlreadyRedeemed)
	expectStatus(t, redeem(u.Token, "one"), http.StatusCreated)
	other := e.newUser(store.RoleMember, store.PlanFree, 0)
	expectError(t, redeem(other.Token, "one"), protocol.CodeCouponMaxRedemptionsReached)
	expectError(t, redeem(u.Token, "one"), protocol.CodeCouponAlreadyRedeemed) // before the cap
	expectError(t, e.post("/v1/coupons/redeem", u.Token, map[string]any{}), protocol.CodeBadRequest)
	expectError(t, e.post("/v1/coupons/redeem", u.Token, map[string]any{"code": 5}), protocol.CodeBadRequest)
	expectError(t, redeem(u.Token, strings.Repeat("x", 10_000)), protocol.CodeCouponNotFound)
	expectError(t, redeem("", "gift"), protocol.CodeUnauthenticated)

	// The ledger shows the grants with their codes; nothing else moved.
	r = e.get("/v1/credits/ledger", u.Token)
	var page struct{ Items []store.LedgerEntry }
	r.JSON(t, &page)
	var coupons []string
	for _, it := range page.Items {
		if it.Kind == store.LedgerCoupon {
			coupons = append(coupons, fmt.Sprintf("%s:%d", it.CouponCode, it.Amount))
		}
	}
	if !sameSet(coupons, []string{"GIFT:20", "ONE:20"}) {
		t.Errorf("coupon entries %v", coupons)
	}
	if c, _ := e.Store.CreditsGet(t.Context(), u.ID); c.Balance != 43 {
		t.Errorf("balance %d, want 43", c.Balance)
	}

	// With an Idempotency-Key a retry answers the first response again.
	e.newCoupon(map[string]any{"code": "retry", "credits": 7})
	rq := request{Method: "POST", Path: "/v1/coupons/redeem", Token: other.Token, Body: map[string]any{"code": "retry"}, Header: map[string]string{"Idempotency-Key": "redeem-1"}}
	first := e.do(rq)
	expectStatus(t, first, http.StatusCreated)
	again := e.do(rq)
	expectStatus(t, again, http.StatusCreated)
	if again.Header.Get("Idempotent-Replayed") != "true" || string(again.Body) != string(first.Body) {
		t.Errorf("replay %s %v, first %s", again.Body, again.Header, first.Body)
	}
	if c, _ := e.Store.CreditsGet(t.Context(), other.ID); c.Balance != 7 {
		t.Errorf("balance after a replayed redemption %d, want 7", c.Balance)
	}
}

// 100 accounts race for a coupon capped at 10; one account redeems 20 times
// at once. Over HTTP, against the real store.
func TestCouponRaceHTTP(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{})
	ctx := t.Context()
	e.newCoupon(map[string]any{"code": "launch", "credits": 5, "maxRedemptions": 10})
	calls := make([]call, 100)
	users := make([]user, 100)
	for i := range calls {
		users[i] = e.newUser(store.RoleMember, store.PlanFree, 0)
		calls[i] = call{method: "POST", path: "/v1/coupons/redeem", token: users[i].Token, body: []byte(`{"code":"LAUNCH"}`)}
	}
	results := e.race(calls)
	if got := tally(results); got["Created"] != 10 || got[string(protocol.CodeCouponMaxRedemptionsReached)] != 90 || len(got) != 2 {
		t.Fatalf("outcomes %v", got)
	}
	grants := 0
	for i, u := range users {
		c, err := e.Store.CreditsGet(ctx, u.ID)
		if err != nil {
			t.Fatal(err)
		}
		if (results[i].Status == http.StatusCreated) != (c.Balance == 5) || (c.Balance != 0 && c.Balance != 5) {
			t.Errorf("account %d: %d, balance %d", i, results[i].Status, c.Balance)
		}
		if c.Balance == 5 {
			grants++
		}
	}
	if grants != 10 {
		t.Errorf("%d grants, want 10", grants)
	}

	e.newCoupon(map[string]any{"code": "once", "credits": 9})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	calls = make([]call, 20)
	for i := range calls {
		calls[i] = call{method: "POST", path: "/v1/coupons/redeem", token: u.Token, body: []byte(`{"code":"once"}`)}
	}
	if got := tally(e.race(calls)); got["Created"] != 1 || got[string(protocol.CodeCouponAlreadyRedeemed)] != 19 || len(got) != 2 {
		t.Fatalf("one account, 20 redemptions: %v", got)
	}
	if c, _ := e.Store.CreditsGet(ctx, u.ID); c.Balance != 9 {
		t.Errorf("balance %d, want 9", c.Balance)
	}
}
