package billing

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v85"

	"github.com/copelf/copelf/protocol"
)

// StripeConfig configures the Stripe client.
type StripeConfig struct {
	// Key is the secret API key.
	Key string
	// APIBase replaces https://api.stripe.com, e.g. with stripe-mock's URL.
	APIBase string
	// HTTPClient makes the calls; nil: a client with a 30 s timeout.
	HTTPClient *http.Client
	// MaxNetworkRetries bounds stripe-go's retries of failed connections
	// and 5xx answers (POSTs carry an idempotency key); nil: 2.
	MaxNetworkRetries *int64
}

// Stripe makes the calls billing needs, through stripe-go.
type Stripe struct {
	c *stripe.Client
}

// NewStripe returns a client for cfg.
func NewStripe(cfg StripeConfig) *Stripe {
	hc := cfg.HTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	bc := &stripe.BackendConfig{
		HTTPClient: hc,
		// Errors are logged by the API with the request id; stripe-go's own
		// log lines would repeat them without it.
		LeveledLogger:     &stripe.LeveledLogger{Level: stripe.LevelNull},
		MaxNetworkRetries: cfg.MaxNetworkRetries,
	}
	if cfg.APIBase != "" {
		bc.URL = stripe.String(strings.TrimRight(cfg.APIBase, "/"))
	}
	return &Stripe{c: stripe.NewClient(cfg.Key, stripe.WithBackends(stripe.NewBackendsWithConfig(bc)))}
}

// CreateCustomer creates the Stripe customer of an account
// (POST /v1/customers) and returns its id. The call carries an idempotency
// key derived from the account, so concurrent or retried calls within
// Stripe's 24 hours get the same customer.
func (s *Stripe) CreateCustomer(ctx context.Context, accountID, email string) (string, error) {
	p := &stripe.CustomerCreateParams{Metadata: map[string]string{"accountId": accountID}}
	if email != "" {
		p.Email = stripe.String(email)
	}
	p.SetIdempotencyKey("copelf-customer-" + accountID)
	c, err := s.c.V1Customers.Create(ctx, p)
	if err != nil {
		return "", err
	}
	return c.ID, nil
}

// CheckoutParams describe a Checkout Session that buys one pack.
type CheckoutParams struct {
	AccountID  string
	CustomerID string
	Price      Price
	SuccessURL string
	CancelURL  string
}

// CreateCheckoutSession creates a Checkout Session in payment mode for one
// unit of the pack's Stripe price, naming the account in
// client_reference_id and the account and pack in metadata (of the session
// and of its payment). It returns the session's id and URL.
func (s *Stripe) CreateCheckoutSession(ctx context.Context, p CheckoutParams) (id, url string, err error) {
	meta := map[string]string{"accountId": p.AccountID, "priceId": p.Price.ID}
	params := &stripe.CheckoutSessionCreateParams{
		Mode:              stripe.String(string(stripe.CheckoutSessionModePayment)),
		Customer:          stripe.String(p.CustomerID),
		ClientReferenceID: stripe.String(p.AccountID),
		LineItems: []*stripe.CheckoutSessionCreateLineItemParams{
			{Price: stripe.String(p.Price.StripePriceID), Quantity: stripe.Int64(1)},
		},
		Metadata:          meta,
		PaymentIntentData: &stripe.CheckoutSessionCreatePaymentIntentDataParams{Metadata: meta},
		SuccessURL:        stripe.String(p.SuccessURL),
		CancelURL:         stripe.String(p.CancelURL),
	}
	sess, err := s.c.V1CheckoutSessions.Create(ctx, params)
	if err != nil {
		return "", "", err
	}
	return sess.ID, sess.URL, nil
}

// CreatePortalSession opens a billing portal session for a customer and
// returns its URL.
func (s *Stripe) CreatePortalSession(ctx context.Context, customerID, returnURL string) (string, error) {
	ps, err := s.c.V1BillingPortalSessions.Create(ctx, &stripe.BillingPortalSessionCreateParams{
		Customer:  stripe.String(customerID),
		ReturnURL: stripe.String(returnURL),
	})
	if err != nil {
		return "", err
	}
	return ps.URL, nil
}

// SessionStatus retrieves a Checkout Session from Stripe: whether it is paid,
// and the account and pack its metadata name. An unknown session is
// not_found.
func (s *Stripe) SessionStatus(ctx context.Context, id string) (paid bool, accountID, priceID string, err error) {
	sess, err := s.c.V1CheckoutSessions.Retrieve(ctx, id, nil)
	if err != nil {
		var se *stripe.Error
		if errors.As(err, &se) && (se.HTTPStatusCode == http.StatusNotFound || se.Code == stripe.ErrorCodeResourceMissing) {
			return false, "", "", protocol.Errorf(protocol.CodeNotFound, "No checkout session has this id.")
		}
		return false, "", "", err
	}
	accountID = sess.Metadata["accountId"]
	if accountID == "" {
		accountID = sess.ClientReferenceID
	}
	return sess.PaymentStatus == stripe.CheckoutSessionPaymentStatusPaid, accountID, sess.Metadata["priceId"], nil
}

// SessionStatuser tells whether a Checkout Session is paid, and for which
// account and pack. *Stripe is the real one; tests substitute it at the
// network boundary.
type SessionStatuser interface {
	SessionStatus(ctx context.Context, id string) (paid bool, accountID, priceID string, err error)
}

var _ SessionStatuser = (*Stripe)(nil)

// Reasons of checkout_failed (details.reason).
const (
	ReasonNotConfigured       = "billing_not_configured" // no -stripe-key (or no webhook secret)
	ReasonProviderUnreachable = "provider_unreachable"   // no answer from Stripe
	ReasonProviderRejected    = "provider_rejected"      // Stripe refused the request (4xx)
	ReasonProviderRateLimited = "provider_rate_limited"  // Stripe asked to slow down
	ReasonProviderError       = "provider_error"         // Stripe failed (5xx)
)

// NotConfigured is the error of a billing route on a server without Stripe.
func NotConfigured() *protocol.Error {
	return protocol.Errorf(protocol.CodeCheckoutFailed, "Billing is not configured on this server.").With("reason", ReasonNotConfigured)
}

// Failure turns an error of a Stripe call into checkout_failed with a
// reason; the message says what happened in our words, never Stripe's (the
// caller logs the original). Errors already in the catalog pass through.
func Failure(err error) *protocol.Error {
	var pe *protocol.Error
	if errors.As(err, &pe) && pe.Code.Valid() {
		return pe
	}
	var se *stripe.Error
	if !errors.As(err, &se) || se.HTTPStatusCode == 0 {
		return protocol.Errorf(protocol.CodeCheckoutFailed, "The payment provider could not be reached.").With("reason", ReasonProviderUnreachable)
	}
	switch {
	case se.HTTPStatusCode == http.StatusTooManyRequests || se.Type == stripe.ErrorTypeRateLimit:
		return protocol.Errorf(protocol.CodeCheckoutFailed, "The payment provider is busy; retry later.").With("reason", ReasonProviderRateLimited)
	case se.HTTPStatusCode >= 500 || se.Type == stripe.ErrorTypeAPI:
		return protocol.Errorf(protocol.CodeCheckoutFailed, "The payment provider failed.").With("reason", ReasonProviderError)
	}
	return protocol.Errorf(protocol.CodeCheckoutFailed, "The payment provider refused the request.").With("reason", ReasonProviderRejected)
}
