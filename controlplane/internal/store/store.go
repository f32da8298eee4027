// Package store defines the control plane's persistence contract: the domain
// records and one Store interface that every database implements. Rules that
// must hold exactly once (one active run per workflow, credit holds, no
// overspend, approval resolution) are enforced inside the implementation's
// transactions by guarded updates, never by a read followed by a write in the
// caller. Domain failures are returned as *protocol.Error values from the
// catalog; anything else is an internal error.
//
// The conformance suite in storetest runs against every implementation.
package store

import (
	"context"
	"encoding/json"
	"time"

	"github.com/copelf/copelf/protocol"
)

// Role of a user.
type Role string

const (
	RoleMember   Role = "member"
	RoleOperator Role = "operator"
	RoleAdmin    Role = "admin"
)

// Valid reports whether r is a known role.
func (r Role) Valid() bool { return r == RoleMember || r == RoleOperator || r == RoleAdmin }

// AtLeast reports whether r grants everything other grants.
func (r Role) AtLeast(other Role) bool { return roleRank[r] >= roleRank[other] }

var roleRank = map[Role]int{RoleMember: 1, RoleOperator: 2, RoleAdmin: 3}

// Plan of an account.
type Plan string

const (
	PlanFree Plan = "free"
	PlanPro  Plan = "pro"
)

// Valid reports whether p is a known plan.
func (p Plan) Valid() bool { return p == PlanFree || p == PlanPro }

// User is a person who signs in. In this version an account is a user: the
// account id is the user id.
type User struct {
	ID           string    `json:"id"`
	Email        string    `json:"email"`
	PasswordHash string    `json:"-"`
	Role         Role      `json:"role"`
	Plan         Plan      `json:"plan"`
	CreatedAt    time.Time `json:"createdAt"`
}

// AccountID is the id of the account the user belongs to.
func (u *User) AccountID() string { return u.ID }

// TokenKind says what a token may be used for.
type TokenKind string

const (
	TokenSession  TokenKind = "session"
	TokenAPI      TokenKind = "api"
	TokenAgent    TokenKind = "agent"
	TokenAnalyzer TokenKind = "analyzer"
)

// Token is a bearer credential. Only its hash is stored.
type Token struct {
	ID        string     `json:"id"`
	UserID    string     `json:"-"`
	Kind      TokenKind  `json:"kind"`
	Name      string     `json:"name"`
	Hash      string     `json:"-"`
	CreatedAt time.Time  `json:"createdAt"`
	ExpiresAt *time.Time `json:"expiresAt"`
	RevokedAt *time.Time `json:"-"`
}

// Workflow is a recorded browser task.
type Workflow struct {
	ID         string                  `json:"id"`
	AccountID  string                  `json:"accountId"`
	Name       string                  `json:"name"`
	Status     protocol.WorkflowStatus `json:"status"`
	Definition json.RawMessage         `json:"definition"`
	// ActiveRunID / ActiveBatchID hold the workflow's single active request.
	ActiveRunID   string     `json:"-"`
	ActiveBatchID string     `json:"-"`
	CreatedAt     time.Time  `json:"createdAt"`
	UpdatedAt     time.Time  `json:"updatedAt"`
	DeletedAt     *time.Time `json:"-"`
	// Video is the recording the workflow was made from; nil for a
	// workflow created from a definition.
	Video *WorkflowVideo `json:"video,omitempty"`
	// Analysis is the latest analysis of the video; nil when none ran.
	Analysis *WorkflowAnalysis `json:"analysis,omitempty"`
}

// WorkflowVideo is a workflow's recording, kept in the video store.
type WorkflowVideo struct {
	Key        string `json:"-"` // the video store's key
	SizeBytes  int64  `json:"sizeBytes"`
	DurationMs int64  `json:"durationMs"`
	Container  string `json:"container"` // mp4, mov, webm, matroska
}

// WorkflowAnalysis is where the analysis of a workflow's video stands. It
// starts when the video is uploaded (status analyzing), may be claimed by
// one analyzer at a time, and finishes with a definition (ready) or an
// error (analysis_failed), posted by the claimant or set by the analysis
// timeout (error code "timeout").
type WorkflowAnalysis struct {
	StartedAt  time.Time      `json:"startedAt"`
	FinishedAt *time.Time     `json:"finishedAt,omitempty"`
	Error      *AnalysisError `json:"error,omitempty"`
	// ClaimID names the current claim; ClaimedBy is the claimant's token.
	ClaimID   string     `json:"-"`
	ClaimedBy string     `json:"-"`
	ClaimedAt *time.Time `json:"-"`
}

