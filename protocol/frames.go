package protocol

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"unicode/utf8"
)

// FrameType names an agent protocol frame (API.md §9). Every frame is one JSON
// text message with a "type".
type FrameType string

const (
	FrameHello     FrameType = "hello"     // agent → server, first frame, within HelloTimeout
	FrameWelcome   FrameType = "welcome"   // server → agent, answers a good hello
	FrameError     FrameType = "error"     // server → agent
	FrameReady     FrameType = "ready"     // agent → server: free slots now
	FrameAssign    FrameType = "assign"    // server → agent: a run to execute
	FrameAccept    FrameType = "accept"    // agent → server
	FrameReject    FrameType = "reject"    // agent → server
	FrameEvent     FrameType = "event"     // agent → server: run progress
	FrameAck       FrameType = "ack"       // server → agent: event applied
	FrameApproval  FrameType = "approval"  // server → agent: an approval was resolved
	FrameCancel    FrameType = "cancel"    // server → agent: stop a run
	FrameHeartbeat FrameType = "heartbeat" // both ways
)

// Limits of the wire protocol.
const (
	// MaxFrameBytes: a larger frame closes the connection (1009).
	MaxFrameBytes = 1 << 20
	// HelloTimeoutMs: the hello must arrive this soon after the upgrade.
	HelloTimeoutMs = 10_000
	maxSlots       = 256
	maxLabels      = 32
	maxRunsListed  = 1024
	maxTextBytes   = 4096
)

// AgentKind says what kind of client an agent is.
type AgentKind string

const (
	AgentHeadless  AgentKind = "headless"
	AgentExtension AgentKind = "extension"
)

// EventKind is the kind of a run event.
type EventKind string

const (
	EventStarted           EventKind = "started"
	EventStepStarted       EventKind = "step_started"
	EventStepFinished      EventKind = "step_finished"
	EventApprovalRequested EventKind = "approval_requested"
	EventFinished          EventKind = "finished"
)

// Frame is one message of the agent protocol.
type Frame interface {
	FrameType() FrameType
	// Validate checks the fields of a decoded frame.
	Validate() error
}

// AgentInfo describes an agent in its hello.
type AgentInfo struct {
	// ID is the agent's own stable key (it chooses it and keeps it across
	// restarts); the server keys its record on (account, ID).
	ID      string            `json:"id"`
	Name    string            `json:"name"`
	Kind    AgentKind         `json:"kind"`
	Version string            `json:"version"`
	Slots   int               `json:"slots"`
	Labels  map[string]string `json:"labels,omitempty"`
}

// Hello is the agent's first frame. The token travels here, never in the URL.
type Hello struct {
	Type     FrameType `json:"type"`
	Protocol int       `json:"protocol"`
	Token    string    `json:"token"`
	Agent    AgentInfo `json:"agent"`
}

// HeldRun is a run the server believes an agent holds.
type HeldRun struct {
	RunID   string    `json:"runId"`
	Attempt int       `json:"attempt"`
	LeaseID string    `json:"leaseId"`
	Status  RunStatus `json:"status"`
}

// Welcome answers a good hello.
type Welcome struct {
	Type        FrameType `json:"type"`
	SessionID   string    `json:"sessionId"`
	AgentID     string    `json:"agentId"` // the server's agt_ id for this agent
	HeartbeatMs int64     `json:"heartbeatMs"`
	LeaseMs     int64     `json:"leaseMs"`
	Runs        []HeldRun `json:"runs"`
}

// ErrorFrame carries a catalog error; RunID names the run it is about.
type ErrorFrame struct {
	Type    FrameType      `json:"type"`
	Code    Code           `json:"code"`
	Message string         `json:"message"`
	Details map[string]any `json:"details"`
	RunID   string         `json:"runId,omitempty"`
}

// Ready sets the agent's free capacity outright; 0 pauses dispatch to it.
type Ready struct {
	Type  FrameType `json:"type"`
	Slots int       `json:"slots"`
}

// AssignedWorkflow is the workflow part of an assign.
type AssignedWorkflow struct {
	ID         string      `json:"id"`
	Name       string      `json:"name"`
	Definition *Definition `json:"definition"`
}

