// Package storetest is the conformance suite of store.Store. Every database
// implementation runs it once, from its own tests:
//
//	func TestStore(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store {
//			s := openFreshDatabase(t)
//			t.Cleanup(func() { s.Close() })
//			return s
//		})
//	}
//
// The suite speaks only the Store interface and the error catalog: it knows
// nothing of SQL, files or connection pools. The race tests start real
// goroutines against the real store; they are the reason the suite exists.
package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Definition is the ready workflow every test runs.
const Definition = `{"version":1,"variables":[],"steps":[{"type":"navigate","url":"about:blank"}]}`

// Opener returns a fresh, empty store for one test and arranges (with
// t.Cleanup) for it to be closed when the test ends.
type Opener func(t *testing.T) store.Store

// Run runs the conformance suite. Every subtest calls open for a store of its
// own, and most run in parallel.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	t.Helper()
	for _, g := range []struct {
		name string
		fn   func(*testing.T, Opener)
	}{
		{"Users", testUsers},
		{"Tokens", testTokens},
		{"Workflows", testWorkflows},
		{"Runs", testRuns},
		{"Approvals", testApprovals},
		{"Batches", testBatches},
		{"Credits", testCredits},
		{"Idempotency", testIdempotency},
		{"Races", testRaces},
		{"Money", testMoney},
		{"Analysis", testAnalysis},
		{"AnalysisRaces", testAnalysisRaces},
		{"Events", testEvents},
	} {
		t.Run(g.name, func(t *testing.T) {
			t.Parallel()
			g.fn(t, open)
		})
	}
}

// bundle is what a test starts from: a fresh store, an account with credits
// and a ready workflow of that account. Every account made through the bundle
// is audited when the test ends (see audit).
type bundle struct {
	st   store.Store
	user *store.User
	wf   *store.Workflow

	mu       sync.Mutex
	accounts []string
}

var emailSeq atomic.Int64

// setup opens a store and seeds an account with credits and a ready workflow.
func setup(t *testing.T, open Opener, credits int64) (context.Context, *bundle) {
	t.Helper()
	b := &bundle{st: open(t)}
	// Registered after open's cleanups, so it runs before the store closes.
	t.Cleanup(func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, id := range b.accounts {
			audit(t, b.st, id)
		}
	})
	ctx := t.Context()
	b.user = b.newUser(t, ctx, credits)
	b.wf = b.newWorkflow(t, ctx, b.user.ID)
	return ctx, b
}

// audit checks the credit invariants of an account: balance equals the sum of
// the ledger, 0 ≤ held ≤ balance, available = balance − held, and held is
// exactly the reserved cost of the account's runs that are still queued.
func audit(t *testing.T, st store.Store, accountID string) {
	t.Helper()
	ctx := context.Background() // t.Context is already cancelled in cleanups
	c, err := st.CreditsGet(ctx, accountID)
	if err != nil {
		t.Errorf("audit %s: CreditsGet: %v", accountID, err)
		return
	}
	sum, err := st.LedgerSum(ctx, accountID)
	if err != nil {
		t.Errorf("audit %s: LedgerSum: %v", accountID, err)
		return
	}
	if sum != c.Balance {
		t.Errorf("audit %s: ledger sum %d, balance %d", accountID, sum, c.Balance)
	}
	if c.Held < 0 || c.Held > c.Balance || c.Available != c.Balance-c.Held {
		t.Errorf("audit %s: credits %+v break 0 ≤ held ≤ balance, available = balance − held", accountID, c)
	}
	var reserved int64
	page := store.Page{Limit: 500}
	for {
		runs, next, err := st.RunList(ctx, store.RunListParams{AccountID: accountID, Status: protocol.RunQueued, Page: page})
		if err != nil {
			t.Errorf("audit %s: RunList: %v", accountID, err)
			return
		}
		for _, r := range runs {
			reserved += r.CostReserved
		}
		if next == "" {
			break
		}
		page.Cursor = next
	}
	if reserved != c.Held {
		t.Errorf("audit %s: held %d, but queued runs reserve %d", accountID, c.Held, reserved)
	}
}

// newUser creates a member on plan pro with credits granted (if any).
func (b *bundle) newUser(t *testing.T, ctx context.Context, credits int64) *store.User {
	t.Helper()
	u, err := b.st.UserCreate(ctx, store.UserCreateParams{
		Email:        fmt.Sprintf("user%d@example.com", emailSeq.Add(1)),
		PasswordHash: "hash",
		Role:         store.RoleMember,
		Plan:         store.PlanPro,
	})
	if err != nil {
		t.Fatalf("UserCreate: %v", err)
	}
	b.track(u.ID)
	if credits != 0 {
		b.grant(t, ctx, u.ID, credits)
	}
	return u
}

// track adds an account to those audited when the test ends.
func (b *bundle) track(accountID string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.accounts = append(b.accounts, accountID)
}

func (b *bundle) grant(t *testing.T, ctx context.Context, accountID string, amount int64) *store.LedgerEntry {
	t.Helper()
	e, err := b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: accountID, Amount: amount, Kind: store.LedgerGrant, Reason: "test"})
	if err != nil {
		t.Fatalf("CreditsGrant(%d): %v", amount, err)
	}
	return e
}

// newWorkflow creates a ready workflow with Definition.
func (b *bundle) newWorkflow(t *testing.T, ctx context.Context, accountID string) *store.Workflow {
	t.Helper()
	w, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{
		AccountID: accountID, Name: "wf", Status: protocol.WorkflowReady, Definition: json.RawMessage(Definition),
	})
	if err != nil {
		t.Fatalf("WorkflowCreate: %v", err)
	}
	return w
}

// runParams are the parameters of a run of workflowID costing cost.
func runParams(accountID, workflowID string, cost int64) store.RunCreateParams {
	return store.RunCreateParams{
		AccountID:  accountID,
		WorkflowID: workflowID,
		Inputs:     map[string]any{"name": "value"},
		Steps:      []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}},
		TimeoutMs:  60_000,
		Cost:       cost,
	}
}

// createRun queues a run on workflowID (of the bundle's account) or fails the test.
func (b *bundle) createRun(t *testing.T, ctx context.Context, workflowID string, cost int64) *store.Run {
	t.Helper()
	return b.createRunFor(t, ctx, b.user.ID, workflowID, cost)
}

func (b *bundle) createRunFor(t *testing.T, ctx context.Context, accountID, workflowID string, cost int64) *store.Run {
	t.Helper()
	r, err := b.st.RunCreate(ctx, runParams(accountID, workflowID, cost))
	if err != nil {
		t.Fatalf("RunCreate: %v", err)
	}
	return r
}

// leaseOf is the lease a test starts runID with.
func leaseOf(runID string) string { return "lse_" + runID }

// startRun starts a queued run on a test agent under leaseOf(id).
func (b *bundle) startRun(t *testing.T, ctx context.Context, id string) *store.Run {
	t.Helper()
	r, err := b.st.RunStart(ctx, store.RunStartParams{ID: id, AgentID: "agt_test", LeaseID: leaseOf(id)})
	if err != nil {
		t.Fatalf("RunStart: %v", err)
	}
	return r
}

// finishRun finishes a started run under its lease.
func (b *bundle) finishRun(t *testing.T, ctx context.Context, id string, status protocol.RunStatus, runErr *protocol.Error) *store.Run {
	t.Helper()
	r, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: id, LeaseID: leaseOf(id), Status: status, Error: runErr})
	if err != nil {
		t.Fatalf("RunFinish(%s): %v", status, err)
	}
	return r
}

func (b *bundle) getRun(t *testing.T, ctx context.Context, id string) *store.Run {
	t.Helper()
	r, err := b.st.RunGet(ctx, id)
	if err != nil {
		t.Fatalf("RunGet: %v", err)
	}
	return r
}

func (b *bundle) getWorkflow(t *testing.T, ctx context.Context, id string) *store.Workflow {
	t.Helper()
	w, err := b.st.WorkflowGet(ctx, id)
	if err != nil {
		t.Fatalf("WorkflowGet: %v", err)
	}
	return w
}

func (b *bundle) getBatch(t *testing.T, ctx context.Context, id string) *store.Batch {
	t.Helper()
	bt, err := b.st.BatchGet(ctx, id)
	if err != nil {
		t.Fatalf("BatchGet: %v", err)
	}
	return bt
}

func (b *bundle) getApproval(t *testing.T, ctx context.Context, id string) *store.Approval {
	t.Helper()
	a, err := b.st.ApprovalGet(ctx, id)
	if err != nil {
		t.Fatalf("ApprovalGet: %v", err)
	}
	return a
}

// wantCredits checks an account's balance and held amount (and available).
func (b *bundle) wantCredits(t *testing.T, ctx context.Context, accountID string, balance, held int64) {
	t.Helper()
	c, err := b.st.CreditsGet(ctx, accountID)
	if err != nil {
		t.Fatalf("CreditsGet: %v", err)
	}
	want := store.Credits{Balance: balance, Held: held, Available: balance - held}
	if c != want {
		t.Errorf("credits = %+v, want %+v", c, want)
	}
}

// ledger returns every ledger entry of the account, newest first.
func (b *bundle) ledger(t *testing.T, ctx context.Context, accountID string) []*store.LedgerEntry {
	t.Helper()
	var out []*store.LedgerEntry
	page := store.Page{Limit: 500}
	for {
		items, next, err := b.st.LedgerList(ctx, accountID, page)
		if err != nil {
			t.Fatalf("LedgerList: %v", err)
		}
		out = append(out, items...)
		if next == "" {
			return out
		}
		page.Cursor = next
	}
}

// ledgerKinds counts an account's ledger entries by kind, and sums their
// amounts by kind.
func (b *bundle) ledgerKinds(t *testing.T, ctx context.Context, accountID string) (count, sum map[string]int64) {
	t.Helper()
	count, sum = map[string]int64{}, map[string]int64{}
	for _, e := range b.ledger(t, ctx, accountID) {
		count[e.Kind]++
		sum[e.Kind] += e.Amount
	}
	return count, sum
}

// runsOf lists every run matching p (all pages).
func (b *bundle) runsOf(t *testing.T, ctx context.Context, p store.RunListParams) []*store.Run {
	t.Helper()
	var out []*store.Run
	p.Limit = 500
	for {
		items, next, err := b.st.RunList(ctx, p)
		if err != nil {
			t.Fatalf("RunList: %v", err)
		}
		out = append(out, items...)
		if next == "" {
			return out
		}
		p.Cursor = next
	}
}

// wantErr checks that err carries the catalog code want and, given as
// key/value pairs, details whose JSON equals the JSON of the values.
func wantErr(t *testing.T, err error, want protocol.Code, details ...any) {
	t.Helper()
	if err == nil {
		t.Fatalf("err = nil, want %s", want)
	}
	if got := protocol.ErrorCode(err); got != want {
		t.Fatalf("err = %v (code %s), want code %s", err, got, want)
	}
	var pe *protocol.Error
	if !errors.As(err, &pe) {
		t.Fatalf("err = %T %v, want a *protocol.Error", err, err)
	}
	for i := 0; i+1 < len(details); i += 2 {
		key := details[i].(string)
		wantDetail(t, "details."+key, pe.Details[key], details[i+1])
	}
}

// wantDetail compares the JSON of got and want (details travel as JSON).
func wantDetail(t *testing.T, name string, got, want any) {
	t.Helper()
	g, err := json.Marshal(got)
	if err != nil {
		t.Fatalf("marshal %s: %v", name, err)
	}
	w, _ := json.Marshal(want)
	if string(g) != string(w) {
		t.Errorf("%s = %s, want %s", name, g, w)
	}
}