// AnalysisError is why an analysis failed.
type AnalysisError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// AnalysisTimeoutCode is the error code of an analysis that ran past the
// analysis timeout.
const AnalysisTimeoutCode = "timeout"

// StepRecord is the progress of one step of a run.
type StepRecord struct {
	Index      int                 `json:"index"`
	Type       protocol.StepType   `json:"type"`
	Status     protocol.StepStatus `json:"status"`
	StartedAt  *time.Time          `json:"startedAt,omitempty"`
	DurationMs *int64              `json:"durationMs,omitempty"`
	Attempts   int                 `json:"attempts,omitempty"`
	Error      *protocol.Error     `json:"error,omitempty"`
}

// Run is one execution of a workflow.
type Run struct {
	ID         string             `json:"id"`
	AccountID  string             `json:"accountId"`
	WorkflowID string             `json:"workflowId"`
	BatchID    string             `json:"batchId,omitempty"`
	Iteration  *int               `json:"iteration,omitempty"`
	Status     protocol.RunStatus `json:"status"`
	Inputs     map[string]any     `json:"inputs"`
	// SecretNames are the inputs of type secret when the run was created;
	// their values are never shown.
	SecretNames       []string             `json:"-"`
	Outputs           map[string]any       `json:"outputs"`
	Error             *protocol.Error      `json:"error,omitempty"`
	AgentID           string               `json:"agentId,omitempty"`
	Attempt           int                  `json:"attempt"`
	LeaseID           string               `json:"-"`
	Steps             []StepRecord         `json:"steps"`
	QueueReason       protocol.QueueReason `json:"-"`
	QueueSince        *time.Time           `json:"-"`
	Labels            map[string]string    `json:"labels,omitempty"`
	TimeoutMs         int64                `json:"timeoutMs,omitempty"`
	QueueTimeoutMs    int64                `json:"queueTimeoutMs,omitempty"`
	CostReserved      int64                `json:"-"`
	CostCharged       int64                `json:"-"`
	QueuedAt          time.Time            `json:"queuedAt"`
	StartedAt         *time.Time           `json:"startedAt,omitempty"`
	FinishedAt        *time.Time           `json:"finishedAt,omitempty"`
	CancelRequestedAt *time.Time           `json:"-"`
	LeaseExpiresAt    *time.Time           `json:"-"`
	AssignedAt        *time.Time           `json:"-"`
}

// Approval is a human decision a run waits for.
type Approval struct {
	ID         string                  `json:"id"`
	AccountID  string                  `json:"accountId"`
	RunID      string                  `json:"runId"`
	WorkflowID string                  `json:"workflowId"`
	Step       int                     `json:"step"`
	Message    string                  `json:"message"`
	Status     protocol.ApprovalStatus `json:"status"`
	CreatedAt  time.Time               `json:"createdAt"`
	ResolvedAt *time.Time              `json:"resolvedAt,omitempty"`
	ResolvedBy string                  `json:"resolvedBy,omitempty"`
	Comment    string                  `json:"comment,omitempty"`
}

// Batch runs a workflow once per iteration.
type Batch struct {
	ID            string               `json:"id"`
	AccountID     string               `json:"accountId"`
	WorkflowID    string               `json:"workflowId"`
	Status        protocol.BatchStatus `json:"status"`
	Concurrency   int                  `json:"concurrency"`
	StopOnFailure bool                 `json:"stopOnFailure"`
	Iterations    []BatchIteration     `json:"iterations"`
	// SecretNames are the inputs of type secret when the batch was created;
	// they stay redacted whatever the definition says later.
	SecretNames []string   `json:"-"`
	CreatedAt   time.Time  `json:"createdAt"`
	StartedAt   *time.Time `json:"startedAt,omitempty"`
	FinishedAt  *time.Time `json:"finishedAt,omitempty"`
}

