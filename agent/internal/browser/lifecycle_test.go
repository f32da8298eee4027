package browser

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/copelf/copelf/protocol"
)

func TestSecretsNeverLeak(t *testing.T) {
	t.Parallel()
	const secret = "tops3cretvalue"
	def := steps(t, `[{"name":"user","type":"string"},{"name":"pw","type":"secret","required":true}]`,
		`{"type":"navigate","url":"http://127.0.0.1:0/login.html?token={{pw}}"},
		{"type":"type","selector":"#username","text":"{{pw}}"},
		{"type":"type","selector":"#password","text":"{{pw}}"},
		{"type":"click","selector":"#login"},
		{"type":"extract","selector":"#welcome","output":"welcome"},
		{"type":"click","selector":"#{{pw}}","timeoutMs":150,"optional":true},
		{"type":"approval","message":"Sign in as {{user}} with {{pw}}?"},
		{"type":"assert","selector":"#welcome","equals":"Welcome, {{pw}}"}`)
	rec := &recorder{}
	res := runDef(t, def, rec, withInputs(map[string]any{"user": "ada", "pw": secret}))
	wantFailure(t, res, protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonAssertionFailed, 7)

	if got := res.Outputs["welcome"]; got != "Welcome, "+protocol.RedactedValue+"!" {
		t.Errorf("outputs.welcome = %q", got)
	}
	if e, _ := rec.end(5); e.err == nil || e.err.Details["selector"] != "#"+protocol.RedactedValue {
		t.Errorf("element_not_found of a secret selector: %+v", e.err)
	}
	if rec.approvals[0] != "Sign in as ada with "+protocol.RedactedValue+"?" {
		t.Errorf("approval message %q", rec.approvals[0])
	}
	if res.Error.Details["expected"] != "Welcome, "+protocol.RedactedValue {
		t.Errorf("details.expected = %v", res.Error.Details["expected"])
	}

	everything, _ := json.Marshal(map[string]any{"result": res, "error": res.Error, "ends": fmt.Sprintf("%+v", rec.ends),
		"endErrs": rec.ends, "approvals": rec.approvals})
	for _, e := range rec.ends {
		b, _ := json.Marshal(e.err)
		everything = append(everything, b...)
		everything = append(everything, fmt.Sprint(e.output)...)
	}
	if strings.Contains(string(everything), secret) {
		t.Errorf("the secret leaked into the result or the reports: %s", everything)
	}
	for _, e := range logs.AllEntries() {
		line, _ := e.String()
		if strings.Contains(line, secret) || strings.Contains(e.Message, secret) {
			t.Errorf("the secret leaked into a log line: %s", line)
		}
	}
}

func TestIsolationBetweenSessions(t *testing.T) {
	t.Parallel()
	set := steps(t, "", `{"type":"navigate","url":"http://127.0.0.1:0/storage.html"},
		{"type":"click","selector":"#set"},
		{"type":"assert","selector":"#cookie","textContains":"copelf=remembered"},
		{"type":"assert","selector":"#local","equals":"remembered"},
		{"type":"navigate","url":"http://127.0.0.1:0/storage.html"},
		{"type":"assert","selector":"#local","equals":"remembered"}`)
	a := newSession(t)
	wantSucceeded(t, runIn(t, a, context.Background(), set, nil))

	read := steps(t, "", `{"type":"navigate","url":"http://127.0.0.1:0/storage.html"},
		{"type":"extract","selector":"#cookie","output":"cookie"},
		{"type":"extract","selector":"#local","output":"local"}`)
	b := newSession(t) // a is still open
	res := runIn(t, b, context.Background(), read, nil)
	wantSucceeded(t, res)
	if res.Outputs["cookie"] != "" || res.Outputs["local"] != "" {
		t.Errorf("the second session sees the first one's storage: %v", res.Outputs)
	}
}

