package cli

import (
	"testing"
	"time"
)

func TestShortDurations(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:                  "0ms",
		850 * time.Millisecond:        "850ms",
		1331 * time.Millisecond:       "1.33s",
		12 * time.Second:              "12s",
		3*time.Minute + 4*time.Second: "3m04s",
		2*time.Hour + 5*time.Minute:   "2h05m",
		76*time.Hour + 10*time.Minute: "3d04h",
	} {
		if got := short(d); got != want {
			t.Errorf("short(%v) = %q, want %q", d, got, want)
		}
	}
}