// BatchIteration is one row of a batch. Status is "pending" before the batch
// starts, then its run's status. Outputs are the run's outputs.
type BatchIteration struct {
	Index   int             `json:"index"`
	Inputs  map[string]any  `json:"inputs"`
	RunID   string          `json:"runId,omitempty"`
	Status  string          `json:"status"`
	Outputs map[string]any  `json:"-"`
	Error   *protocol.Error `json:"-"`
}

// Credits is an account's balance. Available = Balance − Held ≥ 0 always.
type Credits struct {
	Balance   int64 `json:"balance"`
	Held      int64 `json:"held"`
	Available int64 `json:"available"`
}

// Ledger entry kinds.
const (
	LedgerGrant     = "grant"      // admin grant or adjustment
	LedgerRunCharge = "run_charge" // a run's hold captured when it started
	LedgerRunRefund = "run_refund" // a started run that ended by agent_lost/browser_crashed/internal
	LedgerCoupon    = "coupon"     // coupon redemption
	LedgerPurchase  = "purchase"   // paid checkout session
)

// Coupon grants credits to each account that redeems it, once per account,
// at most MaxRedemptions times in all. Code is stored normalised
// (coupons.Normalize), so codes are case-insensitive.
type Coupon struct {
	ID             string     `json:"id"`
	Code           string     `json:"code"`
	Credits        int64      `json:"credits"`
	MaxRedemptions *int64     `json:"maxRedemptions"`
	Redeemed       int64      `json:"redeemed"`
	StartsAt       *time.Time `json:"startsAt"`
	ExpiresAt      *time.Time `json:"expiresAt"`
	Active         bool       `json:"active"`
	CreatedAt      time.Time  `json:"createdAt"`
}

// CouponRedemption is the outcome of a redemption: the credits granted and
// the account's balance after them.
type CouponRedemption struct {
	CouponID string       `json:"-"`
	Entry    *LedgerEntry `json:"-"`
	Credited int64        `json:"credited"`
	Balance  int64        `json:"balance"`
}

// CheckoutStatus is where a Stripe Checkout Session stands for us. Pending
// moves on to paid or failed; failed may still become paid (money received
// wins); nothing leaves paid. Credits are granted on the move to paid, once.
type CheckoutStatus string

const (
	CheckoutPending CheckoutStatus = "pending" // created, or completed without payment yet
	CheckoutPaid    CheckoutStatus = "paid"    // paid: the pack's credits are granted
	CheckoutFailed  CheckoutStatus = "failed"  // the asynchronous payment failed
)

// Valid reports whether s is a known checkout status.
func (s CheckoutStatus) Valid() bool {
	return s == CheckoutPending || s == CheckoutPaid || s == CheckoutFailed
}

// Next is the status of a session at s once Stripe reports to, whatever
// the order reports arrive in: paid is final, a payment wins over a failure,
// and a failure is not undone by a late "still pending".
func (s CheckoutStatus) Next(to CheckoutStatus) CheckoutStatus {
	switch {
	case s == CheckoutPaid || !to.Valid():
		return s
	case to == CheckoutPaid:
		return to
	case s == CheckoutFailed:
		return s
	}
	return to
}

// CheckoutSession is the record of a Stripe Checkout Session that buys a
// credit pack. Credits is the pack's size when the session was first seen.
type CheckoutSession struct {
	ID        string         `json:"sessionId"`
	AccountID string         `json:"accountId"`
	PriceID   string         `json:"priceId"`
	Credits   int64          `json:"credits"`
	Status    CheckoutStatus `json:"status"`
	CreatedAt time.Time      `json:"createdAt"`
	UpdatedAt time.Time      `json:"updatedAt"`
}

// CheckoutResult says what a CheckoutUpdate did.
type CheckoutResult struct {
	// Session is the record after the update.
	Session *CheckoutSession
	// Entry is the session's purchase entry when it is paid (whoever
	// granted it); nil otherwise.
	Entry *LedgerEntry
	// Granted is true for the one call that granted the credits.
	Granted bool
}

// LedgerEntry is one append-only movement of credits.
type LedgerEntry struct {
	ID         string    `json:"id"`
	AccountID  string    `json:"accountId"`
	Kind       string    `json:"kind"`
	Amount     int64     `json:"amount"`
	RunID      string    `json:"runId,omitempty"`
	CouponCode string    `json:"couponCode,omitempty"`
	Reason     string    `json:"reason,omitempty"`
	CreatedAt  time.Time `json:"createdAt"`
}

