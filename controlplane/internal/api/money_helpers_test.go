package api_test

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"go/build"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
	"github.com/stripe/stripe-go/v85/webhook"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// TestMain stops the shared stripe-mock (if a test started it) when the
// package's tests are done.
func TestMain(m *testing.M) {
	code := m.Run()
	stopStripeMock()
	os.Exit(code)
}

// testPricesJSON is the -prices file of the billing tests.
const testPricesJSON = `[
{"id":"pack_100","credits":100,"amount":1000,"currency":"usd","stripePriceId":"price_100","active":true},
{"id":"pack_500","credits":500,"amount":4000,"currency":"EUR","stripePriceId":"price_500","active":true},
{"id":"pack_old","credits":50,"amount":500,"currency":"usd","stripePriceId":"price_old","active":false}]`

const testWebhookSecret = "whsec_test_secret"

// moneyEnv is a server with billing configured: the test prices, the
// webhook secret, a fake session-status seam and, when asked for,
// stripe-mock behind -stripe-api-base. It knows its database file, so that
// tests can count every row billing may write.
type moneyEnv struct {
	*env
	DBPath   string
	Secret   string
	Sessions *fakeSessions
	Prices   *billing.Prices
}

type moneyOpts struct {
	// StripeBase is the Stripe API base URL (stripeMockURL); "": no
	// Stripe client (billing not configured).
	StripeBase string
	// StripeKey is the secret key; "": a test key stripe-mock takes.
	StripeKey string
	// NoWebhookSecret leaves the webhook unconfigured.
	NoWebhookSecret bool
	// NoSessions leaves the success page on the Stripe client.
	NoSessions bool
}

// newMoneyEnv starts a server like newEnv, on a database file it knows.
func newMoneyEnv(t *testing.T, o moneyOpts) *moneyEnv {
	t.Helper()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "copelf.db")
	st, err := sqlstore.Open(ctx, "sqlite://"+path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	prices, err := billing.ParsePrices([]byte(testPricesJSON))
	if err != nil {
		t.Fatal(err)
	}
	cfg := api.Config{RunCost: 1, DataDir: t.TempDir(), Prices: prices}
	m := &moneyEnv{DBPath: path, Prices: prices, Sessions: &fakeSessions{m: map[string]fakeSession{}}}
	if !o.NoWebhookSecret {
		cfg.WebhookSecret, m.Secret = testWebhookSecret, testWebhookSecret
	}
	if o.StripeBase != "" {
		key := o.StripeKey
		if key == "" {
			key = "sk_test_123"
		}
		cfg.Stripe = billing.NewStripe(billing.StripeConfig{Key: key, APIBase: o.StripeBase, MaxNetworkRetries: ptrInt64(0)})
	}
	if !o.NoSessions {
		cfg.Sessions = m.Sessions
	}
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	srv := api.New(st, log, cfg)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	m.env = &env{t: t, Store: st, API: srv, Server: hs, Logs: hook}
	admin, err := st.UserCreate(ctx, store.UserCreateParams{Email: "admin@example.com", PasswordHash: "x", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	if m.Admin, err = api.CreateToken(ctx, st, admin.ID, store.TokenAPI, "admin"); err != nil {
		t.Fatal(err)
	}
	return m
}

func ptrInt64(v int64) *int64 { return &v }

// counts are the rows money can be written to, and the balances.
type counts struct {
	Ledger, Sessions, Redemptions, Customers, IdemKeys int
	Balance, Held                                      int64
	Coupons                                            string // id:redeemed:active of each
}

// counts reads the database file directly (read-only).
func (m *moneyEnv) counts(t *testing.T) counts {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+m.DBPath+"?mode=ro&_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var c counts
	for q, dst := range map[string]any{
		`SELECT COUNT(*) FROM ledger`:                                        &c.Ledger,
		`SELECT COUNT(*) FROM checkout_sessions`:                             &c.Sessions,
		`SELECT COUNT(*) FROM coupon_redemptions`:                            &c.Redemptions,
		`SELECT COUNT(*) FROM accounts WHERE stripe_customer_id IS NOT NULL`: &c.Customers,
		`SELECT COUNT(*) FROM idempotency_keys`:                              &c.IdemKeys,
		`SELECT COALESCE(SUM(balance), 0) FROM accounts`:                     &c.Balance,
		`SELECT COALESCE(SUM(held), 0) FROM accounts`:                        &c.Held,
		`SELECT COALESCE(GROUP_CONCAT(id || ':' || redeemed || ':' || active), '') FROM (SELECT * FROM coupons ORDER BY id)`: &c.Coupons,
	} {
		if err := db.QueryRow(q).Scan(dst); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	return c
}

// fakeSessions is the success page's seam: what Stripe would say of a
// Checkout Session.
type fakeSessions struct {
	mu sync.Mutex
	m  map[string]fakeSession
}

type fakeSession struct {
	Paid               bool
	AccountID, PriceID string
	Err                error
}

func (f *fakeSessions) set(id string, s fakeSession) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.m[id] = s
}

func (f *fakeSessions) SessionStatus(_ context.Context, id string) (bool, string, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.m[id]
	switch {
	case !ok:
		return false, "", "", protocol.Errorf(protocol.CodeNotFound, "No checkout session has this id.")
	case s.Err != nil:
		return false, "", "", s.Err
	}
	return s.Paid, s.AccountID, s.PriceID, nil
}

// sessionEvent is a Stripe event about a Checkout Session of this service.
func sessionEvent(typ, sessionID, accountID, priceID, paymentStatus string) []byte {
	ev := map[string]any{
		"id": "evt_" + ids.New("x")[2:], "object": "event", "api_version": "2024-06-20", "created": time.Now().Unix(), "type": typ,
		"livemode": false, "pending_webhooks": 1,
		"data": map[string]any{"object": map[string]any{
			"id": sessionID, "object": "checkout.session", "mode": "payment", "payment_status": paymentStatus,
			"client_reference_id": accountID, "metadata": map[string]string{"accountId": accountID, "priceId": priceID},
		}},
	}
	b, err := json.Marshal(ev)
	if err != nil {
		panic(err)
	}
	return b
}

// sign is the Stripe-Signature header of payload signed with secret at ts.
func sign(payload []byte, secret string, ts time.Time) string {
	return webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: secret, Timestamp: ts}).Header
}

