// Package billing sells credit packs through Stripe (API.md §8, §12): the
// packs (prices) an operator configures, the Stripe calls checkout needs
// (customer, Checkout Session, billing portal, a session's payment status)
// and the verification and reading of Stripe's webhooks. It holds no state;
// granting credits exactly once is the store's job (store.CheckoutUpdate).
package billing

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/copelf/copelf/protocol"
)

// Price is a credit pack: Credits for Amount (in the currency's smallest
// unit, e.g. cents) of Currency, sold as StripePriceID. A pack that is not
// Active cannot be bought any more, but sessions already paid for it are
// still fulfilled.
type Price struct {
	ID            string `json:"id"`
	Credits       int64  `json:"credits"`
	Amount        int64  `json:"amount"`
	Currency      string `json:"currency"`
	StripePriceID string `json:"stripePriceId"`
	Active        bool   `json:"active"`
}

// Prices is the configured set of packs, in file order.
type Prices struct {
	list []Price
	byID map[string]Price
}

var (
	priceIDRe  = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	currencyRe = regexp.MustCompile(`^[a-z]{3}$`)
)

// maxCredits bounds one pack.
const maxCredits = 1_000_000_000

// ParsePrices reads the -prices file's JSON: an array of Price, strictly
// (unknown fields are an error). Ids must be unique and well formed, credits
// positive, amounts not negative, currencies ISO 4217 codes (lower case is
// what Stripe uses; upper case is accepted and lowered) and Stripe price ids
// present.
func ParsePrices(data []byte) (*Prices, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var list []Price
	if err := dec.Decode(&list); err != nil {
		return nil, fmt.Errorf("prices: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("prices: trailing data after the array")
	}
	p := &Prices{list: make([]Price, 0, len(list)), byID: make(map[string]Price, len(list))}
	var problems []string
	for i, pr := range list {
		pr.Currency = strings.ToLower(pr.Currency)
		where := fmt.Sprintf("prices[%d]", i)
		switch {
		case !priceIDRe.MatchString(pr.ID):
			problems = append(problems, where+": id must be 1–64 of A–Z, a–z, 0–9, _ and -")
		case p.byID[pr.ID].ID != "":
			problems = append(problems, where+": id "+pr.ID+" is used twice")
		}
		if pr.Credits <= 0 || pr.Credits > maxCredits {
			problems = append(problems, where+": credits must be between 1 and 1000000000")
		}
		if pr.Amount < 0 {
			problems = append(problems, where+": amount must not be negative")
		}
		if !currencyRe.MatchString(pr.Currency) {
			problems = append(problems, where+": currency must be a three-letter ISO 4217 code")
		}
		if strings.TrimSpace(pr.StripePriceID) == "" {
			problems = append(problems, where+": stripePriceId is required")
		}
		p.byID[pr.ID] = pr
		p.list = append(p.list, pr)
	}
	if len(problems) > 0 {
		return nil, errors.New(strings.Join(problems, "; "))
	}
	return p, nil
}

// LoadPrices reads a prices file; an empty path is no packs.
func LoadPrices(path string) (*Prices, error) {
	if path == "" {
		return &Prices{byID: map[string]Price{}}, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("prices: %w", err)
	}
	p, err := ParsePrices(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// Active returns the packs that may be bought, in file order (never nil).
func (p *Prices) Active() []Price {
	out := []Price{}
	if p == nil {
		return out
	}
	for _, pr := range p.list {
		if pr.Active {
			out = append(out, pr)
		}
	}
	return out
}

// Lookup returns any configured pack, active or retired.
func (p *Prices) Lookup(id string) (Price, bool) {
	if p == nil {
		return Price{}, false
	}
	pr, ok := p.byID[id]
	return pr, ok
}

// Buyable returns an active pack, else price_not_found.
func (p *Prices) Buyable(id string) (Price, error) {
	pr, ok := p.Lookup(id)
	if !ok || !pr.Active {
		return Price{}, protocol.Errorf(protocol.CodePriceNotFound, "No active price has this id.")
	}
	return pr, nil
}
