package storetest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// testMoney covers coupons, Stripe customers, checkout fulfilment and the
// credits of runs as the ledger records them (API.md §8, §12).
func testMoney(t *testing.T, open Opener) {
	t.Run("CouponCreateListDeactivate", func(t *testing.T) { t.Parallel(); testCouponCRUD(t, open) })
	t.Run("CouponRedeem", func(t *testing.T) { t.Parallel(); testCouponRedeem(t, open) })
	t.Run("CouponErrorPrecedence", func(t *testing.T) { t.Parallel(); testCouponPrecedence(t, open) })
	t.Run("CouponRaceCap", func(t *testing.T) { t.Parallel(); testCouponRaceCap(t, open) })
	t.Run("CouponRaceOneAccount", func(t *testing.T) { t.Parallel(); testCouponRaceOneAccount(t, open) })
	t.Run("StripeCustomerLink", func(t *testing.T) { t.Parallel(); testStripeCustomerLink(t, open) })
	t.Run("CheckoutGrantsOnce", func(t *testing.T) { t.Parallel(); testCheckoutGrantsOnce(t, open) })
	t.Run("CheckoutOutOfOrder", func(t *testing.T) { t.Parallel(); testCheckoutOutOfOrder(t, open) })
	t.Run("CheckoutRace", func(t *testing.T) { t.Parallel(); testCheckoutRace(t, open) })
	t.Run("RunCreditsEndToEnd", func(t *testing.T) { t.Parallel(); testRunCreditsEndToEnd(t, open) })
	t.Run("LedgerProperties", func(t *testing.T) { t.Parallel(); testLedgerProperties(t, open) })
}

func ptr[T any](v T) *T { return &v }

// newCoupon creates a coupon or fails the test.
func (b *bundle) newCoupon(t *testing.T, ctx context.Context, p store.CouponCreateParams) *store.Coupon {
	t.Helper()
	c, err := b.st.CouponCreate(ctx, p)
	if err != nil {
		t.Fatalf("CouponCreate(%q): %v", p.Code, err)
	}
	return c
}

func testCouponCRUD(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	starts := time.Now().Add(-time.Hour).Round(0)
	expires := starts.Add(48 * time.Hour)
	c := b.newCoupon(t, ctx, store.CouponCreateParams{Code: " Welcome10 ", Credits: 10, MaxRedemptions: ptr[int64](3), StartsAt: &starts, ExpiresAt: &expires, Active: true})
	wantPrefix(t, c.ID, "cpn")
	if c.Code != "WELCOME10" || c.Credits != 10 || c.MaxRedemptions == nil || *c.MaxRedemptions != 3 || c.Redeemed != 0 || !c.Active {
		t.Errorf("created = %+v", c)
	}
	sameTime(t, "StartsAt", *c.StartsAt, starts.Truncate(time.Millisecond))
	sameTime(t, "ExpiresAt", *c.ExpiresAt, expires.Truncate(time.Millisecond))
	recent(t, "CreatedAt", c.CreatedAt)

	// Codes are one regardless of case.
	for _, code := range []string{"welcome10", "WELCOME10", "wElCoMe10"} {
		got, err := b.st.CouponGet(ctx, code)
		if err != nil || got.ID != c.ID {
			t.Errorf("CouponGet(%q) = %+v, %v", code, got, err)
		}
		_, err = b.st.CouponCreate(ctx, store.CouponCreateParams{Code: code, Credits: 1, Active: true})
		wantErr(t, err, protocol.CodeConflict, "field", "code")
	}
	_, err := b.st.CouponGet(ctx, "nope")
	wantErr(t, err, protocol.CodeCouponNotFound)

	// Newest first, in pages.
	tick()
	plain := b.newCoupon(t, ctx, store.CouponCreateParams{Code: "plain", Credits: 1, Active: false})
	if plain.MaxRedemptions != nil || plain.StartsAt != nil || plain.ExpiresAt != nil || plain.Active {
		t.Errorf("plain = %+v", plain)
	}
	tick()
	third := b.newCoupon(t, ctx, store.CouponCreateParams{Code: "third", Credits: 2, Active: true})
	var got []string
	page := store.Page{Limit: 2}
	for range 3 {
		items, next, err := b.st.CouponList(ctx, page)
		if err != nil {
			t.Fatalf("CouponList: %v", err)
		}
		got = append(got, ids(items, func(c *store.Coupon) string { return c.ID })...)
		if next == "" {
			break
		}
		page.Cursor = next
	}
	wantIDs(t, "coupons", got, []string{third.ID, plain.ID, c.ID})
	_, _, err = b.st.CouponList(ctx, store.Page{Cursor: "bogus"})
	wantErr(t, err, protocol.CodeBadRequest)

	// Deactivation is by code in any case, and repeating it changes nothing.
	for range 2 {
		d, err := b.st.CouponDeactivate(ctx, "Third")
		if err != nil || d.ID != third.ID || d.Active {
			t.Fatalf("CouponDeactivate = %+v, %v", d, err)
		}
	}
	_, err = b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "third", AccountID: b.user.ID})
	wantErr(t, err, protocol.CodeCouponInactive)
	_, err = b.st.CouponDeactivate(ctx, "nope")
	wantErr(t, err, protocol.CodeCouponNotFound)
}

