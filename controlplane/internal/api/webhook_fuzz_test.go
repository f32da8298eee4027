package api_test

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
)

// FuzzWebhook sends any body with any Stripe-Signature to the webhook:
// never a 500, every answer the envelope or the webhook's JSON, and nothing
// written unless the signature verifies. "{{account}}" in a body stands for
// a real account, so that verified inputs can reach the grant.
//
//	go test -run='^$' -fuzz=FuzzWebhook -fuzztime=45s -fuzzminimizetime=100x ./controlplane/internal/api
//
// mode picks the signature: 0 the fuzzed header as is, 1 a valid one, 2 a
// valid v1 after one made with another secret, 3 another secret's, 4 a
// valid one 301 s old. Only 1 and 2 verify.
func FuzzWebhook(f *testing.F) {
	ctx := context.Background()
	path := filepath.Join(f.TempDir(), "copelf.db")
	st, err := sqlstore.Open(ctx, "sqlite://"+path)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { st.Close() })
	prices, err := billing.ParsePrices([]byte(testPricesJSON))
	if err != nil {
		f.Fatal(err)
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	srv := api.New(st, log, api.Config{RunCost: 1, Prices: prices, WebhookSecret: testWebhookSecret})
	u, err := st.UserCreate(ctx, store.UserCreateParams{Email: "fuzz@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanFree})
	if err != nil {
		f.Fatal(err)
	}
	ro, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout(10000)")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ro.Close() })
	snapshot := func(t *testing.T) string {
		var ledger, sessions int
		var balance int64
		var statuses string
		err := ro.QueryRow(`SELECT (SELECT COUNT(*) FROM ledger), (SELECT COUNT(*) FROM checkout_sessions),
			(SELECT COALESCE(SUM(balance), 0) FROM accounts), (SELECT COALESCE(GROUP_CONCAT(id || status), '') FROM checkout_sessions)`).Scan(&ledger, &sessions, &balance, &statuses)
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprint(ledger, sessions, balance, statuses)
	}

	event := func(typ, status string) string {
		return string(sessionEvent(typ, "cs_fuzz_1", "{{account}}", "pack_100", status))
	}
	for _, seed := range []struct {
		body, header string
		mode         uint8
	}{
		{event(billing.EventCheckoutCompleted, "paid"), "", 1},
		{event(billing.EventCheckoutCompleted, "unpaid"), "", 2},
		{event(billing.EventCheckoutAsyncPaymentSucceed, "paid"), "", 1},
		{event(billing.EventCheckoutAsyncPaymentFailed, "unpaid"), "", 1},
		{event(billing.EventCheckoutCompleted, "paid"), "", 3},
		{event(billing.EventCheckoutCompleted, "paid"), "", 4},
		{event(billing.EventCheckoutCompleted, "paid"), "t=1700000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd", 0},
		{event(billing.EventCheckoutCompleted, "paid"), "t=x,v1=zz", 0},
		{`{"id":"evt_1","object":"event","type":"checkout.session.completed","data":{"object":{"id":"cs_2","object":"checkout.session","metadata":{"accountId":"{{account}}","priceId":"pack_gone"},"payment_status":"paid"}}}`, "", 1},
		{`{"id":"evt_2","object":"event","type":"invoice.paid","data":{"object":{}}}`, "", 1},
		{`{"object":"event","type":"checkout.session.completed","data":null}`, "", 2},
		{`[1,2,3]`, "", 1},
		{``, "", 0},
	} {
		f.Add([]byte(seed.body), seed.header, seed.mode)
	}
	f.Fuzz(func(t *testing.T, body []byte, header string, mode uint8) {
		body = bytes.ReplaceAll(body, []byte("{{account}}"), []byte(u.ID))
		now := time.Now()
		sig := header
		switch mode % 5 {
		case 1:
			sig = sign(body, testWebhookSecret, now)
		case 2:
			_, v1, _ := strings.Cut(sign(body, testWebhookSecret, now), ",")
			sig = sign(body, "whsec_rolled", now) + "," + v1
		case 3:
			sig = sign(body, "whsec_wrong", now)
		case 4:
			sig = sign(body, testWebhookSecret, now.Add(-301*time.Second))
		}
		verifies := mode%5 == 1 || mode%5 == 2

		before := snapshot(t)
		req := httptest.NewRequest("POST", "/v1/billing/webhook", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Stripe-Signature", sig)
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		m := checkAnswer(t, rec, http.StatusOK)
		if !verifies {
			if rec.Code != http.StatusBadRequest {
				t.Fatalf("mode %d: status %d: %s", mode%5, rec.Code, rec.Body)
			}
			if after := snapshot(t); after != before {
				t.Fatalf("mode %d: an unverified delivery wrote: %s → %s", mode%5, before, after)
			}
			return
		}
		if m != nil && m["received"] != true {
			t.Fatalf("answer %s", rec.Body)
		}
	})
}
