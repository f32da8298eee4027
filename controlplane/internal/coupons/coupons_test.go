package coupons

import (
	"testing"
	"time"

	"github.com/copelf/copelf/protocol"
)

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{"welcome10": "WELCOME10", " Spring-25 ": "SPRING-25", "a_b": "A_B", "": ""} {
		if got := Normalize(in); got != want {
			t.Errorf("Normalize(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestValidCode(t *testing.T) {
	for code, want := range map[string]bool{
		"WELCOME10": true, "spring-25": true, "a_b": true, " padded ": true, "x": true,
		"": false, "   ": false, "two words": false, "ünï": false, "semi;colon": false,
		"0123456789012345678901234567890123456789012345678901234567890123":  true,
		"01234567890123456789012345678901234567890123456789012345678901234": false,
	} {
		if got := ValidCode(code); got != want {
			t.Errorf("ValidCode(%q) = %v, want %v", code, got, want)
		}
	}
}

func TestUsable(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	before, after := now.Add(-time.Second), now.Add(time.Second)
	for _, c := range []struct {
		name string
		w    Window
		want protocol.Code
	}{
		{"active, no window", Window{Active: true}, ""},
		{"within the window", Window{Active: true, StartsAt: &before, ExpiresAt: &after}, ""},
		{"starts now", Window{Active: true, StartsAt: &now}, ""},
		{"switched off", Window{Active: false}, protocol.CodeCouponInactive},
		{"not started", Window{Active: true, StartsAt: &after}, protocol.CodeCouponInactive},
		{"expires now", Window{Active: true, ExpiresAt: &now}, protocol.CodeCouponExpired},
		{"expired", Window{Active: true, ExpiresAt: &before}, protocol.CodeCouponExpired},
		{"off beats expired", Window{Active: false, ExpiresAt: &before}, protocol.CodeCouponInactive},
		{"not started beats expired", Window{Active: true, StartsAt: &after, ExpiresAt: &before}, protocol.CodeCouponInactive},
	} {
		err := Usable(c.w, now)
		got := protocol.Code("")
		if err != nil {
			got = protocol.ErrorCode(err)
		}
		if got != c.want {
			t.Errorf("%s: Usable = %v, want %q", c.name, err, c.want)
		}
	}
}
