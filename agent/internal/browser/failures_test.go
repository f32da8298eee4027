package browser

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/protocol"
)

func TestFailureWorkflows(t *testing.T) {
	t.Parallel()
	cases := []struct {
		workflow string
		status   protocol.RunStatus
		code     protocol.Code
		reason   string
		step     int
		details  map[string]any
	}{
		{"fail-element-not-found", protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, 1,
			map[string]any{"selector": "#does-not-exist"}},
		{"fail-navigation", protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonNavigationFailed, 0,
			map[string]any{"status": int64(404)}},
		{"fail-assertion", protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonAssertionFailed, 4,
			map[string]any{"expected": "Welcome, somebody else!", "actual": "Welcome, ada!", "comparison": "equals"}},
		{"fail-step-timeout", protocol.RunFailed, protocol.CodeTimeout, protocol.ReasonStepTimeout, 1, nil},
		{"fail-run-timeout", protocol.RunTimedOut, protocol.CodeTimeout, protocol.ReasonRunTimeout, 1, nil},
	}
	for _, tc := range cases {
		t.Run(tc.workflow, func(t *testing.T) {
			rec := &recorder{}
			start := time.Now()
			res := runDef(t, loadWorkflow(t, tc.workflow), rec)
			elapsed := time.Since(start)
			wantFailure(t, res, tc.status, tc.code, tc.reason, tc.step)
			for k, v := range tc.details {
				if got := res.Error.Details[k]; got != v {
					t.Errorf("details.%s = %#v, want %#v", k, got, v)
				}
			}
			if elapsed > 10*time.Second {
				t.Errorf("the run took %v", elapsed)
			}
			e, ok := rec.end(tc.step)
			if !ok || e.status != protocol.StepFailed || e.err == nil || e.err.Details["reason"] != tc.reason {
				t.Errorf("StepFinished of the failed step: %+v", e)
			}
			wantPNG(t, rec, "failure-step-"+itoa(tc.step)+".png")
		})
	}
}

func itoa(i int) string { return string(rune('0' + i)) }

func TestNavigationNetworkError(t *testing.T) {
	t.Parallel()
	// A port that was just free: connection refused.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	def := steps(t, "", `{"type":"navigate","url":"http://`+addr+`/"}`)
	res := runDef(t, def, nil)
	wantFailure(t, res, protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonNavigationFailed, 0)
	if e, _ := res.Error.Details["error"].(string); !strings.Contains(e, "ERR_CONNECTION_REFUSED") {
		t.Errorf("details.error = %q", e)
	}
}

func TestRetries(t *testing.T) {
	t.Parallel()
	t.Run("succeeds on a later attempt", func(t *testing.T) {
		// The text changes 1.5 s after the page's script runs: the first
		// attempt comes before it however slow the machine, and the eight
		// retries' backoff (at least about 2 s) outlasts it.
		def := steps(t, "", `{"type":"navigate","url":"http://127.0.0.1:0/widgets.html?eventually=1500"},
			{"type":"assert","selector":"#eventually","equals":"ready","retries":8}`)
		rec := &recorder{}
		wantSucceeded(t, runDef(t, def, rec))
		e, _ := rec.end(1)
		if e.attempts < 2 || e.status != protocol.StepSucceeded {
			t.Fatalf("step 1: %+v", e)
		}
		var attempts []int
		for _, s := range rec.starts {
			if s.step == 1 {
				attempts = append(attempts, s.attempt)
			}
		}
		if len(attempts) != e.attempts {
			t.Fatalf("StepStarted attempts %v, StepFinished attempts %d", attempts, e.attempts)
		}
		for i, a := range attempts {
			if a != i+1 {
				t.Fatalf("StepStarted attempts %v", attempts)
			}
		}
	})
	t.Run("fails after every attempt", func(t *testing.T) {
		def := steps(t, "", widgets+`,{"type":"click","selector":"#nope","timeoutMs":150,"retries":2}`)
		rec := &recorder{}
		res := runDef(t, def, rec)
		wantFailure(t, res, protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, 1)
		if e, _ := rec.end(1); e.attempts != 3 {
			t.Errorf("attempts = %d, want 3", e.attempts)
		}
		n := 0
		for _, s := range rec.starts {
			if s.step == 1 {
				n++
			}
		}
		if n != 3 {
			t.Errorf("StepStarted %d times for step 1", n)
		}
	})
}