// sameJSON reports whether two JSON documents are equal as values.
func sameJSON(t *testing.T, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("unmarshal %s: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("unmarshal %s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

func sameTime(t *testing.T, name string, got, want time.Time) {
	t.Helper()
	if !got.Equal(want) {
		t.Errorf("%s = %v, want %v", name, got, want)
	}
}

// recent checks that a store-made timestamp is set and close to now.
func recent(t *testing.T, name string, got time.Time) {
	t.Helper()
	if d := time.Since(got); got.IsZero() || d < -time.Minute || d > time.Minute {
		t.Errorf("%s = %v, want about now", name, got)
	}
}

func wantPrefix(t *testing.T, id, prefix string) {
	t.Helper()
	if !strings.HasPrefix(id, prefix+"_") || len(id) < len(prefix)+17 {
		t.Errorf("id %q: want %s_ and at least 96 random bits", id, prefix)
	}
}

// tick lets the clock move on, so that records made before and after it have
// different creation times (stores keep at least millisecond precision).
func tick() { time.Sleep(2 * time.Millisecond) }

// race calls fn n times at once from n goroutines, released together, and
// returns each call's error.
func race(n int, fn func(i int) error) []error {
	start := make(chan struct{})
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = fn(i)
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// tally counts errors by catalog code; successes count under "ok".
func tally(errs []error) map[protocol.Code]int {
	out := map[protocol.Code]int{}
	for _, err := range errs {
		if err == nil {
			out["ok"]++
			continue
		}
		out[protocol.ErrorCode(err)]++
	}
	return out
}

func wantTally(t *testing.T, errs []error, want map[protocol.Code]int) {
	t.Helper()
	if got := tally(errs); !maps.Equal(got, want) {
		for _, err := range errs {
			if err != nil && protocol.ErrorCode(err) == protocol.CodeInternal {
				t.Logf("unexpected error: %v", err)
				break
			}
		}
		t.Fatalf("outcomes = %v, want %v", got, want)
	}
}

func ids[T any](items []T, id func(T) string) []string {
	out := make([]string, len(items))
	for i, it := range items {
		out[i] = id(it)
	}
	return out
}

func workflowIDs(ws []*store.Workflow) []string {
	return ids(ws, func(w *store.Workflow) string { return w.ID })
}
func runIDs(rs []*store.Run) []string { return ids(rs, func(r *store.Run) string { return r.ID }) }

func wantIDs(t *testing.T, name string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s = %v, want %v", name, got, want)
	}
}

// ---------------------------------------------------------------- users

func testUsers(t *testing.T, open Opener) {
	t.Run("CreateGetByIDAndEmail", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		u, err := b.st.UserCreate(ctx, store.UserCreateParams{Email: "Ada.Lovelace@Example.com", PasswordHash: "phc", Role: store.RoleOperator, Plan: store.PlanFree})
		if err != nil {
			t.Fatalf("UserCreate: %v", err)
		}
		b.track(u.ID)
		wantPrefix(t, u.ID, "usr")
		if u.AccountID() != u.ID {
			t.Errorf("AccountID = %q, want the user id %q", u.AccountID(), u.ID)
		}
		recent(t, "CreatedAt", u.CreatedAt)
		for _, get := range []struct {
			name string
			fn   func() (*store.User, error)
		}{
			{"UserGet", func() (*store.User, error) { return b.st.UserGet(ctx, u.ID) }},
			{"UserGetByEmail exact", func() (*store.User, error) { return b.st.UserGetByEmail(ctx, "Ada.Lovelace@Example.com") }},
			{"UserGetByEmail lower", func() (*store.User, error) { return b.st.UserGetByEmail(ctx, "ada.lovelace@example.com") }},
			{"UserGetByEmail upper", func() (*store.User, error) { return b.st.UserGetByEmail(ctx, "ADA.LOVELACE@EXAMPLE.COM") }},
		} {
			got, err := get.fn()
			if err != nil {
				t.Fatalf("%s: %v", get.name, err)
			}
			if got.ID != u.ID || got.Email != "Ada.Lovelace@Example.com" || got.PasswordHash != "phc" || got.Role != store.RoleOperator || got.Plan != store.PlanFree {
				t.Errorf("%s = %+v, want %+v", get.name, got, u)
			}
			sameTime(t, get.name+" CreatedAt", got.CreatedAt, u.CreatedAt)
		}
		b.wantCredits(t, ctx, u.ID, 0, 0)
		if sum, err := b.st.LedgerSum(ctx, u.ID); err != nil || sum != 0 {
			t.Errorf("LedgerSum = %d, %v; want 0", sum, err)
		}
	})

	t.Run("DuplicateEmailInAnotherCase", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		_, err := b.st.UserCreate(ctx, store.UserCreateParams{Email: "bob@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
		if err != nil {
			t.Fatalf("UserCreate: %v", err)
		}
		_, err = b.st.UserCreate(ctx, store.UserCreateParams{Email: "BOB@Example.COM", PasswordHash: "h2", Role: store.RoleAdmin, Plan: store.PlanPro})
		wantErr(t, err, protocol.CodeConflict)
		got, err := b.st.UserGetByEmail(ctx, "bob@example.com")
		if err != nil || got.Role != store.RoleMember {
			t.Errorf("after the refused duplicate: %+v, %v; want the first user", got, err)
		}
	})

	t.Run("NotFound", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		_, err := b.st.UserGet(ctx, "usr_doesnotexist")
		wantErr(t, err, protocol.CodeNotFound)
		_, err = b.st.UserGetByEmail(ctx, "nobody@example.com")
		wantErr(t, err, protocol.CodeNotFound)
	})
}

// ---------------------------------------------------------------- tokens

func testTokens(t *testing.T, open Opener) {
	t.Run("CreateLookupListRevoke", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		other := b.newUser(t, ctx, 0)
		expires := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
		mk := func(userID string, kind store.TokenKind, name, hash string, exp *time.Time) *store.Token {
			t.Helper()
			tok, err := b.st.TokenCreate(ctx, store.TokenCreateParams{UserID: userID, Kind: kind, Name: name, Hash: hash, ExpiresAt: exp})
			if err != nil {
				t.Fatalf("TokenCreate(%s): %v", name, err)
			}
			return tok
		}
		api := mk(b.user.ID, store.TokenAPI, "ci", "hash-api", &expires)
		agent := mk(b.user.ID, store.TokenAgent, "laptop", "hash-agent", nil)
		mk(b.user.ID, store.TokenSession, "session", "hash-session", &expires)
		revoked := mk(b.user.ID, store.TokenAPI, "old", "hash-old", nil)
		foreign := mk(other.ID, store.TokenAPI, "theirs", "hash-theirs", nil)
		wantPrefix(t, api.ID, "tok")
		recent(t, "CreatedAt", api.CreatedAt)

		// Lookup by hash returns the token and its user.
		tok, u, err := b.st.TokenGetByHash(ctx, "hash-api")
		if err != nil {
			t.Fatalf("TokenGetByHash: %v", err)
		}
		if tok.ID != api.ID || tok.UserID != b.user.ID || tok.Kind != store.TokenAPI || tok.Name != "ci" || tok.RevokedAt != nil {
			t.Errorf("token = %+v, want %+v", tok, api)
		}
		if tok.ExpiresAt == nil || !tok.ExpiresAt.Equal(expires) {
			t.Errorf("ExpiresAt = %v, want %v", tok.ExpiresAt, expires)
		}
		if u.ID != b.user.ID || u.Email != b.user.Email || u.Role != b.user.Role || u.Plan != b.user.Plan {
			t.Errorf("user = %+v, want %+v", u, b.user)
		}
		if tok, _, err := b.st.TokenGetByHash(ctx, "hash-session"); err != nil || tok.Kind != store.TokenSession {
			t.Errorf("session lookup = %+v, %v", tok, err)
		}
		_, _, err = b.st.TokenGetByHash(ctx, "hash-unknown")
		wantErr(t, err, protocol.CodeUnauthenticated)

		// Another user's token is not found, and stays live.
		wantErr(t, b.st.TokenRevoke(ctx, b.user.ID, foreign.ID), protocol.CodeNotFound)
		if _, u, err := b.st.TokenGetByHash(ctx, "hash-theirs"); err != nil || u.ID != other.ID {
			t.Errorf("foreign token after a refused revoke: %v, %v", u, err)
		}
		wantErr(t, b.st.TokenRevoke(ctx, b.user.ID, "tok_doesnotexist"), protocol.CodeNotFound)

		if err := b.st.TokenRevoke(ctx, b.user.ID, revoked.ID); err != nil {
			t.Fatalf("TokenRevoke: %v", err)
		}
		_, _, err = b.st.TokenGetByHash(ctx, "hash-old")
		wantErr(t, err, protocol.CodeUnauthenticated)

		list, err := b.st.TokenList(ctx, b.user.ID)
		if err != nil {
			t.Fatalf("TokenList: %v", err)
		}
		got := ids(list, func(t *store.Token) string { return t.ID })
		slices.Sort(got)
		want := []string{api.ID, agent.ID}
		slices.Sort(want)
		wantIDs(t, "TokenList (no sessions, no revoked)", got, want)

		list, err = b.st.TokenList(ctx, "usr_nobody")
		if err != nil || list == nil || len(list) != 0 {
			t.Errorf("TokenList of a user without tokens = %v, %v; want an empty, non-nil list", list, err)
		}
	})
}

// ---------------------------------------------------------------- workflows

