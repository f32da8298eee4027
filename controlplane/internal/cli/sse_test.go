package cli

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// readAll reads every event of a stream and the reader's final state.
func readAll(r io.Reader) (events []SSEEvent, lastID string, retry time.Duration, err error) {
	sr := NewSSEReader(r)
	for {
		ev, err := sr.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = nil
			}
			return events, sr.LastEventID(), sr.Retry(), err
		}
		events = append(events, ev)
	}
}

func TestSSEReader(t *testing.T) {
	cases := []struct {
		name   string
		in     string
		want   []SSEEvent
		lastID string
		retry  time.Duration
	}{
		{"multi-line data", "data: YHOO\ndata: +2\ndata: 10\n\n", []SSEEvent{{Type: "message", Data: "YHOO\n+2\n10"}}, "", 0},
		{"comments and ids", ": keep-alive\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
			[]SSEEvent{{ID: "1", Type: "message", Data: "first event"}, {ID: "", Type: "message", Data: "second event"}, {ID: "", Type: "message", Data: " third event"}}, "", 0},
		{"empty data", "data\n\ndata\ndata\n\ndata:\n", []SSEEvent{{Type: "message", Data: ""}, {Type: "message", Data: "\n"}}, "", 0},
		{"one space is dropped", "data:test\n\ndata: test\n\n", []SSEEvent{{Type: "message", Data: "test"}, {Type: "message", Data: "test"}}, "", 0},
		{"event type and id", "id: 42\nevent: run.updated\ndata: {\"a\":1}\n\n", []SSEEvent{{ID: "42", Type: "run.updated", Data: `{"a":1}`}}, "42", 0},
		{"the type does not carry over", "event: x\ndata: 1\n\ndata: 2\n\n", []SSEEvent{{Type: "x", Data: "1"}, {Type: "message", Data: "2"}}, "", 0},
		{"the id carries over", "id: 7\ndata: 1\n\ndata: 2\n\n", []SSEEvent{{ID: "7", Type: "message", Data: "1"}, {ID: "7", Type: "message", Data: "2"}}, "7", 0},
		{"an id without data still counts", "id: 9\n\n", nil, "9", 0},
		{"an id with NUL is ignored", "id: 3\ndata: a\n\nid: 4\x005\ndata: b\n\n", []SSEEvent{{ID: "3", Type: "message", Data: "a"}, {ID: "3", Type: "message", Data: "b"}}, "3", 0},
		{"CRLF", "id: 1\r\ndata: a\r\ndata: b\r\n\r\n", []SSEEvent{{ID: "1", Type: "message", Data: "a\nb"}}, "1", 0},
		{"CR", "data: a\rdata: b\r\rdata: c\r\r", []SSEEvent{{Type: "message", Data: "a\nb"}, {Type: "message", Data: "c"}}, "", 0},
		{"byte order mark", "\xEF\xBB\xBFdata: a\n\n", []SSEEvent{{Type: "message", Data: "a"}}, "", 0},
		{"a later BOM is data", "data: \xEF\xBB\xBFa\n\n", []SSEEvent{{Type: "message", Data: "\xEF\xBB\xBFa"}}, "", 0},
		{"retry", "retry: 2500\n\nretry: 10a\n\nretry:\n\n", nil, "", 2500 * time.Millisecond},
		{"a huge retry is clamped", "retry: 99999999999999999999999\n", nil, "", time.Hour},
		{"unknown fields are ignored", "foo: bar\ndata: x\nDATA: y\n\n", []SSEEvent{{Type: "message", Data: "x"}}, "", 0},
		{"an event cut by the end is dropped", "data: a\n\ndata: b\n", []SSEEvent{{Type: "message", Data: "a"}}, "", 0},
		{"a line cut by the end is dropped", "data: a\n\nid: 5", []SSEEvent{{Type: "message", Data: "a"}}, "", 0},
		{"colons in the value", "data: a: b\n\n", []SSEEvent{{Type: "message", Data: "a: b"}}, "", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, split := range []bool{false, true} {
				var r io.Reader = strings.NewReader(tc.in)
				if split {
					r = iotest.OneByteReader(r)
				}
				got, lastID, retry, err := readAll(r)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tc.want) || lastID != tc.lastID || retry != tc.retry {
					t.Errorf("byte by byte %t:\ngot  %q last id %q retry %v\nwant %q last id %q retry %v", split, got, lastID, retry, tc.want, tc.lastID, tc.retry)
				}
			}
		})
	}
}