func testCouponRedeem(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 5)
	c := b.newCoupon(t, ctx, store.CouponCreateParams{Code: "spring-25", Credits: 25, Active: true})
	r, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "SPRING-25", AccountID: b.user.ID})
	if err != nil {
		t.Fatalf("CouponRedeem: %v", err)
	}
	if r.Credited != 25 || r.Balance != 30 || r.CouponID != c.ID || r.Entry == nil || r.Entry.Kind != store.LedgerCoupon {
		t.Errorf("redemption = %+v", r)
	}
	b.wantCredits(t, ctx, b.user.ID, 30, 0)
	entries := b.ledger(t, ctx, b.user.ID)
	i := slices.IndexFunc(entries, func(e *store.LedgerEntry) bool { return e.Kind == store.LedgerCoupon })
	if len(entries) != 2 || i < 0 || entries[i].Amount != 25 || entries[i].CouponCode != "SPRING-25" || entries[i].ID != r.Entry.ID {
		for _, e := range entries {
			t.Errorf("ledger entry %+v", *e)
		}
	}
	if got, _ := b.st.CouponGet(ctx, c.Code); got.Redeemed != 1 {
		t.Errorf("Redeemed = %d, want 1", got.Redeemed)
	}
	// Once per account; another account may.
	_, err = b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "spring-25", AccountID: b.user.ID})
	wantErr(t, err, protocol.CodeCouponAlreadyRedeemed)
	other := b.newUser(t, ctx, 0)
	if r, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "spring-25", AccountID: other.ID}); err != nil || r.Balance != 25 {
		t.Fatalf("other account: %+v, %v", r, err)
	}
	b.wantCredits(t, ctx, b.user.ID, 30, 0)
	b.wantCredits(t, ctx, other.ID, 25, 0)

	// A refused redemption writes nothing: no entry, no redemption, no count.
	_, err = b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "spring-25", AccountID: "usr_nobody"})
	wantErr(t, err, protocol.CodeNotFound)
	if got, _ := b.st.CouponGet(ctx, c.Code); got.Redeemed != 2 {
		t.Errorf("Redeemed = %d after a refused redemption, want 2", got.Redeemed)
	}
}

