package browser

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/chromedp/cdproto/inspector"
	"github.com/chromedp/chromedp"
	"github.com/copelf/copelf/protocol"
	"github.com/sirupsen/logrus"
)

// RunSpec is one run to execute.
type RunSpec struct {
	RunID, BatchID string
	Iteration      *int
	Definition     *protocol.Definition
	Inputs         map[string]any // already validated and defaulted by the server; secrets in clear
	TimeoutMs      int64          // run timeout (0 = none; then the definition's timeoutMs, if any)
}

// Reporter receives a run's progress. Run makes one call at a time, in step
// order (not always from the goroutine that called Run), and returns only
// after its last call.
type Reporter interface {
	// StepStarted is called before each attempt of a step (attempt 1, 2, …).
	StepStarted(step, attempt int)
	// StepFinished is called once per step that started: succeeded, failed
	// (err set; for an optional step the run goes on) or skipped (the run
	// was cancelled while the step ran). output is the extracted value of
	// an extract step, nil otherwise. Secrets are redacted from output and err.
	StepFinished(step int, status protocol.StepStatus, durationMs int64, attempts int, output any, err *protocol.Error)
	// ApprovalRequested blocks until the approval is resolved (or ctx ends).
	ApprovalRequested(ctx context.Context, step int, message string) (approved bool, comment string, err error)
	// Artifact delivers a screenshot; called synchronously.
	Artifact(name, contentType string, data []byte)
}

// Result is the outcome of a run.
type Result struct {
	Status  protocol.RunStatus // succeeded | failed | timed_out | cancelled
	Error   *protocol.Error    // nil on success (and on cancel)
	Outputs map[string]any     // extract results by output name; never nil
}

// Retry backoff between the attempts of a step with retries.
const (
	retryInitialInterval = 100 * time.Millisecond
	retryMaxInterval     = time.Second
	// failureShotTimeout bounds the screenshot taken when a step fails.
	failureShotTimeout = 2 * time.Second
)

// Causes of the contexts of a run.
var (
	errRunTimeout  = errors.New("run timeout")
	errStepTimeout = errors.New("step timeout")
	errTabCrashed  = errors.New("the tab crashed")
)

// cancelledError is the cause of a run context cancelled by Run's caller.
type cancelledError struct{ cause error }

func (e *cancelledError) Error() string { return "run cancelled: " + e.cause.Error() }
func (e *cancelledError) Unwrap() error { return e.cause }

// failKind says how a failure ends a step or a run.
type failKind int

const (
	failStep      failKind = iota // the step failed; retries and optional apply
	failCancelled                 // Run's ctx was cancelled
	failTimedOut                  // the run timeout passed
	failCrashed                   // Chromium or the tab died
)

// failure is a classified step failure.
type failure struct {
	err       *protocol.Error
	kind      failKind
	retryable bool
	rejected  bool // an approval was rejected: never optional
}

func (f *failure) Error() string { return f.err.Error() }

func (f *failure) with(k string, v any) *failure {
	cp := *f
	cp.err = f.err.With(k, v)
	return &cp
}

// fail builds a step failure with details.reason (when set) and details.step.
func (c *compiled) fail(code protocol.Code, reason string, retryable bool, msg string) *failure {
	e := protocol.Errorf(code, "%s", msg).With("step", c.index)
	if reason != "" {
		e = e.With("reason", reason)
	}
	return &failure{err: e, retryable: retryable}
}

// runner is the state of one Run.
type runner struct {
	s       *Session
	spec    RunSpec
	rep     Reporter
	scrub   scrubber
	log     logrus.FieldLogger
	outputs map[string]any

	parent context.Context // Run's ctx
	ctx    context.Context // child of the tab's context: cancelled by parent, run timeout, crash
	wedged bool            // the tab hung and was killed: the run cannot go on
}

