package cli

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strconv"
	"time"
)

// SSE limits: a stream is untrusted input, so a line or an event that grows
// past these ends the stream with an error instead of exhausting memory.
const (
	maxSSELine  = 8 << 20
	maxSSEEvent = 16 << 20
)

// errSSETooLarge ends a stream whose line or event is over the limits.
var errSSETooLarge = errors.New("event stream: line or event too large")

// SSEEvent is one dispatched Server-Sent Event.
type SSEEvent struct {
	// ID is the last event ID after this event (the stream's, not only this
	// event's: an event without an id: field keeps the previous one).
	ID string
	// Type is the event: field, "message" when the event has none.
	Type string
	// Data is the data: lines joined with "\n".
	Data string
}

// SSEReader reads an event stream as the WHATWG HTML standard's "event
// stream interpretation" says: lines end with CRLF, LF or CR; a leading
// byte order mark is skipped; lines starting with ":" are comments; "field:
// value" drops one space after the colon; "data" lines are joined with LF; an
// "id" containing NUL is ignored; "retry" takes only ASCII digits; a blank
// line dispatches the event, unless it has no data; an event cut by the end
// of the stream is not dispatched.
type SSEReader struct {
	br *bufio.Reader
	// maxLine and maxEvent are the limits (maxSSELine, maxSSEEvent).
	maxLine, maxEvent int

	line    []byte
	skipLF  bool // the last line ended with CR: a following LF belongs to it
	started bool // the BOM check is done

	lastID string
	retry  time.Duration

	data      bytes.Buffer
	eventType string
	hasData   bool
}

// NewSSEReader reads events from r.
func NewSSEReader(r io.Reader) *SSEReader {
	return &SSEReader{br: bufio.NewReaderSize(r, 32<<10), maxLine: maxSSELine, maxEvent: maxSSEEvent}
}

// LastEventID is the ID to send as Last-Event-ID when reconnecting.
func (r *SSEReader) LastEventID() string { return r.lastID }

// Retry is the reconnection delay the server asked for (0 when it did not).
func (r *SSEReader) Retry() time.Duration { return r.retry }

// Next returns the next event. At the end of the stream it returns io.EOF;
// any event still being read is dropped.
func (r *SSEReader) Next() (SSEEvent, error) {
	for {
		line, err := r.readLine()
		if err != nil {
			return SSEEvent{}, err
		}
		if len(line) == 0 {
			if ev, ok := r.dispatch(); ok {
				return ev, nil
			}
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value := line, []byte(nil)
		if i := bytes.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], line[i+1:]
			if len(value) > 0 && value[0] == ' ' {
				value = value[1:]
			}
		}
		switch string(field) {
		case "event":
			r.eventType = string(value)
		case "data":
			if r.data.Len()+len(value)+1 > r.maxEvent {
				return SSEEvent{}, errSSETooLarge
			}
			r.data.Write(value)
			r.data.WriteByte('\n')
			r.hasData = true
		case "id":
			if bytes.IndexByte(value, 0) < 0 {
				r.lastID = string(value)
			}
		case "retry":
			if ms, ok := digits(value); ok {
				r.retry = time.Duration(ms) * time.Millisecond
			}
		}
	}
}

// dispatch ends the event being read; an event without data is dropped
// (its id: still counts).
func (r *SSEReader) dispatch() (SSEEvent, bool) {
	defer func() {
		r.data.Reset()
		r.eventType = ""
		r.hasData = false
	}()
	if !r.hasData {
		return SSEEvent{}, false
	}
	data := r.data.Bytes()
	data = data[:len(data)-1] // the last data line's LF
	ev := SSEEvent{ID: r.lastID, Type: r.eventType, Data: string(data)}
	if ev.Type == "" {
		ev.Type = "message"
	}
	return ev, true
}

// digits parses a non-empty string of ASCII digits; a value too large for
// a duration is clamped to an hour.
func digits(b []byte) (int64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil || n > int64(time.Hour/time.Millisecond) {
		n = int64(time.Hour / time.Millisecond)
	}
	return n, true
}

// readLine returns the next line without its end (CRLF, LF or CR). The
// returned slice is valid until the next call.
func (r *SSEReader) readLine() ([]byte, error) {
	r.line = r.line[:0]
	for {
		c, err := r.br.ReadByte()
		if err != nil {
			return nil, err
		}
		if !r.started {
			r.started = true
			if c == 0xEF {
				// A UTF-8 byte order mark (EF BB BF) may open the stream.
				if next, err := r.br.Peek(2); err == nil && next[0] == 0xBB && next[1] == 0xBF {
					r.br.Discard(2)
					continue
				}
			}
		}
		if r.skipLF {
			r.skipLF = false
			if c == '\n' {
				continue
			}
		}
		switch c {
		case '\n':
			return r.line, nil
		case '\r':
			r.skipLF = true
			return r.line, nil
		}
		if len(r.line) >= r.maxLine {
			return nil, errSSETooLarge
		}
		r.line = append(r.line, c)
	}
}
