package billing

import (
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v85/webhook"

	"github.com/copelf/copelf/protocol"
)

// WebhookTolerance is how old a signature's timestamp may be.
const WebhookTolerance = 300 * time.Second

// The Checkout Session events billing acts on. Others are acknowledged and
// ignored.
const (
	EventCheckoutCompleted           = "checkout.session.completed"
	EventCheckoutAsyncPaymentSucceed = "checkout.session.async_payment_succeeded"
	EventCheckoutAsyncPaymentFailed  = "checkout.session.async_payment_failed"
)

// Event is what billing reads of a verified webhook event.
type Event struct {
	ID   string
	Type string
	// Session is the event's Checkout Session, for checkout.session.*
	// events; nil otherwise.
	Session *Session
}

// Session is what billing reads of a Checkout Session.
type Session struct {
	ID            string
	Mode          string
	PaymentStatus string // paid, unpaid, no_payment_required
	// AccountID is metadata.accountId, else client_reference_id.
	AccountID string
	// PriceID is metadata.priceId: the pack bought.
	PriceID string
}

// Paid reports whether the session's payment has been received.
func (s *Session) Paid() bool { return s.PaymentStatus == "paid" }

// Reasons of a refused webhook (bad_request, details.reason).
const (
	ReasonMissingSignature = "missing_signature"
	ReasonInvalidSignature = "invalid_signature"
	ReasonStaleSignature   = "stale_signature"
	ReasonMalformedEvent   = "malformed_event"
)

// ParseWebhook verifies a webhook's Stripe-Signature header against secret
// (HMAC-SHA256 of "<t>.<payload>"; any of several v1 signatures may match,
// as while a secret is rolled; the timestamp may be at most
// WebhookTolerance old) and reads the event. Every failure is bad_request
// with details.reason; nothing is read from a payload whose signature does
// not verify.
func ParseWebhook(payload []byte, header, secret string) (*Event, error) {
	if strings.TrimSpace(header) == "" {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "The Stripe-Signature header is missing.").With("reason", ReasonMissingSignature)
	}
	e, err := webhook.ConstructEventWithOptions(payload, header, secret, webhook.ConstructEventOptions{
		Tolerance:                WebhookTolerance,
		IgnoreAPIVersionMismatch: true,
	})
	switch {
	case errors.Is(err, webhook.ErrTooOld):
		return nil, protocol.Errorf(protocol.CodeBadRequest, "The webhook signature is too old.").With("reason", ReasonStaleSignature)
	case errors.Is(err, webhook.ErrNotSigned), errors.Is(err, webhook.ErrInvalidHeader), errors.Is(err, webhook.ErrNoValidSignature):
		return nil, protocol.Errorf(protocol.CodeBadRequest, "The webhook signature does not verify.").With("reason", ReasonInvalidSignature)
	case err != nil:
		return nil, malformed()
	}
	out := &Event{ID: e.ID, Type: string(e.Type)}
	if !strings.HasPrefix(out.Type, "checkout.session.") {
		return out, nil
	}
	if e.Data == nil || len(e.Data.Raw) == 0 {
		return nil, malformed()
	}
	var s struct {
		ID                string            `json:"id"`
		Object            string            `json:"object"`
		Mode              string            `json:"mode"`
		PaymentStatus     string            `json:"payment_status"`
		ClientReferenceID string            `json:"client_reference_id"`
		Metadata          map[string]string `json:"metadata"`
	}
	if err := json.Unmarshal(e.Data.Raw, &s); err != nil || s.ID == "" || s.Object != "checkout.session" {
		return nil, malformed()
	}
	out.Session = &Session{ID: s.ID, Mode: s.Mode, PaymentStatus: s.PaymentStatus, AccountID: s.Metadata["accountId"], PriceID: s.Metadata["priceId"]}
	if out.Session.AccountID == "" {
		out.Session.AccountID = s.ClientReferenceID
	}
	return out, nil
}

func malformed() *protocol.Error {
	return protocol.Errorf(protocol.CodeBadRequest, "The webhook body is not a Stripe event.").With("reason", ReasonMalformedEvent)
}
