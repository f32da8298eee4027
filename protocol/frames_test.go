package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// Realistic ids of the server's shape: a prefix, "_" and 26 of [a-z2-7].
const (
	tRun   = "run_k4tq2mzx5bv3hn4wp6yc2drfja"
	tRun2  = "run_c3kq7m4zxbv5hnw2pt6yd2rfja"
	tLease = "lse_m2zq7t4xkbv5hnw3pc6yd2rfja"
	tAgent = "agt_p7d2kq4mzxv3tbn5hw6yc2rfja"
	tWf    = "wf_t2kq7m4zxbv5hnw3pc6yd2rfja"
	tBatch = "bat_x5kq7m4ztbv2hnw3pc6yd2rfja"
	tAppr  = "apr_h6kq7m4zxbv5tnw3pc2yd2rfja"
	tSess  = "ses_w3kq7m4zxbv5hnt2pc6yd2rfja"
)

func refOf[T any](v T) *T { return &v }

// sampleDefinition is a small login workflow with an approval step.
func sampleDefinition() *Definition {
	return &Definition{
		Version:   1,
		TimeoutMs: 120_000,
		Variables: []Variable{
			{Name: "username", Type: VarString, Required: true, Pattern: "[a-z0-9._-]+", MaxLength: refOf(64)},
			{Name: "password", Type: VarSecret, Required: true},
			{Name: "amount", Type: VarNumber, Default: 10.0, Min: refOf(1.0), Max: refOf(500.0)},
		},
		Steps: []Step{
			{Type: StepNavigate, URL: "https://shop.example.com/login"},
			{Type: StepTypeText, Selector: "#user", Text: "{{username}}", TimeoutMs: 5000},
			{Type: StepTypeText, Selector: "#pass", Text: "{{password}}", Clear: true},
			{Type: StepClick, Selector: "button[type=submit]", Retries: 2},
			{Type: StepWaitFor, Selector: ".dashboard", State: "visible"},
			{Type: StepApproval, Message: "Transfer {{amount}} EUR?"},
			{Type: StepExtract, Selector: "#balance", Output: "balance"},
			{Type: StepScreenshot, Name: "done-{{run.id}}", FullPage: true},
		},
	}
}

// SampleFrames returns realistic frames of every type, each valid. Tests of
// package protocol_test use it too.
func SampleFrames() []Frame {
	return []Frame{
		&Hello{Protocol: 1, Token: "copelf_agent_3q2x-Fh8kLm0zN_vY7tR1uWcBaE9dG4sJ6pQ5oI2nK8",
			Agent: AgentInfo{ID: "build-box-01", Name: "Build box", Kind: AgentHeadless, Version: "0.1.0", Slots: 2,
				Labels: map[string]string{"region": "eu-west", "browser": "chromium"}}},
		&Hello{Protocol: 1, Token: "copelf_agent_x", Agent: AgentInfo{ID: "ext:6f0c2a", Name: "Chrome on laptop", Kind: AgentExtension, Version: "1.4.2", Slots: 1}},
		&Welcome{SessionID: tSess, AgentID: tAgent, HeartbeatMs: 10_000, LeaseMs: 30_000, Runs: []HeldRun{}},
		&Welcome{SessionID: tSess, AgentID: tAgent, HeartbeatMs: 10_000, LeaseMs: 30_000,
			Runs: []HeldRun{{RunID: tRun, Attempt: 1, LeaseID: tLease, Status: RunRunning}, {RunID: tRun2, Attempt: 2, LeaseID: tLease, Status: RunAwaitingApproval}}},
		&ErrorFrame{Code: CodeConflict, Message: "The lease of this run was lost.", Details: map[string]any{"reason": ReasonLeaseLost}, RunID: tRun},
		&ErrorFrame{Code: CodeBadRequest, Message: "Unsupported protocol version 2.", Details: map[string]any{"reason": "unsupported_protocol", "supported": []any{1.0}}},
		&ErrorFrame{Code: CodeUnauthenticated, Message: "Authentication is required."},
		&Ready{Slots: 0},
		&Ready{Slots: 3},
		&Assign{RunID: tRun, Attempt: 1, LeaseID: tLease, Workflow: AssignedWorkflow{ID: tWf, Name: "Login and transfer", Definition: sampleDefinition()},
			Inputs: map[string]any{"username": "ada", "password": "s3cret", "amount": 25.0}, TimeoutMs: 120_000},
		&Assign{RunID: tRun2, Attempt: 3, LeaseID: tLease, Workflow: AssignedWorkflow{ID: tWf, Name: "Batch row", Definition: &Definition{Version: 1, Variables: []Variable{},
			Steps: []Step{{Type: StepNavigate, URL: "https://example.com/?q={{iteration.index}}"}}}}, Inputs: map[string]any{}, BatchID: tBatch, Iteration: refOf(4)},
		&Accept{RunID: tRun, LeaseID: tLease},
		&Reject{RunID: tRun, LeaseID: tLease, Reason: "browser unavailable"},
		&Reject{RunID: tRun, LeaseID: tLease},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 1, Kind: EventStarted},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 2, Kind: EventStepStarted, Step: refOf(0)},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 3, Kind: EventStepFinished, Step: refOf(0), Status: "succeeded", DurationMs: refOf[int64](812), Attempts: 1},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 4, Kind: EventStepFinished, Step: refOf(6), Status: "succeeded", DurationMs: refOf[int64](40), Attempts: 1, Output: "1,024.50 EUR"},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 5, Kind: EventStepFinished, Step: refOf(3), Status: "failed", DurationMs: refOf[int64](30_000), Attempts: 3,
			Error: &Error{Code: CodeUnprocessableEntity, Message: "No element matches button[type=submit].", Details: map[string]any{"reason": ReasonElementNotFound, "step": 3.0}}},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 6, Kind: EventStepFinished, Step: refOf(2), Status: "skipped"},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 7, Kind: EventApprovalRequested, Step: refOf(5), Message: "Transfer 25 EUR?"},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 8, Kind: EventFinished, Status: "succeeded", DurationMs: refOf[int64](54_321), Outputs: map[string]any{"balance": "1,024.50 EUR"}},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 9, Kind: EventFinished, Status: "failed", Step: refOf(4),
			Error: &Error{Code: CodeTimeout, Message: "Step 4 timed out.", Details: map[string]any{"reason": ReasonStepTimeout, "step": 4.0}}},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 10, Kind: EventFinished, Status: "timed_out",
			Error: &Error{Code: CodeTimeout, Message: "The run timed out.", Details: map[string]any{"reason": ReasonRunTimeout}}},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 11, Kind: EventFinished, Status: "failed",
			Error: &Error{Code: CodeInternal, Message: "The browser crashed.", Details: map[string]any{"reason": ReasonBrowserCrashed}}},
		&Event{RunID: tRun, LeaseID: tLease, Seq: 12, Kind: EventFinished, Status: "cancelled", Message: "cancelled by user"},
		&Ack{RunID: tRun, Seq: 7},
		&ApprovalFrame{RunID: tRun, ApprovalID: tAppr, Approved: true, Comment: "go ahead"},
		&ApprovalFrame{RunID: tRun, ApprovalID: tAppr, Approved: false},
		&Cancel{RunID: tRun, Reason: "cancelled by user"},
		&Cancel{RunID: tRun},
		&Heartbeat{Runs: []string{tRun, tRun2}},
		&Heartbeat{Runs: []string{}},
	}
}

