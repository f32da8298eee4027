package api

import (
	"context"
	"io"
	"net/http"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/billing"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// maxSessionIDLen bounds a Checkout Session id taken from a path or an event.
const maxSessionIDLen = 255

func (s *Server) listPrices(w http.ResponseWriter, r *http.Request) error {
	if _, err := s.auth(r); err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(s.cfg.Prices.Active(), ""))
}

// origin is the scheme and host Stripe sends the customer back to.
func (s *Server) origin(r *http.Request) string {
	if s.cfg.PublicURL != "" {
		return strings.TrimRight(s.cfg.PublicURL, "/")
	}
	scheme := "http"
	if r.TLS != nil || s.cfg.SecureCookies {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

// stripeFailure logs a failed Stripe call with the request id and returns
// the catalog error the client sees (no Stripe internals).
func (s *Server) stripeFailure(r *http.Request, call string, err error) error {
	out := billing.Failure(err)
	if out.Code == protocol.CodeCheckoutFailed {
		s.log.WithFields(logrus.Fields{"requestId": RequestID(r.Context()), "call": call, "error": err.Error()}).Warn("stripe call failed")
	}
	return out
}

type checkoutBody struct {
	PriceID *string `json:"priceId"`
}

// createCheckout opens a Stripe Checkout Session for one pack: the account's
// Stripe customer is created and linked first when it has none.
func (s *Server) createCheckout(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	var b checkoutBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	if b.PriceID == nil || *b.PriceID == "" {
		return badRequest("The price is required.", fieldRequired("priceId"))
	}
	if s.cfg.Stripe == nil {
		return billing.NotConfigured()
	}
	price, err := s.cfg.Prices.Buyable(*b.PriceID)
	if err != nil {
		return err
	}
	ctx := r.Context()
	customer, err := s.stripeCustomer(r, p.User)
	if err != nil {
		return err
	}
	origin := s.origin(r)
	id, url, err := s.cfg.Stripe.CreateCheckoutSession(ctx, billing.CheckoutParams{
		AccountID: p.AccountID(), CustomerID: customer, Price: price,
		SuccessURL: origin + "/?checkout=success&session_id={CHECKOUT_SESSION_ID}",
		CancelURL:  origin + "/?checkout=cancelled",
	})
	if err != nil {
		return s.stripeFailure(r, "create checkout session", err)
	}
	addLogField(ctx, "sessionId", id)
	// The pack's size is recorded with the session, so that a pack resized
	// or retired later still grants what was sold. Fulfilment falls back on
	// the configured pack if this record is missing.
	if _, err := s.store.CheckoutUpdate(context.WithoutCancel(ctx), store.CheckoutUpdateParams{
		SessionID: id, AccountID: p.AccountID(), PriceID: price.ID, Credits: price.Credits, Status: store.CheckoutPending,
	}); err != nil {
		s.log.WithField("requestId", RequestID(ctx)).WithField("sessionId", id).WithError(err).Error("record checkout session")
	}
	return writeJSON(w, http.StatusCreated, map[string]string{"sessionId": id, "url": url})
}

// stripeCustomer returns the account's linked Stripe customer, creating and
// linking one when there is none. When two requests race, both create (with
// the same idempotency key, so Stripe usually answers the same customer)
// and the first link wins: both use the winner's.
func (s *Server) stripeCustomer(r *http.Request, u *store.User) (string, error) {
	ctx := r.Context()
	cus, err := s.store.AccountStripeCustomer(ctx, u.AccountID())
	if err != nil || cus != "" {
		return cus, err
	}
	created, err := s.cfg.Stripe.CreateCustomer(ctx, u.AccountID(), u.Email)
	if err != nil {
		return "", s.stripeFailure(r, "create customer", err)
	}
	linked, err := s.store.AccountStripeCustomerLink(context.WithoutCancel(ctx), u.AccountID(), created)
	if err != nil {
		return "", err
	}
	if linked != created {
		s.log.WithField("requestId", RequestID(ctx)).WithField("customerId", created).WithField("linkedId", linked).Info("stripe customer created by a concurrent checkout is not linked")
	}
	return linked, nil
}

// billingPortal opens the Stripe billing portal for the account's customer.
func (s *Server) billingPortal(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if s.cfg.Stripe == nil {
		return billing.NotConfigured()
	}
	cus, err := s.store.AccountStripeCustomer(r.Context(), p.AccountID())
	if err != nil {
		return err
	}
	if cus == "" {
		return protocol.NewError(protocol.CodeNoStripeCustomer)
	}
	url, err := s.cfg.Stripe.CreatePortalSession(r.Context(), cus, s.origin(r)+"/")
	if err != nil {
		return s.stripeFailure(r, "create billing portal session", err)
	}
	return writeJSON(w, http.StatusOK, map[string]string{"url": url})
}

// fulfil records what Stripe says of a paid, pending or failed session and,
// when it is paid, grants its pack once (store.Store.CheckoutUpdate). The
// webhook and the success page share it.
func (s *Server) fulfil(ctx context.Context, sessionID, accountID, priceID string, status store.CheckoutStatus) (*store.CheckoutResult, error) {
	var credits int64
	if pr, ok := s.cfg.Prices.Lookup(priceID); ok {
		credits = pr.Credits
	} else if rec, err := s.store.CheckoutGet(ctx, sessionID); err == nil {
		credits = rec.Credits // the recorded session keeps its own size anyway
	} else if protocol.ErrorCode(err) != protocol.CodeNotFound {
		return nil, err
	} else {
		return nil, protocol.Errorf(protocol.CodePriceNotFound, "The session's price is not configured.")
	}
	res, err := s.store.CheckoutUpdate(ctx, store.CheckoutUpdateParams{SessionID: sessionID, AccountID: accountID, PriceID: priceID, Credits: credits, Status: status})
	if err != nil {
		return nil, err
	}
	if res.Granted {
		s.log.WithFields(logrus.Fields{"requestId": RequestID(ctx), "sessionId": sessionID, "accountId": res.Session.AccountID, "credits": res.Entry.Amount}).Info("credit pack granted")
	}
	return res, nil
}

// webhook receives Stripe's events. Nothing is read from, let alone
// written for, a body whose signature does not verify.
func (s *Server) webhook(w http.ResponseWriter, r *http.Request) error {
	if s.cfg.WebhookSecret == "" {
		return billing.NotConfigured()
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		return jsonError(err)
	}
	ev, err := billing.ParseWebhook(body, r.Header.Get("Stripe-Signature"), s.cfg.WebhookSecret)
	if err != nil {
		return err
	}
	ctx := r.Context()
	addLogField(ctx, "eventId", ev.ID)
	addLogField(ctx, "eventType", ev.Type)
	var status store.CheckoutStatus
	switch ev.Type {
	case billing.EventCheckoutCompleted:
		status = store.CheckoutPending
		if ev.Session.Paid() {
			status = store.CheckoutPaid
		}
	case billing.EventCheckoutAsyncPaymentSucceed:
		status = store.CheckoutPaid
	case billing.EventCheckoutAsyncPaymentFailed:
		status = store.CheckoutFailed
	default:
		return writeJSON(w, http.StatusOK, webhookAnswer{Received: true, Outcome: "ignored"})
	}
	sess := ev.Session
	addLogField(ctx, "sessionId", sess.ID)
	if (sess.Mode != "" && sess.Mode != "payment") || sess.AccountID == "" || sess.PriceID == "" || len(sess.ID) > maxSessionIDLen {
		// Not a session of ours: another integration on the same account.
		return writeJSON(w, http.StatusOK, webhookAnswer{Received: true, Outcome: "ignored"})
	}
	// The request may be cut; the event is fulfilled all the same.
	res, err := s.fulfil(context.WithoutCancel(ctx), sess.ID, sess.AccountID, sess.PriceID, status)
	if protocol.ErrorCode(err) == protocol.CodeNotFound {
		s.log.WithField("requestId", RequestID(ctx)).WithField("sessionId", sess.ID).Warn("checkout session names an unknown account; ignored")
		return writeJSON(w, http.StatusOK, webhookAnswer{Received: true, Outcome: "ignored"})
	}
	if err != nil {
		return err
	}
	out := webhookAnswer{Received: true, Outcome: "recorded", Status: res.Session.Status}
	switch {
	case res.Granted:
		out.Outcome = "granted"
	case res.Session.Status == store.CheckoutPaid:
		out.Outcome = "already_granted"
	}
	return writeJSON(w, http.StatusOK, out)
}

type webhookAnswer struct {
	Received bool                 `json:"received"`
	Outcome  string               `json:"outcome"`
	Status   store.CheckoutStatus `json:"status,omitempty"`
}

// checkoutStatus is the success page's call: it asks Stripe whether the
// session is paid and, if so, fulfils it as the webhook would (whichever
// comes first grants; the other finds it done).
func (s *Server) checkoutStatus(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	sessions := s.cfg.Sessions
	if sessions == nil && s.cfg.Stripe != nil {
		sessions = s.cfg.Stripe
	}
	if sessions == nil {
		return billing.NotConfigured()
	}
	id := r.PathValue("sessionId")
	if len(id) > maxSessionIDLen {
		return protocol.Errorf(protocol.CodeNotFound, "No checkout session has this id.")
	}
	ctx := r.Context()
	paid, accountID, priceID, err := sessions.SessionStatus(ctx, id)
	if err != nil {
		return s.stripeFailure(r, "retrieve checkout session", err)
	}
	if accountID == "" {
		return protocol.Errorf(protocol.CodeNotFound, "No checkout session of this service has this id.")
	}
	if err := owns(p, accountID, true); err != nil {
		return err
	}
	out := checkoutStatusAnswer{SessionID: id, PriceID: priceID, Status: store.CheckoutPending}
	if paid {
		res, err := s.fulfil(context.WithoutCancel(ctx), id, accountID, priceID, store.CheckoutPaid)
		if err != nil {
			return err
		}
		out.Status, out.PriceID, out.Credited = res.Session.Status, res.Session.PriceID, res.Entry.Amount
	} else if rec, err := s.store.CheckoutGet(ctx, id); err == nil {
		out.Status, out.PriceID = rec.Status, rec.PriceID
		if rec.Status == store.CheckoutPaid {
			out.Credited = rec.Credits
		}
	} else if protocol.ErrorCode(err) != protocol.CodeNotFound {
		return err
	}
	c, err := s.store.CreditsGet(ctx, accountID)
	if err != nil {
		return err
	}
	out.Balance = c.Balance
	return writeJSON(w, http.StatusOK, out)
}

type checkoutStatusAnswer struct {
	SessionID string               `json:"sessionId"`
	PriceID   string               `json:"priceId"`
	Status    store.CheckoutStatus `json:"status"`
	Credited  int64                `json:"credited"`
	Balance   int64                `json:"balance"`
}