// Page selects a page of a list. Cursor is opaque (from a previous NextCursor).
type Page struct {
	Limit  int
	Cursor string
}

// IdempotencyRecord is a stored response for an Idempotency-Key.
type IdempotencyRecord struct {
	AccountID   string
	Key         string
	RequestHash string
	Done        bool
	Status      int
	Body        []byte
	CreatedAt   time.Time
}

// Params of the operations.
type (
	UserCreateParams struct {
		Email        string
		PasswordHash string
		Role         Role
		Plan         Plan
	}
	TokenCreateParams struct {
		UserID    string
		Kind      TokenKind
		Name      string
		Hash      string
		ExpiresAt *time.Time
	}
	WorkflowCreateParams struct {
		AccountID  string
		Name       string
		Status     protocol.WorkflowStatus
		Definition json.RawMessage
		// Video is the recording of an analyzing workflow; its analysis
		// starts at creation.
		Video *WorkflowVideo
	}
	// WorkflowVideoParams gives a workflow a new video.
	WorkflowVideoParams struct {
		ID    string
		Video WorkflowVideo
	}
	WorkflowAnalysisClaimParams struct {
		ID      string
		ClaimID string // new, unique
		By      string // the claimant's token id
	}
	// WorkflowAnalysisFinishParams ends an analysis with a definition or an
	// error. The claim is named by ClaimID, or else by the claimant (By).
	WorkflowAnalysisFinishParams struct {
		ID         string
		ClaimID    string
		By         string
		Definition json.RawMessage
		Error      *AnalysisError
	}
	WorkflowUpdateParams struct {
		ID         string
		Name       *string
		Definition json.RawMessage // nil: unchanged
	}
	RunCreateParams struct {
		AccountID      string
		WorkflowID     string
		Inputs         map[string]any
		SecretNames    []string
		Steps          []StepRecord
		Labels         map[string]string
		TimeoutMs      int64
		QueueTimeoutMs int64
		Cost           int64
	}
	RunListParams struct {
		AccountID  string // empty: every account (operators)
		WorkflowID string
		BatchID    string
		Status     protocol.RunStatus
		Page
	}
	AgentUpsertParams struct {
		AccountID string
		ClientID  string
		Name      string
		Kind      string
		Version   string
		Labels    map[string]string
	}
	RunAssignParams struct {
		RunID        string
		AgentID      string
		LeaseID      string
		LeaseExpires time.Time
	}
	RunEventParams struct {
		RunID      string
		LeaseID    string
		Seq        int64
		Kind       string // a protocol.EventKind
		Step       *int
		Status     string
		DurationMs *int64
		Attempts   int
		// Output is an extract step's value, stored under OutputName.
		Output     any
		OutputName string
		Error      *protocol.Error
		Outputs    map[string]any
		Message    string
		// Body is the event as recorded in the run's history (secrets redacted).
		Body json.RawMessage
	}
	RunStartParams struct {
		ID           string
		AgentID      string
		LeaseID      string
		LeaseExpires time.Time // zero: unchanged
	}
	RunFinishParams struct {
		ID      string
		LeaseID string // when set, the run's current lease must match (else conflict, lease_lost)
		Status  protocol.RunStatus
		Error   *protocol.Error
		Outputs map[string]any // nil: unchanged
		Steps   []StepRecord   // nil: unchanged
	}
	BatchCreateParams struct {
		AccountID     string
		WorkflowID    string
		Concurrency   int
		StopOnFailure bool
		Iterations    []map[string]any
		SecretNames   []string
	}
	BatchStartParams struct {
		ID          string
		Steps       []StepRecord
		SecretNames []string
		TimeoutMs   int64
		Cost        int64
	}
	ApprovalCreateParams struct {
		RunID   string
		Step    int
		Message string
	}
	ApprovalResolveParams struct {
		ID       string
		Approved bool
		By       string
		Comment  string
	}
	ApprovalListParams struct {
		AccountID string // empty: every account
		RunID     string // empty: every run
		Status    protocol.ApprovalStatus
		Page
	}
	CreditsGrantParams struct {
		AccountID string
		Amount    int64
		Kind      string
		Reason    string
		// Key makes the grant happen at most once (e.g. "admin:<requestKey>").
		// Empty: always a new entry.
		Key string
	}
	CouponCreateParams struct {
		Code           string // normalised by the store
		Credits        int64
		MaxRedemptions *int64
		StartsAt       *time.Time
		ExpiresAt      *time.Time
		Active         bool
	}
	CouponRedeemParams struct {
		Code      string // any case
		AccountID string
	}
	// CheckoutUpdateParams records what Stripe says of a session. AccountID,
	// PriceID and Credits are used only when the session is not recorded
	// yet; a recorded session keeps its own.
	CheckoutUpdateParams struct {
		SessionID string
		AccountID string
		PriceID   string
		Credits   int64
		Status    CheckoutStatus
	}
)