// Run executes the steps in the session. Cancelling ctx (context.WithCancelCause)
// ends the run as cancelled. Run does not close the session.
func (s *Session) Run(ctx context.Context, spec RunSpec, rep Reporter) Result {
	r := &runner{s: s, spec: spec, rep: rep, parent: ctx, outputs: map[string]any{}}
	var secrets []string
	if spec.Definition != nil {
		secrets = spec.Definition.SecretValues(spec.Inputs)
	}
	r.scrub = newScrubber(secrets)
	s.b.secrets.add(secrets)
	defer s.b.secrets.remove(secrets)
	r.log = s.b.log.WithFields(logrus.Fields{"run_id": spec.RunID})
	return r.run()
}

func (r *runner) run() Result {
	start := time.Now()
	def := r.spec.Definition
	if def == nil {
		return r.result(protocol.RunFailed, protocol.Errorf(protocol.CodeUnprocessableEntity, "The run has no workflow definition."))
	}
	if err := r.parent.Err(); err != nil {
		return r.result(protocol.RunCancelled, nil)
	}

	// The run's context derives from the tab's (never from the browser's
	// first context): per-step timeouts below only end steps.
	ctx, cancel := context.WithCancelCause(r.s.ctx)
	defer cancel(nil)
	stop := context.AfterFunc(r.parent, func() { cancel(&cancelledError{context.Cause(r.parent)}) })
	defer stop()
	timeout := r.spec.TimeoutMs
	if timeout <= 0 {
		timeout = def.TimeoutMs
	}
	if timeout > 0 {
		var tcancel context.CancelFunc
		ctx, tcancel = context.WithTimeoutCause(ctx, time.Duration(timeout)*time.Millisecond, errRunTimeout)
		defer tcancel()
	}
	r.ctx = ctx
	// A renderer crash leaves the browser up; end the run at once instead of
	// at the step timeout. (A Chromium crash cancels the tab's context.)
	_ = chromedp.Listen(ctx, func(ev any) {
		if _, ok := ev.(*inspector.EventTargetCrashed); ok {
			cancel(errTabCrashed)
			r.s.kill() // unblocks chromedp calls that wait on the dead renderer
		}
	})

	vars := r.vars()
	r.log.WithField("steps", len(def.Steps)).Info("run: started")
	for i := range def.Steps {
		c := compileStep(i, interpolate(def.Steps[i], vars))
		if f := r.step(c); f != nil {
			res := r.finish(f)
			r.log.WithFields(r.scrub.fields(logrus.Fields{
				"status": res.Status, "ms": time.Since(start).Milliseconds(), "error": errMessage(res.Error),
			})).Info("run: finished")
			return res
		}
	}
	r.log.WithFields(logrus.Fields{"status": protocol.RunSucceeded, "ms": time.Since(start).Milliseconds()}).Info("run: finished")
	return r.result(protocol.RunSucceeded, nil)
}

// finish turns the failure that ended the run into its result.
func (r *runner) finish(f *failure) Result {
	switch f.kind {
	case failCancelled:
		return r.result(protocol.RunCancelled, nil)
	case failTimedOut:
		return r.result(protocol.RunTimedOut, f.err)
	}
	return r.result(protocol.RunFailed, f.err)
}

func (r *runner) result(st protocol.RunStatus, e *protocol.Error) Result {
	return Result{Status: st, Error: r.scrub.err(e), Outputs: maps.Clone(r.outputs)}
}

func errMessage(e *protocol.Error) string {
	if e == nil {
		return ""
	}
	return e.Message
}

// vars are the values references resolve to: the inputs (numbers without
// trailing zeros, booleans true/false) and the built-ins.
func (r *runner) vars() map[string]string {
	vars := make(map[string]string, len(r.spec.Inputs)+3)
	for k, v := range r.spec.Inputs {
		switch t := v.(type) {
		case nil:
		case string:
			vars[k] = t
		case bool:
			vars[k] = strconv.FormatBool(t)
		case float64:
			vars[k] = strconv.FormatFloat(t, 'f', -1, 64)
		case float32:
			vars[k] = strconv.FormatFloat(float64(t), 'f', -1, 32)
		case fmt.Stringer: // json.Number
			vars[k] = t.String()
		default:
			vars[k] = fmt.Sprint(t)
		}
	}
	vars["run.id"] = r.spec.RunID
	if r.spec.BatchID != "" {
		vars["batch.id"] = r.spec.BatchID
	}
	if r.spec.Iteration != nil {
		vars["iteration.index"] = strconv.Itoa(*r.spec.Iteration)
	}
	return vars
}