func testWorkflows(t *testing.T, open Opener) {
	t.Run("CreateGet", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		w := b.wf
		wantPrefix(t, w.ID, "wf")
		if w.AccountID != b.user.ID || w.Name != "wf" || w.Status != protocol.WorkflowReady || w.DeletedAt != nil || w.ActiveRunID != "" || w.ActiveBatchID != "" {
			t.Errorf("created = %+v", w)
		}
		recent(t, "CreatedAt", w.CreatedAt)
		got := b.getWorkflow(t, ctx, w.ID)
		if got.ID != w.ID || got.AccountID != w.AccountID || got.Name != w.Name || got.Status != w.Status || got.DeletedAt != nil {
			t.Errorf("got = %+v, want %+v", got, w)
		}
		if !sameJSON(t, got.Definition, []byte(Definition)) {
			t.Errorf("Definition = %s, want %s", got.Definition, Definition)
		}
		sameTime(t, "CreatedAt", got.CreatedAt, w.CreatedAt)
		sameTime(t, "UpdatedAt", got.UpdatedAt, w.UpdatedAt)

		analyzing, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: b.user.ID, Name: "video", Status: protocol.WorkflowAnalyzing})
		if err != nil {
			t.Fatalf("WorkflowCreate analyzing: %v", err)
		}
		got = b.getWorkflow(t, ctx, analyzing.ID)
		if got.Status != protocol.WorkflowAnalyzing || len(got.Definition) != 0 {
			t.Errorf("analyzing workflow = status %s, definition %s", got.Status, got.Definition)
		}

		_, err = b.st.WorkflowGet(ctx, "wf_doesnotexist")
		wantErr(t, err, protocol.CodeWorkflowNotFound)
	})

	t.Run("ListNewestFirstPaginated", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		want := []string{b.wf.ID}
		for range 4 {
			tick()
			want = append(want, b.newWorkflow(t, ctx, b.user.ID).ID)
		}
		slices.Reverse(want)
		other := b.newUser(t, ctx, 0)
		b.newWorkflow(t, ctx, other.ID)

		all, next, err := b.st.WorkflowList(ctx, b.user.ID, store.Page{})
		if err != nil {
			t.Fatalf("WorkflowList: %v", err)
		}
		wantIDs(t, "default page", workflowIDs(all), want)
		if next != "" {
			t.Errorf("nextCursor = %q at the end, want empty", next)
		}

		var pages [][]string
		page := store.Page{Limit: 2}
		for {
			items, next, err := b.st.WorkflowList(ctx, b.user.ID, page)
			if err != nil {
				t.Fatalf("WorkflowList(%+v): %v", page, err)
			}
			pages = append(pages, workflowIDs(items))
			if next == "" {
				break
			}
			if len(pages) > 5 {
				t.Fatalf("pagination does not end")
			}
			page.Cursor = next
		}
		wantPages := [][]string{want[0:2], want[2:4], want[4:5]}
		if !reflect.DeepEqual(pages, wantPages) {
			t.Errorf("pages = %v, want %v", pages, wantPages)
		}

		// An exact multiple of the limit ends with an empty cursor too.
		items, next, err := b.st.WorkflowList(ctx, b.user.ID, store.Page{Limit: 5})
		if err != nil || len(items) != 5 || next != "" {
			t.Errorf("limit 5 of 5 = %d items, next %q, %v; want 5 and no cursor", len(items), next, err)
		}

		for _, bad := range []string{"not a cursor!", "Zm9v", "MTIzfA"} {
			_, _, err = b.st.WorkflowList(ctx, b.user.ID, store.Page{Cursor: bad})
			wantErr(t, err, protocol.CodeBadRequest)
		}
	})

	t.Run("ListPagesCoverSameInstant", func(t *testing.T) {
		// Many workflows made within the same clock tick: paging by 2 sees each exactly once.
		t.Parallel()
		ctx, b := setup(t, open, 0)
		want := []string{b.wf.ID}
		for range 8 {
			want = append(want, b.newWorkflow(t, ctx, b.user.ID).ID)
		}
		var got []string
		page := store.Page{Limit: 2}
		for range 20 {
			items, next, err := b.st.WorkflowList(ctx, b.user.ID, page)
			if err != nil {
				t.Fatalf("WorkflowList: %v", err)
			}
			for i := 1; i < len(items); i++ {
				if items[i].CreatedAt.After(items[i-1].CreatedAt) {
					t.Errorf("not newest first: %v after %v", items[i].CreatedAt, items[i-1].CreatedAt)
				}
			}
			got = append(got, workflowIDs(items)...)
			if next == "" {
				break
			}
			page.Cursor = next
		}
		slices.Sort(got)
		slices.Sort(want)
		wantIDs(t, "every page together", got, want)
	})

	t.Run("Update", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		name := "renamed"
		tick()
		w, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name})
		if err != nil {
			t.Fatalf("WorkflowUpdate name: %v", err)
		}
		if w.Name != "renamed" || !sameJSON(t, w.Definition, []byte(Definition)) || w.Status != protocol.WorkflowReady {
			t.Errorf("after rename = %+v (definition %s)", w, w.Definition)
		}
		if !w.UpdatedAt.After(b.wf.UpdatedAt) {
			t.Errorf("UpdatedAt = %v, want after %v", w.UpdatedAt, b.wf.UpdatedAt)
		}
		def2 := `{"version":1,"variables":[],"steps":[{"type":"navigate","url":"https://example.com"}]}`
		if _, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Definition: json.RawMessage(def2)}); err != nil {
			t.Fatalf("WorkflowUpdate definition: %v", err)
		}
		got := b.getWorkflow(t, ctx, b.wf.ID)
		if got.Name != "renamed" || !sameJSON(t, got.Definition, []byte(def2)) {
			t.Errorf("after both updates = name %q, definition %s", got.Name, got.Definition)
		}
		sameTime(t, "CreatedAt", got.CreatedAt, b.wf.CreatedAt)

		// A definition makes an analyzing workflow ready (the analyzer's result).
		analyzing, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: b.user.ID, Name: "video", Status: protocol.WorkflowAnalyzing})
		if err != nil {
			t.Fatalf("WorkflowCreate: %v", err)
		}
		w, err = b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: analyzing.ID, Definition: json.RawMessage(Definition)})
		if err != nil || w.Status != protocol.WorkflowReady {
			t.Fatalf("WorkflowUpdate of an analyzing workflow = %+v, %v; want ready", w, err)
		}

		_, err = b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: "wf_doesnotexist", Name: &name})
		wantErr(t, err, protocol.CodeWorkflowNotFound)
	})

	t.Run("Delete", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		keep := b.newWorkflow(t, ctx, b.user.ID)
		if err := b.st.WorkflowDelete(ctx, b.wf.ID); err != nil {
			t.Fatalf("WorkflowDelete: %v", err)
		}
		got := b.getWorkflow(t, ctx, b.wf.ID)
		if got.DeletedAt == nil {
			t.Errorf("DeletedAt = nil after delete")
		} else {
			recent(t, "DeletedAt", *got.DeletedAt)
		}
		list, _, err := b.st.WorkflowList(ctx, b.user.ID, store.Page{})
		if err != nil {
			t.Fatalf("WorkflowList: %v", err)
		}
		wantIDs(t, "list after delete", workflowIDs(list), []string{keep.ID})

		wantErr(t, b.st.WorkflowDelete(ctx, b.wf.ID), protocol.CodeWorkflowNotFound)
		name := "x"
		_, err = b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name})
		wantErr(t, err, protocol.CodeWorkflowNotFound)
		wantErr(t, b.st.WorkflowDelete(ctx, "wf_doesnotexist"), protocol.CodeWorkflowNotFound)
	})

	t.Run("ActiveRunBlocksUpdateAndDelete", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		for _, started := range []bool{false, true} {
			r := b.createRun(t, ctx, b.wf.ID, 1)
			if started {
				b.startRun(t, ctx, r.ID)
			}
			before := b.getWorkflow(t, ctx, b.wf.ID)
			name := fmt.Sprint("renamed while started=", started)
			_, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name})
			wantErr(t, err, protocol.CodeWorkflowHasActiveRequests, "approvalIds", []string{}, "runId", r.ID)
			wantErr(t, b.st.WorkflowDelete(ctx, b.wf.ID), protocol.CodeWorkflowHasActiveRequests, "approvalIds", []string{}, "runId", r.ID)
			if got := b.getWorkflow(t, ctx, b.wf.ID); got.Name != before.Name || !got.UpdatedAt.Equal(before.UpdatedAt) || got.DeletedAt != nil {
				t.Errorf("refused edits changed the workflow: %+v", got)
			}
			if started {
				b.finishRun(t, ctx, r.ID, protocol.RunSucceeded, nil)
			} else if _, err := b.st.RunCancel(ctx, r.ID); err != nil {
				t.Fatalf("RunCancel: %v", err)
			}
			if _, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name}); err != nil {
				t.Fatalf("WorkflowUpdate after the run ended: %v", err)
			}
		}
		if err := b.st.WorkflowDelete(ctx, b.wf.ID); err != nil {
			t.Fatalf("WorkflowDelete after the runs ended: %v", err)
		}
	})
}

// ---------------------------------------------------------------- runs