// Store is the control plane's persistence. Every method takes a context and
// is safe for concurrent use.
type Store interface {
	UserCreate(ctx context.Context, p UserCreateParams) (*User, error)
	UserGet(ctx context.Context, id string) (*User, error)
	UserGetByEmail(ctx context.Context, email string) (*User, error)

	TokenCreate(ctx context.Context, p TokenCreateParams) (*Token, error)
	// TokenGetByHash returns the token and its user; revoked tokens are not found.
	TokenGetByHash(ctx context.Context, hash string) (*Token, *User, error)
	TokenList(ctx context.Context, userID string) ([]*Token, error)
	TokenRevoke(ctx context.Context, userID, id string) error

	WorkflowCreate(ctx context.Context, p WorkflowCreateParams) (*Workflow, error)
	// WorkflowGet returns deleted workflows too (DeletedAt set); callers decide.
	WorkflowGet(ctx context.Context, id string) (*Workflow, error)
	WorkflowList(ctx context.Context, accountID string, page Page) ([]*Workflow, string, error)
	// WorkflowUpdate and WorkflowDelete refuse with workflow_has_active_requests
	// while approvals are pending or a run or batch is active.
	WorkflowUpdate(ctx context.Context, p WorkflowUpdateParams) (*Workflow, error)
	WorkflowDelete(ctx context.Context, id string) error

	// Recorded workflows (API.md §4). WorkflowAnalysisWaiting lists the
	// live workflows that are analyzing and unclaimed, oldest analysis
	// first.
	WorkflowAnalysisWaiting(ctx context.Context, page Page) ([]*Workflow, string, error)
	// WorkflowAnalysisClaim claims an analyzing, unclaimed workflow for one
	// analyzer, once: a claimed one is conflict (details.reason
	// "already_claimed"), one in another state conflict (details.status).
	WorkflowAnalysisClaim(ctx context.Context, p WorkflowAnalysisClaimParams) (*Workflow, error)
	// WorkflowAnalysisFinish ends the current claim's analysis: a
	// definition makes the workflow ready, an error analysis_failed. A
	// workflow no longer analyzing, or claimed by another claim, is conflict.
	WorkflowAnalysisFinish(ctx context.Context, p WorkflowAnalysisFinishParams) (*Workflow, error)
	// WorkflowAnalysisExpire fails every live workflow still analyzing an
	// analysis started at or before startedBefore, with error code
	// "timeout", and returns their ids. Safe to run from several places.
	WorkflowAnalysisExpire(ctx context.Context, startedBefore time.Time) ([]string, error)
	// WorkflowVideoReplace gives a ready or analysis_failed workflow a new
	// video and restarts its analysis; it returns the workflow and the key
	// of the video it replaced ("" when none). An analyzing workflow is
	// conflict (details.status); active requests refuse as WorkflowUpdate.
	WorkflowVideoReplace(ctx context.Context, p WorkflowVideoParams) (*Workflow, string, error)
	// WorkflowVideoKeysInUse returns which of keys are the video of a live
	// (not deleted) workflow.
	WorkflowVideoKeysInUse(ctx context.Context, keys []string) (map[string]bool, error)

	// RunCreate takes the workflow's active slot (workflow_already_running),
	// holds the cost (insufficient_credits) and queues the run, atomically.
	RunCreate(ctx context.Context, p RunCreateParams) (*Run, error)
	RunGet(ctx context.Context, id string) (*Run, error)
	RunList(ctx context.Context, p RunListParams) ([]*Run, string, error)
	// RunCancel cancels a queued run at once (hold released); a running run is
	// marked cancel-requested. A terminal run is conflict.
	RunCancel(ctx context.Context, id string) (*Run, error)
	// RunStart moves a queued run to running on an agent and captures its
	// hold: the run's cost is charged from here on.
	RunStart(ctx context.Context, p RunStartParams) (*Run, error)
	// RunFinish moves a non-terminal run to a terminal state. A run that never
	// started has its hold released; a started run that ends by agent_lost,
	// browser_crashed or internal is refunded. Guarded by LeaseID when set.
	RunFinish(ctx context.Context, p RunFinishParams) (*Run, error)

	ApprovalCreate(ctx context.Context, p ApprovalCreateParams) (*Approval, error)
	ApprovalGet(ctx context.Context, id string) (*Approval, error)
	ApprovalList(ctx context.Context, p ApprovalListParams) ([]*Approval, string, error)
	// ApprovalResolve moves a pending approval on exactly once (else conflict)
	// and its run with it: approved → running, rejected → failed.
	ApprovalResolve(ctx context.Context, p ApprovalResolveParams) (*Approval, error)

	BatchCreate(ctx context.Context, p BatchCreateParams) (*Batch, error)
	BatchGet(ctx context.Context, id string) (*Batch, error)
	BatchList(ctx context.Context, accountID string, page Page) ([]*Batch, string, error)
	// BatchStart queues every iteration's run and holds credits for all.
	BatchStart(ctx context.Context, p BatchStartParams) (*Batch, error)
	BatchCancel(ctx context.Context, id string) (*Batch, error)

	CreditsGet(ctx context.Context, accountID string) (Credits, error)
	CreditsGrant(ctx context.Context, p CreditsGrantParams) (*LedgerEntry, error)
	LedgerList(ctx context.Context, accountID string, page Page) ([]*LedgerEntry, string, error)
	// LedgerSum is the sum of the account's entries (for audits and tests).
	LedgerSum(ctx context.Context, accountID string) (int64, error)

	// CouponCreate creates a coupon; a code in use (in any case) is conflict.
	CouponCreate(ctx context.Context, p CouponCreateParams) (*Coupon, error)
	// CouponGet finds a coupon by code, in any case (coupon_not_found).
	CouponGet(ctx context.Context, code string) (*Coupon, error)
	// CouponList lists coupons, newest first.
	CouponList(ctx context.Context, page Page) ([]*Coupon, string, error)
	// CouponDeactivate switches a coupon off (coupon_not_found); switching
	// off an inactive coupon changes nothing.
	CouponDeactivate(ctx context.Context, code string) (*Coupon, error)
	// CouponRedeem grants the coupon's credits to the account in the same
	// transaction that records the redemption. It fails with the first of
	// coupon_not_found, coupon_inactive, coupon_expired,
	// coupon_already_redeemed (one redemption per account, a unique
	// constraint) and coupon_max_redemptions_reached (a guarded increment).
	CouponRedeem(ctx context.Context, p CouponRedeemParams) (*CouponRedemption, error)

	// AccountStripeCustomer returns the Stripe customer linked to the
	// account, "" when none is.
	AccountStripeCustomer(ctx context.Context, accountID string) (string, error)
	// AccountStripeCustomerLink links customerID to the account unless one is
	// linked already, and returns the linked customer: the first link wins.
	AccountStripeCustomerLink(ctx context.Context, accountID, customerID string) (string, error)
	// CheckoutUpdate records a session's status and, on the move to paid,
	// grants its credits once (ledger key "stripe:checkout:<sessionId>", a
	// unique constraint): any number of calls, in any order, grant once.
	// A status the session may not move to is kept as it was (see
	// CheckoutStatus). An unknown account is not_found, and nothing is written.
	CheckoutUpdate(ctx context.Context, p CheckoutUpdateParams) (*CheckoutResult, error)
	// CheckoutGet returns a recorded session (not_found).
	CheckoutGet(ctx context.Context, sessionID string) (*CheckoutSession, error)

	// IdempotencyBegin reserves key for a request. When the key exists it
	// returns the record (Done false: still in progress) and false.
	IdempotencyBegin(ctx context.Context, rec IdempotencyRecord) (*IdempotencyRecord, bool, error)
	IdempotencyFinish(ctx context.Context, rec IdempotencyRecord) error
	IdempotencyAbort(ctx context.Context, accountID, key string) error

	// Agents and dispatch (API.md §9). A run is claimed by an agent under a
	// lease while still queued (RunAssign), starts when the agent accepts
	// (RunStart with the lease), and every later change is fenced by the lease.
	AgentUpsert(ctx context.Context, p AgentUpsertParams) (*Agent, error)
	AgentGet(ctx context.Context, id string) (*Agent, error)
	// RunQueuedList lists an account's queued, unclaimed runs, oldest first,
	// skipping batch runs whose batch is at its concurrency.
	RunQueuedList(ctx context.Context, accountID string, limit int) ([]*Run, error)
	// RunAssign claims queued, unclaimed runs for agents, each at most once;
	// it returns the runs it claimed (those already claimed, cancelled or
	// over their batch's concurrency are left out).
	RunAssign(ctx context.Context, claims []RunAssignParams) ([]*Run, error)
	// RunRelease gives a claimed but not started run back to the queue.
	RunRelease(ctx context.Context, runID, leaseID string) error
	// RunHeartbeat extends the leases of an agent's runs.
	RunHeartbeat(ctx context.Context, agentID string, runIDs []string, until time.Time) error
	// RunHeldList lists the runs an agent holds a live lease on.
	RunHeldList(ctx context.Context, agentID string) ([]*Run, error)
	// RunLeasesExtend gives every live lease at least until (after a restart,
	// agents get a full lease to reconnect).
	RunLeasesExtend(ctx context.Context, until time.Time) error
	// RunEventApply applies one agent event, once per (LeaseID, Seq).
	RunEventApply(ctx context.Context, p RunEventParams) (*RunEventResult, error)
	RunEventList(ctx context.Context, runID string) ([]*RunEvent, error)
	// RunDueList finds runs that maintenance must move on at now.
	RunDueList(ctx context.Context, now time.Time, cancelGrace time.Duration, limit int) (*DueRuns, error)
	// RunExpireLease ends a lease that is still expired at now: a claimed run
	// goes back to the queue, a started one fails with agent_lost.
	RunExpireLease(ctx context.Context, runID, leaseID string, now time.Time) (*Run, error)

	ArtifactPut(ctx context.Context, a Artifact) error
	ArtifactList(ctx context.Context, runID string) ([]*Artifact, error)
	ArtifactGet(ctx context.Context, runID, name string) (*Artifact, error)

	// Events: the log behind GET /v1/events (API.md §10). Ids are assigned
	// by the database, strictly increasing in commit order: a reader that
	// has seen id n never later finds a new event below n.
	//
	// EventAppend inserts a batch of events in one transaction and sets
	// their ID and CreatedAt (when zero).
	EventAppend(ctx context.Context, events []*Event) error
	// EventsAfter lists events with id > afterID that match f, oldest
	// first, at most limit.
	EventsAfter(ctx context.Context, afterID int64, f EventFilter, limit int) ([]*Event, error)
	// EventLatestID is the id of the latest event (of a run when runID is
	// set), 0 when there is none.
	EventLatestID(ctx context.Context, runID string) (int64, error)
	// EventPrune deletes events created before before; it returns how many.
	EventPrune(ctx context.Context, before time.Time) (int64, error)
	// QueueStats counts the queued runs, by account and required labels,
	// and the runs and workflows stuck in a state (API.md §10).
	QueueStats(ctx context.Context, p QueueStatsParams) (*QueueStats, error)

	Close() error
}