// normalized returns a deep copy of v in which empty maps and slices are nil:
// on the wire an omitted empty map, [] and {} carry the same meaning.
func normalized(v reflect.Value) reflect.Value {
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		n := reflect.New(v.Type().Elem())
		n.Elem().Set(normalized(v.Elem()))
		return n
	case reflect.Interface:
		if v.IsNil() {
			return v
		}
		n := reflect.New(v.Type()).Elem()
		n.Set(normalized(v.Elem()))
		return n
	case reflect.Struct:
		n := reflect.New(v.Type()).Elem()
		for i := range v.NumField() {
			n.Field(i).Set(normalized(v.Field(i)))
		}
		return n
	case reflect.Slice:
		if v.Len() == 0 {
			return reflect.Zero(v.Type())
		}
		n := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		for i := range v.Len() {
			n.Index(i).Set(normalized(v.Index(i)))
		}
		return n
	case reflect.Map:
		if v.Len() == 0 {
			return reflect.Zero(v.Type())
		}
		n := reflect.MakeMapWithSize(v.Type(), v.Len())
		for it := v.MapRange(); it.Next(); {
			n.SetMapIndex(it.Key(), normalized(it.Value()))
		}
		return n
	}
	return v
}

// sameFrame compares two frames, empty and nil collections being equal.
func sameFrame(a, b Frame) bool {
	return reflect.DeepEqual(normalized(reflect.ValueOf(a)).Interface(), normalized(reflect.ValueOf(b)).Interface())
}

// withType returns a copy of f with its Type field set.
func withType(f Frame) Frame {
	v := reflect.New(reflect.TypeOf(f).Elem())
	v.Elem().Set(reflect.ValueOf(f).Elem())
	v.Elem().FieldByName("Type").SetString(string(f.FrameType()))
	return v.Interface().(Frame)
}

func mustEncode(t *testing.T, f Frame) []byte {
	t.Helper()
	b, err := EncodeFrame(f)
	if err != nil {
		t.Fatalf("EncodeFrame(%T): %v", f, err)
	}
	return b
}