// hook sends a webhook delivery through the harness (validated against the
// OpenAPI document).
func (m *moneyEnv) hook(payload []byte, signature string) *response {
	h := map[string]string{"Content-Type": "application/json; charset=utf-8"}
	if signature != "" {
		h["Stripe-Signature"] = signature
	}
	return m.do(request{Method: "POST", Path: "/v1/billing/webhook", Body: payload, Header: h})
}

// ---------------------------------------------------------------- stripe-mock

// stripeMock is one stripe-mock process shared by the package's tests.
var stripeMock struct {
	once sync.Once
	cmd  *exec.Cmd
	url  string
	err  error
}

// stripeMockBinary finds stripe-mock on PATH or where go install puts it.
func stripeMockBinary() string {
	if p, err := exec.LookPath("stripe-mock"); err == nil {
		return p
	}
	var dirs []string
	if gobin := os.Getenv("GOBIN"); gobin != "" {
		dirs = append(dirs, gobin)
	}
	for _, p := range filepath.SplitList(build.Default.GOPATH) {
		dirs = append(dirs, filepath.Join(p, "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, "stripe-mock")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p
		}
	}
	return ""
}

// stripeMockURL returns the base URL of the shared stripe-mock, starting it
// on the first call. Without the binary the test is skipped with how to
// install it — or fails when CI=true.
func stripeMockURL(t testing.TB) string {
	t.Helper()
	bin := stripeMockBinary()
	if bin == "" {
		msg := "stripe-mock is not installed: go install github.com/stripe/stripe-mock@v0.203.0 (make test and .ci/run do it)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	stripeMock.once.Do(func() { stripeMock.url, stripeMock.err = startStripeMock(bin) })
	if stripeMock.err != nil {
		t.Fatalf("stripe-mock: %v", stripeMock.err)
	}
	return stripeMock.url
}

// startStripeMock runs stripe-mock on loopback ports it picks itself, reads
// the HTTP address it prints, and waits until it answers.
func startStripeMock(bin string) (string, error) {
	cmd := exec.Command(bin, "-http-addr", "127.0.0.1:0", "-https-addr", "127.0.0.1:0")
	setParentDeathSignal(cmd)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		return "", err
	}
	stripeMock.cmd = cmd
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "Listening for HTTP at address: "); ok {
				addr <- strings.TrimSpace(a)
			}
		}
		close(addr)
		_, _ = io.Copy(io.Discard, out)
	}()
	var base string
	select {
	case a, ok := <-addr:
		if !ok {
			return "", errors.New("exited before listening")
		}
		base = "http://" + a
	case <-time.After(2 * time.Minute):
		return "", errors.New("did not listen within 2 minutes")
	}
	// It prints the address once listening; make sure it serves the API.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		req, _ := http.NewRequest("GET", base+"/v1/customers", nil)
		req.Header.Set("Authorization", "Bearer sk_test_123")
		res, err := http.DefaultClient.Do(req)
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return base, nil
			}
			err = fmt.Errorf("status %d", res.StatusCode)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("not answering at %s: %v", base, err)
		}
		time.Sleep(50 * time.Millisecond) // polling a subprocess, not synchronising goroutines
	}
}

func stopStripeMock() {
	if c := stripeMock.cmd; c != nil && c.Process != nil {
		_ = c.Process.Kill()
		_ = c.Wait()
	}
}
