package storetest

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"

	"pgregory.net/rapid"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// testLedgerProperties drives one account through random sequences of
// grants, run holds (RunCreate), captures (RunStart), voids (cancel before
// start), finishes with and without refunds, coupon redemptions, purchases
// reported in any order, and refunds (negative adjustments under a key,
// sometimes repeated), checking after every step against a model:
//
//   - the balance equals the sum of the ledger, and the model's balance;
//   - available ≥ 0 and held ≤ balance;
//   - held equals the sum of the pending holds (the model's queued runs);
//   - each hold is resolved at most once: a run has at most one charge and
//     one refund, a refund only after a charge, and none unless it started;
//   - every refused operation wrote nothing.
func testLedgerProperties(t *testing.T, open Opener) {
	fewerChecksUnderRace()
	st := open(t)
	var seq atomic.Int64
	rapid.Check(t, func(rt *rapid.T) {
		m := newLedgerModel(t, rt, st, &seq)
		rt.Repeat(map[string]func(*rapid.T){
			"grant":        m.grant,
			"createRun":    m.createRun,
			"startRun":     m.startRun,
			"cancelRun":    m.cancelRun,
			"finishRun":    m.finishRun,
			"redeem":       m.redeem,
			"otherRedeems": m.otherRedeems,
			"deactivate":   m.deactivate,
			"refund":       m.refund,
			"repeatRefund": m.repeatRefund,
			"purchase":     m.purchase,
			"":             m.check,
		})
	})
}

var raceChecks sync.Once

// fewerChecksUnderRace lowers rapid's number of checks from 100 to 25 under
// the race detector, unless -rapid.checks (or RAPID_CHECKS) says otherwise:
// each check is some 30 transactions, and the race detector slows SQLite
// down tenfold. Without it the full 100 run in about two seconds.
func fewerChecksUnderRace() {
	raceChecks.Do(func() {
		if !raceEnabled || os.Getenv("RAPID_CHECKS") != "" {
			return
		}
		set := false
		flag.Visit(func(f *flag.Flag) { set = set || f.Name == "rapid.checks" })
		if !set {
			_ = flag.Set("rapid.checks", "25")
		}
	})
}

type modelRun struct {
	id      string
	wf      int
	cost    int64
	state   string // queued, running, done
	started bool
}

type modelCoupon struct {
	code     string
	credits  int64
	max      int64 // 0: no cap
	redeemed int64
	mine     bool
	active   bool
}

type modelRefund struct {
	key    string
	amount int64
}

type ledgerModel struct {
	ctx     context.Context
	st      store.Store
	seq     *atomic.Int64
	account string
	wfs     []string
	busy    []string // per workflow: the active run, or ""

	balance, held int64
	runs          []*modelRun
	coupons       []*modelCoupon
	refunds       []modelRefund
	sessions      map[string]store.CheckoutStatus
}

func newLedgerModel(t *testing.T, rt *rapid.T, st store.Store, seq *atomic.Int64) *ledgerModel {
	ctx := t.Context()
	n := seq.Add(1)
	u, err := st.UserCreate(ctx, store.UserCreateParams{Email: fmt.Sprintf("prop%d-%d@example.com", n, emailSeq.Add(1)), PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		rt.Fatalf("UserCreate: %v", err)
	}
	m := &ledgerModel{ctx: ctx, st: st, seq: seq, account: u.ID, sessions: map[string]store.CheckoutStatus{}}
	for range 3 {
		w, err := st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(Definition)})
		if err != nil {
			rt.Fatalf("WorkflowCreate: %v", err)
		}
		m.wfs = append(m.wfs, w.ID)
		m.busy = append(m.busy, "")
	}
	for i, c := range []struct{ credits, max int64 }{{5, 0}, {3, 2}, {7, 1}} {
		code := fmt.Sprintf("P%dC%d", n, i)
		p := store.CouponCreateParams{Code: code, Credits: c.credits, Active: true}
		if c.max > 0 {
			p.MaxRedemptions = ptr(c.max)
		}
		if _, err := st.CouponCreate(ctx, p); err != nil {
			rt.Fatalf("CouponCreate: %v", err)
		}
		m.coupons = append(m.coupons, &modelCoupon{code: code, credits: c.credits, max: c.max, active: true})
	}
	return m
}