func testCouponPrecedence(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	now := time.Now()
	past, future := now.Add(-time.Hour), now.Add(time.Hour)
	longAgo := now.Add(-2 * time.Hour)
	// redeemedBy redeems code for accounts before the check (while usable).
	type tc struct {
		name string
		p    store.CouponCreateParams
		// prior redemptions by b.user (true) and by others (count), made
		// while the coupon is still usable; then the coupon is changed by
		// after, and b.user redeems.
		mine   bool
		others int
		after  func(code string)
		want   protocol.Code
	}
	deactivate := func(code string) {
		if _, err := b.st.CouponDeactivate(ctx, code); err != nil {
			t.Fatal(err)
		}
	}
	cases := []tc{
		{name: "not found", want: protocol.CodeCouponNotFound},
		{name: "switched off", p: store.CouponCreateParams{Active: false}, want: protocol.CodeCouponInactive},
		{name: "not started", p: store.CouponCreateParams{Active: true, StartsAt: &future}, want: protocol.CodeCouponInactive},
		{name: "expired", p: store.CouponCreateParams{Active: true, ExpiresAt: &past}, want: protocol.CodeCouponExpired},
		{name: "expires now", p: store.CouponCreateParams{Active: true, StartsAt: &longAgo, ExpiresAt: ptr(now.Add(-time.Millisecond))}, want: protocol.CodeCouponExpired},
		{name: "inactive beats expired", p: store.CouponCreateParams{Active: false, ExpiresAt: &past}, want: protocol.CodeCouponInactive},
		{name: "not started beats expired", p: store.CouponCreateParams{Active: true, StartsAt: &future, ExpiresAt: &past}, want: protocol.CodeCouponInactive},
		{name: "already redeemed", p: store.CouponCreateParams{Active: true}, mine: true, want: protocol.CodeCouponAlreadyRedeemed},
		{name: "cap reached", p: store.CouponCreateParams{Active: true, MaxRedemptions: ptr[int64](2)}, others: 2, want: protocol.CodeCouponMaxRedemptionsReached},
		{name: "already redeemed beats cap", p: store.CouponCreateParams{Active: true, MaxRedemptions: ptr[int64](2)}, mine: true, others: 1, want: protocol.CodeCouponAlreadyRedeemed},
		{name: "inactive beats already redeemed", p: store.CouponCreateParams{Active: true, MaxRedemptions: ptr[int64](1)}, mine: true, after: deactivate, want: protocol.CodeCouponInactive},
	}
	for i, c := range cases {
		code := fmt.Sprintf("case%d", i)
		if c.want != protocol.CodeCouponNotFound {
			p := c.p
			p.Code, p.Credits = code, 3
			b.newCoupon(t, ctx, p)
		}
		if c.mine {
			if _, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: code, AccountID: b.user.ID}); err != nil {
				t.Fatalf("%s: first redemption: %v", c.name, err)
			}
		}
		for range c.others {
			if _, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: code, AccountID: b.newUser(t, ctx, 0).ID}); err != nil {
				t.Fatalf("%s: other's redemption: %v", c.name, err)
			}
		}
		if c.after != nil {
			c.after(code)
		}
		before := b.ledger(t, ctx, b.user.ID)
		_, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: code, AccountID: b.user.ID})
		if got := protocol.ErrorCode(err); got != c.want {
			t.Errorf("%s: err = %v, want %s", c.name, err, c.want)
		}
		if after := b.ledger(t, ctx, b.user.ID); len(after) != len(before) {
			t.Errorf("%s: a refused redemption wrote %d ledger entries", c.name, len(after)-len(before))
		}
	}
}

func testCouponRaceCap(t *testing.T, open Opener) {
	const accounts, maxRed, credits = 100, 10, 7
	ctx, b := setup(t, open, 0)
	b.newCoupon(t, ctx, store.CouponCreateParams{Code: "launch", Credits: credits, MaxRedemptions: ptr[int64](maxRed), Active: true})
	users := make([]*store.User, accounts)
	for i := range users {
		users[i] = b.newUser(t, ctx, 0)
	}
	errs := race(accounts, func(i int) error {
		_, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "LAUNCH", AccountID: users[i].ID})
		return err
	})
	wantTally(t, errs, map[protocol.Code]int{"ok": maxRed, protocol.CodeCouponMaxRedemptionsReached: accounts - maxRed})
	granted := 0
	for i, u := range users {
		count, sum := b.ledgerKinds(t, ctx, u.ID)
		switch {
		case errs[i] == nil && (count[store.LedgerCoupon] != 1 || sum[store.LedgerCoupon] != credits):
			t.Errorf("winner %d: coupon entries %d summing %d", i, count[store.LedgerCoupon], sum[store.LedgerCoupon])
		case errs[i] != nil && count[store.LedgerCoupon] != 0:
			t.Errorf("loser %d has %d coupon entries", i, count[store.LedgerCoupon])
		}
		granted += int(count[store.LedgerCoupon])
	}
	if granted != maxRed {
		t.Errorf("%d grants, want %d", granted, maxRed)
	}
	if c, err := b.st.CouponGet(ctx, "launch"); err != nil || c.Redeemed != maxRed {
		t.Errorf("coupon after the race = %+v, %v", c, err)
	}
}

