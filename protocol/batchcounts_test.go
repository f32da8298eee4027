package protocol

import "testing"

func TestBatchCountsAdd(t *testing.T) {
	var c BatchCounts
	for _, s := range []string{"pending", "queued", "running", "awaiting_approval", "succeeded", "succeeded", "failed", "timed_out", "cancelled", ""} {
		c.Add(s)
	}
	want := BatchCounts{Total: 10, Pending: 2, Queued: 1, Running: 1, AwaitingApproval: 1, Succeeded: 2, Failed: 1, TimedOut: 1, Cancelled: 1}
	if c != want {
		t.Fatalf("counts %+v, want %+v", c, want)
	}
	if c.Done() != 5 {
		t.Fatalf("done %d, want 5", c.Done())
	}
}
