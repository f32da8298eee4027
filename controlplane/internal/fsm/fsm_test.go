package fsm

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/copelf/copelf/protocol"
)

// matrix parses an expected-allowed table: a header row of column indexes and
// one row per from-state, "x" where from → to is allowed and "." where not.
// Columns follow the order of states.
func matrix[S ~string](t *testing.T, states []S, table string) map[[2]S]bool {
	t.Helper()
	allowed := make(map[[2]S]bool)
	rows := 0
	for _, line := range strings.Split(strings.TrimSpace(table), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || fields[0] == "from\\to" {
			continue
		}
		if len(fields) != len(states)+1 {
			t.Fatalf("row %q: want %d columns", line, len(states)+1)
		}
		from := S(fields[0])
		if from == "<empty>" {
			from = ""
		}
		if !slices.Contains(states, from) {
			t.Fatalf("row %q: unknown from-state", line)
		}
		for i, cell := range fields[1:] {
			switch cell {
			case "x":
				allowed[[2]S{from, states[i]}] = true
			case ".":
			default:
				t.Fatalf("row %q: bad cell %q", line, cell)
			}
		}
		rows++
	}
	if rows != len(states) {
		t.Fatalf("table has %d rows, want %d", rows, len(states))
	}
	return allowed
}

func checkMachine[S ~string](t *testing.T, states []S, table string,
	transition func(from, to S) error, sources func(to S) []S) {
	t.Helper()
	allowed := matrix(t, states, table)
	for _, from := range states {
		for _, to := range states {
			err := transition(from, to)
			if want := allowed[[2]S{from, to}]; want != (err == nil) {
				t.Errorf("%q → %q: err = %v, want allowed = %v", from, to, err, want)
				continue
			}
			if err == nil {
				continue
			}
			var e *protocol.Error
			if !errors.As(err, &e) || e.Code != protocol.CodeConflict || e.Message == "" {
				t.Errorf("%q → %q: error %#v is not a conflict *protocol.Error", from, to, err)
				continue
			}
			if e.Details["from"] != string(from) || e.Details["to"] != string(to) {
				t.Errorf("%q → %q: details %v", from, to, e.Details)
			}
			if !errors.Is(err, protocol.NewError(protocol.CodeConflict)) {
				t.Errorf("errors.Is conflict fails")
			}
		}
	}
	// Sources agree with the transitions, sorted, and are fresh copies.
	for _, to := range states {
		want := []S{}
		for _, from := range states {
			if transition(from, to) == nil {
				want = append(want, from)
			}
		}
		slices.Sort(want)
		got := sources(to)
		if got == nil || !slices.Equal(got, want) {
			t.Errorf("sources(%q) = %#v, want %#v", to, got, want)
		}
		if !slices.IsSorted(got) {
			t.Errorf("sources(%q) not sorted: %v", to, got)
		}
		if len(got) > 0 {
			got[0] = "mutated"
			if again := sources(to); !slices.Equal(again, want) {
				t.Errorf("sources(%q) shares its backing array", to)
			}
		}
	}
}

func TestRun(t *testing.T) {
	states := []protocol.RunStatus{
		protocol.RunQueued, protocol.RunRunning, protocol.RunAwaitingApproval,
		protocol.RunSucceeded, protocol.RunFailed, protocol.RunTimedOut, protocol.RunCancelled,
		"paused", "",
	}
	// Columns: queued running awaiting_approval succeeded failed timed_out cancelled paused <empty>
	checkMachine(t, states, `
from\to            qu ru aw su fa ti ca pa em
queued             .  x  .  .  .  x  x  .  .
running            .  .  x  x  x  x  x  .  .
awaiting_approval  .  x  .  x  x  x  x  .  .
succeeded          .  .  .  .  .  .  .  .  .
failed             .  .  .  .  .  .  .  .  .
timed_out          .  .  .  .  .  .  .  .  .
cancelled          .  .  .  .  .  .  .  .  .
paused             .  .  .  .  .  .  .  .  .
<empty>            .  .  .  .  .  .  .  .  .
`, RunTransition, RunSources)
	// Terminal states agree with protocol.RunStatus.Terminal.
	for _, s := range states[:7] {
		leaves := false
		for _, to := range states {
			leaves = leaves || RunTransition(s, to) == nil
		}
		if s.Terminal() == leaves {
			t.Errorf("%q: Terminal() = %v but leaves = %v", s, s.Terminal(), leaves)
		}
	}
	if got := RunSources(protocol.RunCancelled); !slices.Equal(got, []protocol.RunStatus{"awaiting_approval", "queued", "running"}) {
		t.Errorf("RunSources(cancelled) = %v", got)
	}
}

func TestBatch(t *testing.T) {
	states := []protocol.BatchStatus{
		protocol.BatchCreated, protocol.BatchRunning, protocol.BatchCompleted, protocol.BatchCancelled, "paused", "",
	}
	checkMachine(t, states, `
from\to    cr ru co ca pa em
created    .  x  .  x  .  .
running    .  .  x  x  .  .
completed  .  .  .  .  .  .
cancelled  .  .  .  .  .  .
paused     .  .  .  .  .  .
<empty>    .  .  .  .  .  .
`, BatchTransition, BatchSources)
}

func TestWorkflow(t *testing.T) {
	states := []protocol.WorkflowStatus{
		protocol.WorkflowAnalyzing, protocol.WorkflowReady, protocol.WorkflowAnalysisFailed, "deleted", "",
	}
	checkMachine(t, states, `
from\to          an re af de em
analyzing        .  x  x  .  .
ready            x  x  .  .  .
analysis_failed  x  .  .  .  .
deleted          .  .  .  .  .
<empty>          .  .  .  .  .
`, WorkflowTransition, WorkflowSources)
}

func TestApproval(t *testing.T) {
	states := []protocol.ApprovalStatus{
		protocol.ApprovalPending, protocol.ApprovalApproved, protocol.ApprovalRejected, protocol.ApprovalExpired, "cancelled", "",
	}
	checkMachine(t, states, `
from\to    pe ap re ex ca em
pending    .  x  x  x  .  .
approved   .  .  .  .  .  .
rejected   .  .  .  .  .  .
expired    .  .  .  .  .  .
cancelled  .  .  .  .  .  .
<empty>    .  .  .  .  .  .
`, ApprovalTransition, ApprovalSources)
}

func TestErrorMessage(t *testing.T) {
	err := RunTransition(protocol.RunSucceeded, protocol.RunRunning)
	want := `conflict: Cannot move the run from "succeeded" to "running".`
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v, want %s", err, want)
	}
}