func testRuns(t *testing.T, open Opener) {
	t.Run("CreateHoldsCost", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		p := runParams(b.user.ID, b.wf.ID, 3)
		p.SecretNames = []string{"password"}
		p.Labels = map[string]string{"os": "linux"}
		p.QueueTimeoutMs = 5000
		r, err := b.st.RunCreate(ctx, p)
		if err != nil {
			t.Fatalf("RunCreate: %v", err)
		}
		wantPrefix(t, r.ID, "run")
		if r.Status != protocol.RunQueued || r.AccountID != b.user.ID || r.WorkflowID != b.wf.ID || r.CostReserved != 3 || r.CostCharged != 0 ||
			r.StartedAt != nil || r.FinishedAt != nil || r.Attempt != 0 || r.BatchID != "" || r.Iteration != nil {
			t.Errorf("created = %+v", r)
		}
		recent(t, "QueuedAt", r.QueuedAt)
		b.wantCredits(t, ctx, b.user.ID, 10, 3)
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != r.ID {
			t.Errorf("workflow ActiveRunID = %q, want %q", w.ActiveRunID, r.ID)
		}

		got := b.getRun(t, ctx, r.ID)
		if got.Status != protocol.RunQueued || got.CostReserved != 3 || got.TimeoutMs != 60_000 || got.QueueTimeoutMs != 5000 {
			t.Errorf("got = %+v", got)
		}
		sameTime(t, "QueuedAt", got.QueuedAt, r.QueuedAt)
		if !reflect.DeepEqual(got.Inputs, p.Inputs) || !reflect.DeepEqual(got.Labels, p.Labels) || !reflect.DeepEqual(got.SecretNames, p.SecretNames) {
			t.Errorf("got inputs %v labels %v secrets %v, want %v %v %v", got.Inputs, got.Labels, got.SecretNames, p.Inputs, p.Labels, p.SecretNames)
		}
		if !reflect.DeepEqual(got.Steps, p.Steps) {
			t.Errorf("Steps = %+v, want %+v", got.Steps, p.Steps)
		}
		if got.Outputs == nil || len(got.Outputs) != 0 {
			t.Errorf("Outputs = %#v, want an empty, non-nil map", got.Outputs)
		}
		// Nothing is charged before the run starts.
		if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 0 {
			t.Errorf("a queued run has %d run_charge entries", count[store.LedgerRunCharge])
		}

		_, err = b.st.RunGet(ctx, "run_doesnotexist")
		wantErr(t, err, protocol.CodeNotFound)
	})

	t.Run("InsufficientCreditsWritesNothing", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 2)
		_, err := b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 3))
		wantErr(t, err, protocol.CodeInsufficientCredits, "required", 3, "available", 2)
		b.wantCredits(t, ctx, b.user.ID, 2, 0)
		if runs := b.runsOf(t, ctx, store.RunListParams{AccountID: b.user.ID}); len(runs) != 0 {
			t.Errorf("a refused run was written: %v", runIDs(runs))
		}
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != "" {
			t.Errorf("a refused run took the workflow slot: %q", w.ActiveRunID)
		}
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries, want only the grant", n)
		}
		// Exactly the available amount is enough; then nothing is left.
		b.createRun(t, ctx, b.wf.ID, 2)
		b.wantCredits(t, ctx, b.user.ID, 2, 2)
		_, err = b.st.RunCreate(ctx, runParams(b.user.ID, b.newWorkflow(t, ctx, b.user.ID).ID, 1))
		wantErr(t, err, protocol.CodeInsufficientCredits, "required", 1, "available", 0)
	})

	t.Run("SecondRunWhileActive", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		first := b.createRun(t, ctx, b.wf.ID, 2)
		_, err := b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 2))
		wantErr(t, err, protocol.CodeWorkflowAlreadyRunning, "runId", first.ID)
		b.startRun(t, ctx, first.ID)
		_, err = b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 2))
		wantErr(t, err, protocol.CodeWorkflowAlreadyRunning, "runId", first.ID)
		b.wantCredits(t, ctx, b.user.ID, 8, 0)
		if runs := b.runsOf(t, ctx, store.RunListParams{WorkflowID: b.wf.ID}); len(runs) != 1 {
			t.Errorf("%d runs on the workflow, want 1", len(runs))
		}
	})

	t.Run("WorkflowNotReadyOrGone", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		for _, status := range []protocol.WorkflowStatus{protocol.WorkflowAnalyzing, protocol.WorkflowAnalysisFailed} {
			w, err := b.st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: b.user.ID, Name: "video", Status: status})
			if err != nil {
				t.Fatalf("WorkflowCreate: %v", err)
			}
			_, err = b.st.RunCreate(ctx, runParams(b.user.ID, w.ID, 1))
			wantErr(t, err, protocol.CodeWorkflowNotReady, "status", status)
		}
		if err := b.st.WorkflowDelete(ctx, b.wf.ID); err != nil {
			t.Fatalf("WorkflowDelete: %v", err)
		}
		_, err := b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 1))
		wantErr(t, err, protocol.CodeWorkflowNotFound)
		_, err = b.st.RunCreate(ctx, runParams(b.user.ID, "wf_doesnotexist", 1))
		wantErr(t, err, protocol.CodeWorkflowNotFound)
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
	})

	t.Run("CancelQueued", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		got, err := b.st.RunCancel(ctx, r.ID)
		if err != nil {
			t.Fatalf("RunCancel: %v", err)
		}
		if got.Status != protocol.RunCancelled || got.FinishedAt == nil || got.CostCharged != 0 {
			t.Errorf("cancelled = %+v", got)
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunCancelled || got.FinishedAt == nil || got.StartedAt != nil {
			t.Errorf("stored = %+v", got)
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries, want only the grant", n)
		}
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != "" {
			t.Errorf("ActiveRunID = %q after cancel", w.ActiveRunID)
		}
		_, err = b.st.RunCancel(ctx, r.ID)
		wantErr(t, err, protocol.CodeConflict)
		next := b.createRun(t, ctx, b.wf.ID, 3) // the slot is free
		b.wantCredits(t, ctx, b.user.ID, 10, 3)

		// Every terminal state refuses cancel.
		b.startRun(t, ctx, next.ID)
		b.finishRun(t, ctx, next.ID, protocol.RunSucceeded, nil)
		_, err = b.st.RunCancel(ctx, next.ID)
		wantErr(t, err, protocol.CodeConflict)
		_, err = b.st.RunCancel(ctx, "run_doesnotexist")
		wantErr(t, err, protocol.CodeNotFound)
	})

	t.Run("CancelRunningIsRequested", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		b.startRun(t, ctx, r.ID)
		got, err := b.st.RunCancel(ctx, r.ID)
		if err != nil {
			t.Fatalf("RunCancel: %v", err)
		}
		if got.Status != protocol.RunRunning || got.CancelRequestedAt == nil {
			t.Errorf("after cancel of a running run = status %s, cancel requested %v", got.Status, got.CancelRequestedAt)
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunRunning || got.CancelRequestedAt == nil {
			t.Errorf("stored = status %s, cancel requested %v", got.Status, got.CancelRequestedAt)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		// The agent stops and reports cancelled: a started run is charged.
		b.finishRun(t, ctx, r.ID, protocol.RunCancelled, nil)
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if count, sum := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 1 || sum[store.LedgerRunCharge] != -3 || count[store.LedgerRunRefund] != 0 {
			t.Errorf("ledger kinds %v sums %v, want one run_charge of -3", count, sum)
		}
	})

	t.Run("StartChargesOnce", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		got := b.startRun(t, ctx, r.ID)
		if got.Status != protocol.RunRunning || got.AgentID != "agt_test" || got.LeaseID != leaseOf(r.ID) || got.Attempt != 1 || got.StartedAt == nil || got.CostCharged != 3 {
			t.Errorf("started = %+v", got)
		}
		stored := b.getRun(t, ctx, r.ID)
		if stored.Status != protocol.RunRunning || stored.LeaseID != leaseOf(r.ID) || stored.CostCharged != 3 || stored.StartedAt == nil {
			t.Errorf("stored = %+v", stored)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		entries := b.ledger(t, ctx, b.user.ID)
		var charges []*store.LedgerEntry
		for _, e := range entries {
			if e.Kind == store.LedgerRunCharge {
				charges = append(charges, e)
			}
		}
		if len(charges) != 1 || charges[0].Amount != -3 || charges[0].RunID != r.ID || charges[0].AccountID != b.user.ID {
			t.Errorf("run_charge entries = %+v, want one of -3 for %s", charges, r.ID)
		}

		_, err := b.st.RunStart(ctx, store.RunStartParams{ID: r.ID, AgentID: "agt_other", LeaseID: "lse_other"})
		wantErr(t, err, protocol.CodeConflict)
		if got := b.getRun(t, ctx, r.ID); got.LeaseID != leaseOf(r.ID) || got.AgentID != "agt_test" || got.Attempt != 1 {
			t.Errorf("a refused start changed the run: %+v", got)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 2 {
			t.Errorf("ledger has %d entries, want 2", n)
		}
		_, err = b.st.RunStart(ctx, store.RunStartParams{ID: "run_doesnotexist", LeaseID: "lse_x"})
		wantErr(t, err, protocol.CodeNotFound)

		// A cancelled run cannot start.
		b.finishRun(t, ctx, r.ID, protocol.RunSucceeded, nil)
		r2 := b.createRun(t, ctx, b.wf.ID, 3)
		if _, err := b.st.RunCancel(ctx, r2.ID); err != nil {
			t.Fatalf("RunCancel: %v", err)
		}
		_, err = b.st.RunStart(ctx, store.RunStartParams{ID: r2.ID, LeaseID: "lse_x"})
		wantErr(t, err, protocol.CodeConflict, "reason", "run_finished", "status", "cancelled")
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
	})

	t.Run("FinishSucceededChargedOnce", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		b.startRun(t, ctx, r.ID)
		dur := int64(42)
		steps := []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepSucceeded, DurationMs: &dur, Attempts: 1}}
		outputs := map[string]any{"title": "Example"}
		got, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, LeaseID: leaseOf(r.ID), Status: protocol.RunSucceeded, Outputs: outputs, Steps: steps})
		if err != nil {
			t.Fatalf("RunFinish: %v", err)
		}
		if got.Status != protocol.RunSucceeded || got.FinishedAt == nil || got.Error != nil || got.CostCharged != 3 {
			t.Errorf("finished = %+v", got)
		}
		stored := b.getRun(t, ctx, r.ID)
		if stored.Status != protocol.RunSucceeded || stored.FinishedAt == nil || stored.CostCharged != 3 || stored.Error != nil {
			t.Errorf("stored = %+v", stored)
		}
		if !reflect.DeepEqual(stored.Outputs, outputs) || !reflect.DeepEqual(stored.Steps, steps) {
			t.Errorf("stored outputs %v steps %+v, want %v %+v", stored.Outputs, stored.Steps, outputs, steps)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)

		_, err = b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, LeaseID: leaseOf(r.ID), Status: protocol.RunFailed, Error: protocol.NewError(protocol.CodeInternal)})
		wantErr(t, err, protocol.CodeConflict)
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunSucceeded {
			t.Errorf("a second finish changed the status to %s", got.Status)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 1 || count[store.LedgerRunRefund] != 0 {
			t.Errorf("ledger kinds = %v, want one run_charge and no refund", count)
		}
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != "" {
			t.Errorf("ActiveRunID = %q after finish", w.ActiveRunID)
		}
		b.createRun(t, ctx, b.wf.ID, 3) // the slot is free
	})

	t.Run("FinishSettlesCredits", func(t *testing.T) {
		t.Parallel()
		reason := func(code protocol.Code, reason string) *protocol.Error {
			e := protocol.NewError(code)
			if reason != "" {
				e = e.With("reason", reason)
			}
			return e
		}
		for _, tc := range []struct {
			name    string
			status  protocol.RunStatus
			err     *protocol.Error
			charged bool
		}{
			{"succeeded", protocol.RunSucceeded, nil, true},
			{"failed element_not_found", protocol.RunFailed, reason(protocol.CodeNotFound, protocol.ReasonElementNotFound), true},
			{"timed_out", protocol.RunTimedOut, reason(protocol.CodeTimeout, protocol.ReasonRunTimeout), true},
			{"cancelled after start", protocol.RunCancelled, nil, true},
			{"internal", protocol.RunFailed, reason(protocol.CodeInternal, ""), false},
			{"internal agent_lost", protocol.RunFailed, reason(protocol.CodeInternal, protocol.ReasonAgentLost), false},
			// The reason alone decides, whatever the code.
			{"agent_lost", protocol.RunFailed, reason(protocol.CodeTimeout, protocol.ReasonAgentLost), false},
			{"browser_crashed", protocol.RunFailed, reason(protocol.CodeTimeout, protocol.ReasonBrowserCrashed), false},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				ctx, b := setup(t, open, 10)
				r := b.createRun(t, ctx, b.wf.ID, 3)
				b.startRun(t, ctx, r.ID)
				got := b.finishRun(t, ctx, r.ID, tc.status, tc.err)
				want, wantCharged := int64(10), int64(0)
				if tc.charged {
					want, wantCharged = 7, 3
				}
				b.wantCredits(t, ctx, b.user.ID, want, 0)
				if got.CostCharged != wantCharged {
					t.Errorf("returned CostCharged = %d, want %d", got.CostCharged, wantCharged)
				}
				stored := b.getRun(t, ctx, r.ID)
				if stored.Status != tc.status || stored.CostCharged != wantCharged {
					t.Errorf("stored status %s charged %d, want %s %d", stored.Status, stored.CostCharged, tc.status, wantCharged)
				}
				if tc.err != nil {
					if stored.Error == nil || stored.Error.Code != tc.err.Code {
						t.Errorf("stored error = %v, want code %s", stored.Error, tc.err.Code)
					} else {
						wantDetail(t, "error.details.reason", stored.Error.Details["reason"], tc.err.Details["reason"])
					}
				}
				count, sum := b.ledgerKinds(t, ctx, b.user.ID)
				if count[store.LedgerRunCharge] > 1 || count[store.LedgerRunRefund] > 1 || sum[store.LedgerRunCharge]+sum[store.LedgerRunRefund] != -wantCharged {
					t.Errorf("ledger kinds %v sums %v, want net run cost -%d", count, sum, wantCharged)
				}
				// Nothing moves after the end.
				_, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, Status: protocol.RunFailed, Error: reason(protocol.CodeInternal, protocol.ReasonAgentLost)})
				wantErr(t, err, protocol.CodeConflict)
				b.wantCredits(t, ctx, b.user.ID, want, 0)
			})
		}
	})

	t.Run("FinishBeforeStartReleasesHold", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		qt := protocol.NewError(protocol.CodeTimeout).With("reason", protocol.ReasonQueueTimeout)
		got, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, Status: protocol.RunTimedOut, Error: qt})
		if err != nil {
			t.Fatalf("RunFinish: %v", err)
		}
		if got.Status != protocol.RunTimedOut || got.CostCharged != 0 {
			t.Errorf("finished = %+v", got)
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries, want only the grant", n)
		}
		b.createRun(t, ctx, b.wf.ID, 3)
	})

	t.Run("FinishWithLostLeaseChangesNothing", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		b.startRun(t, ctx, r.ID)
		before := b.getRun(t, ctx, r.ID)
		for _, status := range []protocol.RunStatus{protocol.RunSucceeded, protocol.RunFailed} {
			_, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, LeaseID: "lse_stale", Status: status,
				Error: protocol.NewError(protocol.CodeInternal).With("reason", protocol.ReasonAgentLost), Outputs: map[string]any{"x": "y"}})
			wantErr(t, err, protocol.CodeConflict, "reason", protocol.ReasonLeaseLost)
		}
		after := b.getRun(t, ctx, r.ID)
		if after.Status != protocol.RunRunning || after.FinishedAt != nil || after.LeaseID != before.LeaseID || after.CostCharged != 3 || len(after.Outputs) != 0 || after.Error != nil {
			t.Errorf("a refused finish changed the run: %+v", after)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 2 {
			t.Errorf("ledger has %d entries, want 2 (grant, charge)", n)
		}
		// The current lease still finishes it.
		b.finishRun(t, ctx, r.ID, protocol.RunSucceeded, nil)
	})

	t.Run("FinishNeedsTerminalStatus", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		b.startRun(t, ctx, r.ID)
		for _, status := range []protocol.RunStatus{protocol.RunQueued, protocol.RunRunning, protocol.RunAwaitingApproval} {
			if _, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: r.ID, LeaseID: leaseOf(r.ID), Status: status}); err == nil {
				t.Errorf("RunFinish(%s) = nil error, want a refusal", status)
			}
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunRunning || got.FinishedAt != nil {
			t.Errorf("after refused finishes = %+v", got)
		}
		_, err := b.st.RunFinish(ctx, store.RunFinishParams{ID: "run_doesnotexist", Status: protocol.RunSucceeded})
		wantErr(t, err, protocol.CodeNotFound)
	})

	t.Run("ListFiltersAndPages", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 100)
		wf2 := b.newWorkflow(t, ctx, b.user.ID)
		other := b.newUser(t, ctx, 100)
		wf3 := b.newWorkflow(t, ctx, other.ID)

		r1 := b.createRun(t, ctx, b.wf.ID, 1)
		b.startRun(t, ctx, r1.ID)
		b.finishRun(t, ctx, r1.ID, protocol.RunSucceeded, nil)
		tick()
		r2 := b.createRun(t, ctx, b.wf.ID, 1)
		if _, err := b.st.RunCancel(ctx, r2.ID); err != nil {
			t.Fatalf("RunCancel: %v", err)
		}
		tick()
		r3 := b.createRun(t, ctx, b.wf.ID, 1)
		tick()
		r4 := b.createRun(t, ctx, wf2.ID, 1)
		b.startRun(t, ctx, r4.ID)
		tick()
		r5 := b.createRunFor(t, ctx, other.ID, wf3.ID, 1)

		for _, tc := range []struct {
			name string
			p    store.RunListParams
			want []string
		}{
			{"workflow", store.RunListParams{WorkflowID: b.wf.ID}, []string{r3.ID, r2.ID, r1.ID}},
			{"account", store.RunListParams{AccountID: b.user.ID}, []string{r4.ID, r3.ID, r2.ID, r1.ID}},
			{"other account", store.RunListParams{AccountID: other.ID}, []string{r5.ID}},
			{"every account", store.RunListParams{}, []string{r5.ID, r4.ID, r3.ID, r2.ID, r1.ID}},
			{"queued", store.RunListParams{Status: protocol.RunQueued}, []string{r5.ID, r3.ID}},
			{"queued in account", store.RunListParams{AccountID: b.user.ID, Status: protocol.RunQueued}, []string{r3.ID}},
			{"running", store.RunListParams{Status: protocol.RunRunning}, []string{r4.ID}},
			{"succeeded on workflow", store.RunListParams{WorkflowID: b.wf.ID, Status: protocol.RunSucceeded}, []string{r1.ID}},
			{"cancelled", store.RunListParams{AccountID: b.user.ID, Status: protocol.RunCancelled}, []string{r2.ID}},
			{"workflow of another account", store.RunListParams{AccountID: b.user.ID, WorkflowID: wf3.ID}, []string{}},
			{"failed", store.RunListParams{Status: protocol.RunFailed}, []string{}},
		} {
			got, next, err := b.st.RunList(ctx, tc.p)
			if err != nil {
				t.Fatalf("%s: RunList: %v", tc.name, err)
			}
			wantIDs(t, tc.name, runIDs(got), tc.want)
			if next != "" {
				t.Errorf("%s: nextCursor = %q, want empty", tc.name, next)
			}
			if got == nil {
				t.Errorf("%s: nil list, want empty", tc.name)
			}
		}

		var pages [][]string
		p := store.RunListParams{AccountID: b.user.ID, Page: store.Page{Limit: 3}}
		for range 5 {
			items, next, err := b.st.RunList(ctx, p)
			if err != nil {
				t.Fatalf("RunList: %v", err)
			}
			pages = append(pages, runIDs(items))
			if next == "" {
				break
			}
			p.Cursor = next
		}
		want := [][]string{{r4.ID, r3.ID, r2.ID}, {r1.ID}}
		if !reflect.DeepEqual(pages, want) {
			t.Errorf("pages = %v, want %v", pages, want)
		}
		_, _, err := b.st.RunList(ctx, store.RunListParams{Page: store.Page{Cursor: "bogus"}})
		wantErr(t, err, protocol.CodeBadRequest)
	})
}