// Assign gives a run to an agent under a lease. It must be accepted within
// the lease or it goes back to the queue.
type Assign struct {
	Type      FrameType        `json:"type"`
	RunID     string           `json:"runId"`
	Attempt   int              `json:"attempt"`
	LeaseID   string           `json:"leaseId"`
	Workflow  AssignedWorkflow `json:"workflow"`
	Inputs    map[string]any   `json:"inputs"`
	TimeoutMs int64            `json:"timeoutMs"`
	// BatchID and Iteration feed the built-in references.
	BatchID   string `json:"batchId,omitempty"`
	Iteration *int   `json:"iteration,omitempty"`
}

// Accept takes an assigned run: from here on it is running and charged.
type Accept struct {
	Type    FrameType `json:"type"`
	RunID   string    `json:"runId"`
	LeaseID string    `json:"leaseId"`
}

// Reject gives an assigned run back to the queue.
type Reject struct {
	Type    FrameType `json:"type"`
	RunID   string    `json:"runId"`
	LeaseID string    `json:"leaseId"`
	Reason  string    `json:"reason"`
}

// Event reports progress of a run. Seq counts 1, 2, 3… per lease; the server
// applies each (leaseId, seq) once and acknowledges every event.
type Event struct {
	Type       FrameType      `json:"type"`
	RunID      string         `json:"runId"`
	LeaseID    string         `json:"leaseId"`
	Seq        int64          `json:"seq"`
	Kind       EventKind      `json:"kind"`
	Step       *int           `json:"step,omitempty"`
	Status     string         `json:"status,omitempty"`
	DurationMs *int64         `json:"durationMs,omitempty"`
	Attempts   int            `json:"attempts,omitempty"`
	Output     any            `json:"output,omitempty"`
	Error      *Error         `json:"error,omitempty"`
	Outputs    map[string]any `json:"outputs,omitempty"`
	Message    string         `json:"message,omitempty"`
}

// Ack acknowledges an applied (or already applied) event.
type Ack struct {
	Type  FrameType `json:"type"`
	RunID string    `json:"runId"`
	Seq   int64     `json:"seq"`
}

// ApprovalFrame tells the agent how an approval was resolved.
type ApprovalFrame struct {
	Type       FrameType `json:"type"`
	RunID      string    `json:"runId"`
	ApprovalID string    `json:"approvalId"`
	Approved   bool      `json:"approved"`
	Comment    string    `json:"comment,omitempty"`
}

// Cancel tells the agent to stop a run and finish it as cancelled.
type Cancel struct {
	Type   FrameType `json:"type"`
	RunID  string    `json:"runId"`
	Reason string    `json:"reason,omitempty"`
}

// Heartbeat: from the agent it lists the runs it holds (keeping their
// leases); the server answers with an empty heartbeat.
type Heartbeat struct {
	Type FrameType `json:"type"`
	Runs []string  `json:"runs"`
}

func (*Hello) FrameType() FrameType         { return FrameHello }
func (*Welcome) FrameType() FrameType       { return FrameWelcome }
func (*ErrorFrame) FrameType() FrameType    { return FrameError }
func (*Ready) FrameType() FrameType         { return FrameReady }
func (*Assign) FrameType() FrameType        { return FrameAssign }
func (*Accept) FrameType() FrameType        { return FrameAccept }
func (*Reject) FrameType() FrameType        { return FrameReject }
func (*Event) FrameType() FrameType         { return FrameEvent }
func (*Ack) FrameType() FrameType           { return FrameAck }
func (*ApprovalFrame) FrameType() FrameType { return FrameApproval }
func (*Cancel) FrameType() FrameType        { return FrameCancel }
func (*Heartbeat) FrameType() FrameType     { return FrameHeartbeat }

