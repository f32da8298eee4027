package agent

import (
	"context"

	"github.com/copelf/copelf/protocol"
)

// Executor runs workflow definitions. The agent asks it for one Session per
// run, right after it accepted the run, from the run's own goroutine.
//
// The browser package is the real executor (wired in by internal/cli); the
// types below mirror browser.RunSpec, browser.Reporter and browser.Result
// field for field so that the adapter is a plain conversion.
type Executor interface {
	// Session returns an isolated environment for one run (a fresh browser
	// context). ctx is the run's context: when it ends, Session gives up.
	Session(ctx context.Context) (Session, error)
}

// Session executes one run and is closed afterwards.
type Session interface {
	// Run executes spec and reports progress to rep, from the calling
	// goroutine, one call at a time. Cancelling ctx (with a cause) ends the
	// run as cancelled; Run returns once it has stopped.
	Run(ctx context.Context, spec RunSpec, rep Reporter) Result
	// Close disposes the session; it may be called from any goroutine.
	Close() error
}

// RunSpec is one run to execute.
type RunSpec struct {
	RunID, BatchID string
	Iteration      *int
	Definition     *protocol.Definition
	Inputs         map[string]any // validated and defaulted by the server; secrets in clear
	TimeoutMs      int64          // run timeout (0 = none; then the definition's timeoutMs, if any)
}

// Reporter receives a run's progress; the agent turns each call into an
// event frame. Calls come from the run's goroutine, in step order.
type Reporter interface {
	// StepStarted is called before each attempt of a step (attempt 1, 2, …).
	StepStarted(step, attempt int)
	// StepFinished is called once per step that started.
	StepFinished(step int, status protocol.StepStatus, durationMs int64, attempts int, output any, err *protocol.Error)
	// ApprovalRequested sends approval_requested and blocks until the
	// server's approval frame resolves it, or ctx ends (err is then the
	// context's cause).
	ApprovalRequested(ctx context.Context, step int, message string) (approved bool, comment string, err error)
	// Artifact hands over a file (a screenshot); the agent uploads it over
	// HTTP before it reports the run finished. data must not be changed
	// afterwards.
	Artifact(name, contentType string, data []byte)
}

// Result is the outcome of a run.
type Result struct {
	Status  protocol.RunStatus // succeeded | failed | timed_out | cancelled
	Error   *protocol.Error    // nil on success (and on cancel)
	Outputs map[string]any     // extract results by output name
}
