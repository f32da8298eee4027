package api

import (
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSignInLimiterKeySize: the per-account bucket's key is of a fixed
// size however long the posted email is; otherwise a client posting
// megabyte-long emails (the body limit) makes the limiter hold a megabyte
// per bucket, up to maxLimiterKeys of them.
func TestSignInLimiterKeySize(t *testing.T) {
	l := newSignInLimiter(RateLimit{Burst: 2, Every: time.Hour}, RateLimit{Burst: 100, Every: time.Hour})
	now := time.Now()
	long := strings.Repeat("a", 1<<20) + "@example.com"
	r := httptest.NewRequest("POST", "/v1/sessions", nil)
	for range 2 {
		if err := l.allow(httptest.NewRecorder(), r, long, now); err != nil {
			t.Fatal(err)
		}
	}
	// The same email in another case and with spaces is the same bucket.
	if err := l.allow(httptest.NewRecorder(), r, " "+strings.ToUpper(long)+" ", now); err == nil {
		t.Fatal("third attempt on the same account allowed")
	}
	if len(l.account.buckets) != 1 {
		t.Fatalf("%d account buckets, want 1", len(l.account.buckets))
	}
	for k := range l.account.buckets {
		if len(k) > 64 {
			t.Fatalf("an account bucket's key holds %d bytes", len(k))
		}
	}
}

// TestKeyedLimiterEvictsInBulk: a limiter at its bound frees a tenth of it
// at once, so that a flood of new keys does not pay a scan of the whole map
// for each one.
func TestKeyedLimiterEvictsInBulk(t *testing.T) {
	l := newKeyedLimiter(RateLimit{Burst: 5, Every: time.Hour})
	now := time.Now()
	for i := range maxLimiterKeys {
		l.take(strconv.Itoa(i), now) // none refills: the sweep drops none as full
	}
	if len(l.buckets) != maxLimiterKeys {
		t.Fatalf("%d buckets, want %d", len(l.buckets), maxLimiterKeys)
	}
	l.take("one more", now)
	if n := len(l.buckets); n > maxLimiterKeys-maxLimiterKeys/10+1 {
		t.Fatalf("%d buckets after the bound was reached, want at most %d", n, maxLimiterKeys-maxLimiterKeys/10+1)
	}
	if _, ok := l.buckets["one more"]; !ok {
		t.Fatal("the new key has no bucket")
	}
}

// TestSignInLimiterIPv6Network: the per-address limit covers an IPv6
// client's /64, not each of its addresses: a client holds the whole /64 and
// would otherwise get a fresh bucket for every try.
func TestSignInLimiterIPv6Network(t *testing.T) {
	l := newSignInLimiter(RateLimit{Burst: 100, Every: time.Hour}, RateLimit{Burst: 2, Every: time.Hour})
	now := time.Now()
	try := func(addr string) error {
		r := httptest.NewRequest("POST", "/v1/sessions", nil)
		r.RemoteAddr = addr
		return l.allow(httptest.NewRecorder(), r, "someone@example.com", now)
	}
	for _, a := range []string{"[2001:db8:1:2::1]:4000", "[2001:db8:1:2:ffff::9]:4001"} {
		if err := try(a); err != nil {
			t.Fatal(a, err)
		}
	}
	if err := try("[2001:db8:1:2:abcd::7%eth0]:4002"); err == nil {
		t.Fatal("a third address of the same /64 was not limited")
	}
	// Another /64, and IPv4 clients (also as IPv4-mapped IPv6), keep
	// buckets of their own.
	for _, a := range []string{"[2001:db8:1:3::1]:4000", "192.0.2.1:4000", "[::ffff:192.0.2.2]:4000"} {
		if err := try(a); err != nil {
			t.Fatal(a, err)
		}
	}
}
