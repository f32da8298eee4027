package cluster

import (
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// TestEncode: a burst packs into payloads PostgreSQL takes (under 8000
// bytes), and decodes back to every signal, in order.
func TestEncode(t *testing.T) {
	var sigs []Signal
	for i := range 3000 {
		sigs = append(sigs, Signal{Kind: KindApproval, RunID: fmt.Sprintf("run_%026d", i), ApprovalID: fmt.Sprintf("apr_%026d", i)})
	}
	sigs = append(sigs, Signal{Kind: KindEvents}, Signal{Kind: KindRun, RunID: strings.Repeat("x", 9000)})
	payloads := encode("rep_1", sigs)
	if len(payloads) < 2 {
		t.Fatalf("%d payloads for %d signals", len(payloads), len(sigs))
	}
	var got []Signal
	for _, p := range payloads {
		if len(p) >= 8000 {
			t.Fatalf("payload of %d bytes", len(p))
		}
		m, ok := decode(p)
		if !ok || m.Origin != "rep_1" {
			t.Fatalf("decode %q: %v %+v", p[:40], ok, m)
		}
		got = append(got, m.Signals...)
	}
	// The oversized signal is not sent; the rest are, in order.
	if len(got) != len(sigs)-1 || got[0] != sigs[0] || got[len(got)-1] != sigs[len(sigs)-2] {
		t.Fatalf("got %d signals back of %d", len(got), len(sigs)-1)
	}
	if encode("rep_1", nil) != nil {
		t.Error("no signals, no payload")
	}
}

// FuzzReceive: whatever arrives on the channel (anyone who can connect to
// the database can NOTIFY it) is ignored or acted on, never a panic, and
// only well-formed signals reach the receiver.
func FuzzReceive(f *testing.F) {
	f.Add(`{"origin":"rep_2","s":[{"k":"queued","a":"usr_1"},{"k":"run","r":"run_1"},{"k":"approval","r":"run_1","p":"apr_1"},{"k":"events"}]}`)
	f.Add(`{"origin":"rep_1","s":[{"k":"queued","a":"usr_1"}]}`)
	f.Add(`{"origin":"","s":[]}`)
	f.Add(`{"s":[{"k":"approval","r":"run_1"}]}`)
	f.Add(`[1,2,3]`)
	f.Add(`not json`)
	f.Fuzz(func(t *testing.T, payload string) {
		log := logrus.New()
		log.Out = io.Discard
		c, err := New("sqlite://x", log, Config{Origin: "rep_1"})
		if err != nil {
			t.Fatal(err)
		}
		c.recv = Receiver{
			Queued: func(a string) {
				if a == "" {
					t.Error("queued without an account")
				}
			},
			EventsAppended: func() {},
		}
		c.receive(payload)
		for {
			select {
			case s := <-c.slow:
				if s.RunID == "" || (s.Kind == KindApproval && s.ApprovalID == "") {
					t.Errorf("slow signal without ids: %+v", s)
				}
				continue
			case <-c.resyncKick:
				continue
			default:
			}
			break
		}
	})
}
