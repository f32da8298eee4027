package browser

import (
	"slices"
	"strings"

	"github.com/copelf/copelf/protocol"
	"github.com/sirupsen/logrus"
)

// scrubber replaces secret values with protocol.RedactedValue.
type scrubber struct {
	r *strings.Replacer // nil when there is nothing to scrub
}

// newScrubber scrubs the given values; longer values are replaced first so
// that a secret containing another is redacted whole.
func newScrubber(vals []string) scrubber {
	var pairs []string
	sorted := slices.Clone(vals)
	// longest first (SecretValues already sorts, the browser-wide set does not)
	slices.SortStableFunc(sorted, func(a, b string) int { return len(b) - len(a) })
	for _, v := range sorted {
		if v != "" {
			pairs = append(pairs, v, protocol.RedactedValue)
		}
	}
	if len(pairs) == 0 {
		return scrubber{}
	}
	return scrubber{r: strings.NewReplacer(pairs...)}
}

// str scrubs one string.
func (s scrubber) str(v string) string {
	if s.r == nil {
		return v
	}
	return s.r.Replace(v)
}

// value scrubs the strings inside a JSON-like value.
func (s scrubber) value(v any) any {
	if s.r == nil {
		return v
	}
	switch t := v.(type) {
	case string:
		return s.str(t)
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, x := range t {
			out[k] = s.value(x)
		}
		return out
	case []any:
		out := make([]any, len(t))
		for i, x := range t {
			out[i] = s.value(x)
		}
		return out
	case []string:
		out := make([]string, len(t))
		for i, x := range t {
			out[i] = s.str(x)
		}
		return out
	}
	return v
}

// err scrubs an error's message and details (a copy; nil stays nil).
func (s scrubber) err(e *protocol.Error) *protocol.Error {
	if e == nil || s.r == nil {
		return e
	}
	cp := *e
	cp.Message = s.str(e.Message)
	if e.Details != nil {
		cp.Details = s.value(e.Details).(map[string]any)
	}
	return &cp
}

// fields scrubs logrus fields.
func (s scrubber) fields(f logrus.Fields) logrus.Fields {
	if s.r == nil {
		return f
	}
	out := make(logrus.Fields, len(f))
	for k, v := range f {
		switch t := v.(type) {
		case error:
			out[k] = s.str(t.Error())
		default:
			out[k] = s.value(v)
		}
	}
	return out
}
