package protocol

// Version is the agent wire protocol version sent in `hello.protocol`.
const Version = 1

// Subprotocol is the websocket subprotocol agents negotiate.
const Subprotocol = "copelf.v1"

// WorkflowStatus is the analysis state of a workflow.
type WorkflowStatus string

const (
	// WorkflowAnalyzing: a recorded video waits for the analyzer. Moved on by
	// the analyzer's result or by the analysis timeout.
	WorkflowAnalyzing WorkflowStatus = "analyzing"
	// WorkflowReady: the definition is valid and runs may be created.
	WorkflowReady WorkflowStatus = "ready"
	// WorkflowAnalysisFailed: the analyzer reported an error or timed out.
	// A new video upload moves it back to analyzing.
	WorkflowAnalysisFailed WorkflowStatus = "analysis_failed"
)

// RunStatus is the state of a run (API.md §5).
type RunStatus string

const (
	// RunQueued: credits are held; waiting for an agent. Moved on by dispatch
	// (running) or by cancel / queue timeout.
	RunQueued RunStatus = "queued"
	// RunRunning: an agent accepted the run and executes it.
	RunRunning RunStatus = "running"
	// RunAwaitingApproval: paused at an approval step until it is resolved.
	RunAwaitingApproval RunStatus = "awaiting_approval"
	// Terminal states: nothing leaves them.
	RunSucceeded RunStatus = "succeeded"
	RunFailed    RunStatus = "failed"
	RunTimedOut  RunStatus = "timed_out"
	RunCancelled RunStatus = "cancelled"
)

// Terminal reports whether s is a final state.
func (s RunStatus) Terminal() bool {
	switch s {
	case RunSucceeded, RunFailed, RunTimedOut, RunCancelled:
		return true
	}
	return false
}

// Valid reports whether s is a known run state.
func (s RunStatus) Valid() bool {
	switch s {
	case RunQueued, RunRunning, RunAwaitingApproval, RunSucceeded, RunFailed, RunTimedOut, RunCancelled:
		return true
	}
	return false
}

// StepStatus is the state of one step record of a run.
type StepStatus string

const (
	StepPending   StepStatus = "pending"
	StepRunning   StepStatus = "running"
	StepSucceeded StepStatus = "succeeded"
	StepFailed    StepStatus = "failed"
	StepSkipped   StepStatus = "skipped"
)

// BatchStatus is the state of a batch (API.md §7).
type BatchStatus string

const (
	BatchCreated   BatchStatus = "created"
	BatchRunning   BatchStatus = "running"
	BatchCompleted BatchStatus = "completed"
	BatchCancelled BatchStatus = "cancelled"
)

// Terminal reports whether s is a final state.
func (s BatchStatus) Terminal() bool { return s == BatchCompleted || s == BatchCancelled }

// ApprovalStatus is the state of an approval request (API.md §6).
type ApprovalStatus string

const (
	ApprovalPending  ApprovalStatus = "pending"
	ApprovalApproved ApprovalStatus = "approved"
	ApprovalRejected ApprovalStatus = "rejected"
	ApprovalExpired  ApprovalStatus = "expired"
)

// QueueReason says why a queued run has not started.
type QueueReason string

const (
	QueueNoAgentConnected QueueReason = "no_agent_connected"
	QueueAgentsBusy       QueueReason = "agents_busy"
	QueueNoMatchingAgent  QueueReason = "no_matching_agent"
)

// Failure reasons carried in a run error's details.reason.
const (
	ReasonStepTimeout      = "step_timeout"
	ReasonRunTimeout       = "run_timeout"
	ReasonElementNotFound  = "element_not_found"
	ReasonNavigationFailed = "navigation_failed"
	ReasonAssertionFailed  = "assertion_failed"
	ReasonApprovalRejected = "approval_rejected"
	ReasonAgentLost        = "agent_lost"
	ReasonBrowserCrashed   = "browser_crashed"
	ReasonQueueTimeout     = "queue_timeout"
	ReasonSessionExpired   = "session_expired"
	ReasonLeaseLost        = "lease_lost"
)

// ReasonDatabaseUnavailable is details.reason of the internal error that
// answers a request or a frame while the control plane's database server
// cannot be reached: the same request may succeed when retried.
const ReasonDatabaseUnavailable = "database_unavailable"

// DatabaseUnavailable is the error of ReasonDatabaseUnavailable.
func DatabaseUnavailable() *Error {
	return Errorf(CodeInternal, "The database is unavailable; retry in a moment.").With("reason", ReasonDatabaseUnavailable)
}

// BatchCounts counts a batch's iterations by status, as GET
// /v1/batches/{id} shows them (`counts`); an iteration without a run yet is
// pending.
type BatchCounts struct {
	Total            int `json:"total"`
	Pending          int `json:"pending"`
	Queued           int `json:"queued"`
	Running          int `json:"running"`
	AwaitingApproval int `json:"awaitingApproval"`
	Succeeded        int `json:"succeeded"`
	Failed           int `json:"failed"`
	TimedOut         int `json:"timedOut"`
	Cancelled        int `json:"cancelled"`
}

// Add counts one iteration whose status (its run's, or "pending") is status.
func (c *BatchCounts) Add(status string) {
	c.Total++
	switch RunStatus(status) {
	case RunQueued:
		c.Queued++
	case RunRunning:
		c.Running++
	case RunAwaitingApproval:
		c.AwaitingApproval++
	case RunSucceeded:
		c.Succeeded++
	case RunFailed:
		c.Failed++
	case RunTimedOut:
		c.TimedOut++
	case RunCancelled:
		c.Cancelled++
	default:
		c.Pending++
	}
}

// Done counts the iterations whose run is terminal.
func (c BatchCounts) Done() int { return c.Succeeded + c.Failed + c.TimedOut + c.Cancelled }