// step runs one step with its retries and reports it. It returns the
// failure that ends the run, nil when the run goes on.
func (r *runner) step(c *compiled) *failure {
	start := time.Now()
	log := r.log.WithFields(logrus.Fields{"step": c.index, "type": c.step.Type})
	attempts := 0
	var last *failure
	var output any
	op := func() error {
		attempts++
		r.rep.StepStarted(c.index, attempts)
		out, f := r.attempt(c)
		if f == nil {
			output = out
			last = nil
			return nil
		}
		last = f
		if attempts <= c.step.Retries && f.retryable && f.kind == failStep && !r.wedged {
			log.WithFields(r.scrub.fields(logrus.Fields{"attempt": attempts, "error": f.err.Message})).Debug("run: step attempt failed; retrying")
			return f
		}
		return backoff.Permanent(f)
	}
	bo := backoff.WithContext(backoff.WithMaxRetries(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(retryInitialInterval),
		backoff.WithMaxInterval(retryMaxInterval),
		backoff.WithMaxElapsedTime(0),
	), uint64(max(c.step.Retries, 0))), r.ctx)
	_ = backoff.Retry(op, bo)
	if last != nil && last.kind == failStep {
		// The run may have ended while waiting to retry.
		if f := r.ended(c); f != nil {
			last = f
		}
	}
	ms := time.Since(start).Milliseconds()

	if last == nil {
		output = r.scrub.value(output)
		if c.step.Type == protocol.StepExtract {
			r.outputs[c.step.Output] = output
		}
		log.WithFields(logrus.Fields{"ms": ms, "attempts": attempts}).Debug("run: step succeeded")
		r.rep.StepFinished(c.index, protocol.StepSucceeded, ms, attempts, output, nil)
		return nil
	}

	if last.kind == failCancelled {
		log.WithField("ms", ms).Info("run: cancelled during the step")
		r.rep.StepFinished(c.index, protocol.StepSkipped, ms, attempts, nil, nil)
		return last
	}
	last.err = r.scrub.err(last.err)
	if last.kind != failCrashed {
		r.failureShot(c.index)
	}
	log.WithFields(r.scrub.fields(logrus.Fields{
		"ms": ms, "attempts": attempts, "code": last.err.Code, "reason": last.err.Details["reason"], "error": last.err.Message,
	})).Warn("run: step failed")
	r.rep.StepFinished(c.index, protocol.StepFailed, ms, attempts, nil, last.err)
	if c.step.Optional && last.kind == failStep && !last.rejected && !r.wedged {
		return nil
	}
	return last
}

// attempt runs one attempt of a step under its timeout and classifies its error.
func (r *runner) attempt(c *compiled) (any, *failure) {
	ctx := r.ctx
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(r.ctx, c.timeout, errStepTimeout)
		defer cancel()
	}
	c.found.Store(false)
	out, err := r.exec(ctx, c)
	if err == nil {
		return out, nil
	}
	if f := r.ended(c); f != nil {
		return nil, f
	}
	if errors.Is(context.Cause(ctx), errStepTimeout) {
		if c.waitsForFound && !c.found.Load() {
			return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, true,
				fmt.Sprintf("Step %d (%s): no element matched %s within %s.", c.index, c.step.Type, quoteSel(c.selector), c.timeout)).
				with("selector", c.selector).with("timeoutMs", c.timeout.Milliseconds())
		}
		f := c.fail(protocol.CodeTimeout, protocol.ReasonStepTimeout, true,
			fmt.Sprintf("Step %d (%s) did not finish within %s.", c.index, c.step.Type, c.timeout)).
			with("timeoutMs", c.timeout.Milliseconds())
		if c.selector != "" {
			f = f.with("selector", c.selector)
		}
		return nil, f
	}
	var f *failure
	if errors.As(err, &f) {
		return nil, f
	}
	// A protocol or page error (a node gone during a navigation, an
	// invalid selector): internal, worth a retry.
	return nil, c.fail(protocol.CodeInternal, "", true,
		fmt.Sprintf("Step %d (%s) failed: %s", c.index, c.step.Type, truncate(err.Error(), 500)))
}

