// Package fsm holds the state machines of runs, batches, workflows and
// approvals (API.md §4–§7). It is pure: no I/O, no clock. The store uses the
// Sources functions to guard its updates ("UPDATE … WHERE status IN (…)"), so
// a transition the machine refuses can never be written, whatever races.
//
// Every refused transition — including one from or to an unknown state — is a
// *protocol.Error with code conflict and details {"from": …, "to": …}.
//
// Run (terminal: succeeded, failed, timed_out, cancelled):
//
//	queued --+--> running <------> awaiting_approval
//	         |       |                     |
//	         |       +----------+----------+
//	         |                  v
//	         |    succeeded | failed | timed_out | cancelled
//	         |
//	         +--> cancelled
//	         +--> timed_out (queue_timeout)
//
// Batch (terminal: completed, cancelled):
//
//	created ---> running ---> completed
//	   |            |
//	   +------------+-------> cancelled
//
// Workflow (no terminal state):
//
//	          new video
//	    +-----------------------+
//	    v                       |
//	analyzing ------------> ready --+
//	  |    ^                  ^     | definition edited
//	  |    | new video        +-----+
//	  v    |
//	analysis_failed
//
// Approval (terminal: approved, rejected, expired; resolving twice is a conflict):
//
//	pending ---> approved | rejected | expired
package fsm

import (
	"slices"

	"github.com/copelf/copelf/protocol"
)

// machine is a finite set of states and the allowed edges between them.
type machine[S ~string] struct {
	kind    string    // "run", "batch", … for messages
	edges   map[S][]S // from → allowed targets
	sources map[S][]S // to → allowed sources, sorted
}

func newMachine[S ~string](kind string, states []S, edges map[S][]S) machine[S] {
	m := machine[S]{kind: kind, edges: edges, sources: make(map[S][]S, len(states))}
	for _, s := range states {
		m.sources[s] = []S{}
	}
	for from, tos := range edges {
		for _, to := range tos {
			m.sources[to] = append(m.sources[to], from)
		}
	}
	for _, src := range m.sources {
		slices.Sort(src)
	}
	return m
}

func (m machine[S]) transition(from, to S) error {
	if slices.Contains(m.edges[from], to) {
		return nil
	}
	return protocol.Errorf(protocol.CodeConflict, "Cannot move the %s from %q to %q.", m.kind, string(from), string(to)).
		With("from", string(from)).
		With("to", string(to))
}

// sourcesOf returns a fresh, never nil copy; an unknown state has no sources.
func (m machine[S]) sourcesOf(to S) []S {
	return append([]S{}, m.sources[to]...)
}

var runMachine = newMachine("run",
	[]protocol.RunStatus{
		protocol.RunQueued, protocol.RunRunning, protocol.RunAwaitingApproval,
		protocol.RunSucceeded, protocol.RunFailed, protocol.RunTimedOut, protocol.RunCancelled,
	},
	map[protocol.RunStatus][]protocol.RunStatus{
		// failed: queue_timeout.
		protocol.RunQueued: {protocol.RunRunning, protocol.RunCancelled, protocol.RunTimedOut},
		protocol.RunRunning: {protocol.RunAwaitingApproval,
			protocol.RunSucceeded, protocol.RunFailed, protocol.RunTimedOut, protocol.RunCancelled},
		protocol.RunAwaitingApproval: {protocol.RunRunning,
			protocol.RunSucceeded, protocol.RunFailed, protocol.RunTimedOut, protocol.RunCancelled},
	})

var batchMachine = newMachine("batch",
	[]protocol.BatchStatus{protocol.BatchCreated, protocol.BatchRunning, protocol.BatchCompleted, protocol.BatchCancelled},
	map[protocol.BatchStatus][]protocol.BatchStatus{
		protocol.BatchCreated: {protocol.BatchRunning, protocol.BatchCancelled},
		protocol.BatchRunning: {protocol.BatchCompleted, protocol.BatchCancelled},
	})

var workflowMachine = newMachine("workflow",
	[]protocol.WorkflowStatus{protocol.WorkflowAnalyzing, protocol.WorkflowReady, protocol.WorkflowAnalysisFailed},
	map[protocol.WorkflowStatus][]protocol.WorkflowStatus{
		protocol.WorkflowAnalyzing:      {protocol.WorkflowReady, protocol.WorkflowAnalysisFailed},
		protocol.WorkflowAnalysisFailed: {protocol.WorkflowAnalyzing},                         // new video
		protocol.WorkflowReady:          {protocol.WorkflowReady, protocol.WorkflowAnalyzing}, // edited; new video
	})

var approvalMachine = newMachine("approval",
	[]protocol.ApprovalStatus{protocol.ApprovalPending, protocol.ApprovalApproved, protocol.ApprovalRejected, protocol.ApprovalExpired},
	map[protocol.ApprovalStatus][]protocol.ApprovalStatus{
		protocol.ApprovalPending: {protocol.ApprovalApproved, protocol.ApprovalRejected, protocol.ApprovalExpired},
	})

// RunTransition returns nil if a run may move from → to, else a conflict
// *protocol.Error with details {"from", "to"}. queued → running | cancelled |
// failed (queue_timeout); running ⇄ awaiting_approval; running and
// awaiting_approval → succeeded | failed | timed_out | cancelled. No state
// moves to itself and nothing leaves a terminal state.
func RunTransition(from, to protocol.RunStatus) error { return runMachine.transition(from, to) }

// RunSources returns every state from which a run may move to `to`, sorted.
// It is empty for queued and for unknown states.
func RunSources(to protocol.RunStatus) []protocol.RunStatus { return runMachine.sourcesOf(to) }

// BatchTransition returns nil if a batch may move from → to, else a conflict
// *protocol.Error: created → running | cancelled; running → completed | cancelled.
func BatchTransition(from, to protocol.BatchStatus) error { return batchMachine.transition(from, to) }

// BatchSources returns every state from which a batch may move to `to`, sorted.
func BatchSources(to protocol.BatchStatus) []protocol.BatchStatus { return batchMachine.sourcesOf(to) }

// WorkflowTransition returns nil if a workflow may move from → to, else a
// conflict *protocol.Error: analyzing → ready | analysis_failed;
// analysis_failed → analyzing (new video); ready → ready (definition edited);
// ready → analyzing (new video).
func WorkflowTransition(from, to protocol.WorkflowStatus) error {
	return workflowMachine.transition(from, to)
}

// WorkflowSources returns every state from which a workflow may move to `to`, sorted.
func WorkflowSources(to protocol.WorkflowStatus) []protocol.WorkflowStatus {
	return workflowMachine.sourcesOf(to)
}

// ApprovalTransition returns nil if an approval may move from → to, else a
// conflict *protocol.Error: pending → approved | rejected | expired, and
// nothing else.
func ApprovalTransition(from, to protocol.ApprovalStatus) error {
	return approvalMachine.transition(from, to)
}

// ApprovalSources returns every state from which an approval may move to `to`, sorted.
func ApprovalSources(to protocol.ApprovalStatus) []protocol.ApprovalStatus {
	return approvalMachine.sourcesOf(to)
}