// Agent is the server's record of an agent, keyed by its account and its own
// stable id (ClientID).
type Agent struct {
	ID        string            `json:"id"`
	AccountID string            `json:"accountId"`
	ClientID  string            `json:"clientId"`
	Name      string            `json:"name"`
	Kind      string            `json:"kind"`
	Version   string            `json:"version"`
	Labels    map[string]string `json:"labels"`
	CreatedAt time.Time         `json:"createdAt"`
	SeenAt    time.Time         `json:"lastSeenAt"`
}

// RunEvent is one applied agent event of a run.
type RunEvent struct {
	RunID     string          `json:"runId"`
	Seq       int64           `json:"seq"` // position in the run's history, 1-based
	LeaseID   string          `json:"-"`
	LeaseSeq  int64           `json:"-"`
	Kind      string          `json:"kind"`
	Body      json.RawMessage `json:"body"`
	CreatedAt time.Time       `json:"createdAt"`
}

// RunEventResult says what an event did.
type RunEventResult struct {
	// Duplicate is true when (LeaseID, Seq) was applied before: nothing changed.
	Duplicate bool
	Run       *Run
	// Approval is the request opened by an approval_requested event.
	Approval *Approval
}

// DueRuns are the runs maintenance must act on.
type DueRuns struct {
	LeaseExpired  []*Run // lease not renewed in time
	CancelOverdue []*Run // cancel requested longer ago than the grace
	TimedOut      []*Run // running past the definition's timeoutMs
	QueueTimedOut []*Run // queued past the run's queueTimeoutMs
}