// ---------------------------------------------------------------- approvals

// awaitingRun queues and starts a run on the bundle's workflow and opens an
// approval on it.
func (b *bundle) awaitingRun(t *testing.T, ctx context.Context, cost int64) (*store.Run, *store.Approval) {
	t.Helper()
	r := b.createRun(t, ctx, b.wf.ID, cost)
	b.startRun(t, ctx, r.ID)
	a, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r.ID, Step: 0, Message: "Submit the order?"})
	if err != nil {
		t.Fatalf("ApprovalCreate: %v", err)
	}
	return r, a
}

func testApprovals(t *testing.T, open Opener) {
	t.Run("ApproveResumesRun", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r, a := b.awaitingRun(t, ctx, 3)
		wantPrefix(t, a.ID, "apr")
		if a.Status != protocol.ApprovalPending || a.RunID != r.ID || a.WorkflowID != b.wf.ID || a.AccountID != b.user.ID ||
			a.Step != 0 || a.Message != "Submit the order?" || a.ResolvedAt != nil {
			t.Errorf("created = %+v", a)
		}
		recent(t, "CreatedAt", a.CreatedAt)
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunAwaitingApproval {
			t.Errorf("run status = %s, want awaiting_approval", got.Status)
		}
		if got := b.getApproval(t, ctx, a.ID); got.Status != protocol.ApprovalPending || got.RunID != r.ID {
			t.Errorf("stored = %+v", got)
		}
		pending, _, err := b.st.ApprovalList(ctx, store.ApprovalListParams{AccountID: b.user.ID, Status: protocol.ApprovalPending})
		if err != nil || len(pending) != 1 || pending[0].ID != a.ID {
			t.Fatalf("pending approvals = %v, %v; want [%s]", pending, err, a.ID)
		}

		got, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: true, By: b.user.ID, Comment: "go"})
		if err != nil {
			t.Fatalf("ApprovalResolve: %v", err)
		}
		if got.Status != protocol.ApprovalApproved || got.ResolvedAt == nil || got.ResolvedBy != b.user.ID || got.Comment != "go" {
			t.Errorf("resolved = %+v", got)
		}
		if got := b.getApproval(t, ctx, a.ID); got.Status != protocol.ApprovalApproved || got.ResolvedAt == nil || got.ResolvedBy != b.user.ID || got.Comment != "go" {
			t.Errorf("stored = %+v", got)
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunRunning || got.FinishedAt != nil {
			t.Errorf("run after approve = %s, want running", got.Status)
		}
		for _, approved := range []bool{true, false} {
			_, err = b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: approved, By: b.user.ID})
			wantErr(t, err, protocol.CodeConflict)
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunRunning {
			t.Errorf("a second resolve moved the run to %s", got.Status)
		}
		pending, _, err = b.st.ApprovalList(ctx, store.ApprovalListParams{AccountID: b.user.ID, Status: protocol.ApprovalPending})
		if err != nil || len(pending) != 0 {
			t.Errorf("pending after approve = %v, %v", pending, err)
		}
		b.finishRun(t, ctx, r.ID, protocol.RunSucceeded, nil)
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
	})

	t.Run("RejectFailsRunCharged", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r, a := b.awaitingRun(t, ctx, 3)
		got, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: false, By: b.user.ID, Comment: "wrong price"})
		if err != nil {
			t.Fatalf("ApprovalResolve: %v", err)
		}
		if got.Status != protocol.ApprovalRejected || got.Comment != "wrong price" || got.ResolvedAt == nil {
			t.Errorf("resolved = %+v", got)
		}
		run := b.getRun(t, ctx, r.ID)
		if run.Status != protocol.RunFailed || run.FinishedAt == nil || run.Error == nil {
			t.Fatalf("run after reject = %+v, want failed with an error", run)
		}
		wantDetail(t, "error.details.reason", run.Error.Details["reason"], protocol.ReasonApprovalRejected)
		wantDetail(t, "error.details.step", run.Error.Details["step"], 0)
		// A started run that fails is charged.
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 1 || count[store.LedgerRunRefund] != 0 {
			t.Errorf("ledger kinds = %v, want one run_charge", count)
		}
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != "" {
			t.Errorf("ActiveRunID = %q after reject", w.ActiveRunID)
		}
		_, err = b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: false, By: b.user.ID})
		wantErr(t, err, protocol.CodeConflict)
		_, err = b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: true, By: b.user.ID})
		wantErr(t, err, protocol.CodeConflict)
		if run := b.getRun(t, ctx, r.ID); run.Status != protocol.RunFailed {
			t.Errorf("run moved after the second resolve: %s", run.Status)
		}
	})

	t.Run("PendingBlocksWorkflowEdits", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r, a := b.awaitingRun(t, ctx, 3)
		name := "renamed"
		_, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name, Definition: json.RawMessage(Definition)})
		wantErr(t, err, protocol.CodeWorkflowHasActiveRequests, "approvalIds", []string{a.ID}, "runId", r.ID)
		wantErr(t, b.st.WorkflowDelete(ctx, b.wf.ID), protocol.CodeWorkflowHasActiveRequests, "approvalIds", []string{a.ID}, "runId", r.ID)
		if _, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: true, By: b.user.ID}); err != nil {
			t.Fatalf("ApprovalResolve: %v", err)
		}
		// Still running: blocked by the run, with no approvals left.
		wantErr(t, b.st.WorkflowDelete(ctx, b.wf.ID), protocol.CodeWorkflowHasActiveRequests, "approvalIds", []string{}, "runId", r.ID)
		b.finishRun(t, ctx, r.ID, protocol.RunSucceeded, nil)
		if _, err := b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name}); err != nil {
			t.Fatalf("WorkflowUpdate: %v", err)
		}
		if err := b.st.WorkflowDelete(ctx, b.wf.ID); err != nil {
			t.Fatalf("WorkflowDelete: %v", err)
		}
	})

	t.Run("EndedRunExpiresPending", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			name string
			end  func(t *testing.T, ctx context.Context, b *bundle, runID string)
			want protocol.RunStatus
		}{
			{"cancel", func(t *testing.T, ctx context.Context, b *bundle, runID string) {
				r, err := b.st.RunCancel(ctx, runID)
				if err != nil {
					t.Fatalf("RunCancel: %v", err)
				}
				if r.CancelRequestedAt == nil || r.Status != protocol.RunAwaitingApproval {
					t.Errorf("cancel of an awaiting run = %s, requested %v", r.Status, r.CancelRequestedAt)
				}
				b.finishRun(t, ctx, runID, protocol.RunCancelled, nil)
			}, protocol.RunCancelled},
			{"timeout", func(t *testing.T, ctx context.Context, b *bundle, runID string) {
				b.finishRun(t, ctx, runID, protocol.RunTimedOut, protocol.NewError(protocol.CodeTimeout).With("reason", protocol.ReasonRunTimeout))
			}, protocol.RunTimedOut},
			{"agent lost", func(t *testing.T, ctx context.Context, b *bundle, runID string) {
				b.finishRun(t, ctx, runID, protocol.RunFailed, protocol.NewError(protocol.CodeInternal).With("reason", protocol.ReasonAgentLost))
			}, protocol.RunFailed},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				ctx, b := setup(t, open, 10)
				r, a := b.awaitingRun(t, ctx, 3)
				tc.end(t, ctx, b, r.ID)
				if got := b.getRun(t, ctx, r.ID); got.Status != tc.want {
					t.Errorf("run = %s, want %s", got.Status, tc.want)
				}
				got := b.getApproval(t, ctx, a.ID)
				if got.Status != protocol.ApprovalExpired || got.ResolvedAt == nil {
					t.Errorf("approval = %s (resolved %v), want expired", got.Status, got.ResolvedAt)
				}
				_, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: true, By: b.user.ID})
				wantErr(t, err, protocol.CodeConflict)
				if got := b.getRun(t, ctx, r.ID); got.Status != tc.want {
					t.Errorf("resolving an expired approval moved the run to %s", got.Status)
				}
				// Nothing blocks the workflow any more.
				if err := b.st.WorkflowDelete(ctx, b.wf.ID); err != nil {
					t.Errorf("WorkflowDelete: %v", err)
				}
			})
		}
	})

	t.Run("CreateNeedsRunningRun", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		_, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r.ID, Step: 0, Message: "?"})
		wantErr(t, err, protocol.CodeConflict)
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunQueued {
			t.Errorf("run = %s, want queued", got.Status)
		}
		b.startRun(t, ctx, r.ID)
		if _, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r.ID, Step: 0, Message: "?"}); err != nil {
			t.Fatalf("ApprovalCreate: %v", err)
		}
		// Already awaiting: a second request is refused.
		_, err = b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r.ID, Step: 0, Message: "again?"})
		wantErr(t, err, protocol.CodeConflict)
		_, err = b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: "run_doesnotexist", Step: 0, Message: "?"})
		wantErr(t, err, protocol.CodeNotFound)
		_, err = b.st.ApprovalGet(ctx, "apr_doesnotexist")
		wantErr(t, err, protocol.CodeNotFound)
		_, err = b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: "apr_doesnotexist", Approved: true})
		wantErr(t, err, protocol.CodeNotFound)
	})

	t.Run("ListFiltersAndPages", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		other := b.newUser(t, ctx, 10)
		otherWf := b.newWorkflow(t, ctx, other.ID)

		r1, a1 := b.awaitingRun(t, ctx, 1)
		if _, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a1.ID, Approved: true}); err != nil {
			t.Fatalf("ApprovalResolve: %v", err)
		}
		tick()
		a2, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r1.ID, Step: 0, Message: "again?"})
		if err != nil {
			t.Fatalf("ApprovalCreate: %v", err)
		}
		tick()
		r3 := b.createRunFor(t, ctx, other.ID, otherWf.ID, 1)
		b.startRun(t, ctx, r3.ID)
		a3, err := b.st.ApprovalCreate(ctx, store.ApprovalCreateParams{RunID: r3.ID, Step: 0, Message: "?"})
		if err != nil {
			t.Fatalf("ApprovalCreate: %v", err)
		}
		apIDs := func(as []*store.Approval) []string { return ids(as, func(a *store.Approval) string { return a.ID }) }
		for _, tc := range []struct {
			name string
			p    store.ApprovalListParams
			want []string
		}{
			{"account", store.ApprovalListParams{AccountID: b.user.ID}, []string{a2.ID, a1.ID}},
			{"account pending", store.ApprovalListParams{AccountID: b.user.ID, Status: protocol.ApprovalPending}, []string{a2.ID}},
			{"every account pending", store.ApprovalListParams{Status: protocol.ApprovalPending}, []string{a3.ID, a2.ID}},
			{"approved", store.ApprovalListParams{Status: protocol.ApprovalApproved}, []string{a1.ID}},
			{"rejected", store.ApprovalListParams{Status: protocol.ApprovalRejected}, []string{}},
		} {
			got, next, err := b.st.ApprovalList(ctx, tc.p)
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			wantIDs(t, tc.name, apIDs(got), tc.want)
			if next != "" {
				t.Errorf("%s: nextCursor = %q", tc.name, next)
			}
		}
		p := store.ApprovalListParams{Page: store.Page{Limit: 2}}
		page1, next, err := b.st.ApprovalList(ctx, p)
		if err != nil || next == "" {
			t.Fatalf("page 1 = %v, %q, %v; want a cursor", page1, next, err)
		}
		p.Cursor = next
		page2, next, err := b.st.ApprovalList(ctx, p)
		if err != nil || next != "" {
			t.Fatalf("page 2 = %v, %q, %v; want the end", page2, next, err)
		}
		wantIDs(t, "pages", append(apIDs(page1), apIDs(page2)...), []string{a3.ID, a2.ID, a1.ID})
		_, _, err = b.st.ApprovalList(ctx, store.ApprovalListParams{Page: store.Page{Cursor: "bogus"}})
		wantErr(t, err, protocol.CodeBadRequest)
	})
}