func TestPoolGetIsFast(t *testing.T) {
	p := NewPool(shared, 2)
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.WaitReady(ctx, 2); err != nil {
		t.Fatal(err)
	}
	var firstCmd time.Duration
	for i := range 2 {
		start := time.Now()
		s, err := p.Get(ctx)
		got := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		// A ready session is handed over at once (microseconds); making
		// a browser context costs about 200 ms. The bound tells the two
		// apart with room for a loaded machine (the figure itself is
		// measured by BenchmarkAssignToFirstCommand).
		if got > 150*time.Millisecond {
			t.Errorf("Get %d took %v with a ready pool", i, got)
		}
		rec := &recorder{onStart: func(step, attempt int) {
			if step == 0 && attempt == 1 {
				firstCmd = time.Since(start)
			}
		}}
		res := runIn(t, s, ctx, steps(t, "", widgets+`,{"type":"extract","selector":"#title","output":"t"}`), rec)
		s.Close()
		wantSucceeded(t, res)
		t.Logf("Get %v, Get to the first step %v", got, firstCmd)
	}
	// Replacements come back.
	if err := p.WaitReady(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Get(ctx); err != ErrClosed {
		t.Errorf("Get after Close: %v", err)
	}
}

// TestBrowserCrash kills Chromium in the middle of a run: the run fails at
// once with browser_crashed, and the next session (from NewSession and from
// a pool prepared before the crash) runs on a new Chromium.
func TestBrowserCrash(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b, err := Start(ctx, Options{Log: logger})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := b.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}()
	p := NewPool(b, 1)
	defer p.Close()
	if err := p.WaitReady(ctx, 1); err != nil {
		t.Fatal(err)
	}

	s, err := b.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	oldPID := b.PID()
	def := steps(t, "", widgets+`,{"type":"waitFor","selector":"#never","timeoutMs":30000}`)
	rec := &recorder{onStart: func(step, _ int) {
		if step == 1 {
			if err := syscall.Kill(oldPID, syscall.SIGKILL); err != nil {
				t.Errorf("kill: %v", err)
			}
		}
	}}
	start := time.Now()
	res := runIn(t, s, ctx, def, rec)
	elapsed := time.Since(start)
	wantFailure(t, res, protocol.RunFailed, protocol.CodeInternal, protocol.ReasonBrowserCrashed, 1)
	if elapsed > 5*time.Second {
		t.Errorf("the crash was noticed after %v", elapsed)
	}
	t.Logf("run with the crash: %v", elapsed)

	check := steps(t, "", widgets+`,{"type":"extract","selector":"#title","output":"t"}`)
	start = time.Now()
	s2, err := b.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("new session on a new Chromium: %v", time.Since(start))
	defer s2.Close()
	if pid := b.PID(); pid == oldPID || pid == 0 {
		t.Errorf("pid %d after the crash, was %d", pid, oldPID)
	}
	wantSucceeded(t, runIn(t, s2, ctx, check, nil))

	s3, err := p.Get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	wantSucceeded(t, runIn(t, s3, ctx, check, nil))
}

// TestTabCrash crashes the tab's renderer (not Chromium) in the middle of a
// step: the run fails at once with browser_crashed.
func TestTabCrash(t *testing.T) {
	t.Parallel()
	s := newSession(t)
	def := steps(t, "", widgets+`,{"type":"waitFor","selector":"#never","timeoutMs":30000}`)
	crashed := make(chan struct{})
	rec := &recorder{onStart: func(step, _ int) {
		if step == 1 {
			go func() {
				defer close(crashed)
				ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
				defer cancel()
				_, _ = chromedp.Call(ctx, page.Crash, cdp.Empty{}) // no answer: the renderer is gone
			}()
		}
	}}
	start := time.Now()
	res := runIn(t, s, context.Background(), def, rec)
	<-crashed
	wantFailure(t, res, protocol.RunFailed, protocol.CodeInternal, protocol.ReasonBrowserCrashed, 1)
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the crash was noticed after %v", d)
	}
}
