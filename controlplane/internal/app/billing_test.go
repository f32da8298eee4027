package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v85/webhook"

	"github.com/copelf/copelf/controlplane/internal/app"
)

const appPrices = `[{"id":"pack_10","credits":10,"amount":500,"currency":"usd","stripePriceId":"price_app","active":true},
{"id":"pack_off","credits":99,"amount":1,"currency":"usd","stripePriceId":"price_off","active":false}]`

// fakeStripe answers the two calls a first checkout makes and records them:
// a stand-in at the network boundary that proves -stripe-api-base and
// -stripe-key reach stripe-go. (The API's tests run against stripe-mock.)
type fakeStripe struct {
	mu    sync.Mutex
	calls []string // "METHOD path auth form"
}

func (f *fakeStripe) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	form, _ := url.ParseQuery(string(body))
	f.mu.Lock()
	f.calls = append(f.calls, r.Method+" "+r.URL.Path+" "+r.Header.Get("Authorization")+" "+form.Encode())
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch r.URL.Path {
	case "/v1/customers":
		io.WriteString(w, `{"id":"cus_app","object":"customer"}`)
	case "/v1/checkout/sessions":
		io.WriteString(w, `{"id":"cs_app","object":"checkout.session","mode":"payment","payment_status":"unpaid","url":"https://pay.example/cs_app"}`)
	default:
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"error":{"type":"invalid_request_error","message":"no such route"}}`)
	}
}

func writePrices(t *testing.T, dir, content string) string {
	t.Helper()
	p := filepath.Join(dir, "prices.json")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// copelfd wired for billing: -prices, -stripe-key, -stripe-api-base and
// -stripe-webhook-secret reach the API; a paid session's webhook grants.
func TestBillingFlags(t *testing.T) {
	const admin = "copelf-test-admin-token-billing-0123"
	t.Setenv("COPELF_ADMIN_TOKEN", admin)
	dir := t.TempDir()
	fs := &fakeStripe{}
	stripeSrv := httptest.NewServer(fs)
	t.Cleanup(stripeSrv.Close)
	in := startApp(t, append(baseArgs(dir), "-prices", writePrices(t, dir, appPrices), "-stripe-key", "sk_test_app",
		"-stripe-api-base", stripeSrv.URL, "-stripe-webhook-secret", "whsec_app")...)
	c := client(t)

	status, prices := call(t, c, "GET", in.URL+"/v1/billing/prices", admin, nil)
	expect(t, "GET /v1/billing/prices", status, prices, http.StatusOK)
	if items := prices["items"].([]any); len(items) != 1 || items[0].(map[string]any)["id"] != "pack_10" {
		t.Fatalf("prices %v", prices)
	}
	status, me := call(t, c, "GET", in.URL+"/v1/me", admin, nil)
	expect(t, "GET /v1/me", status, me, http.StatusOK)
	account := me["id"].(string)

	status, co := call(t, c, "POST", in.URL+"/v1/billing/checkout", admin, map[string]any{"priceId": "pack_10"})
	expect(t, "POST /v1/billing/checkout", status, co, http.StatusCreated)
	if co["sessionId"] != "cs_app" || co["url"] != "https://pay.example/cs_app" {
		t.Fatalf("checkout %v", co)
	}
	fs.mu.Lock()
	calls := append([]string(nil), fs.calls...)
	fs.mu.Unlock()
	if len(calls) != 2 || !strings.HasPrefix(calls[0], "POST /v1/customers Bearer sk_test_app ") || !strings.HasPrefix(calls[1], "POST /v1/checkout/sessions Bearer sk_test_app ") {
		t.Fatalf("Stripe calls %q", calls)
	}
	for _, want := range []string{"mode=payment", "client_reference_id=" + account, "customer=cus_app", url.QueryEscape("metadata[accountId]") + "=" + account,
		url.QueryEscape("metadata[priceId]") + "=pack_10", url.QueryEscape("line_items[0][price]") + "=price_app"} {
		if !strings.Contains(calls[1], want) {
			t.Errorf("checkout session call lacks %s: %s", want, calls[1])
		}
	}

	// Stripe reports the payment.
	payload, _ := json.Marshal(map[string]any{"id": "evt_app", "object": "event", "type": "checkout.session.completed", "data": map[string]any{"object": map[string]any{
		"id": "cs_app", "object": "checkout.session", "mode": "payment", "payment_status": "paid", "client_reference_id": account,
		"metadata": map[string]string{"accountId": account, "priceId": "pack_10"}}}})
	sig := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: "whsec_app", Timestamp: time.Now()}).Header
	req, _ := http.NewRequest("POST", in.URL+"/v1/billing/webhook", bytes.NewReader(payload))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Stripe-Signature", sig)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("webhook: %d", res.StatusCode)
	}
	status, credits := call(t, c, "GET", in.URL+"/v1/credits", admin, nil)
	expect(t, "GET /v1/credits", status, credits, http.StatusOK)
	if credits["balance"] != float64(10) {
		t.Errorf("credits after the webhook %v", credits)
	}
}

// Without -stripe-key the server starts; billing says it is not configured.
func TestBillingOffWithoutStripeKey(t *testing.T) {
	const admin = "copelf-test-admin-token-nobilling-01"
	t.Setenv("COPELF_ADMIN_TOKEN", admin)
	dir := t.TempDir()
	in := startApp(t, append(baseArgs(dir), "-prices", writePrices(t, dir, appPrices))...)
	c := client(t)
	status, prices := call(t, c, "GET", in.URL+"/v1/billing/prices", admin, nil)
	expect(t, "GET /v1/billing/prices", status, prices, http.StatusOK)
	status, body := call(t, c, "POST", in.URL+"/v1/billing/checkout", admin, map[string]any{"priceId": "pack_10"})
	expect(t, "POST /v1/billing/checkout", status, body, http.StatusBadRequest)
	if body["code"] != "checkout_failed" || body["details"].(map[string]any)["reason"] != "billing_not_configured" {
		t.Errorf("checkout without Stripe: %v", body)
	}
}

func TestBillingRejectsBadPricesFile(t *testing.T) {
	unsetAdminToken(t)
	for name, content := range map[string]string{
		"not json":     `{`,
		"unknown key":  `[{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":"p","active":true,"x":1}]`,
		"no credits":   `[{"id":"a","credits":0,"amount":1,"currency":"usd","stripePriceId":"p","active":true}]`,
		"duplicate id": `[{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":"p","active":true},{"id":"a","credits":2,"amount":1,"currency":"usd","stripePriceId":"q","active":true}]`,
		"missing file": "",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "missing.json")
			if content != "" {
				path = writePrices(t, dir, content)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err := app.Run(ctx, append(baseArgs(dir), "-prices", path), io.Discard, io.Discard, func(addr string) { t.Errorf("served on %s", addr) })
			if err == nil || !strings.Contains(err.Error(), "-prices") {
				t.Fatalf("Run with %s: %v", name, err)
			}
		})
	}
}