// newFrame returns an empty frame of type t, or nil.
func newFrame(t FrameType) Frame {
	switch t {
	case FrameHello:
		return &Hello{}
	case FrameWelcome:
		return &Welcome{}
	case FrameError:
		return &ErrorFrame{}
	case FrameReady:
		return &Ready{}
	case FrameAssign:
		return &Assign{}
	case FrameAccept:
		return &Accept{}
	case FrameReject:
		return &Reject{}
	case FrameEvent:
		return &Event{}
	case FrameAck:
		return &Ack{}
	case FrameApproval:
		return &ApprovalFrame{}
	case FrameCancel:
		return &Cancel{}
	case FrameHeartbeat:
		return &Heartbeat{}
	}
	return nil
}

// FrameTypes lists every frame type.
func FrameTypes() []FrameType {
	return []FrameType{FrameHello, FrameWelcome, FrameError, FrameReady, FrameAssign, FrameAccept, FrameReject,
		FrameEvent, FrameAck, FrameApproval, FrameCancel, FrameHeartbeat}
}

// EncodeFrame encodes f with its type set. f itself is not modified, so one
// frame may be encoded by several goroutines at once. Nil lists and input maps
// are sent as [] and {}, never null.
func EncodeFrame(f Frame) ([]byte, error) {
	v := reflect.ValueOf(f)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return nil, fmt.Errorf("protocol: EncodeFrame needs a non-nil frame pointer, got %T", f)
	}
	cp := reflect.New(v.Elem().Type())
	cp.Elem().Set(v.Elem())
	cp.Elem().FieldByName("Type").SetString(string(f.FrameType()))
	switch c := cp.Interface().(type) {
	case *Welcome:
		if c.Runs == nil {
			c.Runs = []HeldRun{}
		}
	case *Heartbeat:
		if c.Runs == nil {
			c.Runs = []string{}
		}
	case *Assign:
		if c.Inputs == nil {
			c.Inputs = map[string]any{}
		}
		if d := c.Workflow.Definition; d != nil && d.Variables == nil {
			dc := *d
			dc.Variables = []Variable{}
			c.Workflow.Definition = &dc
		}
	}
	return json.Marshal(cp.Interface())
}

func frameError(msg string, problems ...FieldProblem) *Error {
	e := Errorf(CodeBadRequest, "%s", msg)
	if len(problems) > 0 {
		e = e.With("fields", problems)
	}
	return e
}