func (m *ledgerModel) available() int64 { return m.balance - m.held }

// expect fails unless err has the code want ("" for success).
func expect(rt *rapid.T, op string, err error, want protocol.Code) {
	rt.Helper()
	got := protocol.Code("")
	if err != nil {
		got = protocol.ErrorCode(err)
	}
	if got != want {
		rt.Fatalf("%s: err = %v, want %q", op, err, want)
	}
}

func (m *ledgerModel) grant(rt *rapid.T) {
	n := rapid.Int64Range(1, 20).Draw(rt, "amount")
	_, err := m.st.CreditsGrant(m.ctx, store.CreditsGrantParams{AccountID: m.account, Amount: n, Kind: store.LedgerGrant, Reason: "prop"})
	expect(rt, "grant", err, "")
	m.balance += n
}

func (m *ledgerModel) createRun(rt *rapid.T) {
	wf := rapid.IntRange(0, len(m.wfs)-1).Draw(rt, "workflow")
	cost := rapid.Int64Range(1, 8).Draw(rt, "cost")
	r, err := m.st.RunCreate(m.ctx, runParams(m.account, m.wfs[wf], cost))
	switch {
	case m.busy[wf] != "":
		expect(rt, "createRun on a busy workflow", err, protocol.CodeWorkflowAlreadyRunning)
	case m.available() < cost:
		expect(rt, "createRun beyond the available credits", err, protocol.CodeInsufficientCredits)
	default:
		expect(rt, "createRun", err, "")
		m.held += cost
		m.busy[wf] = r.ID
		m.runs = append(m.runs, &modelRun{id: r.ID, wf: wf, cost: cost, state: "queued"})
	}
}

func (m *ledgerModel) pickRun(rt *rapid.T) *modelRun {
	if len(m.runs) == 0 {
		rt.Skip("no runs yet")
	}
	return rapid.SampledFrom(m.runs).Draw(rt, "run")
}

func (m *ledgerModel) startRun(rt *rapid.T) {
	r := m.pickRun(rt)
	_, err := m.st.RunStart(m.ctx, store.RunStartParams{ID: r.id, AgentID: "agt_prop", LeaseID: leaseOf(r.id)})
	if r.state != "queued" {
		expect(rt, "start of a "+r.state+" run", err, protocol.CodeConflict)
		return
	}
	expect(rt, "start", err, "")
	m.held -= r.cost
	m.balance -= r.cost
	r.state, r.started = "running", true
}

func (m *ledgerModel) cancelRun(rt *rapid.T) {
	r := m.pickRun(rt)
	_, err := m.st.RunCancel(m.ctx, r.id)
	switch r.state {
	case "done":
		expect(rt, "cancel of a finished run", err, protocol.CodeConflict)
	case "running":
		expect(rt, "cancel of a running run", err, "") // requested; the agent ends it
	default:
		expect(rt, "cancel", err, "")
		m.held -= r.cost
		m.busy[r.wf] = ""
		r.state = "done"
	}
}

// finishOutcomes are the ways a started run may end, and whether each costs
// nothing in the end.
var finishOutcomes = []struct {
	status protocol.RunStatus
	err    *protocol.Error
	free   bool
}{
	{protocol.RunSucceeded, nil, false},
	{protocol.RunFailed, protocol.Errorf(protocol.CodeUnprocessableEntity, "No element.").With("reason", protocol.ReasonElementNotFound), false},
	{protocol.RunTimedOut, protocol.Errorf(protocol.CodeTimeout, "Too slow.").With("reason", protocol.ReasonRunTimeout), false},
	{protocol.RunCancelled, nil, false},
	{protocol.RunFailed, protocol.Errorf(protocol.CodeInternal, "Lost.").With("reason", protocol.ReasonAgentLost), true},
	{protocol.RunFailed, protocol.Errorf(protocol.CodeInternal, "Crashed.").With("reason", protocol.ReasonBrowserCrashed), true},
	{protocol.RunFailed, protocol.NewError(protocol.CodeInternal), true},
}