func TestOptionalStep(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"click","selector":"#nope","timeoutMs":150,"optional":true},
		{"type":"extract","selector":"#title","output":"title"}`)
	rec := &recorder{}
	res := runDef(t, def, rec)
	wantSucceeded(t, res)
	if res.Outputs["title"] != "Widgets" {
		t.Errorf("outputs = %v", res.Outputs)
	}
	e, _ := rec.end(1)
	if e.status != protocol.StepFailed || e.err == nil || e.err.Details["reason"] != protocol.ReasonElementNotFound {
		t.Errorf("optional step: %+v", e)
	}
	wantPNG(t, rec, "failure-step-1.png")
}

func TestCancel(t *testing.T) {
	t.Parallel()
	t.Run("during a step", func(t *testing.T) {
		def := steps(t, "", widgets+`,{"type":"sleep","ms":20000},{"type":"extract","selector":"#title","output":"title"}`)
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		rec := &recorder{onStart: func(step, _ int) {
			if step == 1 {
				cancel(errors.New("cancelled by the user"))
			}
		}}
		start := time.Now()
		res := runIn(t, newSession(t), ctx, def, rec)
		if res.Status != protocol.RunCancelled || res.Error != nil {
			t.Fatalf("result %+v", res)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("cancel took %v", d)
		}
		if e, _ := rec.end(1); e.status != protocol.StepSkipped {
			t.Errorf("step 1: %+v", e)
		}
		if _, ok := rec.end(2); ok {
			t.Error("a step ran after the cancel")
		}
	})
	t.Run("while awaiting approval", func(t *testing.T) {
		def := steps(t, "", `{"type":"approval","message":"Go on?"}`)
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		rec := &recorder{approve: func(actx context.Context, _ int, _ string) (bool, string, error) {
			cancel(errors.New("cancelled"))
			<-actx.Done()
			return false, "", actx.Err()
		}}
		res := runIn(t, newSession(t), ctx, def, rec)
		if res.Status != protocol.RunCancelled {
			t.Fatalf("result %+v", res)
		}
	})
	t.Run("before the start", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		rec := &recorder{}
		res := runIn(t, newSession(t), ctx, steps(t, "", widgets), rec)
		if res.Status != protocol.RunCancelled || len(rec.starts) != 0 {
			t.Fatalf("result %+v, starts %v", res, rec.starts)
		}
	})
}

func TestApproval(t *testing.T) {
	t.Parallel()
	def := steps(t, `[{"name":"amount","type":"number"}]`, widgets+`,
		{"type":"approval","message":"Pay {{amount}} EUR?"},
		{"type":"extract","selector":"#title","output":"title"}`)
	t.Run("approved", func(t *testing.T) {
		rec := &recorder{}
		res := runDef(t, def, rec, withInputs(map[string]any{"amount": 12.5}))
		wantSucceeded(t, res)
		if len(rec.approvals) != 1 || rec.approvals[0] != "Pay 12.5 EUR?" {
			t.Errorf("approvals %q", rec.approvals)
		}
		if res.Outputs["title"] != "Widgets" {
			t.Errorf("outputs %v", res.Outputs)
		}
	})
	t.Run("rejected", func(t *testing.T) {
		rec := &recorder{approve: func(context.Context, int, string) (bool, string, error) {
			return false, "too expensive", nil
		}}
		res := runDef(t, def, rec, withInputs(map[string]any{"amount": 99}))
		wantFailure(t, res, protocol.RunFailed, protocol.CodeForbidden, protocol.ReasonApprovalRejected, 1)
		if res.Error.Details["comment"] != "too expensive" {
			t.Errorf("details %v", res.Error.Details)
		}
		if _, ok := rec.end(2); ok {
			t.Error("a step ran after the rejection")
		}
	})
	t.Run("rejected optional still fails", func(t *testing.T) {
		def := steps(t, "", `{"type":"approval","message":"ok?","optional":true,"retries":2}`)
		rec := &recorder{approve: func(context.Context, int, string) (bool, string, error) { return false, "", nil }}
		res := runDef(t, def, rec)
		wantFailure(t, res, protocol.RunFailed, protocol.CodeForbidden, protocol.ReasonApprovalRejected, 0)
		if len(rec.approvals) != 1 {
			t.Errorf("asked %d times", len(rec.approvals))
		}
	})
}

func TestInvalidSelector(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,{"type":"click","selector":"#3","retries":2}`)
	rec := &recorder{}
	start := time.Now()
	res := runDef(t, def, rec)
	wantFailure(t, res, protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, 1)
	if e, _ := rec.end(1); e.attempts != 1 {
		t.Errorf("an invalid selector was retried: %d attempts", e.attempts)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %v: the invalid selector waited for the step timeout", d)
	}
}

// TestHungPage: a page that never returns from a script does not hold the
// run past its step timeout, even for an optional step.
func TestHungPage(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"click","selector":"#hang","timeoutMs":400,"optional":true},
		{"type":"extract","selector":"#title","output":"title","timeoutMs":400}`)
	start := time.Now()
	res := runDef(t, def, nil)
	if res.Status != protocol.RunFailed || res.Error == nil {
		t.Fatalf("result %+v", res)
	}
	t.Logf("%v: %s", time.Since(start), res.Error.Message)
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("a hung page held the run for %v", d)
	}
}
