package api

import (
	"net/http"
	"net/url"
	"testing"

	"github.com/copelf/copelf/protocol"
)

// FuzzEventQuery feeds the event streams' query and Last-Event-ID readers
// untrusted input: each either accepts it or answers bad_request naming the
// field, never panics.
func FuzzEventQuery(f *testing.F) {
	f.Add("run,batch", "42", "")
	f.Add("agent", "", "7")
	f.Add("run,,bogus", "-1", "x")
	f.Add(" approval ", "9223372036854775808", "0")
	f.Fuzz(func(t *testing.T, types, header, query string) {
		if got, err := eventTypes(types); err != nil {
			if protocol.ErrorCode(err) != protocol.CodeBadRequest {
				t.Fatalf("types %q: %v", types, err)
			}
		} else if types != "" && len(got) == 0 {
			t.Fatalf("types %q accepted as nothing", types)
		}
		r := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: url.Values{"lastEventId": {query}}.Encode()}}
		if header != "" {
			r.Header.Set("Last-Event-ID", header)
		}
		id, ok, err := lastEventID(r)
		switch {
		case err != nil:
			if protocol.ErrorCode(err) != protocol.CodeBadRequest {
				t.Fatalf("last event id %q/%q: %v", header, query, err)
			}
		case ok && id < 0:
			t.Fatalf("negative id %d accepted", id)
		}
	})
}
