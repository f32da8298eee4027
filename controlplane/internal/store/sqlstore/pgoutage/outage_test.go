package pgoutage_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore/pgtest"
	"github.com/copelf/copelf/controlplane/internal/store/storetest"
	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wait bounds every wait: the tests run under -race on two busy cores.
const wait = 2 * time.Minute

// The server vanishes (a proxy between the store and PostgreSQL cuts every
// connection and refuses new ones) while writes are in flight, then comes
// back: calls fail with errors the store reports as Unavailable, and once
// the server is back every write has happened exactly once.
func TestOutageWithWritesInFlight(t *testing.T) {
	proxy := pgtest.NewProxy(t)
	st, err := sqlstore.Open(t.Context(), proxy.URL(pgtest.Schema(t, pgtest.Database(t))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	scenario(t, st, func(failed func() int64) {
		proxy.Cut()
		waitFor(t, "calls failing during the outage", func() bool { return failed() >= 3 })
		proxy.Restore(t)
	})
}

// PostgreSQL itself restarts in immediate mode (a crash: no shutdown
// checkpoint, connections dropped, crash recovery at start) while writes
// are in flight. The server is a cluster of this test's own (initdb in a
// temporary directory, on a port of its own), so nobody else's tests see
// the restart. It needs root (the server runs as the postgres user) and
// runs under CI=true or COPELF_TEST_PG_RESTART=1.
func TestServerRestartWithWritesInFlight(t *testing.T) {
	if os.Getenv("CI") != "true" && os.Getenv("COPELF_TEST_PG_RESTART") != "1" {
		t.Skip("restarts a PostgreSQL server of its own; set COPELF_TEST_PG_RESTART=1 (or CI=true) to run it")
	}
	c := newCluster(t)
	st, err := sqlstore.Open(t.Context(), c.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	scenario(t, st, func(failed func() int64) {
		if err := c.pgctl("restart", "-m", "immediate", "-w", "-t", "120"); err != nil {
			t.Error(err)
		}
		waitFor(t, "calls failing across the restart", func() bool { return failed() >= 1 })
	})
}

// scenario runs writers that retry each write until it succeeds, calls
// outage once a third of the writes are done, and checks the outcome:
// every failure was typed as the database being unavailable, and every
// write happened exactly once (credits granted under keys, coupon
// redemptions under a cap, runs created, started and finished).
func scenario(t *testing.T, st *sqlstore.DB, outage func(failed func() int64)) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*wait)
	defer cancel()
	const (
		grants   = 240
		accounts = 12
		capacity = 5
		runs     = 30
	)
	owner, err := st.UserCreate(ctx, store.UserCreateParams{Email: "owner@example.com", PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: owner.ID, Amount: 1000, Kind: store.LedgerGrant, Key: "seed"}); err != nil {
		t.Fatal(err)
	}
	wf, err := st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: owner.ID, Name: "wf", Status: protocol.WorkflowReady, Definition: []byte(storetest.Definition)})
	if err != nil {
		t.Fatal(err)
	}
	maxRedemptions := int64(capacity)
	if _, err := st.CouponCreate(ctx, store.CouponCreateParams{Code: "OUTAGE", Credits: 7, MaxRedemptions: &maxRedemptions, Active: true}); err != nil {
		t.Fatal(err)
	}
	var redeemers []string
	for i := range accounts {
		u, err := st.UserCreate(ctx, store.UserCreateParams{Email: fmt.Sprintf("r%d@example.com", i), PasswordHash: "h", Role: store.RoleMember, Plan: store.PlanFree})
		if err != nil {
			t.Fatal(err)
		}
		redeemers = append(redeemers, u.ID)
	}

	var (
		failures atomic.Int64
		done     atomic.Int64
		mu       sync.Mutex
		untyped  []error
	)
	// retry runs call until it succeeds or answers a catalog error; a
	// failure must be one that says the database is unavailable.
	retry := func(call func() error) error {
		for {
			err := call()
			if err == nil || protocol.ErrorCode(err) != protocol.CodeInternal {
				return err
			}
			failures.Add(1)
			if !st.Unavailable(err) {
				mu.Lock()
				untyped = append(untyped, err)
				mu.Unlock()
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			time.Sleep(10 * time.Millisecond) // a client's back-off, not a synchronisation
		}
	}

	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range 6 { // grants under keys
		wg.Go(func() {
			for i := next.Add(1); i <= grants; i = next.Add(1) {
				if err := retry(func() error {
					_, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: owner.ID, Amount: 1, Kind: store.LedgerGrant, Key: "k" + strconv.FormatInt(i, 10)})
					return err
				}); err != nil {
					t.Errorf("grant %d: %v", i, err)
				}
				done.Add(1)
			}
		})
	}
	redeemed := make([]error, accounts)
	for i, acc := range redeemers { // coupon redemptions against the cap
		wg.Go(func() {
			redeemed[i] = retry(func() error {
				_, err := st.CouponRedeem(ctx, store.CouponRedeemParams{Code: "outage", AccountID: acc})
				return err
			})
		})
	}
	wg.Go(func() { // run lifecycles, one at a time on the workflow
		for i := range runs {
			if err := lifecycle(ctx, st, retry, owner.ID, wf.ID, i); err != nil {
				t.Errorf("run %d: %v", i, err)
				return
			}
		}
	})
	wg.Go(func() {
		waitFor(t, "a third of the writes", func() bool { return done.Load() >= grants/3 })
		outage(failures.Load)
	})
	wg.Wait()

	if len(untyped) > 0 {
		t.Errorf("%d failures not reported as the database being unavailable, e.g. %v", len(untyped), untyped[0])
	}
	if failures.Load() == 0 {
		t.Error("no call failed during the outage")
	}
	t.Logf("%d calls failed during the outage, all typed", failures.Load())

	// Exactly once, everywhere.
	c, err := st.CreditsGet(ctx, owner.ID)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := st.LedgerSum(ctx, owner.ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(1000 + grants - runs); c.Balance != want || sum != want || c.Held != 0 {
		t.Errorf("owner: credits %+v, ledger sum %d; want balance %d, nothing held", c, sum, want)
	}
	var entries []*store.LedgerEntry
	for cursor := ""; ; {
		page, next, err := st.LedgerList(ctx, owner.ID, store.Page{Limit: 500, Cursor: cursor})
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, page...)
		if next == "" {
			break
		}
		cursor = next
	}
	kinds := map[string]int{}
	for _, e := range entries {
		kinds[e.Kind]++
	}
	if kinds[store.LedgerGrant] != grants+1 || kinds[store.LedgerRunCharge] != runs || len(entries) != grants+1+runs {
		t.Errorf("owner's ledger by kind %v, want %d grants and %d run charges only", kinds, grants+1, runs)
	}
	list, _, err := st.RunList(ctx, store.RunListParams{AccountID: owner.ID, Page: store.Page{Limit: 500}})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range list {
		if r.Status != protocol.RunSucceeded || r.CostCharged != 1 {
			t.Errorf("run %s: %s, charged %d; want succeeded, charged 1", r.ID, r.Status, r.CostCharged)
		}
	}
	if len(list) != runs {
		t.Errorf("%d runs, want %d", len(list), runs)
	}
	coupon, err := st.CouponGet(ctx, "outage")
	if err != nil {
		t.Fatal(err)
	}
	var ok, capped int
	for i, err := range redeemed {
		switch code := protocol.ErrorCode(err); {
		case err == nil, code == protocol.CodeCouponAlreadyRedeemed: // redeemed, maybe by the attempt the outage cut off
			ok++
			if c, _ := st.CreditsGet(ctx, redeemers[i]); c.Balance != 7 {
				t.Errorf("redeemer %d: balance %d, want 7", i, c.Balance)
			}
		case code == protocol.CodeCouponMaxRedemptionsReached:
			capped++
			if c, _ := st.CreditsGet(ctx, redeemers[i]); c.Balance != 0 {
				t.Errorf("capped redeemer %d: balance %d, want 0", i, c.Balance)
			}
		default:
			t.Errorf("redeemer %d: %v", i, err)
		}
	}
	if ok != capacity || capped != accounts-capacity || coupon.Redeemed != capacity {
		t.Errorf("coupon: %d redeemed, %d capped, counter %d; want %d, %d, %d", ok, capped, coupon.Redeemed, capacity, accounts-capacity, capacity)
	}
}

