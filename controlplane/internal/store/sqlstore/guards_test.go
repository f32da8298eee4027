package sqlstore_test

import (
	"database/sql"
	"path/filepath"
	"strings"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/storetest"
	"github.com/copelf/copelf/protocol"
)

// The database refuses what no code path does: changing or deleting a
// ledger entry or a redemption, and resolving a hold twice.
func TestLedgerGuards(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "copelf.db")
	db := openFile(t, path)
	accountID := seedGuarded(t, db)

	raw, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	wantGuardsRefuse(t, raw, db, accountID,
		`UPDATE ledger SET amount = amount + 1`,
		`DELETE FROM ledger`,
		`UPDATE credit_holds SET status = 'voided'`,
		`UPDATE credit_holds SET status = 'pending'`,
		`DELETE FROM credit_holds`,
		`UPDATE coupon_redemptions SET account_id = 'usr_other'`,
		`DELETE FROM coupon_redemptions`)
}

// wantGuardsRefuse runs each statement on raw, a connection that bypasses
// the store, and wants every one refused by the database's guards, the
// ledger of the seed (seedGuarded) untouched.
func wantGuardsRefuse(t *testing.T, raw *sql.DB, db store.Store, accountID string, statements ...string) {
	t.Helper()
	ctx := t.Context()
	for _, q := range statements {
		_, err := raw.ExecContext(ctx, q)
		if err == nil || !strings.Contains(err.Error(), "once") && !strings.Contains(err.Error(), "append-only") && !strings.Contains(err.Error(), "kept") {
			t.Errorf("%s: err = %v, want the trigger's refusal", q, err)
		}
	}
	if sum, err := db.LedgerSum(ctx, accountID); err != nil || sum != 9 {
		t.Errorf("LedgerSum = %d, %v; want 9", sum, err)
	}
}

// seedGuarded writes what the guard tests try to change behind the store's
// back: a grant, a coupon redemption, and a started run (a captured hold and
// its charge). It returns the account's id.
func seedGuarded(t *testing.T, db store.Store) string {
	t.Helper()
	ctx := t.Context()
	u, err := db.UserCreate(ctx, store.UserCreateParams{Email: "guard@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: 10, Kind: store.LedgerGrant}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.CouponCreate(ctx, store.CouponCreateParams{Code: "g", Credits: 1, Active: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := db.CouponRedeem(ctx, store.CouponRedeemParams{Code: "g", AccountID: u.ID}); err != nil {
		t.Fatal(err)
	}
	wf, err := db.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if err != nil {
		t.Fatal(err)
	}
	run, err := db.RunCreate(ctx, store.RunCreateParams{AccountID: u.ID, WorkflowID: wf.ID, Cost: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.RunStart(ctx, store.RunStartParams{ID: run.ID, AgentID: "agt_1", LeaseID: "lse_1"}); err != nil {
		t.Fatal(err)
	}
	return u.ID
}
