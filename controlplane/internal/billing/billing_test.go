package billing

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/stripe/stripe-go/v85"

	"github.com/copelf/copelf/protocol"
)

func TestParsePrices(t *testing.T) {
	p, err := ParsePrices([]byte(`[
		{"id":"pack_100","credits":100,"amount":1000,"currency":"USD","stripePriceId":"price_1","active":true},
		{"id":"old","credits":5,"amount":0,"currency":"eur","stripePriceId":"price_2","active":false}]`))
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Active(); len(got) != 1 || got[0].ID != "pack_100" || got[0].Currency != "usd" {
		t.Errorf("Active = %+v", got)
	}
	if pr, ok := p.Lookup("old"); !ok || pr.Credits != 5 {
		t.Errorf("Lookup(old) = %+v, %v", pr, ok)
	}
	if _, err := p.Buyable("old"); protocol.ErrorCode(err) != protocol.CodePriceNotFound {
		t.Errorf("Buyable(old) = %v", err)
	}
	if _, err := p.Buyable("nope"); protocol.ErrorCode(err) != protocol.CodePriceNotFound {
		t.Errorf("Buyable(nope) = %v", err)
	}
	if pr, err := p.Buyable("pack_100"); err != nil || pr.StripePriceID != "price_1" {
		t.Errorf("Buyable(pack_100) = %+v, %v", pr, err)
	}
	var none *Prices
	if got := none.Active(); got == nil || len(got) != 0 {
		t.Errorf("nil Active = %#v", got)
	}

	for name, bad := range map[string]string{
		"not an array":  `{}`,
		"trailing":      `[] []`,
		"unknown field": `[{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":"p","active":true,"x":1}]`,
		"bad id":        `[{"id":"a b","credits":1,"amount":1,"currency":"usd","stripePriceId":"p","active":true}]`,
		"duplicate":     `[{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":"p","active":true},{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":"q","active":true}]`,
		"no credits":    `[{"id":"a","credits":0,"amount":1,"currency":"usd","stripePriceId":"p","active":true}]`,
		"negative":      `[{"id":"a","credits":1,"amount":-1,"currency":"usd","stripePriceId":"p","active":true}]`,
		"currency":      `[{"id":"a","credits":1,"amount":1,"currency":"dollars","stripePriceId":"p","active":true}]`,
		"no stripe id":  `[{"id":"a","credits":1,"amount":1,"currency":"usd","stripePriceId":" ","active":true}]`,
	} {
		if _, err := ParsePrices([]byte(bad)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if p, err := LoadPrices(""); err != nil || len(p.Active()) != 0 {
		t.Errorf("LoadPrices(\"\") = %v, %v", p, err)
	}
	if _, err := LoadPrices("/nonexistent/prices.json"); err == nil {
		t.Error("LoadPrices of a missing file: no error")
	}
}

func TestFailure(t *testing.T) {
	for _, c := range []struct {
		err    error
		code   protocol.Code
		reason string
	}{
		{errors.New("dial tcp 127.0.0.1:1: connection refused"), protocol.CodeCheckoutFailed, ReasonProviderUnreachable},
		{&stripe.Error{HTTPStatusCode: http.StatusUnauthorized, Type: stripe.ErrorTypeInvalidRequest, Msg: "Invalid API Key provided: sk_live_****"}, protocol.CodeCheckoutFailed, ReasonProviderRejected},
		{&stripe.Error{HTTPStatusCode: http.StatusBadRequest, Type: stripe.ErrorTypeInvalidRequest, Msg: "No such price: 'price_x'"}, protocol.CodeCheckoutFailed, ReasonProviderRejected},
		{&stripe.Error{HTTPStatusCode: http.StatusTooManyRequests, Type: stripe.ErrorTypeRateLimit}, protocol.CodeCheckoutFailed, ReasonProviderRateLimited},
		{&stripe.Error{HTTPStatusCode: http.StatusInternalServerError, Type: stripe.ErrorTypeAPI}, protocol.CodeCheckoutFailed, ReasonProviderError},
		{protocol.Errorf(protocol.CodeNotFound, "gone"), protocol.CodeNotFound, ""},
	} {
		got := Failure(c.err)
		reason, _ := got.Details["reason"].(string)
		if got.Code != c.code || reason != c.reason {
			t.Errorf("Failure(%v) = %v %v, want %s %s", c.err, got.Code, got.Details, c.code, c.reason)
		}
		if strings.Contains(got.Message, "sk_") || strings.Contains(got.Message, "price_x") {
			t.Errorf("Failure(%v) shows Stripe's words: %q", c.err, got.Message)
		}
	}
}