// DecodeFrame decodes and validates one frame from untrusted bytes. Malformed
// JSON, an unknown type, wrong field types and unknown fields are bad_request
// errors; invalid values are the frame's Validate error.
func DecodeFrame(data []byte) (Frame, error) {
	if len(data) > MaxFrameBytes {
		return nil, frameError("The frame is too large.").With("reason", "frame_too_large")
	}
	if !json.Valid(data) {
		return nil, frameError("The frame is not valid JSON.", checkShapeAt(data, reflect.TypeFor[any](), "frame")...).With("reason", "malformed_frame")
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(data, &obj); err != nil || obj == nil {
		return nil, frameError("The frame must be a JSON object.", FieldProblem{Field: "frame", Problem: "must be an object"}).With("reason", "malformed_frame")
	}
	var typ FrameType
	if raw, ok := obj["type"]; !ok {
		return nil, frameError("The frame has no \"type\".", FieldProblem{Field: "type", Problem: "is required"}).With("reason", "malformed_frame")
	} else if err := json.Unmarshal(raw, &typ); err != nil || string(raw) == "null" {
		return nil, frameError("The frame's \"type\" must be a string.", FieldProblem{Field: "type", Problem: "must be a string"}).With("reason", "malformed_frame")
	}
	f := newFrame(typ)
	if f == nil {
		return nil, frameError(fmt.Sprintf("Unknown frame type %q.", truncate(string(typ), 64)), FieldProblem{Field: "type", Problem: "is not a known frame type"}).With("reason", "unknown_frame_type")
	}
	if problems := checkShapeAt(data, reflect.TypeOf(f).Elem(), "frame"); len(problems) > 0 {
		return nil, frameError("The frame is malformed.", problems...).With("reason", "malformed_frame")
	}
	if err := json.Unmarshal(data, f); err != nil {
		return nil, frameError("The frame is malformed.").With("reason", "malformed_frame")
	}
	if err := f.Validate(); err != nil {
		return nil, err
	}
	return f, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// frameProblems collects invalid values of one frame.
type frameProblems []FieldProblem

func (p *frameProblems) check(ok bool, field, problem string) {
	if !ok {
		*p = append(*p, FieldProblem{Field: field, Problem: problem})
	}
}

func (p frameProblems) err(t FrameType) error {
	if len(p) == 0 {
		return nil
	}
	return FieldErrors(CodeUnprocessableEntity, fmt.Sprintf("The %s frame has invalid values.", t), p)
}

var (
	idRE       = regexp.MustCompile(`^[a-z]{2,4}_[a-z2-7]{10,40}$`)
	clientIDRE = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9._/-]{1,63}$`)
)

// validID reports whether s looks like one of the server's ids with prefix.
func validID(s, prefix string) bool {
	return idRE.MatchString(s) && len(s) > len(prefix) && s[:len(prefix)+1] == prefix+"_"
}

func validText(s string, max int) bool { return utf8.ValidString(s) && len(s) <= max }

func (f *Hello) Validate() error {
	var p frameProblems
	p.check(f.Protocol > 0, "protocol", "is required")
	p.check(f.Token != "" && len(f.Token) <= 512, "token", "is required")
	p.check(clientIDRE.MatchString(f.Agent.ID), "agent.id", "must be 1 to 128 of [A-Za-z0-9._:-]")
	p.check(validText(f.Agent.Name, 200), "agent.name", "must be at most 200 bytes of UTF-8")
	p.check(f.Agent.Kind == AgentHeadless || f.Agent.Kind == AgentExtension, "agent.kind", "must be headless or extension")
	p.check(validText(f.Agent.Version, 64), "agent.version", "must be at most 64 bytes")
	p.check(f.Agent.Slots >= 0 && f.Agent.Slots <= maxSlots, "agent.slots", fmt.Sprintf("must be from 0 to %d", maxSlots))
	p.check(len(f.Agent.Labels) <= maxLabels, "agent.labels", fmt.Sprintf("must have at most %d entries", maxLabels))
	for k, v := range f.Agent.Labels {
		p.check(labelKeyRE.MatchString(k) && validText(v, 255), "agent.labels."+truncate(k, 64), "keys must be 1 to 63 of [A-Za-z0-9._/-], values at most 255 bytes")
	}
	return p.err(FrameHello)
}

func (f *Welcome) Validate() error {
	var p frameProblems
	p.check(f.SessionID != "", "sessionId", "is required")
	p.check(validID(f.AgentID, "agt"), "agentId", "must be an agent id")
	p.check(f.HeartbeatMs > 0 && f.LeaseMs > 0, "leaseMs", "heartbeatMs and leaseMs must be positive")
	for i, r := range f.Runs {
		p.check(validID(r.RunID, "run") && validID(r.LeaseID, "lse"), fmt.Sprintf("runs[%d]", i), "must name a run and its lease")
		p.check(r.Attempt >= 1, fmt.Sprintf("runs[%d].attempt", i), "must be at least 1")
		p.check(r.Status.Valid(), fmt.Sprintf("runs[%d].status", i), "must be a run status")
	}
	return p.err(FrameWelcome)
}

func (f *ErrorFrame) Validate() error {
	var p frameProblems
	p.check(f.Code.Valid(), "code", "must be a catalog code")
	p.check(validText(f.Message, maxTextBytes), "message", "must be at most 4096 bytes")
	p.check(f.RunID == "" || validID(f.RunID, "run"), "runId", "must be a run id")
	return p.err(FrameError)
}

func (f *Ready) Validate() error {
	var p frameProblems
	p.check(f.Slots >= 0 && f.Slots <= maxSlots, "slots", fmt.Sprintf("must be from 0 to %d", maxSlots))
	return p.err(FrameReady)
}

func (f *Assign) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(validID(f.LeaseID, "lse"), "leaseId", "must be a lease id")
	p.check(f.Attempt >= 1, "attempt", "must be at least 1")
	p.check(validID(f.Workflow.ID, "wf"), "workflow.id", "must be a workflow id")
	p.check(f.Workflow.Definition != nil, "workflow.definition", "is required")
	if f.Workflow.Definition != nil {
		var e *Error
		if err := f.Workflow.Definition.Validate(); errors.As(err, &e) {
			ps, _ := e.Details["fields"].([]FieldProblem)
			for _, q := range ps {
				field := "workflow.definition"
				if q.Field != rootField {
					field += "." + q.Field
				}
				p.check(false, field, q.Problem)
			}
		}
	}
	p.check(f.TimeoutMs >= 0, "timeoutMs", "must not be negative")
	p.check(f.BatchID == "" || validID(f.BatchID, "bat"), "batchId", "must be a batch id")
	p.check(f.Iteration == nil || *f.Iteration >= 0, "iteration", "must not be negative")
	return p.err(FrameAssign)
}

func (f *Accept) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(validID(f.LeaseID, "lse"), "leaseId", "must be a lease id")
	return p.err(FrameAccept)
}

func (f *Reject) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(validID(f.LeaseID, "lse"), "leaseId", "must be a lease id")
	p.check(validText(f.Reason, 500), "reason", "must be at most 500 bytes")
	return p.err(FrameReject)
}

// Step statuses an agent may report in step_finished.
func validStepOutcome(s string) bool {
	switch StepStatus(s) {
	case StepSucceeded, StepFailed, StepSkipped:
		return true
	}
	return false
}

func (f *Event) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(validID(f.LeaseID, "lse"), "leaseId", "must be a lease id")
	p.check(f.Seq >= 1, "seq", "must be at least 1")
	p.check(f.Step == nil || (*f.Step >= 0 && *f.Step < maxSteps), "step", "must be a step index")
	p.check(f.DurationMs == nil || *f.DurationMs >= 0, "durationMs", "must not be negative")
	p.check(f.Attempts >= 0 && f.Attempts <= maxRetries+1, "attempts", "must be from 0 to 11")
	p.check(validText(f.Message, maxTextBytes), "message", "must be at most 4096 bytes")
	if f.Error != nil {
		p.check(f.Error.Code.Valid(), "error.code", "must be a catalog code")
		p.check(validText(f.Error.Message, maxTextBytes), "error.message", "must be at most 4096 bytes")
	}
	switch f.Kind {
	case EventStarted:
	case EventStepStarted:
		p.check(f.Step != nil, "step", "is required")
	case EventStepFinished:
		p.check(f.Step != nil, "step", "is required")
		p.check(validStepOutcome(f.Status), "status", "must be succeeded, failed or skipped")
	case EventApprovalRequested:
		p.check(f.Step != nil, "step", "is required")
		p.check(f.Message != "", "message", "is required")
	case EventFinished:
		st := RunStatus(f.Status)
		p.check(st == RunSucceeded || st == RunFailed || st == RunTimedOut || st == RunCancelled, "status", "must be succeeded, failed, timed_out or cancelled")
		p.check(st == RunSucceeded || st == RunCancelled || f.Error != nil, "error", "is required when the run did not succeed")
	default:
		p.check(false, "kind", "must be started, step_started, step_finished, approval_requested or finished")
	}
	return p.err(FrameEvent)
}

func (f *Ack) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(f.Seq >= 1, "seq", "must be at least 1")
	return p.err(FrameAck)
}

func (f *ApprovalFrame) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	p.check(validID(f.ApprovalID, "apr"), "approvalId", "must be an approval id")
	return p.err(FrameApproval)
}

func (f *Cancel) Validate() error {
	var p frameProblems
	p.check(validID(f.RunID, "run"), "runId", "must be a run id")
	return p.err(FrameCancel)
}

func (f *Heartbeat) Validate() error {
	var p frameProblems
	p.check(len(f.Runs) <= maxRunsListed, "runs", "must list at most 1024 runs")
	for i, r := range f.Runs {
		p.check(validID(r, "run"), fmt.Sprintf("runs[%d]", i), "must be a run id")
	}
	return p.err(FrameHeartbeat)
}