func (m *ledgerModel) finishRun(rt *rapid.T) {
	r := m.pickRun(rt)
	o := rapid.SampledFrom(finishOutcomes).Draw(rt, "outcome")
	_, err := m.st.RunFinish(m.ctx, store.RunFinishParams{ID: r.id, LeaseID: leaseOf(r.id), Status: o.status, Error: o.err})
	if r.state != "running" {
		// A queued run holds no lease yet; a finished one moves no more.
		expect(rt, "finish of a "+r.state+" run", err, protocol.CodeConflict)
		return
	}
	expect(rt, "finish", err, "")
	if o.free {
		m.balance += r.cost
	}
	m.busy[r.wf] = ""
	r.state = "done"
}

func (m *ledgerModel) redeem(rt *rapid.T) {
	c := rapid.SampledFrom(m.coupons).Draw(rt, "coupon")
	_, err := m.st.CouponRedeem(m.ctx, store.CouponRedeemParams{Code: c.code, AccountID: m.account})
	switch {
	case !c.active:
		expect(rt, "redeem an inactive coupon", err, protocol.CodeCouponInactive)
	case c.mine:
		expect(rt, "redeem twice", err, protocol.CodeCouponAlreadyRedeemed)
	case c.max > 0 && c.redeemed >= c.max:
		expect(rt, "redeem beyond the cap", err, protocol.CodeCouponMaxRedemptionsReached)
	default:
		expect(rt, "redeem", err, "")
		c.mine = true
		c.redeemed++
		m.balance += c.credits
	}
}