// Artifact is a file a run produced (a screenshot).
type Artifact struct {
	RunID       string    `json:"runId"`
	Name        string    `json:"name"`
	ContentType string    `json:"contentType"`
	Size        int64     `json:"size"`
	SHA256      string    `json:"sha256"`
	CreatedAt   time.Time `json:"createdAt"`
}

// Event is one entry of the event log: a resource as the API shows it
// (Data, JSON) after a change. Type is the SSE event name (run.updated…).
type Event struct {
	ID        int64
	AccountID string
	Type      string
	SubjectID string
	RunID     string // the run an event is about (run.updated, approval.updated); "" otherwise
	Data      json.RawMessage
	CreatedAt time.Time
}

// EventFilter selects events; empty fields select everything.
type EventFilter struct {
	AccountID string
	RunID     string
}

// QueueStatsParams selects the queue figures of one account, or of every
// account when AccountID is "". Stuck says since when a state counts as
// stuck; a zero time leaves that state out.
type QueueStatsParams struct {
	AccountID string
	Stuck     StuckSince
}

// StuckSince holds, per non-terminal state, the time before which a run (or
// workflow) still in that state is stuck.
type StuckSince struct {
	Queued           time.Time // queued, not claimed, since queuedAt
	Assigned         time.Time // claimed by an agent, not accepted, since the assign
	Cancelling       time.Time // cancel requested, still running
	AwaitingApproval time.Time // a pending approval, since it was opened
	Analyzing        time.Time // a workflow analyzing, since its last update
}

