package api

import (
	"net/http"
	"time"

	"github.com/copelf/copelf/controlplane/internal/coupons"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

type couponBody struct {
	Code           *string `json:"code"`
	Credits        *int64  `json:"credits"`
	MaxRedemptions *int64  `json:"maxRedemptions"`
	StartsAt       *string `json:"startsAt"`
	ExpiresAt      *string `json:"expiresAt"`
	Active         *bool   `json:"active"`
}

// parseTime reads an optional RFC 3339 field; a malformed one is reported
// in bad.
func parseTime(field string, v *string, bad *[]protocol.FieldProblem) *time.Time {
	if v == nil {
		return nil
	}
	t, err := time.Parse(time.RFC3339Nano, *v)
	if err != nil {
		*bad = append(*bad, protocol.FieldProblem{Field: field, Problem: "must be an RFC 3339 time"})
		return nil
	}
	return &t
}

func (s *Server) createCoupon(w http.ResponseWriter, r *http.Request) error {
	p, err := s.authRole(r, store.RoleAdmin)
	if err != nil {
		return err
	}
	var b couponBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	var problems []protocol.FieldProblem
	if b.Code == nil {
		problems = append(problems, fieldRequired("code"))
	}
	if b.Credits == nil {
		problems = append(problems, fieldRequired("credits"))
	}
	starts := parseTime("startsAt", b.StartsAt, &problems)
	expires := parseTime("expiresAt", b.ExpiresAt, &problems)
	if len(problems) > 0 {
		return badRequest("Some fields are missing or malformed.", problems...)
	}
	var bad []protocol.FieldProblem
	if !coupons.ValidCode(*b.Code) {
		bad = append(bad, protocol.FieldProblem{Field: "code", Problem: "must be 1–64 of A–Z, a–z, 0–9, _ and - (case does not matter)"})
	}
	if *b.Credits < 1 || *b.Credits > maxGrant {
		bad = append(bad, protocol.FieldProblem{Field: "credits", Problem: "must be a whole number from 1 to 1000000000"})
	}
	if b.MaxRedemptions != nil && (*b.MaxRedemptions < 1 || *b.MaxRedemptions > maxGrant) {
		bad = append(bad, protocol.FieldProblem{Field: "maxRedemptions", Problem: "must be a whole number from 1 to 1000000000"})
	}
	if starts != nil && expires != nil && !expires.After(*starts) {
		bad = append(bad, protocol.FieldProblem{Field: "expiresAt", Problem: "must be after startsAt"})
	}
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	active := b.Active == nil || *b.Active
	c, err := s.store.CouponCreate(r.Context(), store.CouponCreateParams{
		Code: *b.Code, Credits: *b.Credits, MaxRedemptions: b.MaxRedemptions, StartsAt: starts, ExpiresAt: expires, Active: active,
	})
	if err != nil {
		return err
	}
	addLogField(r.Context(), "couponId", c.ID)
	s.log.WithField("requestId", RequestID(r.Context())).WithField("adminId", p.User.ID).WithField("couponId", c.ID).WithField("code", c.Code).Info("coupon created")
	return writeJSON(w, http.StatusCreated, c)
}

func (s *Server) listCoupons(w http.ResponseWriter, r *http.Request) error {
	if _, err := s.authRole(r, store.RoleAdmin); err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	items, next, err := s.store.CouponList(r.Context(), page)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, listBody(items, next))
}

func (s *Server) deactivateCoupon(w http.ResponseWriter, r *http.Request) error {
	p, err := s.authRole(r, store.RoleAdmin)
	if err != nil {
		return err
	}
	c, err := s.store.CouponDeactivate(r.Context(), r.PathValue("code"))
	if err != nil {
		return err
	}
	s.log.WithField("requestId", RequestID(r.Context())).WithField("adminId", p.User.ID).WithField("couponId", c.ID).Info("coupon deactivated")
	return writeJSON(w, http.StatusOK, c)
}

type redeemBody struct {
	Code *string `json:"code"`
}

// redeemCoupon grants a coupon's credits to the caller's account, at most
// once per account (see store.Store.CouponRedeem for the order of errors).
func (s *Server) redeemCoupon(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	var b redeemBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	if b.Code == nil || *b.Code == "" {
		return badRequest("The coupon code is required.", fieldRequired("code"))
	}
	if len(*b.Code) > 4*coupons.MaxCodeLen {
		return coupons.NotFound() // no coupon has so long a code
	}
	red, err := s.store.CouponRedeem(r.Context(), store.CouponRedeemParams{Code: *b.Code, AccountID: p.AccountID()})
	if err != nil {
		return err
	}
	addLogField(r.Context(), "couponId", red.CouponID)
	return writeJSON(w, http.StatusCreated, red)
}