func testCouponRaceOneAccount(t *testing.T, open Opener) {
	const tries, credits = 20, 4
	ctx, b := setup(t, open, 0)
	b.newCoupon(t, ctx, store.CouponCreateParams{Code: "once", Credits: credits, Active: true})
	errs := race(tries, func(int) error {
		_, err := b.st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "Once", AccountID: b.user.ID})
		return err
	})
	wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeCouponAlreadyRedeemed: tries - 1})
	b.wantCredits(t, ctx, b.user.ID, credits, 0)
	if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerCoupon] != 1 {
		t.Errorf("%d coupon entries, want 1", count[store.LedgerCoupon])
	}
	if c, _ := b.st.CouponGet(ctx, "once"); c.Redeemed != 1 {
		t.Errorf("Redeemed = %d, want 1", c.Redeemed)
	}
}

func testStripeCustomerLink(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	if got, err := b.st.AccountStripeCustomer(ctx, b.user.ID); err != nil || got != "" {
		t.Fatalf("AccountStripeCustomer before a link = %q, %v", got, err)
	}
	_, err := b.st.AccountStripeCustomer(ctx, "usr_nobody")
	wantErr(t, err, protocol.CodeNotFound)
	_, err = b.st.AccountStripeCustomerLink(ctx, "usr_nobody", "cus_x")
	wantErr(t, err, protocol.CodeNotFound)

	// Concurrent links: the first wins and every caller learns it.
	const n = 20
	linked := make([]string, n)
	errs := race(n, func(i int) error {
		var err error
		linked[i], err = b.st.AccountStripeCustomerLink(ctx, b.user.ID, fmt.Sprintf("cus_%d", i))
		return err
	})
	wantTally(t, errs, map[protocol.Code]int{"ok": n})
	winner := linked[0]
	for i, l := range linked {
		if l != winner {
			t.Errorf("link %d answered %q, link 0 %q", i, l, winner)
		}
	}
	if got, _ := b.st.AccountStripeCustomer(ctx, b.user.ID); got != winner || !slices.Contains(linked, got) {
		t.Errorf("linked customer = %q, want %q", got, winner)
	}
	// A customer belongs to one account.
	other := b.newUser(t, ctx, 0)
	_, err = b.st.AccountStripeCustomerLink(ctx, other.ID, winner)
	wantErr(t, err, protocol.CodeConflict)
}

// checkout updates a session or fails the test.
func (b *bundle) checkout(t *testing.T, ctx context.Context, p store.CheckoutUpdateParams) *store.CheckoutResult {
	t.Helper()
	r, err := b.st.CheckoutUpdate(ctx, p)
	if err != nil {
		t.Fatalf("CheckoutUpdate(%s): %v", p.Status, err)
	}
	return r
}

func testCheckoutGrantsOnce(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	p := store.CheckoutUpdateParams{SessionID: "cs_test_once", AccountID: b.user.ID, PriceID: "pack_100", Credits: 100, Status: store.CheckoutPending}
	r := b.checkout(t, ctx, p)
	if r.Granted || r.Entry != nil || r.Session.Status != store.CheckoutPending || r.Session.Credits != 100 || r.Session.AccountID != b.user.ID || r.Session.PriceID != "pack_100" {
		t.Errorf("pending = %+v (session %+v)", r, r.Session)
	}
	recent(t, "CreatedAt", r.Session.CreatedAt)
	b.wantCredits(t, ctx, b.user.ID, 0, 0)

	// Paid grants; later reports name another account, price and size, but
	// the recorded session keeps its own.
	p.Status = store.CheckoutPaid
	r = b.checkout(t, ctx, p)
	if !r.Granted || r.Entry == nil || r.Entry.Kind != store.LedgerPurchase || r.Entry.Amount != 100 || r.Session.Status != store.CheckoutPaid {
		t.Fatalf("paid = %+v", r)
	}
	first := r.Entry
	other := b.newUser(t, ctx, 0)
	for _, st := range []store.CheckoutStatus{store.CheckoutPaid, store.CheckoutFailed, store.CheckoutPending, store.CheckoutPaid} {
		r = b.checkout(t, ctx, store.CheckoutUpdateParams{SessionID: p.SessionID, AccountID: other.ID, PriceID: "pack_1", Credits: 1, Status: st})
		if r.Granted || r.Entry == nil || r.Entry.ID != first.ID || r.Session.Status != store.CheckoutPaid || r.Session.AccountID != b.user.ID || r.Session.Credits != 100 {
			t.Errorf("repeat %s = %+v (session %+v)", st, r, r.Session)
		}
	}
	b.wantCredits(t, ctx, b.user.ID, 100, 0)
	b.wantCredits(t, ctx, other.ID, 0, 0)
	if got, err := b.st.CheckoutGet(ctx, p.SessionID); err != nil || got.Status != store.CheckoutPaid {
		t.Errorf("CheckoutGet = %+v, %v", got, err)
	}
	_, err := b.st.CheckoutGet(ctx, "cs_unknown")
	wantErr(t, err, protocol.CodeNotFound)

	// An unknown account writes nothing.
	_, err = b.st.CheckoutUpdate(ctx, store.CheckoutUpdateParams{SessionID: "cs_stranger", AccountID: "usr_nobody", PriceID: "pack_100", Credits: 100, Status: store.CheckoutPaid})
	wantErr(t, err, protocol.CodeNotFound)
	_, err = b.st.CheckoutGet(ctx, "cs_stranger")
	wantErr(t, err, protocol.CodeNotFound)
	_, err = b.st.CheckoutUpdate(ctx, store.CheckoutUpdateParams{SessionID: "cs_bad", AccountID: b.user.ID, PriceID: "pack_100", Credits: 100, Status: "refunded"})
	wantErr(t, err, protocol.CodeBadRequest)
}

