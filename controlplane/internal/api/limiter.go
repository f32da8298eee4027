package api

import (
	"crypto/sha256"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/copelf/copelf/protocol"
)

// RateLimit allows Burst events at once, then one every Every.
type RateLimit struct {
	Burst int
	Every time.Duration
}

// Default sign-in limits: a person who mistypes a password a few times is
// never slowed down; a password guesser gets 10 tries a minute per account
// and 30 a minute per address.
var (
	DefaultSignInPerAccount = RateLimit{Burst: 10, Every: 6 * time.Second}
	DefaultSignInPerAddress = RateLimit{Burst: 30, Every: 2 * time.Second}
)

// maxLimiterKeys bounds a keyedLimiter's map; past it, buckets are dropped
// (oldest sweep first) rather than memory growing without end.
const maxLimiterKeys = 100_000

// keyedLimiter is a token bucket per key (an email, a client address), in
// memory. A bucket that has refilled completely holds no information and is
// dropped at the next sweep.
type keyedLimiter struct {
	limit RateLimit

	mu        sync.Mutex
	buckets   map[string]*rate.Limiter
	lastSweep time.Time
}

func newKeyedLimiter(l RateLimit) *keyedLimiter {
	return &keyedLimiter{limit: l, buckets: map[string]*rate.Limiter{}}
}

// take uses one token of key's bucket at now. When the bucket is empty it
// uses nothing and returns false and how long until a token is back.
func (l *keyedLimiter) take(key string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)
	b, ok := l.buckets[key]
	if !ok {
		b = rate.NewLimiter(rate.Every(l.limit.Every), l.limit.Burst)
		l.buckets[key] = b
	}
	res := b.ReserveN(now, 1)
	if !res.OK() {
		return false, l.limit.Every
	}
	if d := res.DelayFrom(now); d > 0 {
		res.CancelAt(now)
		return false, d
	}
	return true, 0
}

// sweep drops full buckets, at most once per refill period, and keeps the
// map within maxLimiterKeys.
func (l *keyedLimiter) sweep(now time.Time) {
	full := time.Duration(l.limit.Burst) * l.limit.Every
	if now.Sub(l.lastSweep) < full && len(l.buckets) < maxLimiterKeys {
		return
	}
	l.lastSweep = now
	for k, b := range l.buckets {
		if b.TokensAt(now) >= float64(l.limit.Burst) {
			delete(l.buckets, k)
		}
	}
	// Evict down to 90% of the bound, not one key below it: otherwise,
	// once full, every new key would pay for a scan of the whole map.
	for k := range l.buckets {
		if len(l.buckets) < maxLimiterKeys-maxLimiterKeys/10 {
			break
		}
		delete(l.buckets, k)
	}
}

// signInLimiter bounds sign-in attempts per account (the email, whatever
// its case) and per client address.
type signInLimiter struct {
	account, address *keyedLimiter
}

func newSignInLimiter(perAccount, perAddress RateLimit) *signInLimiter {
	if perAccount.Burst <= 0 || perAccount.Every <= 0 {
		perAccount = DefaultSignInPerAccount
	}
	if perAddress.Burst <= 0 || perAddress.Every <= 0 {
		perAddress = DefaultSignInPerAddress
	}
	return &signInLimiter{account: newKeyedLimiter(perAccount), address: newKeyedLimiter(perAddress)}
}

// allow counts one attempt; past a limit it sets Retry-After and returns
// rate_limited (details.reason "sign_in_attempts", details.scope "account"
// or "address", details.retryAfterSeconds).
func (l *signInLimiter) allow(w http.ResponseWriter, r *http.Request, email string, now time.Time) error {
	scope := "address"
	ok, wait := l.address.take(clientAddress(r), now)
	if ok {
		scope = "account"
		ok, wait = l.account.take(accountKey(email), now)
	}
	if ok {
		return nil
	}
	secs := int64(math.Ceil(wait.Seconds()))
	if secs < 1 {
		secs = 1
	}
	w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
	return protocol.Errorf(protocol.CodeRateLimited, "Too many sign-in attempts; retry in %d s.", secs).
		With("reason", "sign_in_attempts").With("scope", scope).With("retryAfterSeconds", secs)
}

// accountKey is the account limiter's key for an email: a fixed-size
// digest of it, whatever its case, so that a client posting megabyte-long
// emails cannot make each bucket's key hold a megabyte.
func accountKey(email string) string {
	sum := sha256.Sum256([]byte(strings.ToLower(strings.TrimSpace(email))))
	return string(sum[:])
}

// clientAddress is the request's peer address without its port; for IPv6,
// its /64 network, which one client holds whole (one address a try would
// otherwise escape the limit). Headers such as X-Forwarded-For are not
// trusted: any client can set them.
func clientAddress(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	if a, err := netip.ParseAddr(host); err == nil && a.Unmap().Is6() {
		if p, err := a.WithZone("").Prefix(64); err == nil {
			return p.String()
		}
	}
	return host
}
