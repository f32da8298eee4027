// Package ids makes the opaque, prefixed identifiers and secret tokens of the API.
package ids

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"encoding/hex"
	"regexp"
)

// Prefixes of resource identifiers (API.md §1).
const (
	User     = "usr"
	Token    = "tok"
	Workflow = "wf"
	Run      = "run"
	Batch    = "bat"
	Approval = "apr"
	Agent    = "agt"
	Coupon   = "cpn"
	Request  = "req"
	Lease    = "lse"
	Ledger   = "led"
	Hold     = "hld"
	Session  = "ses"
)

var enc = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// New returns prefix_ followed by 128 random bits (26 base32 characters).
func New(prefix string) string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go ≥ 1.24)
	return prefix + "_" + enc.EncodeToString(b[:])
}

// Token kinds carry a recognisable prefix so that leaked tokens can be found by
// secret scanners: copelf_<kind>_<43 characters of base64url, 256 bits>.
func NewToken(kind string) string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return "copelf_" + kind + "_" + base64.RawURLEncoding.EncodeToString(b[:])
}

// HashToken is how tokens are stored: SHA-256 of the whole token, hex. A token
// has 256 random bits, so a fast hash is enough; no salt is needed.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

var requestIDRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidRequestID reports whether an incoming X-Request-Id is kept as is.
func ValidRequestID(s string) bool { return requestIDRe.MatchString(s) }