func TestFrameTypes(t *testing.T) {
	seen := map[FrameType]bool{}
	for _, ft := range FrameTypes() {
		if seen[ft] {
			t.Fatalf("duplicate frame type %q", ft)
		}
		seen[ft] = true
		f := newFrame(ft)
		if f == nil {
			t.Fatalf("newFrame(%q) = nil", ft)
		}
		if f.FrameType() != ft {
			t.Fatalf("newFrame(%q).FrameType() = %q", ft, f.FrameType())
		}
		if tag := reflect.TypeOf(f).Elem().Field(0); tag.Name != "Type" || tag.Tag.Get("json") != "type" {
			t.Fatalf("%T: the first field must be Type `json:\"type\"`", f)
		}
	}
	if len(seen) != 12 {
		t.Fatalf("%d frame types, want 12", len(seen))
	}
	if newFrame("nope") != nil || newFrame("") != nil {
		t.Fatal("newFrame of an unknown type is not nil")
	}
	covered := map[FrameType]bool{}
	for _, f := range SampleFrames() {
		covered[f.FrameType()] = true
	}
	for _, ft := range FrameTypes() {
		if !covered[ft] {
			t.Errorf("SampleFrames has no %q frame", ft)
		}
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for _, f := range SampleFrames() {
		t.Run(string(f.FrameType()), func(t *testing.T) {
			if err := f.Validate(); err != nil {
				t.Fatalf("sample does not validate: %v", err)
			}
			b := mustEncode(t, f)
			if !bytes.HasPrefix(b, []byte(`{"type":"`+string(f.FrameType())+`",`)) {
				t.Fatalf("encoding does not start with its type: %s", b)
			}
			got, err := DecodeFrame(b)
			if err != nil {
				t.Fatalf("DecodeFrame(%s): %v", b, err)
			}
			if reflect.TypeOf(got) != reflect.TypeOf(f) {
				t.Fatalf("decoded %T, want %T", got, f)
			}
			if !sameFrame(got, withType(f)) {
				t.Fatalf("round trip differs:\n got %#v\nwant %#v", got, withType(f))
			}
			if b2 := mustEncode(t, got); !bytes.Equal(b, b2) {
				t.Fatalf("re-encoding differs:\n%s\n%s", b, b2)
			}
		})
	}
}

func TestEncodeFrame(t *testing.T) {
	t.Run("does not modify the frame", func(t *testing.T) {
		w := &Welcome{SessionID: tSess, AgentID: tAgent, HeartbeatMs: 1, LeaseMs: 3}
		mustEncode(t, w)
		if w.Type != "" || w.Runs != nil {
			t.Fatalf("frame modified: %#v", w)
		}
	})
	t.Run("a wrong Type is overwritten", func(t *testing.T) {
		b := mustEncode(t, &Ready{Type: "hello", Slots: 1})
		if string(b) != `{"type":"ready","slots":1}` {
			t.Fatalf("got %s", b)
		}
	})
	t.Run("lists and inputs are never null", func(t *testing.T) {
		for _, c := range []struct {
			f    Frame
			want string
		}{
			{&Welcome{SessionID: tSess, AgentID: tAgent, HeartbeatMs: 1, LeaseMs: 3}, `"runs":[]`},
			{&Heartbeat{}, `{"type":"heartbeat","runs":[]}`},
			{&Assign{RunID: tRun, Attempt: 1, LeaseID: tLease, Workflow: AssignedWorkflow{ID: tWf, Definition: &Definition{Version: 1, Steps: []Step{{Type: StepClick, Selector: "a"}}}}}, `"inputs":{}`},
			{&Assign{RunID: tRun, Attempt: 1, LeaseID: tLease, Workflow: AssignedWorkflow{ID: tWf, Definition: &Definition{Version: 1, Steps: []Step{{Type: StepClick, Selector: "a"}}}}}, `"variables":[]`},
			{&ErrorFrame{Code: CodeInternal, Message: "x"}, `"details":null`}, // the envelope's convention
		} {
			if b := mustEncode(t, c.f); !strings.Contains(string(b), c.want) {
				t.Errorf("%T: %s lacks %s", c.f, b, c.want)
			}
		}
	})
	t.Run("nil frames", func(t *testing.T) {
		if _, err := EncodeFrame(nil); err == nil {
			t.Fatal("EncodeFrame(nil) succeeded")
		}
		if _, err := EncodeFrame((*Hello)(nil)); err == nil {
			t.Fatal("EncodeFrame((*Hello)(nil)) succeeded")
		}
	})
	t.Run("concurrent use of one frame", func(t *testing.T) {
		f := &Heartbeat{Runs: []string{tRun}}
		done := make(chan []byte)
		for range 4 {
			go func() { b, _ := EncodeFrame(f); done <- b }()
		}
		for range 4 {
			if b := <-done; string(b) != `{"type":"heartbeat","runs":["`+tRun+`"]}` {
				t.Errorf("got %s", b)
			}
		}
	})
}

// asError returns err as *Error, failing the test otherwise.
func asError(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *Error", err, err)
	}
	if e.Message == "" {
		t.Fatalf("empty message: %#v", e)
	}
	return e
}

func problemFields(e *Error) []string {
	ps, _ := e.Details["fields"].([]FieldProblem)
	var out []string
	for _, p := range ps {
		out = append(out, p.Field)
	}
	return out
}

