package protocol

import (
	"errors"
	"fmt"
	"net/http"
)

// Code is a typed error code from the product's catalog (API.md §2). Codes are
// stable strings that clients switch on; messages are for humans and may change.
type Code string

// The error catalog. Every error the control plane returns, over HTTP or in an
// agent frame, carries one of these codes.
const (
	CodeUnauthenticated             Code = "unauthenticated"
	CodeForbidden                   Code = "forbidden"
	CodeWorkflowNotFound            Code = "workflow_not_found"
	CodeWorkflowNotReady            Code = "workflow_not_ready"
	CodeWorkflowAlreadyRunning      Code = "workflow_already_running"
	CodeWorkflowHasActiveRequests   Code = "workflow_has_active_requests"
	CodeBatchNotFound               Code = "batch_not_found"
	CodeBatchAlreadyCompleted       Code = "batch_already_completed"
	CodeInsufficientCredits         Code = "insufficient_credits"
	CodeCheckoutFailed              Code = "checkout_failed"
	CodeNoStripeCustomer            Code = "no_stripe_customer"
	CodePriceNotFound               Code = "price_not_found"
	CodeCouponNotFound              Code = "coupon_not_found"
	CodeCouponInactive              Code = "coupon_inactive"
	CodeCouponExpired               Code = "coupon_expired"
	CodeCouponMaxRedemptionsReached Code = "coupon_max_redemptions_reached"
	CodeCouponAlreadyRedeemed       Code = "coupon_already_redeemed"
	CodeBadRequest                  Code = "bad_request"
	CodeUnprocessableEntity         Code = "unprocessable_entity"
	CodeNotFound                    Code = "not_found"
	CodeConflict                    Code = "conflict"
	CodeTimeout                     Code = "timeout"
	CodeInternal                    Code = "internal"
	CodeRateLimited                 Code = "rate_limited"
)

type codeInfo struct {
	status  int
	message string
}

var catalog = map[Code]codeInfo{
	CodeUnauthenticated:             {http.StatusUnauthorized, "Authentication is required."},
	CodeForbidden:                   {http.StatusForbidden, "You are not allowed to do this."},
	CodeWorkflowNotFound:            {http.StatusNotFound, "The requested workflow does not exist."},
	CodeWorkflowNotReady:            {http.StatusBadRequest, "The workflow is not ready to run."},
	CodeWorkflowAlreadyRunning:      {http.StatusConflict, "A run or batch is already active for this workflow."},
	CodeWorkflowHasActiveRequests:   {http.StatusConflict, "The workflow has pending approvals or an active run."},
	CodeBatchNotFound:               {http.StatusNotFound, "The requested batch does not exist."},
	CodeBatchAlreadyCompleted:       {http.StatusConflict, "The batch has already completed."},
	CodeInsufficientCredits:         {http.StatusBadRequest, "Not enough credits are available."},
	CodeCheckoutFailed:              {http.StatusBadRequest, "The checkout could not be completed."},
	CodeNoStripeCustomer:            {http.StatusBadRequest, "No billing customer is linked to this account."},
	CodePriceNotFound:               {http.StatusNotFound, "The requested price does not exist."},
	CodeCouponNotFound:              {http.StatusNotFound, "The coupon does not exist."},
	CodeCouponInactive:              {http.StatusBadRequest, "The coupon is not active."},
	CodeCouponExpired:               {http.StatusBadRequest, "The coupon has expired."},
	CodeCouponMaxRedemptionsReached: {http.StatusBadRequest, "The coupon has no redemptions left."},
	CodeCouponAlreadyRedeemed:       {http.StatusBadRequest, "This account has already redeemed the coupon."},
	CodeBadRequest:                  {http.StatusBadRequest, "The request is malformed."},
	CodeUnprocessableEntity:         {http.StatusUnprocessableEntity, "The request contains invalid values."},
	CodeNotFound:                    {http.StatusNotFound, "The requested resource does not exist."},
	CodeConflict:                    {http.StatusConflict, "The request conflicts with the current state."},
	CodeTimeout:                     {http.StatusRequestTimeout, "The operation took too long."},
	CodeInternal:                    {http.StatusInternalServerError, "An internal error occurred."},
	CodeRateLimited:                 {http.StatusTooManyRequests, "Too many requests; retry later."},
}

// Codes returns every code of the catalog.
func Codes() []Code {
	out := make([]Code, 0, len(catalog))
	for c := range catalog {
		out = append(out, c)
	}
	return out
}

// Valid reports whether c is in the catalog.
func (c Code) Valid() bool { _, ok := catalog[c]; return ok }

// HTTPStatus is the HTTP status that carries c. Unknown codes map to 500.
func (c Code) HTTPStatus() int {
	if info, ok := catalog[c]; ok {
		return info.status
	}
	return http.StatusInternalServerError
}

// DefaultMessage is the human message used when an error has none of its own.
func (c Code) DefaultMessage() string {
	if info, ok := catalog[c]; ok {
		return info.message
	}
	return catalog[CodeInternal].message
}

// Error is a typed error from the catalog. It is also the wire envelope of every
// HTTP error response and of agent `error` frames (with RequestID or RunID set).
type Error struct {
	Code      Code           `json:"code"`
	Message   string         `json:"message"`
	RequestID string         `json:"requestId,omitempty"`
	Details   map[string]any `json:"details"`
}

// Errorf returns an *Error with code c and a formatted message; an empty format
// takes the code's default message.
func Errorf(c Code, format string, args ...any) *Error {
	msg := c.DefaultMessage()
	if format != "" {
		msg = fmt.Sprintf(format, args...)
	}
	return &Error{Code: c, Message: msg}
}

// NewError returns an *Error with the code's default message.
func NewError(c Code) *Error { return &Error{Code: c, Message: c.DefaultMessage()} }

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// With returns a copy of e with details key set to value.
func (e *Error) With(key string, value any) *Error {
	cp := *e
	cp.Details = make(map[string]any, len(e.Details)+1)
	for k, v := range e.Details {
		cp.Details[k] = v
	}
	cp.Details[key] = value
	return &cp
}

// Is lets errors.Is match on the code alone: errors.Is(err, NewError(CodeConflict)).
func (e *Error) Is(target error) bool {
	var t *Error
	if errors.As(target, &t) {
		return t.Code == e.Code
	}
	return false
}

// ErrorCode returns the catalog code of err, CodeInternal when err carries none.
func ErrorCode(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) && e.Code.Valid() {
		return e.Code
	}
	return CodeInternal
}

// FieldProblem names one invalid field in details.fields.
type FieldProblem struct {
	Field   string `json:"field"`
	Problem string `json:"problem"`
}

// FieldErrors builds an error with details.fields; nil when problems is empty.
func FieldErrors(c Code, message string, problems []FieldProblem) *Error {
	if len(problems) == 0 {
		return nil
	}
	return Errorf(c, "%s", message).With("fields", problems)
}