func testCheckoutOutOfOrder(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	orders := [][]store.CheckoutStatus{
		{store.CheckoutPending, store.CheckoutPaid},
		{store.CheckoutPaid, store.CheckoutPending},
		{store.CheckoutPending, store.CheckoutFailed, store.CheckoutPaid},
		{store.CheckoutPaid, store.CheckoutFailed, store.CheckoutPending},
		{store.CheckoutFailed, store.CheckoutPending, store.CheckoutPaid},
	}
	for i, order := range orders {
		u := b.newUser(t, ctx, 0)
		id := fmt.Sprintf("cs_order_%d", i)
		for _, st := range order {
			b.checkout(t, ctx, store.CheckoutUpdateParams{SessionID: id, AccountID: u.ID, PriceID: "pack_10", Credits: 10, Status: st})
		}
		got, err := b.st.CheckoutGet(ctx, id)
		if err != nil || got.Status != store.CheckoutPaid {
			t.Errorf("order %v: session %+v, %v", order, got, err)
		}
		if count, sum := b.ledgerKinds(t, ctx, u.ID); count[store.LedgerPurchase] != 1 || sum[store.LedgerPurchase] != 10 {
			t.Errorf("order %v: %d purchase entries summing %d", order, count[store.LedgerPurchase], sum[store.LedgerPurchase])
		}
	}
	// A failure stays failed under a late "pending", and grants nothing.
	u := b.newUser(t, ctx, 0)
	for _, st := range []store.CheckoutStatus{store.CheckoutFailed, store.CheckoutPending} {
		b.checkout(t, ctx, store.CheckoutUpdateParams{SessionID: "cs_failed", AccountID: u.ID, PriceID: "pack_10", Credits: 10, Status: st})
	}
	if got, _ := b.st.CheckoutGet(ctx, "cs_failed"); got.Status != store.CheckoutFailed {
		t.Errorf("failed then pending = %s", got.Status)
	}
	b.wantCredits(t, ctx, u.ID, 0, 0)
}

func testCheckoutRace(t *testing.T, open Opener) {
	ctx, b := setup(t, open, 0)
	const n = 30
	results := make([]*store.CheckoutResult, n)
	statuses := []store.CheckoutStatus{store.CheckoutPaid, store.CheckoutPending, store.CheckoutFailed}
	errs := race(n, func(i int) error {
		var err error
		results[i], err = b.st.CheckoutUpdate(ctx, store.CheckoutUpdateParams{SessionID: "cs_race", AccountID: b.user.ID, PriceID: "pack_5", Credits: 5, Status: statuses[i%3]})
		return err
	})
	wantTally(t, errs, map[protocol.Code]int{"ok": n})
	granted := 0
	for _, r := range results {
		if r.Granted {
			granted++
		}
	}
	if granted != 1 {
		t.Errorf("%d calls granted, want 1", granted)
	}
	b.wantCredits(t, ctx, b.user.ID, 5, 0)
	if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerPurchase] != 1 {
		t.Errorf("%d purchase entries, want 1", count[store.LedgerPurchase])
	}
}