func TestDecodeFrameErrors(t *testing.T) {
	validReady := `{"type":"ready","slots":1}`
	cases := []struct {
		name   string
		in     string
		reason string
		fields []string // nil: not checked
	}{
		{"empty", ``, "malformed_frame", []string{"frame"}},
		{"spaces", "  \n", "malformed_frame", []string{"frame"}},
		{"not json", `hello`, "malformed_frame", []string{"frame"}},
		{"truncated", `{"type":"ready","slots":1`, "malformed_frame", []string{"frame"}},
		{"trailing data", validReady + ` {}`, "malformed_frame", []string{"frame"}},
		{"two frames", validReady + validReady, "malformed_frame", []string{"frame"}},
		{"single quotes", `{'type':'ready'}`, "malformed_frame", []string{"frame"}},
		{"trailing comma", `{"type":"ready","slots":1,}`, "malformed_frame", []string{"frame"}},
		{"array", `[` + validReady + `]`, "malformed_frame", []string{"frame"}},
		{"string", `"ready"`, "malformed_frame", []string{"frame"}},
		{"number", `42`, "malformed_frame", []string{"frame"}},
		{"null", `null`, "malformed_frame", []string{"frame"}},
		{"true", `true`, "malformed_frame", []string{"frame"}},
		{"missing type", `{"slots":1}`, "malformed_frame", []string{"type"}},
		{"empty object", `{}`, "malformed_frame", []string{"type"}},
		{"null type", `{"type":null}`, "malformed_frame", []string{"type"}},
		{"number type", `{"type":1}`, "malformed_frame", []string{"type"}},
		{"array type", `{"type":["ready"]}`, "malformed_frame", []string{"type"}},
		{"object type", `{"type":{"name":"ready"}}`, "malformed_frame", []string{"type"}},
		{"unknown type", `{"type":"goodbye"}`, "unknown_frame_type", []string{"type"}},
		{"empty type", `{"type":""}`, "unknown_frame_type", []string{"type"}},
		{"type letter case", `{"type":"Ready","slots":1}`, "unknown_frame_type", []string{"type"}},
		{"type key letter case", `{"TYPE":"ready","slots":1}`, "malformed_frame", []string{"type"}},
		{"unknown field", `{"type":"ready","slots":1,"extra":true}`, "malformed_frame", []string{"extra"}},
		{"field letter case", `{"type":"ready","Slots":1}`, "malformed_frame", []string{"Slots"}},
		{"duplicate field", `{"type":"ready","slots":1,"slots":2}`, "malformed_frame", []string{"slots"}},
		{"duplicate type", `{"type":"ready","type":"ready","slots":1}`, "malformed_frame", []string{"type"}},
		{"string for integer", `{"type":"ready","slots":"1"}`, "malformed_frame", []string{"slots"}},
		{"fraction for integer", `{"type":"ready","slots":1.5}`, "malformed_frame", []string{"slots"}},
		{"exponent for integer", `{"type":"ready","slots":1e2}`, "malformed_frame", []string{"slots"}},
		{"integer overflow", `{"type":"ack","runId":"` + tRun + `","seq":9223372036854775808}`, "malformed_frame", []string{"seq"}},
		{"bool for integer", `{"type":"ready","slots":true}`, "malformed_frame", []string{"slots"}},
		{"string for bool", `{"type":"approval","runId":"` + tRun + `","approvalId":"` + tAppr + `","approved":"yes"}`, "malformed_frame", []string{"approved"}},
		{"number for string", `{"type":"cancel","runId":42}`, "malformed_frame", []string{"runId"}},
		{"array for object", `{"type":"hello","protocol":1,"token":"t","agent":[]}`, "malformed_frame", []string{"agent"}},
		{"string for array", `{"type":"heartbeat","runs":"` + tRun + `"}`, "malformed_frame", []string{"runs"}},
		{"number in array", `{"type":"heartbeat","runs":["` + tRun + `",7]}`, "malformed_frame", []string{"runs[1]"}},
		{"nested unknown field", `{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","kind":"headless","cpu":4}}`, "malformed_frame", []string{"agent.cpu"}},
		{"label value not a string", `{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","kind":"headless","labels":{"gpu":true}}}`, "malformed_frame", []string{"agent.labels.gpu"}},
		{"labels not an object", `{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","kind":"headless","labels":["gpu"]}}`, "malformed_frame", []string{"agent.labels"}},
		{"duplicate label", `{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","kind":"headless","labels":{"gpu":"a","gpu":"b"}}}`, "malformed_frame", []string{"agent.labels.gpu"}},
		{"inputs not an object", `{"type":"assign","runId":"` + tRun + `","attempt":1,"leaseId":"` + tLease + `","inputs":[1]}`, "malformed_frame", []string{"inputs"}},
		{"outputs value out of range", `{"type":"event","runId":"` + tRun + `","leaseId":"` + tLease + `","seq":1,"kind":"started","outputs":{"a":[-1e400]}}`, "malformed_frame", []string{"outputs.a"}},
		{"held run wrong type", `{"type":"welcome","sessionId":"s","agentId":"` + tAgent + `","heartbeatMs":1,"leaseMs":1,"runs":[{"runId":"` + tRun + `","attempt":"1"}]}`, "malformed_frame", []string{"runs[0].attempt"}},
		{"definition wrong type", `{"type":"assign","runId":"` + tRun + `","attempt":1,"leaseId":"` + tLease + `","workflow":{"id":"` + tWf + `","definition":{"version":1,"steps":[{"type":"sleep","ms":"5"}]}}}`, "malformed_frame", []string{"workflow.definition.steps[0].ms"}},
		{"number out of range in any", `{"type":"event","runId":"` + tRun + `","leaseId":"` + tLease + `","seq":1,"kind":"started","output":1e999}`, "malformed_frame", []string{"output"}},
		{"error details not an object", `{"type":"error","code":"internal","message":"x","details":[]}`, "malformed_frame", []string{"details"}},
		{"several problems", `{"type":"ready","slots":"x","a":1,"b":2}`, "malformed_frame", []string{"slots", "a", "b"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := DecodeFrame([]byte(c.in))
			if err == nil {
				t.Fatalf("decoded %#v", f)
			}
			if f != nil {
				t.Fatalf("a frame returned with an error")
			}
			e := asError(t, err)
			if e.Code != CodeBadRequest {
				t.Fatalf("code %q, want bad_request: %v", e.Code, err)
			}
			if e.Details["reason"] != c.reason {
				t.Fatalf("reason %v, want %s (%v)", e.Details["reason"], c.reason, e.Details)
			}
			if c.fields != nil && !slices.Equal(problemFields(e), c.fields) {
				t.Fatalf("fields %v, want %v (%v)", problemFields(e), c.fields, e.Details["fields"])
			}
			if _, err := json.Marshal(e); err != nil {
				t.Fatalf("error does not marshal: %v", err)
			}
		})
	}
}

func TestDecodeFrameSize(t *testing.T) {
	frame := func(size int) []byte {
		b := []byte(`{"type":"heartbeat","runs":[]}`)
		return append(b, bytes.Repeat([]byte(" "), size-len(b))...)
	}
	if _, err := DecodeFrame(frame(MaxFrameBytes)); err != nil {
		t.Fatalf("a frame of exactly MaxFrameBytes: %v", err)
	}
	_, err := DecodeFrame(frame(MaxFrameBytes + 1))
	e := asError(t, err)
	if e.Code != CodeBadRequest || e.Details["reason"] != "frame_too_large" {
		t.Fatalf("got %v %v", e.Code, e.Details)
	}
}

