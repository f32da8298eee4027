package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/copelf/copelf/protocol"
)

// Reasons carried in details.reason that the agent acts on.
const (
	reasonUnsupportedProtocol = "unsupported_protocol"
	reasonSessionReplaced     = "session_replaced"
	reasonRunFinished         = "run_finished"
	reasonSequenceGap         = "sequence_gap"
)

// retryable decides, in this one place, whether a failed connection or
// artifact upload may succeed if tried again later. Network failures,
// dropped connections and the server's transient codes are retryable; what
// the server refused on its merits is not:
//
//   - unauthenticated (a bad, revoked or non-agent token), forbidden (an
//     origin or account the server refuses): permanent.
//   - bad_request (a hello the server does not take, e.g. reason
//     unsupported_protocol or subprotocol_required; a malformed upload):
//     permanent — this build and the server disagree.
//   - not_found, unprocessable_entity: permanent (wrong -server URL, a run
//     or artifact name the server rejects).
//   - conflict: permanent (lease_lost on an upload) except reason
//     session_replaced (another connection of this agent id took over).
//   - internal, timeout, rate_limited and every non-catalog error: retryable.
func retryable(err error) bool {
	if err == nil {
		return false
	}
	var pe *protocol.Error
	if !errors.As(err, &pe) {
		return !errors.Is(err, errConfig)
	}
	switch pe.Code {
	case protocol.CodeInternal, protocol.CodeTimeout, protocol.CodeRateLimited:
		return true
	case protocol.CodeConflict:
		return reasonOf(pe) == reasonSessionReplaced
	}
	return false
}

// classify wraps err for backoff: permanent errors stop retrying.
func classify(err error) error {
	if err != nil && !retryable(err) {
		return backoff.Permanent(err)
	}
	return err
}

// errConfig marks configuration errors (never retried).
var errConfig = errors.New("agent: invalid configuration")

func reasonOf(e *protocol.Error) string {
	if e == nil {
		return ""
	}
	s, _ := e.Details["reason"].(string)
	return s
}

// newBackoff is the reconnect policy: exponential with ±50 % jitter from
// min up to max, forever, ending with ctx.
func newBackoff(min, max time.Duration) *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(min),
		backoff.WithMaxInterval(max),
		backoff.WithRandomizationFactor(0.5),
		backoff.WithMultiplier(2),
		backoff.WithMaxElapsedTime(0),
	)
}

// responseError turns a non-2xx HTTP response (a refused websocket handshake
// or upload) into a *protocol.Error: the server's envelope when it sent one,
// otherwise a code chosen by status.
func responseError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var env protocol.Error
	if json.Unmarshal(body, &env) == nil && env.Code.Valid() {
		return &env
	}
	var code protocol.Code
	switch s := resp.StatusCode; {
	case s == http.StatusUnauthorized:
		code = protocol.CodeUnauthenticated
	case s == http.StatusForbidden:
		code = protocol.CodeForbidden
	case s == http.StatusNotFound:
		code = protocol.CodeNotFound
	case s == http.StatusRequestTimeout:
		code = protocol.CodeTimeout
	case s == http.StatusTooManyRequests:
		code = protocol.CodeRateLimited
	case s >= 400 && s < 500:
		code = protocol.CodeBadRequest
	default:
		code = protocol.CodeInternal
	}
	return protocol.Errorf(code, "The server answered HTTP %d.", resp.StatusCode).With("status", resp.StatusCode)
}

// frameError is the error an error frame carries.
func frameError(f *protocol.ErrorFrame) *protocol.Error {
	return &protocol.Error{Code: f.Code, Message: f.Message, Details: f.Details}
}

// permanentError is what Run returns when it gives up.
type permanentError struct {
	server string
	err    error
}

func (e *permanentError) Error() string {
	return fmt.Sprintf("agent: %s refused the agent: %v", e.server, e.err)
}
func (e *permanentError) Unwrap() error { return e.err }