// StuckThresholds are how long a run (or workflow) may stay in each
// non-terminal state before it counts as stuck; zero: never.
type StuckThresholds struct {
	Queued, Assigned, Cancelling, AwaitingApproval, Analyzing time.Duration
}

// Since turns the thresholds into the times before which, at now, each
// state is stuck.
func (t StuckThresholds) Since(now time.Time) StuckSince {
	at := func(d time.Duration) time.Time {
		if d <= 0 {
			return time.Time{}
		}
		return now.Add(-d)
	}
	return StuckSince{Queued: at(t.Queued), Assigned: at(t.Assigned), Cancelling: at(t.Cancelling),
		AwaitingApproval: at(t.AwaitingApproval), Analyzing: at(t.Analyzing)}
}

// QueueGroup counts an account's queued runs that require the same labels:
// those waiting for an agent (Claimed false) or assigned to one and not yet
// accepted (Claimed true).
type QueueGroup struct {
	AccountID      string
	Labels         map[string]string
	Claimed        bool
	Count          int64
	OldestQueuedAt time.Time
	// Stuck counts the group's runs past the Queued (or, claimed, the
	// Assigned) threshold.
	Stuck int64
}

// StuckCounts counts stuck runs and workflows by state.
type StuckCounts struct {
	Queued           int64 `json:"queued"`
	Assigned         int64 `json:"assigned"`
	Cancelling       int64 `json:"cancelling"`
	AwaitingApproval int64 `json:"awaiting_approval"`
	Analyzing        int64 `json:"analyzing"`
}

// QueueStats is what QueueStats found.
type QueueStats struct {
	Groups []QueueGroup
	// Stuck is by account; Queued and Assigned repeat the groups' sums.
	Stuck map[string]StuckCounts
}