// testRunCreditsEndToEnd follows three runs through the ledger: one that
// succeeds is charged once, one lost with its agent costs nothing, one
// cancelled before it started is released.
func testRunCreditsEndToEnd(t *testing.T, open Opener) {
	const cost = 3
	ctx, b := setup(t, open, 20)
	wfs := []*store.Workflow{b.wf, b.newWorkflow(t, ctx, b.user.ID), b.newWorkflow(t, ctx, b.user.ID)}
	ok, lost, cancelled := b.createRun(t, ctx, wfs[0].ID, cost), b.createRun(t, ctx, wfs[1].ID, cost), b.createRun(t, ctx, wfs[2].ID, cost)
	b.wantCredits(t, ctx, b.user.ID, 20, 3*cost)

	b.startRun(t, ctx, ok.ID)
	b.startRun(t, ctx, lost.ID)
	b.wantCredits(t, ctx, b.user.ID, 20-2*cost, cost)
	// A second start of a started run charges nothing more.
	_, err := b.st.RunStart(ctx, store.RunStartParams{ID: ok.ID, AgentID: "agt_test", LeaseID: leaseOf(ok.ID)})
	wantErr(t, err, protocol.CodeConflict)

	if r := b.finishRun(t, ctx, ok.ID, protocol.RunSucceeded, nil); r.CostCharged != cost {
		t.Errorf("succeeded run CostCharged = %d, want %d", r.CostCharged, cost)
	}
	lostErr := protocol.Errorf(protocol.CodeInternal, "The agent was lost.").With("reason", protocol.ReasonAgentLost)
	if r := b.finishRun(t, ctx, lost.ID, protocol.RunFailed, lostErr); r.CostCharged != 0 {
		t.Errorf("agent_lost run CostCharged = %d, want 0", r.CostCharged)
	}
	if r, err := b.st.RunCancel(ctx, cancelled.ID); err != nil || r.Status != protocol.RunCancelled {
		t.Fatalf("RunCancel = %+v, %v", r, err)
	}
	// Repeats change nothing.
	_, err = b.st.RunFinish(ctx, store.RunFinishParams{ID: ok.ID, LeaseID: leaseOf(ok.ID), Status: protocol.RunSucceeded})
	wantErr(t, err, protocol.CodeConflict)
	_, err = b.st.RunFinish(ctx, store.RunFinishParams{ID: lost.ID, LeaseID: leaseOf(lost.ID), Status: protocol.RunFailed, Error: lostErr})
	wantErr(t, err, protocol.CodeConflict)
	_, err = b.st.RunCancel(ctx, cancelled.ID)
	wantErr(t, err, protocol.CodeConflict)

	b.wantCredits(t, ctx, b.user.ID, 20-cost, 0)
	perRun := map[string]map[string]int64{}
	for _, e := range b.ledger(t, ctx, b.user.ID) {
		if e.RunID == "" {
			continue
		}
		if perRun[e.RunID] == nil {
			perRun[e.RunID] = map[string]int64{}
		}
		perRun[e.RunID][e.Kind] += e.Amount
		perRun[e.RunID]["entries"]++
	}
	want := map[string]map[string]int64{
		ok.ID:   {store.LedgerRunCharge: -cost, "entries": 1},
		lost.ID: {store.LedgerRunCharge: -cost, store.LedgerRunRefund: cost, "entries": 2},
	}
	for id, w := range want {
		for k, v := range w {
			if perRun[id][k] != v {
				t.Errorf("run %s: ledger %s = %d, want %d (all: %v)", id, k, perRun[id][k], v, perRun[id])
			}
		}
	}
	if perRun[cancelled.ID] != nil {
		t.Errorf("the run cancelled before it started has ledger entries: %v", perRun[cancelled.ID])
	}
	if sum, err := b.st.LedgerSum(ctx, b.user.ID); err != nil || sum != 20-cost {
		t.Errorf("LedgerSum = %d, %v; want %d", sum, err, 20-cost)
	}
}