func TestDecodeFrameLenient(t *testing.T) {
	// JSON null and absent fields read as zero values; whitespace is fine.
	for _, c := range []struct {
		in   string
		want Frame
	}{
		{`{"type":"ready","slots":null}`, &Ready{Type: FrameReady}},
		{`{"type":"ready"}`, &Ready{Type: FrameReady}},
		{" \t{ \"type\" : \"heartbeat\" , \"runs\" : null }\n", &Heartbeat{Type: FrameHeartbeat}},
		{`{"type":"cancel","runId":"` + tRun + `","reason":null}`, &Cancel{Type: FrameCancel, RunID: tRun}},
		{`{"type":"ack","runId":"` + tRun + `","seq":-0e0}`, nil}, // -0e0 is no integer literal
	} {
		f, err := DecodeFrame([]byte(c.in))
		if c.want == nil {
			if err == nil {
				t.Errorf("%s: decoded %#v", c.in, f)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if !reflect.DeepEqual(f, c.want) {
			t.Errorf("%s: got %#v, want %#v", c.in, f, c.want)
		}
	}
}

// FrameCase is one value check of a frame: Fields lists the fields of the
// expected problems, nil for a valid frame. Tests of package protocol_test use
// them too.
type FrameCase struct {
	Name   string
	Frame  Frame
	Fields []string
	// Direct: checked with Validate only (the value cannot travel as JSON).
	Direct bool
}

func rep(s string, n int) string { return strings.Repeat(s, n) }

func labelsOf(n int) map[string]string {
	m := map[string]string{}
	for i := range n {
		m["k"+strings.Repeat("x", i)] = "v"
	}
	return m
}

// FrameCases returns valid and invalid frames for every rule of Validate.
func FrameCases() []FrameCase {
	hello := func(mut func(*Hello)) *Hello {
		f := &Hello{Protocol: 1, Token: "copelf_agent_tok", Agent: AgentInfo{ID: "box-1", Name: "Box", Kind: AgentHeadless, Version: "1.0.0", Slots: 1}}
		mut(f)
		return f
	}
	welcome := func(mut func(*Welcome)) *Welcome {
		f := &Welcome{SessionID: tSess, AgentID: tAgent, HeartbeatMs: 10_000, LeaseMs: 30_000,
			Runs: []HeldRun{{RunID: tRun, Attempt: 1, LeaseID: tLease, Status: RunRunning}}}
		mut(f)
		return f
	}
	errFrame := func(mut func(*ErrorFrame)) *ErrorFrame {
		f := &ErrorFrame{Code: CodeConflict, Message: "lost", Details: map[string]any{"reason": "lease_lost"}, RunID: tRun}
		mut(f)
		return f
	}
	assign := func(mut func(*Assign)) *Assign {
		f := &Assign{RunID: tRun, Attempt: 1, LeaseID: tLease, Workflow: AssignedWorkflow{ID: tWf, Name: "w", Definition: sampleDefinition()},
			Inputs: map[string]any{"username": "ada", "password": "x"}, TimeoutMs: 1000}
		mut(f)
		return f
	}
	event := func(kind EventKind, mut func(*Event)) *Event {
		f := &Event{RunID: tRun, LeaseID: tLease, Seq: 1, Kind: kind}
		mut(f)
		return f
	}
	none := func(*Event) {}
	failed := &Error{Code: CodeUnprocessableEntity, Message: "No element.", Details: map[string]any{"reason": "element_not_found", "step": 1.0}}

	idCases := func(field string, prefix string, set func(string) Frame) []FrameCase {
		body := "k4tq2mzx5bv3hn4wp6yc2drfja"
		return []FrameCase{
			{field + " shortest", set(prefix + "_" + rep("a", 10)), nil, false},
			{field + " longest", set(prefix + "_" + rep("7", 40)), nil, false},
			{field + " empty", set(""), []string{field}, false},
			{field + " too short", set(prefix + "_" + rep("a", 9)), []string{field}, false},
			{field + " too long", set(prefix + "_" + rep("a", 41)), []string{field}, false},
			{field + " other prefix", set("usr_" + body), []string{field}, false},
			{field + " longer prefix", set(prefix + "x_" + body), []string{field}, false},
			{field + " no underscore", set(prefix + body), []string{field}, false},
			{field + " upper case", set(prefix + "_" + strings.ToUpper(body)), []string{field}, false},
			{field + " digit 0", set(prefix + "_" + body[:20] + "0"), []string{field}, false},
			{field + " digit 8", set(prefix + "_" + body[:20] + "8"), []string{field}, false},
			{field + " dash", set(prefix + "_" + body[:10] + "-" + body[10:20]), []string{field}, false},
			{field + " space", set(" " + prefix + "_" + body), []string{field}, false},
		}
	}

	cases := []FrameCase{
		// hello
		{"hello ok", hello(func(*Hello) {}), nil, false},
		{"hello protocol 2 (the server refuses it)", hello(func(f *Hello) { f.Protocol = 2 }), nil, false},
		{"hello protocol 0", hello(func(f *Hello) { f.Protocol = 0 }), []string{"protocol"}, false},
		{"hello protocol negative", hello(func(f *Hello) { f.Protocol = -1 }), []string{"protocol"}, false},
		{"hello token empty", hello(func(f *Hello) { f.Token = "" }), []string{"token"}, false},
		{"hello token 512", hello(func(f *Hello) { f.Token = rep("t", 512) }), nil, false},
		{"hello token 513", hello(func(f *Hello) { f.Token = rep("t", 513) }), []string{"token"}, false},
		{"hello agent.id empty", hello(func(f *Hello) { f.Agent.ID = "" }), []string{"agent.id"}, false},
		{"hello agent.id all chars", hello(func(f *Hello) { f.Agent.ID = "Host-1.local:9222_A" }), nil, false},
		{"hello agent.id 128", hello(func(f *Hello) { f.Agent.ID = rep("a", 128) }), nil, false},
		{"hello agent.id 129", hello(func(f *Hello) { f.Agent.ID = rep("a", 129) }), []string{"agent.id"}, false},
		{"hello agent.id space", hello(func(f *Hello) { f.Agent.ID = "my box" }), []string{"agent.id"}, false},
		{"hello agent.id slash", hello(func(f *Hello) { f.Agent.ID = "a/b" }), []string{"agent.id"}, false},
		{"hello agent.id non-ASCII", hello(func(f *Hello) { f.Agent.ID = "café" }), []string{"agent.id"}, false},
		{"hello agent.name empty", hello(func(f *Hello) { f.Agent.Name = "" }), nil, false},
		{"hello agent.name 200 bytes", hello(func(f *Hello) { f.Agent.Name = rep("é", 100) }), nil, false},
		{"hello agent.name 201 bytes", hello(func(f *Hello) { f.Agent.Name = rep("n", 201) }), []string{"agent.name"}, false},
		{"hello agent.name 101 runes of 2 bytes", hello(func(f *Hello) { f.Agent.Name = rep("é", 101) }), []string{"agent.name"}, false},
		{"hello agent.name invalid UTF-8", hello(func(f *Hello) { f.Agent.Name = "\xff" }), []string{"agent.name"}, true},
		{"hello agent.kind extension", hello(func(f *Hello) { f.Agent.Kind = AgentExtension }), nil, false},
		{"hello agent.kind empty", hello(func(f *Hello) { f.Agent.Kind = "" }), []string{"agent.kind"}, false},
		{"hello agent.kind other", hello(func(f *Hello) { f.Agent.Kind = "Headless" }), []string{"agent.kind"}, false},
		{"hello agent.version empty", hello(func(f *Hello) { f.Agent.Version = "" }), nil, false},
		{"hello agent.version 64", hello(func(f *Hello) { f.Agent.Version = rep("1", 64) }), nil, false},
		{"hello agent.version 65", hello(func(f *Hello) { f.Agent.Version = rep("1", 65) }), []string{"agent.version"}, false},
		{"hello agent.slots 0", hello(func(f *Hello) { f.Agent.Slots = 0 }), nil, false},
		{"hello agent.slots 256", hello(func(f *Hello) { f.Agent.Slots = 256 }), nil, false},
		{"hello agent.slots 257", hello(func(f *Hello) { f.Agent.Slots = 257 }), []string{"agent.slots"}, false},
		{"hello agent.slots -1", hello(func(f *Hello) { f.Agent.Slots = -1 }), []string{"agent.slots"}, false},
		{"hello labels 32", hello(func(f *Hello) { f.Agent.Labels = labelsOf(32) }), nil, false},
		{"hello labels 33", hello(func(f *Hello) { f.Agent.Labels = labelsOf(33) }), []string{"agent.labels"}, false},
		{"hello label key chars", hello(func(f *Hello) { f.Agent.Labels = map[string]string{"topology.k8s.io/zone-A_1": ""} }), nil, false},
		{"hello label key 63", hello(func(f *Hello) { f.Agent.Labels = map[string]string{rep("k", 63): "v"} }), nil, false},
		{"hello label key 64", hello(func(f *Hello) { f.Agent.Labels = map[string]string{rep("k", 64): "v"} }), []string{"agent.labels." + rep("k", 64)}, false},
		{"hello label key empty", hello(func(f *Hello) { f.Agent.Labels = map[string]string{"": "v"} }), []string{"agent.labels."}, false},
		{"hello label key space", hello(func(f *Hello) { f.Agent.Labels = map[string]string{"a b": "v"} }), []string{"agent.labels.a b"}, false},
		{"hello label value 255", hello(func(f *Hello) { f.Agent.Labels = map[string]string{"k": rep("v", 255)} }), nil, false},
		{"hello label value 256", hello(func(f *Hello) { f.Agent.Labels = map[string]string{"k": rep("v", 256)} }), []string{"agent.labels.k"}, false},
		{"hello label key truncated in field", hello(func(f *Hello) { f.Agent.Labels = map[string]string{rep("é", 40): "v"} }), []string{"agent.labels." + rep("é", 32) + "…"}, false},
		{"hello everything wrong", &Hello{Agent: AgentInfo{Slots: -1}}, []string{"protocol", "token", "agent.id", "agent.kind", "agent.slots"}, false},

		// welcome
		{"welcome ok", welcome(func(*Welcome) {}), nil, false},
		{"welcome no runs", welcome(func(f *Welcome) { f.Runs = nil }), nil, false},
		{"welcome sessionId empty", welcome(func(f *Welcome) { f.SessionID = "" }), []string{"sessionId"}, false},
		{"welcome heartbeatMs 0", welcome(func(f *Welcome) { f.HeartbeatMs = 0 }), []string{"leaseMs"}, false},
		{"welcome leaseMs 0", welcome(func(f *Welcome) { f.LeaseMs = 0 }), []string{"leaseMs"}, false},
		{"welcome leaseMs negative", welcome(func(f *Welcome) { f.LeaseMs = -30_000 }), []string{"leaseMs"}, false},
		{"welcome run without lease", welcome(func(f *Welcome) { f.Runs[0].LeaseID = "" }), []string{"runs[0]"}, false},
		{"welcome run bad id", welcome(func(f *Welcome) {
			f.Runs = append(f.Runs, HeldRun{RunID: tLease, Attempt: 1, LeaseID: tLease, Status: RunRunning})
		}), []string{"runs[1]"}, false},
		{"welcome run attempt 0", welcome(func(f *Welcome) { f.Runs[0].Attempt = 0 }), []string{"runs[0].attempt"}, false},
		{"welcome run status empty", welcome(func(f *Welcome) { f.Runs[0].Status = "" }), []string{"runs[0].status"}, false},
		{"welcome run status unknown", welcome(func(f *Welcome) { f.Runs[0].Status = "assigned" }), []string{"runs[0].status"}, false},
		{"welcome run status queued", welcome(func(f *Welcome) { f.Runs[0].Status = RunQueued }), nil, false},
		{"welcome run awaiting approval", welcome(func(f *Welcome) { f.Runs[0].Status = RunAwaitingApproval }), nil, false},

		// error
		{"error ok", errFrame(func(*ErrorFrame) {}), nil, false},
		{"error without runId and details", errFrame(func(f *ErrorFrame) { f.RunID = ""; f.Details = nil }), nil, false},
		{"error rate_limited", errFrame(func(f *ErrorFrame) { f.Code = CodeRateLimited }), nil, false},
		{"error code empty", errFrame(func(f *ErrorFrame) { f.Code = "" }), []string{"code"}, false},
		{"error code unknown", errFrame(func(f *ErrorFrame) { f.Code = "lease_lost" }), []string{"code"}, false},
		{"error message empty", errFrame(func(f *ErrorFrame) { f.Message = "" }), nil, false},
		{"error message 4096", errFrame(func(f *ErrorFrame) { f.Message = rep("m", 4096) }), nil, false},
		{"error message 4097", errFrame(func(f *ErrorFrame) { f.Message = rep("m", 4097) }), []string{"message"}, false},
		{"error runId bad", errFrame(func(f *ErrorFrame) { f.RunID = "run_1" }), []string{"runId"}, false},

		// ready
		{"ready 0", &Ready{Slots: 0}, nil, false},
		{"ready 256", &Ready{Slots: 256}, nil, false},
		{"ready 257", &Ready{Slots: 257}, []string{"slots"}, false},
		{"ready -1", &Ready{Slots: -1}, []string{"slots"}, false},

		// assign
		{"assign ok", assign(func(*Assign) {}), nil, false},
		{"assign of a batch", assign(func(f *Assign) { f.BatchID = tBatch; f.Iteration = refOf(0) }), nil, false},
		{"assign no inputs, no timeout", assign(func(f *Assign) { f.Inputs = nil; f.TimeoutMs = 0 }), nil, false},
		{"assign attempt 0", assign(func(f *Assign) { f.Attempt = 0 }), []string{"attempt"}, false},
		{"assign attempt 7", assign(func(f *Assign) { f.Attempt = 7 }), nil, false},
		{"assign workflow.id empty", assign(func(f *Assign) { f.Workflow.ID = "" }), []string{"workflow.id"}, false},
		{"assign workflow.id of a run", assign(func(f *Assign) { f.Workflow.ID = tRun }), []string{"workflow.id"}, false},
		{"assign no definition", assign(func(f *Assign) { f.Workflow.Definition = nil }), []string{"workflow.definition"}, false},
		{"assign definition without steps", assign(func(f *Assign) { f.Workflow.Definition.Steps = nil }), []string{"workflow.definition.steps"}, false},
		{"assign definition problems", assign(func(f *Assign) {
			f.Workflow.Definition.Version = 2
			f.Workflow.Definition.Steps[0].URL = ""
		}), []string{"workflow.definition.version", "workflow.definition.steps[0].url"}, false},
		{"assign timeoutMs negative", assign(func(f *Assign) { f.TimeoutMs = -1 }), []string{"timeoutMs"}, false},
		{"assign batchId bad", assign(func(f *Assign) { f.BatchID = tRun }), []string{"batchId"}, false},
		{"assign iteration negative", assign(func(f *Assign) { f.Iteration = refOf(-1) }), []string{"iteration"}, false},

		// accept / reject
		{"accept ok", &Accept{RunID: tRun, LeaseID: tLease}, nil, false},
		{"accept swapped ids", &Accept{RunID: tLease, LeaseID: tRun}, []string{"runId", "leaseId"}, false},
		{"reject ok", &Reject{RunID: tRun, LeaseID: tLease, Reason: rep("r", 500)}, nil, false},
		{"reject reason 501", &Reject{RunID: tRun, LeaseID: tLease, Reason: rep("r", 501)}, []string{"reason"}, false},
		{"reject no lease", &Reject{RunID: tRun}, []string{"leaseId"}, false},

		// event, common fields
		{"event started", event(EventStarted, none), nil, false},
		{"event seq 0", event(EventStarted, func(f *Event) { f.Seq = 0 }), []string{"seq"}, false},
		{"event seq negative", event(EventStarted, func(f *Event) { f.Seq = -1 }), []string{"seq"}, false},
		{"event big seq", event(EventStarted, func(f *Event) { f.Seq = 1 << 40 }), nil, false},
		{"event step 999", event(EventStepStarted, func(f *Event) { f.Step = refOf(999) }), nil, false},
		{"event step 1000", event(EventStepStarted, func(f *Event) { f.Step = refOf(1000) }), []string{"step"}, false},
		{"event step -1", event(EventStepStarted, func(f *Event) { f.Step = refOf(-1) }), []string{"step"}, false},
		{"event step on started", event(EventStarted, func(f *Event) { f.Step = refOf(0) }), nil, false},
		{"event durationMs 0", event(EventStarted, func(f *Event) { f.DurationMs = refOf[int64](0) }), nil, false},
		{"event durationMs negative", event(EventStarted, func(f *Event) { f.DurationMs = refOf[int64](-1) }), []string{"durationMs"}, false},
		{"event attempts 11", event(EventStarted, func(f *Event) { f.Attempts = 11 }), nil, false},
		{"event attempts 12", event(EventStarted, func(f *Event) { f.Attempts = 12 }), []string{"attempts"}, false},
		{"event attempts negative", event(EventStarted, func(f *Event) { f.Attempts = -1 }), []string{"attempts"}, false},
		{"event message 4096", event(EventStarted, func(f *Event) { f.Message = rep("m", 4096) }), nil, false},
		{"event message 4097", event(EventStarted, func(f *Event) { f.Message = rep("m", 4097) }), []string{"message"}, false},
		{"event error code bad", event(EventStarted, func(f *Event) { f.Error = &Error{Code: "element_not_found", Message: "x"} }), []string{"error.code"}, false},
		{"event error message 4097", event(EventStarted, func(f *Event) { f.Error = &Error{Code: CodeInternal, Message: rep("m", 4097)} }), []string{"error.message"}, false},
		{"event kind empty", event("", none), []string{"kind"}, false},
		{"event kind unknown", event("step_skipped", none), []string{"kind"}, false},
		{"event runId bad", event(EventStarted, func(f *Event) { f.RunID = "run_" }), []string{"runId"}, false},
		{"event leaseId bad", event(EventStarted, func(f *Event) { f.LeaseID = tRun }), []string{"leaseId"}, false},
		// per kind
		{"step_started without step", event(EventStepStarted, none), []string{"step"}, false},
		{"step_finished succeeded", event(EventStepFinished, func(f *Event) { f.Step = refOf(1); f.Status = "succeeded" }), nil, false},
		{"step_finished skipped", event(EventStepFinished, func(f *Event) { f.Step = refOf(1); f.Status = "skipped" }), nil, false},
		{"step_finished failed", event(EventStepFinished, func(f *Event) { f.Step = refOf(1); f.Status = "failed"; f.Error = failed }), nil, false},
		{"step_finished without step", event(EventStepFinished, func(f *Event) { f.Status = "succeeded" }), []string{"step"}, false},
		{"step_finished without status", event(EventStepFinished, func(f *Event) { f.Step = refOf(1) }), []string{"status"}, false},
		{"step_finished status running", event(EventStepFinished, func(f *Event) { f.Step = refOf(1); f.Status = "running" }), []string{"status"}, false},
		{"step_finished status timed_out", event(EventStepFinished, func(f *Event) { f.Step = refOf(1); f.Status = "timed_out" }), []string{"status"}, false},
		{"approval_requested ok", event(EventApprovalRequested, func(f *Event) { f.Step = refOf(2); f.Message = "ok?" }), nil, false},
		{"approval_requested without message", event(EventApprovalRequested, func(f *Event) { f.Step = refOf(2) }), []string{"message"}, false},
		{"approval_requested without step", event(EventApprovalRequested, func(f *Event) { f.Message = "ok?" }), []string{"step"}, false},
		{"finished succeeded", event(EventFinished, func(f *Event) { f.Status = "succeeded"; f.Outputs = map[string]any{"a": "b"} }), nil, false},
		{"finished cancelled", event(EventFinished, func(f *Event) { f.Status = "cancelled" }), nil, false},
		{"finished failed", event(EventFinished, func(f *Event) { f.Status = "failed"; f.Error = failed }), nil, false},
		{"finished timed_out", event(EventFinished, func(f *Event) { f.Status = "timed_out"; f.Error = &Error{Code: CodeTimeout, Message: "t"} }), nil, false},
		{"finished failed without error", event(EventFinished, func(f *Event) { f.Status = "failed" }), []string{"error"}, false},
		{"finished timed_out without error", event(EventFinished, func(f *Event) { f.Status = "timed_out" }), []string{"error"}, false},
		{"finished without status", event(EventFinished, none), []string{"status", "error"}, false},
		{"finished status skipped", event(EventFinished, func(f *Event) { f.Status = "skipped"; f.Error = failed }), []string{"status"}, false},
		{"finished status running", event(EventFinished, func(f *Event) { f.Status = "running"; f.Error = failed }), []string{"status"}, false},

		// ack, approval, cancel
		{"ack ok", &Ack{RunID: tRun, Seq: 1}, nil, false},
		{"ack seq 0", &Ack{RunID: tRun}, []string{"seq"}, false},
		{"ack no run", &Ack{Seq: 1}, []string{"runId"}, false},
		{"approval ok", &ApprovalFrame{RunID: tRun, ApprovalID: tAppr}, nil, false},
		{"approval approvalId bad", &ApprovalFrame{RunID: tRun, ApprovalID: tRun}, []string{"approvalId"}, false},
		{"approval no run", &ApprovalFrame{ApprovalID: tAppr, Approved: true}, []string{"runId"}, false},
		{"cancel ok", &Cancel{RunID: tRun, Reason: "operator"}, nil, false},
		{"cancel no run", &Cancel{}, []string{"runId"}, false},

		// heartbeat
		{"heartbeat empty", &Heartbeat{}, nil, false},
		{"heartbeat 1024 runs", &Heartbeat{Runs: slices.Repeat([]string{tRun}, 1024)}, nil, false},
		{"heartbeat 1025 runs", &Heartbeat{Runs: slices.Repeat([]string{tRun}, 1025)}, []string{"runs"}, false},
		{"heartbeat bad run", &Heartbeat{Runs: []string{tRun, tLease, tRun2, ""}}, []string{"runs[1]", "runs[3]"}, false},
	}
	cases = append(cases, idCases("runId", "run", func(s string) Frame { return &Cancel{RunID: s} })...)
	cases = append(cases, idCases("leaseId", "lse", func(s string) Frame { return &Accept{RunID: tRun, LeaseID: s} })...)
	cases = append(cases, idCases("agentId", "agt", func(s string) Frame { return welcome(func(f *Welcome) { f.AgentID = s }) })...)
	cases = append(cases, idCases("approvalId", "apr", func(s string) Frame { return &ApprovalFrame{RunID: tRun, ApprovalID: s} })...)
	cases = append(cases, idCases("workflow.id", "wf", func(s string) Frame { return assign(func(f *Assign) { f.Workflow.ID = s }) })...)
	cases = append(cases, idCases("runs[0]", "run", func(s string) Frame { return &Heartbeat{Runs: []string{s}} })...)
	return cases
}

func TestFrameValidate(t *testing.T) {
	for _, c := range FrameCases() {
		t.Run(c.Name, func(t *testing.T) {
			check := func(how string, err error) {
				t.Helper()
				if c.Fields == nil {
					if err != nil {
						t.Fatalf("%s: %v (%v)", how, err, asError(t, err).Details)
					}
					return
				}
				if err == nil {
					t.Fatalf("%s: accepted, want problems with %v", how, c.Fields)
				}
				e := asError(t, err)
				if e.Code != CodeUnprocessableEntity {
					t.Fatalf("%s: code %q, want unprocessable_entity", how, e.Code)
				}
				if got := problemFields(e); !slices.Equal(got, c.Fields) {
					t.Fatalf("%s: fields %v, want %v (%v)", how, got, c.Fields, e.Details["fields"])
				}
				for _, p := range e.Details["fields"].([]FieldProblem) {
					if p.Problem == "" {
						t.Fatalf("%s: empty problem for %s", how, p.Field)
					}
				}
			}
			err := c.Frame.Validate()
			if c.Fields == nil && err != nil {
				// A nil *Error in an error interface would not be == nil.
				if reflect.ValueOf(err).IsNil() {
					t.Fatal("Validate returned a typed nil")
				}
			}
			check("Validate", err)
			if c.Direct {
				return
			}
			_, err = DecodeFrame(mustEncode(t, c.Frame))
			check("DecodeFrame", err)
		})
	}
}
