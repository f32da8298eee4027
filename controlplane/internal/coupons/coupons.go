// Package coupons holds the pure rules of coupons (API.md §8, §12): how a
// code is normalised, which codes are well formed, and which of the catalog's
// coupon codes a redemption fails with. It does no I/O and reads no clock;
// the store applies the rules inside its redemption transaction, where the
// once-per-account and the redemption cap are enforced by the database.
//
// When several reasons apply, the first of these wins:
//
//	coupon_not_found                 no coupon has this code (any case)
//	coupon_inactive                  switched off, or startsAt is still ahead
//	coupon_expired                   expiresAt has passed
//	coupon_already_redeemed          this account redeemed it before
//	coupon_max_redemptions_reached   every redemption is used
package coupons

import (
	"regexp"
	"strings"
	"time"

	"github.com/copelf/copelf/protocol"
)

// MaxCodeLen bounds a code.
const MaxCodeLen = 64

var codeRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Normalize is the form a code is stored and looked up in: trimmed and upper
// case, so that "welcome10", " WELCOME10 " and "Welcome10" are one coupon.
func Normalize(code string) string { return strings.ToUpper(strings.TrimSpace(code)) }

// ValidCode reports whether code (before or after Normalize) may name a
// coupon: 1–64 of A–Z, a–z, 0–9, "_" and "-".
func ValidCode(code string) bool { return codeRe.MatchString(strings.TrimSpace(code)) }

// Window is what decides whether a coupon may be redeemed at a time.
type Window struct {
	Active    bool
	StartsAt  *time.Time
	ExpiresAt *time.Time
}

// Usable returns nil when a coupon with window w may be redeemed at now,
// else coupon_inactive (switched off, or not started: startsAt > now) or
// coupon_expired (expiresAt ≤ now), in that order.
func Usable(w Window, now time.Time) error {
	switch {
	case !w.Active:
		return protocol.Errorf(protocol.CodeCouponInactive, "The coupon is switched off.").With("reason", "deactivated")
	case w.StartsAt != nil && now.Before(*w.StartsAt):
		return protocol.Errorf(protocol.CodeCouponInactive, "The coupon is not valid yet.").With("reason", "not_started").With("startsAt", w.StartsAt.UTC())
	case w.ExpiresAt != nil && !now.Before(*w.ExpiresAt):
		return protocol.Errorf(protocol.CodeCouponExpired, "The coupon has expired.").With("expiresAt", w.ExpiresAt.UTC())
	}
	return nil
}

// AlreadyRedeemed is the error of a second redemption by one account.
func AlreadyRedeemed() error { return protocol.NewError(protocol.CodeCouponAlreadyRedeemed) }

// CapReached is the error of a redemption beyond maxRedemptions.
func CapReached() error { return protocol.NewError(protocol.CodeCouponMaxRedemptionsReached) }

// NotFound is the error of an unknown code.
func NotFound() error { return protocol.NewError(protocol.CodeCouponNotFound) }