// wedgeGrace is how long an attempt may go on after its context ended
// before the tab counts as wedged.
const wedgeGrace = time.Second

// exec runs one attempt and makes its timeout hold even when chromedp does
// not return: chromedp holds a frame lock while it waits for a DOM.getDocument
// answer (with no deadline), and its queries wait for that lock without
// looking at their context. A renderer that hangs or crashes would then block
// a step past its timeout. After wedgeGrace the tab is killed, which makes the
// pending call return; exec then waits for the attempt, so that nothing of it
// outlives the run.
func (r *runner) exec(ctx context.Context, c *compiled) (any, error) {
	type result struct {
		out any
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := c.do(ctx, r)
		done <- result{out, err}
	}()
	select {
	case res := <-done:
		return res.out, res.err
	case <-ctx.Done():
	}
	grace := time.NewTimer(wedgeGrace)
	defer grace.Stop()
	select {
	case res := <-done:
		return res.out, res.err
	case <-grace.C:
	}
	r.log.WithFields(logrus.Fields{"step": c.index}).Warn("run: the tab does not respond; closing it")
	r.wedged = true
	r.s.kill()
	res := <-done
	return res.out, res.err
}

// ended returns the failure that ends the run when the run is over for a
// reason other than the step itself: Chromium or the tab died, the caller
// cancelled, or the run timeout passed. nil while the run goes on.
func (r *runner) ended(c *compiled) *failure {
	if r.s.in.crashed() || errors.Is(context.Cause(r.ctx), errTabCrashed) {
		f := c.fail(protocol.CodeInternal, protocol.ReasonBrowserCrashed, false,
			fmt.Sprintf("Step %d (%s): the browser crashed.", c.index, c.step.Type))
		f.kind = failCrashed
		return f
	}
	if r.ctx.Err() == nil {
		return nil
	}
	cause := context.Cause(r.ctx)
	var ce *cancelledError
	switch {
	case errors.As(cause, &ce):
		f := c.fail(protocol.CodeConflict, "", false, fmt.Sprintf("Step %d (%s): the run was cancelled.", c.index, c.step.Type))
		f.kind = failCancelled
		return f
	case errors.Is(cause, errRunTimeout):
		f := c.fail(protocol.CodeTimeout, protocol.ReasonRunTimeout, false,
			fmt.Sprintf("Step %d (%s): the run did not finish within its timeout.", c.index, c.step.Type))
		f.kind = failTimedOut
		return f.with("timeoutMs", r.runTimeoutMs())
	}
	if r.wedged {
		return nil // the tab was killed because it hung: the step's own timeout says why
	}
	// The session's tab context ended: the session or the browser was closed.
	f := c.fail(protocol.CodeInternal, "", false, fmt.Sprintf("Step %d (%s): the browser session was closed.", c.index, c.step.Type))
	f.kind = failCrashed
	return f
}

func (r *runner) runTimeoutMs() int64 {
	if r.spec.TimeoutMs > 0 {
		return r.spec.TimeoutMs
	}
	return r.spec.Definition.TimeoutMs
}

// failureShot delivers a best-effort screenshot of the page after a failed
// step. It runs on the tab's context, so that it works after a run timeout.
func (r *runner) failureShot(step int) {
	if !r.s.alive() {
		return
	}
	ctx, cancel := context.WithTimeout(r.s.ctx, failureShotTimeout)
	defer cancel()
	data, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		r.log.WithFields(r.scrub.fields(logrus.Fields{"step": step, "error": err})).Debug("run: no failure screenshot")
		return
	}
	r.rep.Artifact(fmt.Sprintf("failure-step-%d.png", step), "image/png", data)
}
