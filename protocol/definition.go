package protocol

import "encoding/json"

// DefinitionVersion is the only workflow definition version this build reads.
const DefinitionVersion = 1

// Definition is a workflow definition, version 1 (API.md §4, §12).
type Definition struct {
	Version   int        `json:"version"`
	TimeoutMs int64      `json:"timeoutMs,omitempty"`
	Variables []Variable `json:"variables"`
	Steps     []Step     `json:"steps"`
}

// VariableType is the type of a workflow variable.
type VariableType string

const (
	VarString  VariableType = "string"
	VarNumber  VariableType = "number"
	VarBoolean VariableType = "boolean"
	VarSecret  VariableType = "secret"
)

// Variable declares one input of a workflow.
type Variable struct {
	Name      string       `json:"name"`
	Type      VariableType `json:"type"`
	Required  bool         `json:"required,omitempty"`
	Default   any          `json:"default,omitempty"`
	Pattern   string       `json:"pattern,omitempty"`
	Min       *float64     `json:"min,omitempty"`
	Max       *float64     `json:"max,omitempty"`
	MaxLength *int         `json:"maxLength,omitempty"`
}

// StepType names a browser step.
type StepType string

const (
	StepNavigate   StepType = "navigate"
	StepClick      StepType = "click"
	StepTypeText   StepType = "type"
	StepSelect     StepType = "select"
	StepCheck      StepType = "check"
	StepPress      StepType = "press"
	StepWaitFor    StepType = "waitFor"
	StepSleep      StepType = "sleep"
	StepScroll     StepType = "scroll"
	StepExtract    StepType = "extract"
	StepAssert     StepType = "assert"
	StepScreenshot StepType = "screenshot"
	StepApproval   StepType = "approval"
)

// Step is one flat step object: `{"type":"click","selector":"#go"}`. Which
// fields apply depends on Type; Validate enforces it.
type Step struct {
	Type      StepType `json:"type"`
	TimeoutMs int64    `json:"timeoutMs,omitempty"`
	Retries   int      `json:"retries,omitempty"`
	Optional  bool     `json:"optional,omitempty"`

	URL          string  `json:"url,omitempty"`          // navigate
	Selector     string  `json:"selector,omitempty"`     // click type select check waitFor scroll extract assert
	Text         string  `json:"text,omitempty"`         // type
	Clear        bool    `json:"clear,omitempty"`        // type
	Value        string  `json:"value,omitempty"`        // select
	Checked      *bool   `json:"checked,omitempty"`      // check
	Key          string  `json:"key,omitempty"`          // press
	State        string  `json:"state,omitempty"`        // waitFor: visible|hidden|attached
	Ms           int64   `json:"ms,omitempty"`           // sleep
	Y            *int64  `json:"y,omitempty"`            // scroll
	Attribute    string  `json:"attribute,omitempty"`    // extract
	Output       string  `json:"output,omitempty"`       // extract
	TextContains *string `json:"textContains,omitempty"` // assert
	Equals       *string `json:"equals,omitempty"`       // assert
	Name         string  `json:"name,omitempty"`         // screenshot
	FullPage     bool    `json:"fullPage,omitempty"`     // screenshot
	Message      string  `json:"message,omitempty"`      // approval
}

// DefaultStepTimeoutMs applies to a step without timeoutMs.
const DefaultStepTimeoutMs = 30_000

// RawDefinition keeps the undecoded bytes next to the definition when needed.
type RawDefinition = json.RawMessage
