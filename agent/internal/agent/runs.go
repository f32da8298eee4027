package agent

import (
	"context"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

// Reject reasons.
const (
	RejectNoFreeSlot            = "no_free_slot"
	RejectDraining              = "draining"
	RejectUnsupportedDefinition = "unsupported_definition"
)

// run is one run the agent holds under a lease. Fields are guarded by a.mu
// unless noted.
type run struct {
	id, leaseID string
	order       uint64 // assignment order, for resending
	log         logrus.FieldLogger
	secrets     []string // secret input values, scrubbed from events (read-only)

	ctx    context.Context // the execution's context (read-only)
	cancel context.CancelCauseFunc
	// keep ends uploads: cancelled when the run is dropped or the agent
	// stops, not when the run is merely cancelled (its failure screenshot
	// is still worth uploading).
	keep       context.Context
	keepCancel context.CancelCauseFunc
	uploads    sync.WaitGroup

	nextSeq  int64
	outbox   []outEvent // unacknowledged events, in seq order
	execDone bool       // the execution returned and finished is in the outbox
	dropped  bool       // taken away: no more events, nothing resent

	approvalCh    chan approvalDecision // set while ApprovalRequested waits
	usedApprovals map[string]bool
}

// outEvent is an encoded event waiting for its ack.
type outEvent struct {
	seq  int64
	kind protocol.EventKind
	data []byte
}

type approvalDecision struct {
	approved bool
	comment  string
}

// stop cancels the run's execution and its uploads with cause.
func (r *run) stop(cause error) {
	r.cancel(cause)
	r.keepCancel(cause)
}

// assign takes or rejects an assigned run.
func (a *Agent) assign(c *conn, f *protocol.Assign) {
	a.mu.Lock()
	defer a.mu.Unlock()
	log := a.log.WithFields(logrus.Fields{"agentId": a.agentID, "runId": f.RunID, "leaseId": f.LeaseID, "attempt": f.Attempt, "workflowId": f.Workflow.ID})
	if r := a.runs[f.RunID]; r != nil {
		if r.leaseID == f.LeaseID {
			log.Debug("duplicate assign; accepting again")
			c.send(&protocol.Accept{RunID: f.RunID, LeaseID: f.LeaseID})
			return
		}
		r.log.Warn("the run was assigned again under a new lease; stopping the old execution")
		a.dropLocked(r, errLeaseLost)
	}
	reason := ""
	switch def := f.Workflow.Definition; {
	case a.draining:
		reason = RejectDraining
	case def == nil || def.Version != protocol.DefinitionVersion:
		reason = RejectUnsupportedDefinition
	case a.freeLocked() <= 0:
		reason = RejectNoFreeSlot
	}
	if reason != "" {
		log.WithField("reason", reason).Info("rejecting run")
		c.send(&protocol.Reject{RunID: f.RunID, LeaseID: f.LeaseID, Reason: reason})
		// The server gave itself the slot back on reject; tell it again
		// what is really free.
		a.lastReady = -1
		a.sendReadyLocked()
		return
	}

	base := a.runCtx
	if base == nil {
		base = context.Background()
	}
	a.assigned++
	r := &run{id: f.RunID, leaseID: f.LeaseID, order: a.assigned, log: log, nextSeq: 1,
		secrets: f.Workflow.Definition.SecretValues(f.Inputs), usedApprovals: map[string]bool{}}
	r.ctx, r.cancel = context.WithCancelCause(base)
	r.keep, r.keepCancel = context.WithCancelCause(base)
	a.runs[r.id] = r
	c.send(&protocol.Accept{RunID: f.RunID, LeaseID: f.LeaseID})
	log.Info("run accepted")
	a.emitLocked(r, &protocol.Event{Kind: protocol.EventStarted})
	a.sendReadyLocked()

	spec := RunSpec{RunID: f.RunID, BatchID: f.BatchID, Iteration: f.Iteration, Definition: f.Workflow.Definition,
		Inputs: f.Inputs, TimeoutMs: f.TimeoutMs}
	a.runsWG.Add(1)
	go a.execute(r, spec)
}

// ack drops acknowledged events. The server applies a lease's events in
// order, so an ack of seq n covers every seq up to n.
func (a *Agent) ack(f *protocol.Ack) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.runs[f.RunID]
	if r == nil {
		return
	}
	i := 0
	for i < len(r.outbox) && r.outbox[i].seq <= f.Seq {
		i++
	}
	if i == 0 {
		return
	}
	r.outbox = append(r.outbox[:0:0], r.outbox[i:]...)
	a.releaseLocked(r)
	a.pokeLocked()
}

// cancel stops a run the server cancelled; it finishes as cancelled.
func (a *Agent) cancel(f *protocol.Cancel) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.runs[f.RunID]
	if r == nil {
		a.log.WithField("runId", f.RunID).Debug("cancel for a run the agent does not hold")
		return
	}
	r.log.WithField("reason", f.Reason).Info("run cancelled by the server")
	r.cancel(&CancelError{Reason: f.Reason})
}

// approval resolves the run's pending approval. Approvals already used (the
// server repeats the last one after a reconnect) and approvals nobody waits
// for are ignored.
func (a *Agent) approval(f *protocol.ApprovalFrame) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.runs[f.RunID]
	if r == nil || r.usedApprovals[f.ApprovalID] {
		return
	}
	if r.approvalCh == nil {
		r.log.WithField("approvalId", f.ApprovalID).Debug("approval while no approval is pending; ignored")
		return
	}
	r.usedApprovals[f.ApprovalID] = true
	r.approvalCh <- approvalDecision{approved: f.Approved, comment: f.Comment}
	r.approvalCh = nil
	r.log.WithFields(logrus.Fields{"approvalId": f.ApprovalID, "approved": f.Approved}).Info("approval resolved")
}