// ---------------------------------------------------------------- batches

func iterations(n int) []map[string]any {
	out := make([]map[string]any, n)
	for i := range out {
		out[i] = map[string]any{"row": fmt.Sprint(i)}
	}
	return out
}

func (b *bundle) createBatch(t *testing.T, ctx context.Context, n int, stopOnFailure bool) *store.Batch {
	t.Helper()
	bt, err := b.st.BatchCreate(ctx, store.BatchCreateParams{AccountID: b.user.ID, WorkflowID: b.wf.ID, Iterations: iterations(n), StopOnFailure: stopOnFailure})
	if err != nil {
		t.Fatalf("BatchCreate: %v", err)
	}
	return bt
}

func batchStartParams(id string, cost int64) store.BatchStartParams {
	return store.BatchStartParams{
		ID:        id,
		Steps:     []store.StepRecord{{Index: 0, Type: protocol.StepNavigate, Status: protocol.StepPending}},
		TimeoutMs: 60_000,
		Cost:      cost,
	}
}

func (b *bundle) startBatch(t *testing.T, ctx context.Context, id string, cost int64) *store.Batch {
	t.Helper()
	bt, err := b.st.BatchStart(ctx, batchStartParams(id, cost))
	if err != nil {
		t.Fatalf("BatchStart: %v", err)
	}
	return bt
}

// batchRuns lists a batch's runs by iteration.
func (b *bundle) batchRuns(t *testing.T, ctx context.Context, batchID string) []*store.Run {
	t.Helper()
	runs := b.runsOf(t, ctx, store.RunListParams{BatchID: batchID})
	slices.SortFunc(runs, func(x, y *store.Run) int { return *x.Iteration - *y.Iteration })
	return runs
}

func iterationStatuses(bt *store.Batch) []string {
	return ids(bt.Iterations, func(it store.BatchIteration) string { return it.Status })
}

func testBatches(t *testing.T, open Opener) {
	t.Run("CreateAndStart", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt, err := b.st.BatchCreate(ctx, store.BatchCreateParams{AccountID: b.user.ID, WorkflowID: b.wf.ID, Iterations: iterations(3)})
		if err != nil {
			t.Fatalf("BatchCreate: %v", err)
		}
		wantPrefix(t, bt.ID, "bat")
		if bt.Status != protocol.BatchCreated || bt.Concurrency != 1 || bt.StopOnFailure || bt.AccountID != b.user.ID || bt.WorkflowID != b.wf.ID || bt.StartedAt != nil {
			t.Errorf("created = %+v", bt)
		}
		got := b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchCreated || got.Concurrency != 1 || len(got.Iterations) != 3 {
			t.Fatalf("stored = %+v", got)
		}
		for i, it := range got.Iterations {
			if it.Index != i || it.Status != "pending" || it.RunID != "" || !reflect.DeepEqual(it.Inputs, iterations(3)[i]) {
				t.Errorf("iteration %d = %+v", i, it)
			}
		}
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 0 {
			t.Errorf("a created batch has %d runs", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)

		started := b.startBatch(t, ctx, bt.ID, 2)
		if started.Status != protocol.BatchRunning || started.StartedAt == nil || len(started.Iterations) != 3 {
			t.Errorf("started = %+v", started)
		}
		got = b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchRunning || got.StartedAt == nil {
			t.Errorf("stored = %+v", got)
		}
		runs := b.batchRuns(t, ctx, bt.ID)
		if len(runs) != 3 {
			t.Fatalf("%d runs, want 3", len(runs))
		}
		for i, r := range runs {
			if r.Status != protocol.RunQueued || r.BatchID != bt.ID || *r.Iteration != i || r.CostReserved != 2 || r.WorkflowID != b.wf.ID || r.AccountID != b.user.ID ||
				!reflect.DeepEqual(r.Inputs, iterations(3)[i]) || len(r.Steps) != 1 {
				t.Errorf("run %d = %+v", i, r)
			}
			if it := got.Iterations[i]; it.RunID != r.ID || it.Status != string(protocol.RunQueued) {
				t.Errorf("iteration %d = %+v, want run %s queued", i, it, r.ID)
			}
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 6)
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveBatchID != bt.ID || w.ActiveRunID != "" {
			t.Errorf("workflow slot = run %q batch %q, want batch %s", w.ActiveRunID, w.ActiveBatchID, bt.ID)
		}

		_, err = b.st.BatchStart(ctx, batchStartParams(bt.ID, 2))
		wantErr(t, err, protocol.CodeConflict)
		_, err = b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 1))
		wantErr(t, err, protocol.CodeWorkflowAlreadyRunning, "batchId", bt.ID)
		name := "renamed"
		_, err = b.st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: b.wf.ID, Name: &name})
		wantErr(t, err, protocol.CodeWorkflowHasActiveRequests, "batchId", bt.ID)
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 3 {
			t.Errorf("%d runs after a second start, want 3", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 6)

		_, err = b.st.BatchGet(ctx, "bat_doesnotexist")
		wantErr(t, err, protocol.CodeBatchNotFound)
		_, err = b.st.BatchStart(ctx, batchStartParams("bat_doesnotexist", 1))
		wantErr(t, err, protocol.CodeBatchNotFound)
		_, err = b.st.BatchCancel(ctx, "bat_doesnotexist")
		wantErr(t, err, protocol.CodeBatchNotFound)
	})

	t.Run("DispatchInIterationOrder", func(t *testing.T) {
		t.Parallel()
		const n = 20
		ctx, b := setup(t, open, n)
		bt, err := b.st.BatchCreate(ctx, store.BatchCreateParams{AccountID: b.user.ID, WorkflowID: b.wf.ID, Iterations: iterations(n), Concurrency: n,
			SecretNames: []string{"pin"}})
		if err != nil {
			t.Fatalf("BatchCreate: %v", err)
		}
		if got := b.getBatch(t, ctx, bt.ID); !reflect.DeepEqual(got.SecretNames, []string{"pin"}) {
			t.Errorf("secret names = %q, want [pin]", got.SecretNames)
		}
		b.startBatch(t, ctx, bt.ID, 1)
		// Queued in one transaction (one queued_at), taken in iteration order.
		queued, err := b.st.RunQueuedList(ctx, b.user.ID, 2*n)
		if err != nil || len(queued) != n {
			t.Fatalf("RunQueuedList = %d runs, %v", len(queued), err)
		}
		for i, r := range queued {
			if r.Iteration == nil || *r.Iteration != i {
				t.Fatalf("queued run %d is not iteration %d: %+v", i, i, r)
			}
		}
	})

	t.Run("StartWithoutCreditsQueuesNothing", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 5)
		bt := b.createBatch(t, ctx, 3, false)
		_, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 2))
		wantErr(t, err, protocol.CodeInsufficientCredits, "required", 6, "available", 5)
		got := b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchCreated || got.StartedAt != nil {
			t.Errorf("batch after refused start = %+v", got)
		}
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"pending", "pending", "pending"})
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 0 {
			t.Errorf("%d runs queued by a refused start", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 5, 0)
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveBatchID != "" {
			t.Errorf("a refused start took the slot: %q", w.ActiveBatchID)
		}
		// After a grant the same batch starts.
		b.grant(t, ctx, b.user.ID, 1)
		b.startBatch(t, ctx, bt.ID, 2)
		b.wantCredits(t, ctx, b.user.ID, 6, 6)
	})

	t.Run("StartWhileRunActive", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 1)
		bt := b.createBatch(t, ctx, 2, false)
		_, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 1))
		wantErr(t, err, protocol.CodeWorkflowAlreadyRunning, "runId", r.ID)
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 0 {
			t.Errorf("%d runs queued by a refused start", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 1)
	})

	t.Run("CompletesWhenEveryRunEnds", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 2, false)
		b.startBatch(t, ctx, bt.ID, 2)
		runs := b.batchRuns(t, ctx, bt.ID)
		b.startRun(t, ctx, runs[0].ID)
		b.finishRun(t, ctx, runs[0].ID, protocol.RunSucceeded, nil)
		got := b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchRunning || got.FinishedAt != nil {
			t.Errorf("batch after 1 of 2 runs = %s", got.Status)
		}
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"succeeded", "queued"})
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveBatchID != bt.ID {
			t.Errorf("slot released early: %+v", w)
		}
		b.startRun(t, ctx, runs[1].ID)
		b.finishRun(t, ctx, runs[1].ID, protocol.RunFailed, protocol.NewError(protocol.CodeNotFound).With("reason", protocol.ReasonElementNotFound))
		got = b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchCompleted || got.FinishedAt == nil {
			t.Errorf("batch after every run = %s, finished %v; want completed", got.Status, got.FinishedAt)
		}
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"succeeded", "failed"})
		b.wantCredits(t, ctx, b.user.ID, 6, 0)
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveBatchID != "" || w.ActiveRunID != "" {
			t.Errorf("slot after completion = run %q batch %q", w.ActiveRunID, w.ActiveBatchID)
		}
		_, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 2))
		wantErr(t, err, protocol.CodeBatchAlreadyCompleted)
		_, err = b.st.BatchCancel(ctx, bt.ID)
		wantErr(t, err, protocol.CodeConflict)
		b.wantCredits(t, ctx, b.user.ID, 6, 0)
		b.createRun(t, ctx, b.wf.ID, 1) // the slot is free
	})

	t.Run("StopOnFailureCancelsQueued", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 3, true)
		b.startBatch(t, ctx, bt.ID, 2)
		runs := b.batchRuns(t, ctx, bt.ID)
		b.startRun(t, ctx, runs[0].ID)
		b.startRun(t, ctx, runs[1].ID)
		b.finishRun(t, ctx, runs[0].ID, protocol.RunFailed, protocol.NewError(protocol.CodeNotFound).With("reason", protocol.ReasonElementNotFound))
		got := b.getBatch(t, ctx, bt.ID)
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"failed", "running", "cancelled"})
		if got.Status != protocol.BatchRunning {
			t.Errorf("batch = %s with a run still running, want running", got.Status)
		}
		// Two runs started and were charged; the third's hold is released.
		b.wantCredits(t, ctx, b.user.ID, 6, 0)
		b.finishRun(t, ctx, runs[1].ID, protocol.RunSucceeded, nil)
		got = b.getBatch(t, ctx, bt.ID)
		if got.Status != protocol.BatchCompleted {
			t.Errorf("batch = %s after its last run, want completed", got.Status)
		}
		b.wantCredits(t, ctx, b.user.ID, 6, 0)
		b.createRun(t, ctx, b.wf.ID, 1)
	})

	t.Run("FailureWithoutStopOnFailure", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 3, false)
		b.startBatch(t, ctx, bt.ID, 2)
		runs := b.batchRuns(t, ctx, bt.ID)
		b.startRun(t, ctx, runs[0].ID)
		b.finishRun(t, ctx, runs[0].ID, protocol.RunFailed, protocol.NewError(protocol.CodeNotFound).With("reason", protocol.ReasonElementNotFound))
		wantIDs(t, "iteration statuses", iterationStatuses(b.getBatch(t, ctx, bt.ID)), []string{"failed", "queued", "queued"})
		b.wantCredits(t, ctx, b.user.ID, 8, 4)
	})

	t.Run("CancelQueued", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 3, false)
		b.startBatch(t, ctx, bt.ID, 2)
		got, err := b.st.BatchCancel(ctx, bt.ID)
		if err != nil {
			t.Fatalf("BatchCancel: %v", err)
		}
		if got.Status != protocol.BatchCancelled || got.FinishedAt == nil {
			t.Errorf("cancelled = %+v", got)
		}
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"cancelled", "cancelled", "cancelled"})
		for _, r := range b.batchRuns(t, ctx, bt.ID) {
			if r.Status != protocol.RunCancelled {
				t.Errorf("run %d = %s, want cancelled", *r.Iteration, r.Status)
			}
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveBatchID != "" {
			t.Errorf("slot after cancel = batch %q", w.ActiveBatchID)
		}
		_, err = b.st.BatchCancel(ctx, bt.ID)
		wantErr(t, err, protocol.CodeConflict)
		if _, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 2)); err == nil {
			t.Errorf("BatchStart of a cancelled batch = nil error")
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
		b.createRun(t, ctx, b.wf.ID, 1)
	})

	t.Run("CancelWithRunningRun", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 3, false)
		b.startBatch(t, ctx, bt.ID, 2)
		runs := b.batchRuns(t, ctx, bt.ID)
		b.startRun(t, ctx, runs[0].ID)
		got, err := b.st.BatchCancel(ctx, bt.ID)
		if err != nil {
			t.Fatalf("BatchCancel: %v", err)
		}
		if got.Status != protocol.BatchCancelled {
			t.Errorf("batch = %s, want cancelled", got.Status)
		}
		wantIDs(t, "iteration statuses", iterationStatuses(got), []string{"running", "cancelled", "cancelled"})
		if r := b.getRun(t, ctx, runs[0].ID); r.CancelRequestedAt == nil {
			t.Errorf("the running run was not asked to stop")
		}
		b.wantCredits(t, ctx, b.user.ID, 8, 0)
		// The running run still holds the workflow until it ends.
		_, err = b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 1))
		wantErr(t, err, protocol.CodeWorkflowAlreadyRunning)
		b.finishRun(t, ctx, runs[0].ID, protocol.RunCancelled, nil)
		if got := b.getBatch(t, ctx, bt.ID); got.Status != protocol.BatchCancelled {
			t.Errorf("batch = %s after its last run, want still cancelled", got.Status)
		}
		b.wantCredits(t, ctx, b.user.ID, 8, 0)
		b.createRun(t, ctx, b.wf.ID, 1)
	})

	t.Run("CancelBeforeStart", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		bt := b.createBatch(t, ctx, 2, false)
		got, err := b.st.BatchCancel(ctx, bt.ID)
		if err != nil || got.Status != protocol.BatchCancelled {
			t.Fatalf("BatchCancel = %+v, %v", got, err)
		}
		if _, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 1)); err == nil {
			t.Errorf("BatchStart of a cancelled batch = nil error")
		}
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 0 {
			t.Errorf("%d runs", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
	})

	t.Run("ListPages", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		var want []string
		for range 3 {
			want = append(want, b.createBatch(t, ctx, 1, false).ID)
			tick()
		}
		slices.Reverse(want)
		other := b.newUser(t, ctx, 0)
		if _, err := b.st.BatchCreate(ctx, store.BatchCreateParams{AccountID: other.ID, WorkflowID: b.newWorkflow(t, ctx, other.ID).ID, Iterations: iterations(1)}); err != nil {
			t.Fatalf("BatchCreate: %v", err)
		}
		batchIDs := func(bs []*store.Batch) []string { return ids(bs, func(b *store.Batch) string { return b.ID }) }
		page1, next, err := b.st.BatchList(ctx, b.user.ID, store.Page{Limit: 2})
		if err != nil || next == "" {
			t.Fatalf("page 1 = %v, %q, %v", batchIDs(page1), next, err)
		}
		page2, next, err := b.st.BatchList(ctx, b.user.ID, store.Page{Limit: 2, Cursor: next})
		if err != nil || next != "" {
			t.Fatalf("page 2 = %v, %q, %v", batchIDs(page2), next, err)
		}
		wantIDs(t, "pages", append(batchIDs(page1), batchIDs(page2)...), want)
		_, _, err = b.st.BatchList(ctx, b.user.ID, store.Page{Cursor: "bogus"})
		wantErr(t, err, protocol.CodeBadRequest)
	})
}