// otherRedeems lets another account take one of a coupon's redemptions.
func (m *ledgerModel) otherRedeems(rt *rapid.T) {
	c := rapid.SampledFrom(m.coupons).Draw(rt, "coupon")
	u, err := m.st.UserCreate(m.ctx, store.UserCreateParams{Email: fmt.Sprintf("other%d@example.com", emailSeq.Add(1)), PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	expect(rt, "UserCreate", err, "")
	_, err = m.st.CouponRedeem(m.ctx, store.CouponRedeemParams{Code: c.code, AccountID: u.ID})
	switch {
	case !c.active:
		expect(rt, "other redeems an inactive coupon", err, protocol.CodeCouponInactive)
	case c.max > 0 && c.redeemed >= c.max:
		expect(rt, "other redeems beyond the cap", err, protocol.CodeCouponMaxRedemptionsReached)
	default:
		expect(rt, "other redeems", err, "")
		c.redeemed++
	}
}

func (m *ledgerModel) deactivate(rt *rapid.T) {
	c := rapid.SampledFrom(m.coupons).Draw(rt, "coupon")
	_, err := m.st.CouponDeactivate(m.ctx, c.code)
	expect(rt, "deactivate", err, "")
	c.active = false
}

func (m *ledgerModel) refund(rt *rapid.T) {
	n := rapid.Int64Range(1, 15).Draw(rt, "amount")
	key := fmt.Sprintf("refund:%s:%d", m.account, m.seq.Add(1))
	_, err := m.st.CreditsGrant(m.ctx, store.CreditsGrantParams{AccountID: m.account, Amount: -n, Kind: store.LedgerGrant, Reason: "refund", Key: key})
	if n > m.available() {
		expect(rt, "refund beyond the available credits", err, protocol.CodeInsufficientCredits)
		return
	}
	expect(rt, "refund", err, "")
	m.balance -= n
	m.refunds = append(m.refunds, modelRefund{key: key, amount: n})
}

// repeatRefund replays a refund's key: it answers the first entry and takes
// nothing more, even when repeating it for real would overdraw.
func (m *ledgerModel) repeatRefund(rt *rapid.T) {
	if len(m.refunds) == 0 {
		rt.Skip("no refunds yet")
	}
	r := rapid.SampledFrom(m.refunds).Draw(rt, "refund")
	e, err := m.st.CreditsGrant(m.ctx, store.CreditsGrantParams{AccountID: m.account, Amount: -r.amount, Kind: store.LedgerGrant, Reason: "refund", Key: r.key})
	expect(rt, "repeated refund", err, "")
	if e.Amount != -r.amount {
		rt.Fatalf("repeated refund answered %+v, want the first entry of %d", e, -r.amount)
	}
}

var checkoutStatuses = []store.CheckoutStatus{store.CheckoutPending, store.CheckoutPaid, store.CheckoutFailed}

// purchase reports one of three sessions (10 credits each) in any status.
func (m *ledgerModel) purchase(rt *rapid.T) {
	id := fmt.Sprintf("cs_%s_%d", m.account, rapid.IntRange(0, 2).Draw(rt, "session"))
	status := rapid.SampledFrom(checkoutStatuses).Draw(rt, "status")
	r, err := m.st.CheckoutUpdate(m.ctx, store.CheckoutUpdateParams{SessionID: id, AccountID: m.account, PriceID: "pack_10", Credits: 10, Status: status})
	expect(rt, "purchase", err, "")
	prev, seen := m.sessions[id]
	next := status
	if seen {
		next = prev.Next(status)
	}
	m.sessions[id] = next
	wantGrant := next == store.CheckoutPaid && prev != store.CheckoutPaid
	if r.Granted != wantGrant || r.Session.Status != next {
		rt.Fatalf("purchase %s %s after %q: granted %v, status %s; want %v, %s", id, status, prev, r.Granted, r.Session.Status, wantGrant, next)
	}
	if wantGrant {
		m.balance += 10
	}
}

// check runs after every step.
func (m *ledgerModel) check(rt *rapid.T) {
	c, err := m.st.CreditsGet(m.ctx, m.account)
	if err != nil {
		rt.Fatalf("CreditsGet: %v", err)
	}
	var pending int64
	for _, r := range m.runs {
		if r.state == "queued" {
			pending += r.cost
		}
	}
	want := store.Credits{Balance: m.balance, Held: m.held, Available: m.balance - m.held}
	if c != want || m.held != pending {
		rt.Fatalf("credits %+v, model %+v, pending holds %d", c, want, pending)
	}
	if c.Available < 0 || c.Held < 0 || c.Held > c.Balance {
		rt.Fatalf("credits %+v break 0 ≤ held ≤ balance", c)
	}
	sum, err := m.st.LedgerSum(m.ctx, m.account)
	if err != nil || sum != c.Balance {
		rt.Fatalf("LedgerSum = %d, %v; balance %d", sum, err, c.Balance)
	}
	entries, _, err := m.st.LedgerList(m.ctx, m.account, store.Page{Limit: 500})
	if err != nil {
		rt.Fatalf("LedgerList: %v", err)
	}
	charges, refunds := map[string]int{}, map[string]int{}
	for _, e := range entries {
		switch e.Kind {
		case store.LedgerRunCharge:
			charges[e.RunID]++
		case store.LedgerRunRefund:
			refunds[e.RunID]++
		}
	}
	for _, r := range m.runs {
		if charges[r.id] > 1 || refunds[r.id] > 1 || refunds[r.id] > charges[r.id] || (charges[r.id] > 0) != r.started {
			rt.Fatalf("run %s (%s, started %v): %d charges, %d refunds", r.id, r.state, r.started, charges[r.id], refunds[r.id])
		}
	}
}