// dropRun stops and forgets a run the server took away.
func (a *Agent) dropRun(runID string, cause error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r := a.runs[runID]; r != nil {
		a.dropLocked(r, cause)
	}
}

// dropLocked stops r, drops its outbox and forgets it; its slot stays taken
// until its goroutine returns.
func (a *Agent) dropLocked(r *run, cause error) {
	delete(a.runs, r.id)
	r.dropped = true
	r.outbox = nil
	r.stop(cause)
	if !r.execDone {
		a.zombies[r] = struct{}{}
	}
	a.pokeLocked()
	a.sendReadyLocked()
}

// releaseLocked forgets a run once it has returned and every event of it
// is acknowledged, freeing its slot.
func (a *Agent) releaseLocked(r *run) {
	if r.dropped || !r.execDone || len(r.outbox) > 0 {
		return
	}
	delete(a.runs, r.id)
	r.stop(nil)
	r.log.Debug("run released")
	a.pokeLocked()
	a.sendReadyLocked()
}

// execute runs r in its own goroutine and reports finished.
func (a *Agent) execute(r *run, spec RunSpec) {
	defer a.runsWG.Done()
	res := a.runSession(r, spec)
	r.uploads.Wait() // artifacts are uploaded before finished

	a.mu.Lock()
	defer a.mu.Unlock()
	r.execDone = true
	defer a.pokeLocked()
	if r.dropped {
		delete(a.zombies, r)
		a.sendReadyLocked()
		r.log.Info("dropped run stopped")
		return
	}
	ev := &protocol.Event{Kind: protocol.EventFinished, Status: string(res.Status), Error: res.Error, Outputs: res.Outputs}
	a.emitLocked(r, ev)
	r.log.WithField("status", res.Status).Info("run finished")
	a.releaseLocked(r)
}

func (a *Agent) runSession(r *run, spec RunSpec) Result {
	sess, err := a.cfg.Executor.Session(r.ctx)
	if err != nil {
		if r.ctx.Err() != nil {
			return Result{Status: protocol.RunCancelled}
		}
		r.log.WithError(err).Error("no browser session for the run")
		return Result{Status: protocol.RunFailed, Error: protocol.Errorf(protocol.CodeInternal, "The agent could not start a browser session.").
			With("reason", protocol.ReasonBrowserCrashed)}
	}
	defer func() {
		if err := sess.Close(); err != nil {
			r.log.WithError(err).Warn("close browser session")
		}
	}()
	return normalizeResult(sess.Run(r.ctx, spec, &reporter{a: a, r: r}))
}

// normalizeResult makes a result reportable as a finished event.
func normalizeResult(res Result) Result {
	switch res.Status {
	case protocol.RunSucceeded, protocol.RunCancelled:
	case protocol.RunFailed, protocol.RunTimedOut:
		if res.Error == nil {
			code := protocol.CodeInternal
			if res.Status == protocol.RunTimedOut {
				code = protocol.CodeTimeout
			}
			res.Error = protocol.NewError(code)
		}
	default:
		res = Result{Status: protocol.RunFailed, Error: protocol.Errorf(protocol.CodeInternal, "The executor ended the run with status %q.", res.Status)}
	}
	return res
}

// reporter turns an execution's progress into events of its run.
type reporter struct {
	a *Agent
	r *run
}

func (p *reporter) emit(ev *protocol.Event) {
	p.a.mu.Lock()
	defer p.a.mu.Unlock()
	p.a.emitLocked(p.r, ev)
}

func (p *reporter) StepStarted(step, attempt int) {
	p.emit(&protocol.Event{Kind: protocol.EventStepStarted, Step: &step, Attempts: attempt})
}

func (p *reporter) StepFinished(step int, status protocol.StepStatus, durationMs int64, attempts int, output any, err *protocol.Error) {
	p.emit(&protocol.Event{Kind: protocol.EventStepFinished, Step: &step, Status: string(status), DurationMs: &durationMs,
		Attempts: attempts, Output: output, Error: err})
}

func (p *reporter) ApprovalRequested(ctx context.Context, step int, message string) (bool, string, error) {
	ch := make(chan approvalDecision, 1)
	p.a.mu.Lock()
	p.r.approvalCh = ch
	p.a.emitLocked(p.r, &protocol.Event{Kind: protocol.EventApprovalRequested, Step: &step, Message: message})
	p.a.mu.Unlock()
	p.r.log.WithField("step", step).Info("waiting for approval")
	defer func() {
		p.a.mu.Lock()
		if p.r.approvalCh == ch {
			p.r.approvalCh = nil
		}
		p.a.mu.Unlock()
	}()
	select {
	case d := <-ch:
		return d.approved, d.comment, nil
	case <-ctx.Done():
		return false, "", context.Cause(ctx)
	case <-p.r.ctx.Done():
		return false, "", context.Cause(p.r.ctx)
	}
}

func (p *reporter) Artifact(name, contentType string, data []byte) {
	p.r.uploads.Add(1)
	go func() {
		defer p.r.uploads.Done()
		p.a.upload(p.r, name, contentType, data)
	}()
}