// ---------------------------------------------------------------- credits

func testCredits(t *testing.T, open Opener) {
	t.Run("Grant", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		e, err := b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: b.user.ID, Amount: 25, Kind: store.LedgerGrant, Reason: "welcome"})
		if err != nil {
			t.Fatalf("CreditsGrant: %v", err)
		}
		wantPrefix(t, e.ID, "led")
		if e.AccountID != b.user.ID || e.Kind != store.LedgerGrant || e.Amount != 25 || e.Reason != "welcome" || e.RunID != "" {
			t.Errorf("entry = %+v", e)
		}
		recent(t, "CreatedAt", e.CreatedAt)
		b.wantCredits(t, ctx, b.user.ID, 25, 0)
		entries := b.ledger(t, ctx, b.user.ID)
		if len(entries) != 1 || entries[0].ID != e.ID || entries[0].Amount != 25 || entries[0].Reason != "welcome" {
			t.Errorf("ledger = %+v", entries)
		} else {
			sameTime(t, "CreatedAt", entries[0].CreatedAt, e.CreatedAt)
		}
		// A positive adjustment while credits are held, and a negative one.
		b.createRun(t, ctx, b.wf.ID, 5)
		b.grant(t, ctx, b.user.ID, 10)
		b.grant(t, ctx, b.user.ID, -30)
		b.wantCredits(t, ctx, b.user.ID, 5, 5)

		_, err = b.st.CreditsGet(ctx, "usr_doesnotexist")
		wantErr(t, err, protocol.CodeNotFound)
		_, err = b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: "usr_doesnotexist", Amount: 1, Kind: store.LedgerGrant})
		wantErr(t, err, protocol.CodeNotFound)
	})

	t.Run("NegativeBeyondAvailable", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		b.createRun(t, ctx, b.wf.ID, 4)
		_, err := b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: b.user.ID, Amount: -7, Kind: store.LedgerGrant, Reason: "fix"})
		wantErr(t, err, protocol.CodeInsufficientCredits, "required", 7, "available", 6)
		b.wantCredits(t, ctx, b.user.ID, 10, 4)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries after a refused adjustment, want 1", n)
		}
		b.grant(t, ctx, b.user.ID, -6)
		b.wantCredits(t, ctx, b.user.ID, 4, 4)
		_, err = b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: b.user.ID, Amount: -1, Kind: store.LedgerGrant})
		wantErr(t, err, protocol.CodeInsufficientCredits, "required", 1, "available", 0)
	})

	t.Run("KeyGrantsOnce", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		p := store.CreditsGrantParams{AccountID: b.user.ID, Amount: 7, Kind: store.LedgerGrant, Reason: "support", Key: "admin:req_1"}
		first, err := b.st.CreditsGrant(ctx, p)
		if err != nil {
			t.Fatalf("CreditsGrant: %v", err)
		}
		again, err := b.st.CreditsGrant(ctx, p)
		if err != nil {
			t.Fatalf("CreditsGrant again: %v", err)
		}
		if again.ID != first.ID || again.Amount != 7 {
			t.Errorf("repeat = %+v, want the first entry %+v", again, first)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries, want 1", n)
		}
		// Another key is another grant.
		p.Key = "admin:req_2"
		if e, err := b.st.CreditsGrant(ctx, p); err != nil || e.ID == first.ID {
			t.Fatalf("CreditsGrant with another key = %+v, %v", e, err)
		}
		b.wantCredits(t, ctx, b.user.ID, 14, 0)

		// A repeated negative adjustment answers with its first entry, even
		// though repeating it for real would overdraw.
		p = store.CreditsGrantParams{AccountID: b.user.ID, Amount: -14, Kind: store.LedgerGrant, Reason: "refund", Key: "admin:req_3"}
		first, err = b.st.CreditsGrant(ctx, p)
		if err != nil {
			t.Fatalf("CreditsGrant -14: %v", err)
		}
		again, err = b.st.CreditsGrant(ctx, p)
		if err != nil || again.ID != first.ID {
			t.Errorf("repeated -14 = %+v, %v; want the first entry %s", again, err, first.ID)
		}
		b.wantCredits(t, ctx, b.user.ID, 0, 0)
	})

	t.Run("LedgerPages", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		var want []string
		for i := range 5 {
			want = append(want, b.grant(t, ctx, b.user.ID, int64(i+1)).ID)
			tick()
		}
		slices.Reverse(want)
		b.newUser(t, ctx, 3) // another account's entries stay out
		entryIDs := func(es []*store.LedgerEntry) []string {
			return ids(es, func(e *store.LedgerEntry) string { return e.ID })
		}
		var got [][]string
		page := store.Page{Limit: 2}
		for range 5 {
			items, next, err := b.st.LedgerList(ctx, b.user.ID, page)
			if err != nil {
				t.Fatalf("LedgerList: %v", err)
			}
			got = append(got, entryIDs(items))
			if next == "" {
				break
			}
			page.Cursor = next
		}
		wantPages := [][]string{want[0:2], want[2:4], want[4:5]}
		if !reflect.DeepEqual(got, wantPages) {
			t.Errorf("pages = %v, want %v", got, wantPages)
		}
		_, _, err := b.st.LedgerList(ctx, b.user.ID, store.Page{Cursor: "bogus"})
		wantErr(t, err, protocol.CodeBadRequest)
		if sum, err := b.st.LedgerSum(ctx, b.user.ID); err != nil || sum != 15 {
			t.Errorf("LedgerSum = %d, %v; want 15", sum, err)
		}
		items, _, err := b.st.LedgerList(ctx, "usr_nobody", store.Page{})
		if err != nil || items == nil || len(items) != 0 {
			t.Errorf("ledger of an unknown account = %v, %v; want empty", items, err)
		}
	})
}

// ---------------------------------------------------------------- idempotency

func testIdempotency(t *testing.T, open Opener) {
	t.Run("BeginFinishAbort", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		other := b.newUser(t, ctx, 0)
		rec := store.IdempotencyRecord{AccountID: b.user.ID, Key: "key-1", RequestHash: "sha-a"}

		prev, fresh, err := b.st.IdempotencyBegin(ctx, rec)
		if err != nil || !fresh || prev != nil {
			t.Fatalf("first Begin = %+v, %v, %v; want reserved", prev, fresh, err)
		}
		prev, fresh, err = b.st.IdempotencyBegin(ctx, store.IdempotencyRecord{AccountID: b.user.ID, Key: "key-1", RequestHash: "sha-b"})
		if err != nil || fresh || prev == nil {
			t.Fatalf("second Begin = %+v, %v, %v; want the record", prev, fresh, err)
		}
		if prev.Done || prev.AccountID != b.user.ID || prev.Key != "key-1" || prev.RequestHash != "sha-a" {
			t.Errorf("in-progress record = %+v, want not done with the first request's hash", prev)
		}
		// Keys are per account.
		if _, fresh, err := b.st.IdempotencyBegin(ctx, store.IdempotencyRecord{AccountID: other.ID, Key: "key-1", RequestHash: "sha-c"}); err != nil || !fresh {
			t.Errorf("the same key in another account = %v, %v; want reserved", fresh, err)
		}

		rec.Status, rec.Body = 201, []byte(`{"id":"run_1"}`)
		if err := b.st.IdempotencyFinish(ctx, rec); err != nil {
			t.Fatalf("Finish: %v", err)
		}
		prev, fresh, err = b.st.IdempotencyBegin(ctx, store.IdempotencyRecord{AccountID: b.user.ID, Key: "key-1", RequestHash: "sha-a"})
		if err != nil || fresh || prev == nil {
			t.Fatalf("Begin after Finish = %+v, %v, %v", prev, fresh, err)
		}
		if !prev.Done || prev.Status != 201 || string(prev.Body) != `{"id":"run_1"}` || prev.RequestHash != "sha-a" {
			t.Errorf("finished record = %+v (body %s)", prev, prev.Body)
		}

		// Abort frees an unfinished key.
		rec2 := store.IdempotencyRecord{AccountID: b.user.ID, Key: "key-2", RequestHash: "sha-x"}
		if _, fresh, err := b.st.IdempotencyBegin(ctx, rec2); err != nil || !fresh {
			t.Fatalf("Begin key-2 = %v, %v", fresh, err)
		}
		if err := b.st.IdempotencyAbort(ctx, b.user.ID, "key-2"); err != nil {
			t.Fatalf("Abort: %v", err)
		}
		rec2.RequestHash = "sha-y"
		if prev, fresh, err := b.st.IdempotencyBegin(ctx, rec2); err != nil || !fresh {
			t.Errorf("Begin after Abort = %+v, %v, %v; want reserved again", prev, fresh, err)
		}
	})
}

