package cli

import (
	"context"
	"errors"
	"flag"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"go.uber.org/goleak"

	"github.com/copelf/copelf/agent/internal/agent"
	"github.com/copelf/copelf/protocol"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestParseConfigFlagsAndEnvTwins(t *testing.T) {
	t.Setenv("COPELF_AGENT_TOKEN", "tok")
	t.Setenv("COPELF_SLOTS", "3")
	t.Setenv("COPELF_DRAIN_TIMEOUT", "1500ms")
	c, err := ParseConfig([]string{"-server", "http://a:1, https://b", "-labels", "os=linux, gpu=yes", "-slots", "2"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Token != "tok" || c.Slots != 2 || c.DrainTimeout != 1500*time.Millisecond ||
		strings.Join(c.Servers, " ") != "http://a:1 https://b" || c.Labels["os"] != "linux" || c.Labels["gpu"] != "yes" {
		t.Errorf("config = %+v", c)
	}
	d, err := ParseConfig(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(d.Servers, ",") != "http://127.0.0.1:8080" || d.Slots != 3 || d.Chrome != "" || d.ID != "" {
		t.Errorf("defaults = %+v", d)
	}
}

func TestParseConfigErrors(t *testing.T) {
	t.Setenv("COPELF_AGENT_TOKEN", "")
	if _, err := ParseConfig(nil, io.Discard); err == nil || !strings.Contains(err.Error(), "COPELF_AGENT_TOKEN") {
		t.Errorf("missing token: %v", err)
	}
	t.Setenv("COPELF_AGENT_TOKEN", "tok")
	for _, args := range [][]string{{"-slots", "0"}, {"-labels", "novalue"}, {"-id", "bad id"}, {"extra"}, {"-server", " , "}} {
		if _, err := ParseConfig(args, io.Discard); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
	if _, err := ParseConfig([]string{"-h"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-h: %v", err)
	}
}

// noExec is an executor that never runs anything (no run is assigned).
type noExec struct{}

func (noExec) Session(ctx context.Context) (agent.Session, error) {
	return nil, errors.New("no browser")
}

func fakeExecutor(stopped *bool) executorFactory {
	return func(context.Context, Config, logrus.FieldLogger) (agent.Executor, func(), error) {
		return noExec{}, func() { *stopped = true }, nil
	}
}

func TestRunRefusedTokenIsAnError(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"code":"unauthenticated","message":"The agent token is not valid.","details":null}`))
	}))
	defer srv.Close()
	t.Setenv("COPELF_AGENT_TOKEN", "tok")
	var stopped bool
	err := run(context.Background(), []string{"-server", srv.URL, "-id", "cli-test", "-log-level", "error"}, io.Discard, fakeExecutor(&stopped))
	if protocol.ErrorCode(err) != protocol.CodeUnauthenticated {
		t.Errorf("run = %v, want unauthenticated", err)
	}
	if !stopped {
		t.Error("the executor was not stopped")
	}
}

func TestRunStopsCleanlyOnSignal(t *testing.T) {
	// No server listens: the agent keeps reconnecting until the signal.
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	t.Setenv("COPELF_AGENT_TOKEN", "tok")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	var stopped bool
	go func() {
		errc <- run(ctx, []string{"-server", dead.URL, "-state-dir", t.TempDir(), "-drain-timeout", "100ms", "-log-level", "error"},
			io.Discard, fakeExecutor(&stopped))
	}()
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("run = %v, want nil after a signal", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return")
	}
	if !stopped {
		t.Error("the executor was not stopped")
	}
}