// lifecycle creates, starts and finishes one run, each step retried; a
// step whose first attempt took effect before its answer was lost is
// recognised by the state it left.
func lifecycle(ctx context.Context, st *sqlstore.DB, retry func(func() error) error, accountID, workflowID string, i int) error {
	var runID string
	err := retry(func() error {
		r, err := st.RunCreate(ctx, store.RunCreateParams{AccountID: accountID, WorkflowID: workflowID, Inputs: map[string]any{"i": i}, Cost: 1})
		if err == nil {
			runID = r.ID
			return nil
		}
		var e *protocol.Error
		if errors.As(err, &e) && e.Code == protocol.CodeWorkflowAlreadyRunning {
			runID, _ = e.Details["runId"].(string) // ours: the previous run finished
			return nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	lease := "lse_" + runID
	err = retry(func() error {
		_, err := st.RunStart(ctx, store.RunStartParams{ID: runID, AgentID: "agt_1", LeaseID: lease})
		if protocol.ErrorCode(err) == protocol.CodeConflict {
			if r, gerr := st.RunGet(ctx, runID); gerr == nil && r.Status == protocol.RunRunning && r.LeaseID == lease {
				return nil
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	err = retry(func() error {
		_, err := st.RunFinish(ctx, store.RunFinishParams{ID: runID, LeaseID: lease, Status: protocol.RunSucceeded})
		if protocol.ErrorCode(err) == protocol.CodeConflict {
			if r, gerr := st.RunGet(ctx, runID); gerr == nil && r.Status == protocol.RunSucceeded {
				return nil
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("finish: %w", err)
	}
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Errorf("timed out waiting for %s", what)
			return
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, bounded by the deadline
	}
}

// cluster is a PostgreSQL server of the test's own.
type cluster struct {
	dir, bin, url string
}

// newCluster initialises and starts a cluster in a temporary directory,
// owned by the postgres user, on a free port; it stops and removes it when
// the test ends.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("starting a PostgreSQL server of its own needs root (it runs as the postgres user)")
	}
	versions, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	if len(versions) == 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("no PostgreSQL server binaries under /usr/lib/postgresql (.ci/ensure-deps installs them)")
		}
		t.Skip("no PostgreSQL server binaries under /usr/lib/postgresql")
	}
	sort.Strings(versions)
	c := &cluster{bin: filepath.Dir(versions[len(versions)-1])}
	dir, err := os.MkdirTemp("", "copelf-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c.dir = filepath.Join(dir, "data")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "0700", c.dir, filepath.Join(dir, "run")).CombinedOutput(); err != nil {
		t.Fatalf("install -d: %v\n%s", err, out)
	}
	if err := c.run("initdb", "-D", c.dir, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	if err := c.pgctl("start", "-w", "-t", "120", "-l", filepath.Join(c.dir, "server.log"),
		"-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=50", port, filepath.Join(dir, "run"))); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.pgctl("stop", "-m", "immediate", "-w"); err != nil {
			t.Errorf("stop the test's PostgreSQL: %v", err)
		}
	})
	c.url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	return c
}

// run runs one of the server's tools as the postgres user. Its output goes
// to a file, not a pipe: the server that pg_ctl starts inherits the
// descriptors, and a pipe would stay open as long as the server runs.
func (c *cluster) run(tool string, args ...string) error {
	out, err := os.CreateTemp("", "copelf-pg-out-")
	if err != nil {
		return err
	}
	defer os.Remove(out.Name())
	defer out.Close()
	cmd := exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(c.bin, tool)}, args...)...)
	cmd.Dir, cmd.Stdout, cmd.Stderr = "/", out, out
	if err := cmd.Run(); err != nil {
		text, _ := os.ReadFile(out.Name())
		log, _ := os.ReadFile(filepath.Join(c.dir, "server.log"))
		return fmt.Errorf("%s %s: %v\n%s\nserver log:\n%s", tool, strings.Join(args, " "), err, text, log)
	}
	return nil
}

func (c *cluster) pgctl(args ...string) error {
	return c.run("pg_ctl", append([]string{"-D", c.dir}, args...)...)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