// A CR at the end of what has arrived so far ends the line: the event is
// dispatched without waiting for the next byte.
func TestSSEReaderDoesNotWaitAfterCR(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	go pw.Write([]byte("data: a\r\r"))
	sr := NewSSEReader(pr)
	got := make(chan SSEEvent, 1)
	go func() {
		ev, err := sr.Next()
		if err == nil {
			got <- ev
		}
		close(got)
	}()
	select {
	case ev := <-got:
		if ev.Data != "a" {
			t.Fatalf("got %+v", ev)
		}
	case <-time.After(wait):
		t.Fatal("the event was not dispatched")
	}
	pw.Close()
}

func TestSSEReaderLimits(t *testing.T) {
	limited := func(in string) error {
		sr := NewSSEReader(strings.NewReader(in))
		sr.maxLine, sr.maxEvent = 64, 256
		for {
			if _, err := sr.Next(); err != nil {
				return err
			}
		}
	}
	if err := limited("data: " + strings.Repeat("x", 58) + "\n\n"); !errors.Is(err, io.EOF) {
		t.Errorf("a line at the limit: %v", err)
	}
	if err := limited("data: " + strings.Repeat("x", 59) + "\n\n"); !errors.Is(err, errSSETooLarge) {
		t.Errorf("a line over the limit: %v", err)
	}
	line := "data: " + strings.Repeat("y", 50) + "\n"
	if err := limited(strings.Repeat(line, 6) + "\n"); !errors.Is(err, errSSETooLarge) {
		t.Errorf("an event over the limit: %v", err)
	}
	if err := limited(strings.Repeat(line+"\n", 50)); !errors.Is(err, io.EOF) {
		t.Errorf("many events within the limit: %v", err)
	}
	if r := NewSSEReader(strings.NewReader("")); r.maxLine != maxSSELine || r.maxEvent != maxSSEEvent {
		t.Errorf("default limits %d %d", r.maxLine, r.maxEvent)
	}
}

// encodeSSE writes events as a server would; reading the result gives the
// same events back.
func encodeSSE(events []SSEEvent) string {
	var b strings.Builder
	for _, ev := range events {
		b.WriteString("id: " + ev.ID + "\n")
		b.WriteString("event: " + ev.Type + "\n")
		for _, line := range strings.Split(ev.Data, "\n") {
			b.WriteString("data: " + line + "\n")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// FuzzSSE: the stream is untrusted. Whatever arrives, the reader does not
// panic, reads the same events however the bytes are split, keeps its
// fields free of line ends (and the id free of NUL), and what it read
// encodes back to a stream that reads the same.
func FuzzSSE(f *testing.F) {
	for _, seed := range []string{
		"id: 1\nevent: run.updated\ndata: {\"id\":\"evt_1\",\"type\":\"run.updated\",\"data\":{\"id\":\"run_1\",\"status\":\"running\"}}\n\n",
		": keep-alive\n\nretry: 1000\nid: 2\ndata: a\ndata: b\n\n",
		"\xEF\xBB\xBFdata: x\r\n\r\ndata: y\r\rid: 3\x00\n\n",
		"data\n\nevent\n\nid\n\nretry: 5\n\n:\n\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		events, lastID, retry, err := readAll(strings.NewReader(string(in)))
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		split, splitID, splitRetry, err := readAll(iotest.OneByteReader(strings.NewReader(string(in))))
		if err != nil {
			t.Fatalf("reading byte by byte: %v", err)
		}
		if !reflect.DeepEqual(events, split) || lastID != splitID || retry != splitRetry {
			t.Fatalf("byte by byte differs:\n%q %q %v\n%q %q %v", events, lastID, retry, split, splitID, splitRetry)
		}
		if retry < 0 || retry > time.Hour {
			t.Fatalf("retry %v", retry)
		}
		for _, ev := range events {
			if strings.ContainsAny(ev.ID, "\r\n\x00") || strings.ContainsAny(ev.Type, "\r\n") || strings.Contains(ev.Data, "\r") || ev.Type == "" {
				t.Fatalf("bad event %q", ev)
			}
		}
		again, _, _, err := readAll(strings.NewReader(encodeSSE(events)))
		if err != nil {
			t.Fatalf("reading the encoded events: %v", err)
		}
		if !reflect.DeepEqual(events, again) {
			t.Fatalf("round trip differs:\n%q\n%q", events, again)
		}
	})
}