// ---------------------------------------------------------------- races

func testRaces(t *testing.T, open Opener) {
	t.Run("RunCreateOneWorkflow", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 1000)
		runs := make([]*store.Run, 50)
		errs := race(50, func(i int) error {
			var err error
			runs[i], err = b.st.RunCreate(ctx, runParams(b.user.ID, b.wf.ID, 2))
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeWorkflowAlreadyRunning: 49})
		winner := runs[slices.IndexFunc(errs, func(err error) bool { return err == nil })]
		for _, err := range errs {
			if err != nil {
				wantErr(t, err, protocol.CodeWorkflowAlreadyRunning, "runId", winner.ID)
			}
		}
		if w := b.getWorkflow(t, ctx, b.wf.ID); w.ActiveRunID != winner.ID {
			t.Errorf("ActiveRunID = %q, want %q", w.ActiveRunID, winner.ID)
		}
		wantIDs(t, "runs", runIDs(b.runsOf(t, ctx, store.RunListParams{WorkflowID: b.wf.ID})), []string{winner.ID})
		b.wantCredits(t, ctx, b.user.ID, 1000, 2)
	})

	t.Run("RunCreateCredits", func(t *testing.T) {
		t.Parallel()
		const cost, n, affordable = 3, 30, 5
		ctx, b := setup(t, open, cost*affordable)
		wfs := make([]*store.Workflow, n)
		for i := range wfs {
			wfs[i] = b.newWorkflow(t, ctx, b.user.ID)
		}
		errs := race(n, func(i int) error {
			_, err := b.st.RunCreate(ctx, runParams(b.user.ID, wfs[i].ID, cost))
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": affordable, protocol.CodeInsufficientCredits: n - affordable})
		for _, err := range errs {
			if err != nil {
				wantErr(t, err, protocol.CodeInsufficientCredits, "required", cost)
			}
		}
		b.wantCredits(t, ctx, b.user.ID, cost*affordable, cost*affordable)
		if runs := b.runsOf(t, ctx, store.RunListParams{AccountID: b.user.ID}); len(runs) != affordable {
			t.Errorf("%d runs written, want %d", len(runs), affordable)
		}
		if sum, err := b.st.LedgerSum(ctx, b.user.ID); err != nil || sum != cost*affordable {
			t.Errorf("LedgerSum = %d, %v; want %d", sum, err, cost*affordable)
		}
	})

	t.Run("SpendAgainstAdjustments", func(t *testing.T) {
		// Runs and negative adjustments compete for the same 10 credits:
		// exactly 10 of 20 win and available never goes below zero.
		t.Parallel()
		ctx, b := setup(t, open, 10)
		wfs := make([]*store.Workflow, 10)
		for i := range wfs {
			wfs[i] = b.newWorkflow(t, ctx, b.user.ID)
		}
		var runsOK, adjustOK atomic.Int64
		errs := race(20, func(i int) error {
			if i%2 == 0 {
				_, err := b.st.RunCreate(ctx, runParams(b.user.ID, wfs[i/2].ID, 1))
				if err == nil {
					runsOK.Add(1)
				}
				return err
			}
			_, err := b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: b.user.ID, Amount: -1, Kind: store.LedgerGrant, Reason: "race"})
			if err == nil {
				adjustOK.Add(1)
			}
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 10, protocol.CodeInsufficientCredits: 10})
		b.wantCredits(t, ctx, b.user.ID, 10-adjustOK.Load(), runsOK.Load())
	})

	t.Run("ApprovalResolve", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r, a := b.awaitingRun(t, ctx, 3)
		errs := race(20, func(i int) error {
			_, err := b.st.ApprovalResolve(ctx, store.ApprovalResolveParams{ID: a.ID, Approved: i%2 == 0, By: fmt.Sprint("usr_", i)})
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 19})
		winner := slices.IndexFunc(errs, func(err error) bool { return err == nil })
		got := b.getApproval(t, ctx, a.ID)
		if got.ResolvedBy != fmt.Sprint("usr_", winner) {
			t.Errorf("ResolvedBy = %q, want the winner usr_%d", got.ResolvedBy, winner)
		}
		wantApproval, wantRun := protocol.ApprovalApproved, protocol.RunRunning
		if winner%2 != 0 {
			wantApproval, wantRun = protocol.ApprovalRejected, protocol.RunFailed
		}
		if got.Status != wantApproval {
			t.Errorf("approval = %s, want %s", got.Status, wantApproval)
		}
		if run := b.getRun(t, ctx, r.ID); run.Status != wantRun {
			t.Errorf("run = %s, want %s", run.Status, wantRun)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
	})

	t.Run("RunCancelQueued", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		errs := race(20, func(int) error {
			_, err := b.st.RunCancel(ctx, r.ID)
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 19})
		b.wantCredits(t, ctx, b.user.ID, 10, 0)
		if got := b.getRun(t, ctx, r.ID); got.Status != protocol.RunCancelled {
			t.Errorf("run = %s, want cancelled", got.Status)
		}
		// The slot is free and the next hold counts from zero.
		b.createRun(t, ctx, b.wf.ID, 3)
		b.wantCredits(t, ctx, b.user.ID, 10, 3)
	})

	t.Run("RunStart", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		errs := race(20, func(i int) error {
			_, err := b.st.RunStart(ctx, store.RunStartParams{ID: r.ID, AgentID: fmt.Sprint("agt_", i), LeaseID: fmt.Sprint("lse_", i)})
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 19})
		winner := slices.IndexFunc(errs, func(err error) bool { return err == nil })
		got := b.getRun(t, ctx, r.ID)
		if got.Status != protocol.RunRunning || got.LeaseID != fmt.Sprint("lse_", winner) || got.AgentID != fmt.Sprint("agt_", winner) || got.Attempt != 1 {
			t.Errorf("run = %+v, want started by the winner %d", got, winner)
		}
		b.wantCredits(t, ctx, b.user.ID, 7, 0)
		if count, sum := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 1 || sum[store.LedgerRunCharge] != -3 {
			t.Errorf("ledger kinds %v sums %v, want one run_charge of -3", count, sum)
		}
	})

	t.Run("RunFinish", func(t *testing.T) {
		// Half the reports succeed (charged), half are agent_lost (refunded):
		// exactly one applies and the credits follow it.
		t.Parallel()
		ctx, b := setup(t, open, 10)
		r := b.createRun(t, ctx, b.wf.ID, 3)
		b.startRun(t, ctx, r.ID)
		errs := race(20, func(i int) error {
			p := store.RunFinishParams{ID: r.ID, LeaseID: leaseOf(r.ID), Status: protocol.RunSucceeded}
			if i%2 == 1 {
				p.Status, p.Error = protocol.RunFailed, protocol.NewError(protocol.CodeInternal).With("reason", protocol.ReasonAgentLost)
			}
			_, err := b.st.RunFinish(ctx, p)
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 19})
		winner := slices.IndexFunc(errs, func(err error) bool { return err == nil })
		wantStatus, wantBalance := protocol.RunSucceeded, int64(7)
		if winner%2 == 1 {
			wantStatus, wantBalance = protocol.RunFailed, 10
		}
		if got := b.getRun(t, ctx, r.ID); got.Status != wantStatus {
			t.Errorf("run = %s, want %s", got.Status, wantStatus)
		}
		b.wantCredits(t, ctx, b.user.ID, wantBalance, 0)
		if count, _ := b.ledgerKinds(t, ctx, b.user.ID); count[store.LedgerRunCharge] != 1 || count[store.LedgerRunRefund] > 1 {
			t.Errorf("ledger kinds = %v", count)
		}
	})

	t.Run("RunStartAgainstCancel", func(t *testing.T) {
		// Whichever comes first wins: a cancelled run never starts, a started
		// run is only asked to stop. The hold is captured or released, once.
		t.Parallel()
		for range 3 {
			ctx, b := setup(t, open, 10)
			r := b.createRun(t, ctx, b.wf.ID, 3)
			errs := race(20, func(i int) error {
				if i%2 == 0 {
					_, err := b.st.RunStart(ctx, store.RunStartParams{ID: r.ID, AgentID: "agt_x", LeaseID: fmt.Sprint("lse_", i)})
					return err
				}
				_, err := b.st.RunCancel(ctx, r.ID)
				return err
			})
			var startErrs []error
			for i := 0; i < len(errs); i += 2 {
				startErrs = append(startErrs, errs[i])
			}
			starts := tally(startErrs)
			got := b.getRun(t, ctx, r.ID)
			switch got.Status {
			case protocol.RunCancelled:
				if starts["ok"] != 0 || got.StartedAt != nil {
					t.Errorf("cancelled run was started: %v", starts)
				}
				b.wantCredits(t, ctx, b.user.ID, 10, 0)
			case protocol.RunRunning:
				if starts["ok"] != 1 || got.CancelRequestedAt == nil {
					t.Errorf("started run: starts %v, cancel requested %v", starts, got.CancelRequestedAt)
				}
				b.wantCredits(t, ctx, b.user.ID, 7, 0)
			default:
				t.Errorf("run = %s", got.Status)
			}
		}
	})

	t.Run("BatchStart", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 100)
		bt := b.createBatch(t, ctx, 4, false)
		errs := race(10, func(int) error {
			_, err := b.st.BatchStart(ctx, batchStartParams(bt.ID, 2))
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 1, protocol.CodeConflict: 9})
		if runs := b.batchRuns(t, ctx, bt.ID); len(runs) != 4 {
			t.Errorf("%d runs, want 4", len(runs))
		}
		b.wantCredits(t, ctx, b.user.ID, 100, 8)
	})

	t.Run("CreditsGrantSameKey", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		entries := make([]*store.LedgerEntry, 20)
		errs := race(20, func(i int) error {
			var err error
			entries[i], err = b.st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: b.user.ID, Amount: 5, Kind: store.LedgerGrant, Reason: "race", Key: "admin:same"})
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 20})
		for _, e := range entries {
			if e.ID != entries[0].ID {
				t.Fatalf("grants returned different entries: %s and %s", e.ID, entries[0].ID)
			}
		}
		b.wantCredits(t, ctx, b.user.ID, 5, 0)
		if n := len(b.ledger(t, ctx, b.user.ID)); n != 1 {
			t.Errorf("ledger has %d entries, want 1", n)
		}
	})

	t.Run("IdempotencyBegin", func(t *testing.T) {
		t.Parallel()
		ctx, b := setup(t, open, 0)
		var fresh atomic.Int64
		errs := race(20, func(int) error {
			_, ok, err := b.st.IdempotencyBegin(ctx, store.IdempotencyRecord{AccountID: b.user.ID, Key: "k", RequestHash: "h"})
			if ok {
				fresh.Add(1)
			}
			return err
		})
		wantTally(t, errs, map[protocol.Code]int{"ok": 20})
		if fresh.Load() != 1 {
			t.Errorf("%d calls reserved the key, want 1", fresh.Load())
		}
	})
}
