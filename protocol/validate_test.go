package protocol_test

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/copelf/copelf/protocol"
)

func ptr[T any](v T) *T { return &v }

// problemsOf returns the details.fields of err, failing unless err is an *Error with code.
func problemsOf(t *testing.T, err error, code protocol.Code) []protocol.FieldProblem {
	t.Helper()
	var e *protocol.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *protocol.Error", err, err)
	}
	if e.Code != code {
		t.Fatalf("code = %q, want %q (%v)", e.Code, code, err)
	}
	if e.Message == "" {
		t.Fatalf("empty message")
	}
	ps, ok := e.Details["fields"].([]protocol.FieldProblem)
	if !ok || len(ps) == 0 {
		t.Fatalf("details.fields missing: %#v", e.Details)
	}
	return ps
}

func fieldNames(ps []protocol.FieldProblem) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Field)
	}
	return out
}

func baseDef() *protocol.Definition {
	return &protocol.Definition{
		Version: 1,
		Variables: []protocol.Variable{
			{Name: "username", Type: protocol.VarString, Required: true},
			{Name: "password", Type: protocol.VarSecret, Required: true},
		},
		Steps: []protocol.Step{{Type: protocol.StepNavigate, URL: "https://example.com/login"}},
	}
}

func addVar(v protocol.Variable) func(*protocol.Definition) {
	return func(d *protocol.Definition) { d.Variables = append(d.Variables, v) }
}

func addStep(steps ...protocol.Step) func(*protocol.Definition) {
	return func(d *protocol.Definition) { d.Steps = append(d.Steps, steps...) }
}

func TestValidate(t *testing.T) {
	type tc struct {
		name   string
		mod    func(*protocol.Definition)
		fields []string // expected problem fields, in order; nil = valid
		want   string   // substring of the first problem
	}
	cases := []tc{
		{name: "base is valid", mod: func(*protocol.Definition) {}},

		// definition
		{name: "version 0", mod: func(d *protocol.Definition) { d.Version = 0 }, fields: []string{"version"}, want: "must be 1"},
		{name: "version 2", mod: func(d *protocol.Definition) { d.Version = 2 }, fields: []string{"version"}},
		{name: "timeout 24h ok", mod: func(d *protocol.Definition) { d.TimeoutMs = 86_400_000 }},
		{name: "timeout over 24h", mod: func(d *protocol.Definition) { d.TimeoutMs = 86_400_001 }, fields: []string{"timeoutMs"}},
		{name: "timeout negative", mod: func(d *protocol.Definition) { d.TimeoutMs = -1 }, fields: []string{"timeoutMs"}},

		// variable names
		{name: "name underscore ok", mod: addVar(protocol.Variable{Name: "_a1", Type: "string"})},
		{name: "name 64 chars ok", mod: addVar(protocol.Variable{Name: "a" + strings.Repeat("b", 63), Type: "string"})},
		{name: "name 65 chars", mod: addVar(protocol.Variable{Name: "a" + strings.Repeat("b", 64), Type: "string"}), fields: []string{"variables[2].name"}},
		{name: "name empty", mod: addVar(protocol.Variable{Name: "", Type: "string"}), fields: []string{"variables[2].name"}, want: "is required"},
		{name: "name starts with digit", mod: addVar(protocol.Variable{Name: "1a", Type: "string"}), fields: []string{"variables[2].name"}},
		{name: "name with dash", mod: addVar(protocol.Variable{Name: "a-b", Type: "string"}), fields: []string{"variables[2].name"}},
		{name: "name with dot", mod: addVar(protocol.Variable{Name: "run.id", Type: "string"}), fields: []string{"variables[2].name"}},
		{name: "name non-ascii", mod: addVar(protocol.Variable{Name: "nämé", Type: "string"}), fields: []string{"variables[2].name"}},
		{name: "duplicate name", mod: addVar(protocol.Variable{Name: "username", Type: "string"}), fields: []string{"variables[2].name"}, want: "variables[0]"},
		{name: "duplicate name other case", mod: addVar(protocol.Variable{Name: "UserName", Type: "string"}), fields: []string{"variables[2].name"}},

		// variable types
		{name: "type number ok", mod: addVar(protocol.Variable{Name: "n", Type: "number"})},
		{name: "type boolean ok", mod: addVar(protocol.Variable{Name: "b", Type: "boolean"})},
		{name: "type empty", mod: addVar(protocol.Variable{Name: "x"}), fields: []string{"variables[2].type"}},
		{name: "type unknown", mod: addVar(protocol.Variable{Name: "x", Type: "int"}), fields: []string{"variables[2].type"}},
		{name: "type wrong case", mod: addVar(protocol.Variable{Name: "x", Type: "String"}), fields: []string{"variables[2].type"}},

		// pattern
		{name: "pattern on string", mod: addVar(protocol.Variable{Name: "x", Type: "string", Pattern: "[a-z]+"})},
		{name: "pattern on secret", mod: addVar(protocol.Variable{Name: "x", Type: "secret", Pattern: "[a-z]+"})},
		{name: "pattern on number", mod: addVar(protocol.Variable{Name: "x", Type: "number", Pattern: "[0-9]+"}), fields: []string{"variables[2].pattern"}, want: "only allowed"},
		{name: "pattern on boolean", mod: addVar(protocol.Variable{Name: "x", Type: "boolean", Pattern: "true"}), fields: []string{"variables[2].pattern"}},
		{name: "pattern does not compile", mod: addVar(protocol.Variable{Name: "x", Type: "string", Pattern: "(a"}), fields: []string{"variables[2].pattern"}, want: "regular expression"},
		{name: "pattern backreference (not RE2)", mod: addVar(protocol.Variable{Name: "x", Type: "string", Pattern: `(a)\1`}), fields: []string{"variables[2].pattern"}},
		{name: "pattern only valid when wrapped", mod: addVar(protocol.Variable{Name: "x", Type: "string", Pattern: "a)|(b"}), fields: []string{"variables[2].pattern"}},

		// min/max
		{name: "min max on number", mod: addVar(protocol.Variable{Name: "x", Type: "number", Min: ptr(1.0), Max: ptr(1.0)})},
		{name: "min only", mod: addVar(protocol.Variable{Name: "x", Type: "number", Min: ptr(-5.0)})},
		{name: "min above max", mod: addVar(protocol.Variable{Name: "x", Type: "number", Min: ptr(2.0), Max: ptr(1.0)}), fields: []string{"variables[2].max"}},
		{name: "min on string", mod: addVar(protocol.Variable{Name: "x", Type: "string", Min: ptr(1.0)}), fields: []string{"variables[2].min"}},
		{name: "max on boolean", mod: addVar(protocol.Variable{Name: "x", Type: "boolean", Max: ptr(1.0)}), fields: []string{"variables[2].max"}},
		{name: "min NaN", mod: addVar(protocol.Variable{Name: "x", Type: "number", Min: ptr(math.NaN())}), fields: []string{"variables[2].min"}},

		// maxLength
		{name: "maxLength 0 ok", mod: addVar(protocol.Variable{Name: "x", Type: "string", MaxLength: ptr(0)})},
		{name: "maxLength on secret", mod: addVar(protocol.Variable{Name: "x", Type: "secret", MaxLength: ptr(8)})},
		{name: "maxLength negative", mod: addVar(protocol.Variable{Name: "x", Type: "string", MaxLength: ptr(-1)}), fields: []string{"variables[2].maxLength"}},
		{name: "maxLength on number", mod: addVar(protocol.Variable{Name: "x", Type: "number", MaxLength: ptr(3)}), fields: []string{"variables[2].maxLength"}},

		// defaults
		{name: "default string ok", mod: addVar(protocol.Variable{Name: "x", Type: "string", Default: "abc", Pattern: "[a-c]+", MaxLength: ptr(3)})},
		{name: "default number ok", mod: addVar(protocol.Variable{Name: "x", Type: "number", Default: 3.0, Min: ptr(1.0), Max: ptr(3.0)})},
		{name: "default boolean ok", mod: addVar(protocol.Variable{Name: "x", Type: "boolean", Default: false})},
		{name: "default wrong type", mod: addVar(protocol.Variable{Name: "x", Type: "number", Default: "3"}), fields: []string{"variables[2].default"}, want: "must be a number"},
		{name: "default boolean as string", mod: addVar(protocol.Variable{Name: "x", Type: "boolean", Default: "true"}), fields: []string{"variables[2].default"}},
		{name: "default string as number", mod: addVar(protocol.Variable{Name: "x", Type: "string", Default: 1.0}), fields: []string{"variables[2].default"}},
		{name: "default fails pattern", mod: addVar(protocol.Variable{Name: "x", Type: "string", Default: "abcd", Pattern: "[a-c]+"}), fields: []string{"variables[2].default"}, want: "pattern"},
		{name: "default too long", mod: addVar(protocol.Variable{Name: "x", Type: "string", Default: "abcd", MaxLength: ptr(3)}), fields: []string{"variables[2].default"}},
		{name: "default below min", mod: addVar(protocol.Variable{Name: "x", Type: "number", Default: 0.0, Min: ptr(1.0)}), fields: []string{"variables[2].default"}},
		{name: "default above max", mod: addVar(protocol.Variable{Name: "x", Type: "number", Default: 5.0, Max: ptr(1.0)}), fields: []string{"variables[2].default"}},
		{name: "default object", mod: addVar(protocol.Variable{Name: "x", Type: "string", Default: map[string]any{}}), fields: []string{"variables[2].default"}},
		{name: "secret with default", mod: addVar(protocol.Variable{Name: "x", Type: "secret", Default: "hunter2"}), fields: []string{"variables[2].default"}, want: "secret"},

		// steps: count
		{name: "no steps", mod: func(d *protocol.Definition) { d.Steps = nil }, fields: []string{"steps"}},
		{name: "1000 steps ok", mod: func(d *protocol.Definition) {
			d.Steps = slices.Repeat([]protocol.Step{{Type: "sleep", Ms: 1}}, 1000)
		}},
		{name: "1001 steps", mod: func(d *protocol.Definition) {
			d.Steps = slices.Repeat([]protocol.Step{{Type: "sleep", Ms: 1}}, 1001)
		}, fields: []string{"steps"}},

		// steps: common fields
		{name: "unknown step type", mod: addStep(protocol.Step{Type: "hover", Selector: "#a"}), fields: []string{"steps[1].type"}, want: "unknown step type"},
		{name: "empty step type", mod: addStep(protocol.Step{}), fields: []string{"steps[1].type"}, want: "unknown step type"},
		{name: "step type wrong case", mod: addStep(protocol.Step{Type: "Click", Selector: "#a"}), fields: []string{"steps[1].type"}},
		{name: "step timeout 1h ok", mod: addStep(protocol.Step{Type: "click", Selector: "#a", TimeoutMs: 3_600_000})},
		{name: "step timeout over 1h", mod: addStep(protocol.Step{Type: "click", Selector: "#a", TimeoutMs: 3_600_001}), fields: []string{"steps[1].timeoutMs"}},
		{name: "step timeout negative", mod: addStep(protocol.Step{Type: "click", Selector: "#a", TimeoutMs: -1}), fields: []string{"steps[1].timeoutMs"}},
		{name: "retries 10 ok", mod: addStep(protocol.Step{Type: "click", Selector: "#a", Retries: 10})},
		{name: "retries 11", mod: addStep(protocol.Step{Type: "click", Selector: "#a", Retries: 11}), fields: []string{"steps[1].retries"}},
		{name: "retries negative", mod: addStep(protocol.Step{Type: "click", Selector: "#a", Retries: -1}), fields: []string{"steps[1].retries"}},
		{name: "foreign fields ignored", mod: addStep(protocol.Step{Type: "click", Selector: "#a", URL: "not a url", Ms: -5, State: "bogus", Output: "1bad", Name: "/bad"})},

		// navigate
		{name: "navigate http", mod: addStep(protocol.Step{Type: "navigate", URL: "http://localhost:8080/x?y=1"})},
		{name: "navigate file", mod: addStep(protocol.Step{Type: "navigate", URL: "file:///tmp/page.html"})},
		{name: "navigate about", mod: addStep(protocol.Step{Type: "navigate", URL: "about:blank"})},
		{name: "navigate upper-case scheme", mod: addStep(protocol.Step{Type: "navigate", URL: "HTTPS://example.com"})},
		{name: "navigate with variable", mod: addStep(protocol.Step{Type: "navigate", URL: "{{username}}"})},
		{name: "navigate with builtin", mod: addStep(protocol.Step{Type: "navigate", URL: "https://x.test/{{run.id}}/{{ iteration.index }}/{{batch.id}}"})},
		{name: "navigate empty", mod: addStep(protocol.Step{Type: "navigate"}), fields: []string{"steps[1].url"}, want: "is required"},
		{name: "navigate relative", mod: addStep(protocol.Step{Type: "navigate", URL: "/login"}), fields: []string{"steps[1].url"}},
		{name: "navigate no host", mod: addStep(protocol.Step{Type: "navigate", URL: "https:///path"}), fields: []string{"steps[1].url"}},
		{name: "navigate javascript", mod: addStep(protocol.Step{Type: "navigate", URL: "javascript:alert(1)"}), fields: []string{"steps[1].url"}},
		{name: "navigate ftp", mod: addStep(protocol.Step{Type: "navigate", URL: "ftp://example.com"}), fields: []string{"steps[1].url"}},
		{name: "navigate unparsable", mod: addStep(protocol.Step{Type: "navigate", URL: "http://[::1"}), fields: []string{"steps[1].url"}},
		{name: "navigate undeclared", mod: addStep(protocol.Step{Type: "navigate", URL: "https://{{host}}/"}), fields: []string{"steps[1].url"}, want: `references undeclared variable "host"`},

		// selectors
		{name: "click css", mod: addStep(protocol.Step{Type: "click", Selector: "button[type=submit] > span:nth-child(2)"})},
		{name: "click xpath", mod: addStep(protocol.Step{Type: "click", Selector: "xpath=//button[1]"})},
		{name: "click empty", mod: addStep(protocol.Step{Type: "click"}), fields: []string{"steps[1].selector"}},
		{name: "click blank", mod: addStep(protocol.Step{Type: "click", Selector: "   "}), fields: []string{"steps[1].selector"}},
		{name: "click empty xpath", mod: addStep(protocol.Step{Type: "click", Selector: "xpath="}), fields: []string{"steps[1].selector"}, want: "XPath"},
		{name: "selector with variable", mod: addStep(protocol.Step{Type: "click", Selector: "#{{username}}"})},
		{name: "selector undeclared", mod: addStep(protocol.Step{Type: "click", Selector: "#{{nope}}"}), fields: []string{"steps[1].selector"}},

		// type
		{name: "type ok", mod: addStep(protocol.Step{Type: "type", Selector: "#u", Text: "{{username}}", Clear: true})},
		{name: "type empty text ok", mod: addStep(protocol.Step{Type: "type", Selector: "#u"})},
		{name: "type no selector", mod: addStep(protocol.Step{Type: "type", Text: "x"}), fields: []string{"steps[1].selector"}},
		{name: "type undeclared", mod: addStep(protocol.Step{Type: "type", Selector: "#u", Text: "{{ user }} {{user}} {{other}}"}),
			fields: []string{"steps[1].text", "steps[1].text"}, want: `"user"`},
		{name: "ref case-sensitive", mod: addStep(protocol.Step{Type: "type", Selector: "#u", Text: "{{Username}}"}), fields: []string{"steps[1].text"}},
		{name: "empty ref", mod: addStep(protocol.Step{Type: "type", Selector: "#u", Text: "{{ }}"}), fields: []string{"steps[1].text"}},

		// select
		{name: "select ok", mod: addStep(protocol.Step{Type: "select", Selector: "#s", Value: "{{username}}"})},
		{name: "select no value", mod: addStep(protocol.Step{Type: "select", Selector: "#s"}), fields: []string{"steps[1].value"}},
		{name: "select no selector", mod: addStep(protocol.Step{Type: "select", Value: "a"}), fields: []string{"steps[1].selector"}},
		{name: "select undeclared", mod: addStep(protocol.Step{Type: "select", Selector: "#s", Value: "{{x}}"}), fields: []string{"steps[1].value"}},

		// check
		{name: "check true", mod: addStep(protocol.Step{Type: "check", Selector: "#c", Checked: ptr(true)})},
		{name: "check false", mod: addStep(protocol.Step{Type: "check", Selector: "#c", Checked: ptr(false)})},
		{name: "check no checked", mod: addStep(protocol.Step{Type: "check", Selector: "#c"}), fields: []string{"steps[1].checked"}},
		{name: "check no selector", mod: addStep(protocol.Step{Type: "check", Checked: ptr(true)}), fields: []string{"steps[1].selector"}},

		// press
		{name: "press ok", mod: addStep(protocol.Step{Type: "press", Key: "Enter"})},
		{name: "press empty", mod: addStep(protocol.Step{Type: "press"}), fields: []string{"steps[1].key"}},
		{name: "press undeclared", mod: addStep(protocol.Step{Type: "press", Key: "{{k}}"}), fields: []string{"steps[1].key"}},

		// waitFor
		{name: "waitFor default state", mod: addStep(protocol.Step{Type: "waitFor", Selector: "#w"})},
		{name: "waitFor visible", mod: addStep(protocol.Step{Type: "waitFor", Selector: "#w", State: "visible"})},
		{name: "waitFor hidden", mod: addStep(protocol.Step{Type: "waitFor", Selector: "#w", State: "hidden"})},
		{name: "waitFor attached", mod: addStep(protocol.Step{Type: "waitFor", Selector: "#w", State: "attached"})},
		{name: "waitFor bad state", mod: addStep(protocol.Step{Type: "waitFor", Selector: "#w", State: "detached"}), fields: []string{"steps[1].state"}},
		{name: "waitFor no selector", mod: addStep(protocol.Step{Type: "waitFor"}), fields: []string{"steps[1].selector"}},

		// sleep
		{name: "sleep 1", mod: addStep(protocol.Step{Type: "sleep", Ms: 1})},
		{name: "sleep 1h", mod: addStep(protocol.Step{Type: "sleep", Ms: 3_600_000})},
		{name: "sleep 0", mod: addStep(protocol.Step{Type: "sleep"}), fields: []string{"steps[1].ms"}},
		{name: "sleep over 1h", mod: addStep(protocol.Step{Type: "sleep", Ms: 3_600_001}), fields: []string{"steps[1].ms"}},

		// scroll
		{name: "scroll selector", mod: addStep(protocol.Step{Type: "scroll", Selector: "#footer"})},
		{name: "scroll y", mod: addStep(protocol.Step{Type: "scroll", Y: ptr[int64](0)})},
		{name: "scroll neither", mod: addStep(protocol.Step{Type: "scroll"}), fields: []string{"steps[1]"}},
		{name: "scroll both", mod: addStep(protocol.Step{Type: "scroll", Selector: "#a", Y: ptr[int64](100)}), fields: []string{"steps[1]"}},
		{name: "scroll undeclared", mod: addStep(protocol.Step{Type: "scroll", Selector: "{{s}}"}), fields: []string{"steps[1].selector"}},

		// extract
		{name: "extract ok", mod: addStep(protocol.Step{Type: "extract", Selector: "#total", Attribute: "data-{{username}}", Output: "total"})},
		{name: "extract no output", mod: addStep(protocol.Step{Type: "extract", Selector: "#t"}), fields: []string{"steps[1].output"}},
		{name: "extract bad output", mod: addStep(protocol.Step{Type: "extract", Selector: "#t", Output: "order-id"}), fields: []string{"steps[1].output"}},
		{name: "extract no selector", mod: addStep(protocol.Step{Type: "extract", Output: "t"}), fields: []string{"steps[1].selector"}},
		{name: "extract duplicate output", mod: addStep(
			protocol.Step{Type: "extract", Selector: "#a", Output: "t"},
			protocol.Step{Type: "extract", Selector: "#b", Output: "t"},
		), fields: []string{"steps[2].output"}, want: "steps[1]"},
		{name: "extract outputs differ by case", mod: addStep(
			protocol.Step{Type: "extract", Selector: "#a", Output: "t"},
			protocol.Step{Type: "extract", Selector: "#b", Output: "T"},
		)},
		{name: "extract undeclared attribute", mod: addStep(protocol.Step{Type: "extract", Selector: "#t", Attribute: "{{a}}", Output: "t"}), fields: []string{"steps[1].attribute"}},

		// assert
		{name: "assert textContains", mod: addStep(protocol.Step{Type: "assert", Selector: "#m", TextContains: ptr("Welcome {{username}}")})},
		{name: "assert equals empty", mod: addStep(protocol.Step{Type: "assert", Selector: "#m", Equals: ptr("")})},
		{name: "assert neither", mod: addStep(protocol.Step{Type: "assert", Selector: "#m"}), fields: []string{"steps[1]"}, want: "exactly one"},
		{name: "assert both", mod: addStep(protocol.Step{Type: "assert", Selector: "#m", TextContains: ptr("a"), Equals: ptr("a")}), fields: []string{"steps[1]"}},
		{name: "assert no selector", mod: addStep(protocol.Step{Type: "assert", Equals: ptr("a")}), fields: []string{"steps[1].selector"}},
		{name: "assert undeclared textContains", mod: addStep(protocol.Step{Type: "assert", Selector: "#m", TextContains: ptr("{{x}}")}), fields: []string{"steps[1].textContains"}},
		{name: "assert undeclared equals", mod: addStep(protocol.Step{Type: "assert", Selector: "#m", Equals: ptr("{{x}}")}), fields: []string{"steps[1].equals"}},

		// screenshot
		{name: "screenshot ok", mod: addStep(protocol.Step{Type: "screenshot", Name: "after-login.v2_final", FullPage: true})},
		{name: "screenshot 128 chars", mod: addStep(protocol.Step{Type: "screenshot", Name: strings.Repeat("a", 128)})},
		{name: "screenshot 129 chars", mod: addStep(protocol.Step{Type: "screenshot", Name: strings.Repeat("a", 129)}), fields: []string{"steps[1].name"}},
		{name: "screenshot with reference", mod: addStep(protocol.Step{Type: "screenshot", Name: "shot-{{iteration.index}}"})},
		{name: "screenshot empty", mod: addStep(protocol.Step{Type: "screenshot"}), fields: []string{"steps[1].name"}},
		{name: "screenshot leading dot", mod: addStep(protocol.Step{Type: "screenshot", Name: ".hidden"}), fields: []string{"steps[1].name"}},
		{name: "screenshot slash", mod: addStep(protocol.Step{Type: "screenshot", Name: "a/b"}), fields: []string{"steps[1].name"}},
		{name: "screenshot space", mod: addStep(protocol.Step{Type: "screenshot", Name: "a b"}), fields: []string{"steps[1].name"}},
		{name: "screenshot duplicate", mod: addStep(
			protocol.Step{Type: "screenshot", Name: "shot"},
			protocol.Step{Type: "screenshot", Name: "shot"},
		), fields: []string{"steps[2].name"}},
		{name: "screenshot duplicate other case", mod: addStep(
			protocol.Step{Type: "screenshot", Name: "shot"},
			protocol.Step{Type: "screenshot", Name: "SHOT"},
		), fields: []string{"steps[2].name"}},
		{name: "screenshot undeclared", mod: addStep(protocol.Step{Type: "screenshot", Name: "s-{{x}}"}), fields: []string{"steps[1].name"}},

		// approval
		{name: "approval ok", mod: addStep(protocol.Step{Type: "approval", Message: "Pay {{username}}?"})},
		{name: "approval empty", mod: addStep(protocol.Step{Type: "approval"}), fields: []string{"steps[1].message"}},
		{name: "approval undeclared", mod: addStep(protocol.Step{Type: "approval", Message: "{{amount}}"}), fields: []string{"steps[1].message"}},

		// several problems are all reported
		{name: "collects every problem", mod: func(d *protocol.Definition) {
			d.Version = 3
			d.Variables = append(d.Variables, protocol.Variable{Name: "Run", Type: "string"})
			d.Steps = append(d.Steps, protocol.Step{Type: "click"}, protocol.Step{Type: "sleep"})
		}, fields: []string{"version", "variables[2].name", "steps[1].selector", "steps[2].ms"}},
	}
	for _, name := range []string{"run", "batch", "iteration", "env", "secrets", "now", "true", "false", "null", "RUN", "Secrets", "NULL"} {
		cases = append(cases, tc{name: "reserved " + name, mod: addVar(protocol.Variable{Name: name, Type: "string"}),
			fields: []string{"variables[2].name"}, want: "reserved"})
	}

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := baseDef()
			c.mod(d)
			err := d.Validate()
			if c.fields == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v %#v", err, err.(*protocol.Error).Details)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want problems at %v", c.fields)
			}
			ps := problemsOf(t, err, protocol.CodeUnprocessableEntity)
			if got := fieldNames(ps); !slices.Equal(got, c.fields) {
				t.Fatalf("fields = %v, want %v (%+v)", got, c.fields, ps)
			}
			if c.want != "" && !strings.Contains(ps[0].Problem, c.want) {
				t.Fatalf("problem %q does not contain %q", ps[0].Problem, c.want)
			}
		})
	}
}

func TestValidateNil(t *testing.T) {
	var d *protocol.Definition
	problemsOf(t, d.Validate(), protocol.CodeUnprocessableEntity)
}

func TestValidateReturnsUntypedNil(t *testing.T) {
	if err := baseDef().Validate(); err != nil { // a typed nil *Error would fail here
		t.Fatalf("Validate() = %#v, want nil", err)
	}
}

const validJSON = `{
  "version": 1,
  "timeoutMs": 60000,
  "variables": [
    {"name": "username", "type": "string", "required": true, "pattern": "[a-z]+", "maxLength": 20},
    {"name": "password", "type": "secret", "required": true},
    {"name": "amount", "type": "number", "default": 10, "min": 1, "max": 100},
    {"name": "remember", "type": "boolean", "default": false}
  ],
  "steps": [
    {"type": "navigate", "url": "https://example.com/login"},
    {"type": "type", "selector": "#user", "text": "{{username}}", "timeoutMs": 5000},
    {"type": "type", "selector": "#pass", "text": "{{password}}", "clear": true},
    {"type": "check", "selector": "#remember", "checked": true},
    {"type": "click", "selector": "xpath=//button[@type='submit']", "retries": 2, "optional": true},
    {"type": "waitFor", "selector": "#dashboard", "state": "visible"},
    {"type": "extract", "selector": "#balance", "attribute": "data-value", "output": "balance"},
    {"type": "assert", "selector": "h1", "textContains": "Welcome"},
    {"type": "scroll", "y": 400},
    {"type": "sleep", "ms": 250},
    {"type": "press", "key": "Escape"},
    {"type": "select", "selector": "#amount", "value": "{{amount}}"},
    {"type": "screenshot", "name": "done-{{run.id}}", "fullPage": true},
    {"type": "approval", "message": "Transfer {{amount}}?"}
  ]
}`

func TestDecodeDefinitionValid(t *testing.T) {
	d, err := protocol.DecodeDefinition([]byte(validJSON))
	if err != nil {
		t.Fatalf("DecodeDefinition: %v %#v", err, err.(*protocol.Error).Details)
	}
	if len(d.Steps) != 14 || d.Steps[1].TimeoutMs != 5000 || *d.Steps[3].Checked != true || *d.Steps[8].Y != 400 {
		t.Fatalf("decoded %+v", d)
	}
	if d.Variables[2].Default != 10.0 || *d.Variables[0].MaxLength != 20 {
		t.Fatalf("variables %+v", d.Variables)
	}
	// Round trip.
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := protocol.DecodeDefinition(b)
	if err != nil {
		t.Fatalf("round trip: %v", err)
	}
	if !reflect.DeepEqual(d, d2) {
		t.Fatalf("round trip differs:\n%+v\n%+v", d, d2)
	}
}

func TestDecodeDefinitionErrors(t *testing.T) {
	const steps = `"steps":[{"type":"sleep","ms":1}]`
	cases := []struct {
		name  string
		in    string
		code  protocol.Code
		field string
		want  string
	}{
		{"empty input", ``, protocol.CodeBadRequest, "definition", "malformed JSON"},
		{"whitespace only", "  \n", protocol.CodeBadRequest, "definition", "malformed JSON"},
		{"truncated", `{"version":1,"steps":[{"type":`, protocol.CodeBadRequest, "steps[0].type", "malformed JSON"},
		{"syntax error", `{"version":1,}`, protocol.CodeBadRequest, "definition", "malformed JSON"},
		{"bad literal", `{"version":tru}`, protocol.CodeBadRequest, "version", "malformed JSON"},
		{"top-level array", `[]`, protocol.CodeBadRequest, "definition", "must be an object"},
		{"top-level string", `"x"`, protocol.CodeBadRequest, "definition", "must be an object"},
		{"trailing data", `{"version":1,` + steps + `} x`, protocol.CodeBadRequest, "definition", "after the JSON value"},
		{"second value", `{"version":1,` + steps + `}{}`, protocol.CodeBadRequest, "definition", "after the JSON value"},
		{"unknown top field", `{"version":1,"name":"x",` + steps + `}`, protocol.CodeBadRequest, "name", "unknown field"},
		{"wrong case field", `{"Version":1,` + steps + `}`, protocol.CodeBadRequest, "Version", "unknown field"},
		{"duplicate field", `{"version":1,"version":1,` + steps + `}`, protocol.CodeBadRequest, "version", "duplicate field"},
		{"version string", `{"version":"1",` + steps + `}`, protocol.CodeBadRequest, "version", "must be a number"},
		{"version float", `{"version":1.5,` + steps + `}`, protocol.CodeBadRequest, "version", "integer"},
		{"version exponent", `{"version":1e0,` + steps + `}`, protocol.CodeBadRequest, "version", "integer"},
		{"timeout overflow", `{"version":1,"timeoutMs":99999999999999999999,` + steps + `}`, protocol.CodeBadRequest, "timeoutMs", "integer"},
		{"variables object", `{"version":1,"variables":{},` + steps + `}`, protocol.CodeBadRequest, "variables", "must be an array"},
		{"variable not object", `{"version":1,"variables":[1],` + steps + `}`, protocol.CodeBadRequest, "variables[0]", "must be an object"},
		{"variable unknown field", `{"version":1,"variables":[{"name":"a","type":"string","secret":true}],` + steps + `}`, protocol.CodeBadRequest, "variables[0].secret", "unknown field"},
		{"required string", `{"version":1,"variables":[{"name":"a","type":"string","required":"yes"}],` + steps + `}`, protocol.CodeBadRequest, "variables[0].required", "must be a boolean"},
		{"min string", `{"version":1,"variables":[{"name":"a","type":"number","min":"1"}],` + steps + `}`, protocol.CodeBadRequest, "variables[0].min", "must be a number"},
		{"min out of range", `{"version":1,"variables":[{"name":"a","type":"number","min":1e400}],` + steps + `}`, protocol.CodeBadRequest, "variables[0].min", "range"},
		{"default out of range", `{"version":1,"variables":[{"name":"a","type":"number","default":[1e400]}],` + steps + `}`, protocol.CodeBadRequest, "variables[0].default", "range"},
		{"steps timeoutMs string", `{"version":1,"steps":[{"type":"sleep","ms":1},{"type":"sleep","ms":1},{"type":"click","selector":"a","timeoutMs":"5"}]}`, protocol.CodeBadRequest, "steps[2].timeoutMs", "must be a number"},
		{"step unknown field", `{"version":1,"steps":[{"type":"click","selector":"a","delay":5}]}`, protocol.CodeBadRequest, "steps[0].delay", "unknown field"},
		{"checked string", `{"version":1,"steps":[{"type":"check","selector":"a","checked":"true"}]}`, protocol.CodeBadRequest, "steps[0].checked", "must be a boolean"},
		{"selector number", `{"version":1,"steps":[{"type":"click","selector":1}]}`, protocol.CodeBadRequest, "steps[0].selector", "must be a string"},
		{"selector object", `{"version":1,"steps":[{"type":"click","selector":{"css":"a"}}]}`, protocol.CodeBadRequest, "steps[0].selector", "must be a string"},

		// Well-formed but invalid: the Validate error.
		{"unknown step type", `{"version":1,"steps":[{"type":"hover","selector":"a"}]}`, protocol.CodeUnprocessableEntity, "steps[0].type", "unknown step type"},
		{"reserved name", `{"version":1,"variables":[{"name":"env","type":"string"}],` + steps + `}`, protocol.CodeUnprocessableEntity, "variables[0].name", "reserved"},
		{"missing steps", `{"version":1}`, protocol.CodeUnprocessableEntity, "steps", "at least one"},
		{"null steps", `{"version":1,"steps":null}`, protocol.CodeUnprocessableEntity, "steps", "at least one"},
		{"null version", `{"version":null,` + steps + `}`, protocol.CodeUnprocessableEntity, "version", "must be 1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := protocol.DecodeDefinition([]byte(c.in))
			if err == nil {
				t.Fatalf("no error; decoded %+v", d)
			}
			if d != nil {
				t.Fatalf("definition returned with an error")
			}
			ps := problemsOf(t, err, c.code)
			if ps[0].Field != c.field || !strings.Contains(ps[0].Problem, c.want) {
				t.Fatalf("first problem = %+v, want field %q containing %q (all: %+v)", ps[0], c.field, c.want, ps)
			}
		})
	}
}

func TestDecodeDefinitionCollectsTypeErrors(t *testing.T) {
	_, err := protocol.DecodeDefinition([]byte(`{"version":"1","foo":{"a":[1,2]},"steps":[{"type":3,"ms":"x","selector":[{"x":1}]}]}`))
	ps := problemsOf(t, err, protocol.CodeBadRequest)
	want := []string{"version", "foo", "steps[0].type", "steps[0].ms", "steps[0].selector"}
	if got := fieldNames(ps); !slices.Equal(got, want) {
		t.Fatalf("fields = %v, want %v", got, want)
	}
}

func TestDecodeDefinitionNulls(t *testing.T) {
	d, err := protocol.DecodeDefinition([]byte(`{"version":1,"timeoutMs":null,"variables":null,"steps":[{"type":"check","selector":"#a","checked":false,"timeoutMs":null}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if d.Steps[0].Checked == nil || *d.Steps[0].Checked {
		t.Fatalf("checked = %v", d.Steps[0].Checked)
	}
}

func inputsDef() *protocol.Definition {
	return &protocol.Definition{
		Version: 1,
		Variables: []protocol.Variable{
			{Name: "username", Type: "string", Required: true, Pattern: "[a-z]+", MaxLength: ptr(5)},
			{Name: "password", Type: "secret", Required: true, MaxLength: ptr(4)},
			{Name: "amount", Type: "number", Default: 10.0, Min: ptr(1.0), Max: ptr(100.0)},
			{Name: "remember", Type: "boolean", Default: true},
			{Name: "note", Type: "string"},
			{Name: "count", Type: "number"},
			{Name: "pin", Type: "secret", Pattern: "[0-9]{4}"},
		},
		Steps: []protocol.Step{{Type: "navigate", URL: "about:blank"}},
	}
}

func TestValidateInputs(t *testing.T) {
	d := inputsDef()
	if err := d.Validate(); err != nil {
		t.Fatalf("inputsDef invalid: %v", err)
	}
	cases := []struct {
		name   string
		in     map[string]any
		want   map[string]any
		fields []string
	}{
		{name: "minimal with defaults",
			in:   map[string]any{"username": "bob", "password": "pw"},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "all set",
			in:   map[string]any{"username": "bob", "password": "pw", "amount": 100, "remember": false, "note": "", "count": int64(-3), "pin": "0123"},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 100.0, "remember": false, "note": "", "count": -3.0, "pin": "0123"}},
		{name: "json.Number",
			in:   map[string]any{"username": "bob", "password": "pw", "amount": json.Number("1.5e1")},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 15.0, "remember": true}},
		{name: "nil counts as absent",
			in:   map[string]any{"username": "bob", "password": "pw", "amount": nil, "note": nil},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "maxLength counts runes",
			in:   map[string]any{"username": "bob", "password": "äöüß"},
			want: map[string]any{"username": "bob", "password": "äöüß", "amount": 10.0, "remember": true}},
		{name: "nil inputs", in: nil, fields: []string{"inputs.username", "inputs.password"}},
		{name: "missing required", in: map[string]any{"username": "bob"}, fields: []string{"inputs.password"}},
		{name: "unknown name", in: map[string]any{"username": "bob", "password": "pw", "zeta": 1, "Username": "x"},
			fields: []string{"inputs.Username", "inputs.zeta"}},
		{name: "string wrong type", in: map[string]any{"username": 5, "password": "pw"}, fields: []string{"inputs.username"}},
		{name: "secret wrong type", in: map[string]any{"username": "bob", "password": true}, fields: []string{"inputs.password"}},
		{name: "number as string", in: map[string]any{"username": "bob", "password": "pw", "amount": "5"}, fields: []string{"inputs.amount"}},
		{name: "number NaN", in: map[string]any{"username": "bob", "password": "pw", "amount": math.NaN()}, fields: []string{"inputs.amount"}},
		{name: "number Inf", in: map[string]any{"username": "bob", "password": "pw", "count": math.Inf(1)}, fields: []string{"inputs.count"}},
		{name: "bad json.Number", in: map[string]any{"username": "bob", "password": "pw", "count": json.Number("0x10")}, fields: []string{"inputs.count"}},
		{name: "boolean as string", in: map[string]any{"username": "bob", "password": "pw", "remember": "true"}, fields: []string{"inputs.remember"}},
		{name: "boolean as number", in: map[string]any{"username": "bob", "password": "pw", "remember": 1.0}, fields: []string{"inputs.remember"}},
		{name: "pattern partial match refused", in: map[string]any{"username": "bob1", "password": "pw"}, fields: []string{"inputs.username"}},
		{name: "pattern empty refused", in: map[string]any{"username": "", "password": "pw"}, fields: []string{"inputs.username"}},
		{name: "secret pattern", in: map[string]any{"username": "bob", "password": "pw", "pin": "12345"}, fields: []string{"inputs.pin"}},
		{name: "too long", in: map[string]any{"username": "bobbyx", "password": "pw"}, fields: []string{"inputs.username"}},
		{name: "secret too long", in: map[string]any{"username": "bob", "password": "12345"}, fields: []string{"inputs.password"}},
		{name: "below min", in: map[string]any{"username": "bob", "password": "pw", "amount": 0.5}, fields: []string{"inputs.amount"}},
		{name: "above max", in: map[string]any{"username": "bob", "password": "pw", "amount": 101}, fields: []string{"inputs.amount"}},
		{name: "object value", in: map[string]any{"username": map[string]any{}, "password": []any{"x"}}, fields: []string{"inputs.username", "inputs.password"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.ValidateInputs(c.in)
			if c.fields == nil {
				if err != nil {
					t.Fatalf("unexpected error %v %#v", err, err.(*protocol.Error).Details)
				}
				if !reflect.DeepEqual(got, c.want) {
					t.Fatalf("got %#v, want %#v", got, c.want)
				}
				return
			}
			if got != nil {
				t.Fatalf("inputs returned with an error: %v", got)
			}
			ps := problemsOf(t, err, protocol.CodeUnprocessableEntity)
			if f := fieldNames(ps); !slices.Equal(f, c.fields) {
				t.Fatalf("fields = %v, want %v (%+v)", f, c.fields, ps)
			}
			for _, p := range ps {
				for _, v := range c.in {
					if s, ok := v.(string); ok && len(s) > 1 && strings.Contains(p.Problem, s) {
						t.Fatalf("problem %q echoes the value %q", p.Problem, s)
					}
				}
			}
		})
	}
}

func TestValidateInputsEmptyDefinition(t *testing.T) {
	d := &protocol.Definition{Version: 1}
	got, err := d.ValidateInputs(nil)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("got %v, %v; want empty map", got, err)
	}
}

func TestInputsFromStrings(t *testing.T) {
	d := inputsDef()
	cases := []struct {
		name   string
		row    map[string]string
		want   map[string]any
		fields []string
	}{
		{name: "typed",
			row:  map[string]string{"username": "bob", "password": "pw", "amount": " 42 ", "remember": "0", "count": "-1.5e2", "note": " spaced "},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 42.0, "remember": false, "count": -150.0, "note": " spaced "}},
		{name: "booleans",
			row:  map[string]string{"username": "bob", "password": "pw", "remember": "TRUE"},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "boolean 1",
			row:  map[string]string{"username": "bob", "password": "pw", "remember": "1"},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "empty cells are absent",
			row:  map[string]string{"username": "bob", "password": "pw", "amount": "", "remember": "", "note": "", "count": "  "},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "trailing comma column ignored",
			row:  map[string]string{"username": "bob", "password": "pw", "": ""},
			want: map[string]any{"username": "bob", "password": "pw", "amount": 10.0, "remember": true}},
		{name: "empty required", row: map[string]string{"username": "", "password": "pw"}, fields: []string{"inputs.username"}},
		{name: "unknown column", row: map[string]string{"username": "bob", "password": "pw", "extra": "1"}, fields: []string{"inputs.extra"}},
		{name: "unnamed column with data", row: map[string]string{"username": "bob", "password": "pw", "": "1"}, fields: []string{"inputs."}},
		{name: "not a number", row: map[string]string{"username": "bob", "password": "pw", "amount": "12abc"}, fields: []string{"inputs.amount"}},
		{name: "NaN", row: map[string]string{"username": "bob", "password": "pw", "amount": "NaN"}, fields: []string{"inputs.amount"}},
		{name: "hex", row: map[string]string{"username": "bob", "password": "pw", "amount": "0x10"}, fields: []string{"inputs.amount"}},
		{name: "number out of range", row: map[string]string{"username": "bob", "password": "pw", "count": "1e400"}, fields: []string{"inputs.count"}},
		{name: "not a boolean", row: map[string]string{"username": "bob", "password": "pw", "remember": "yes"}, fields: []string{"inputs.remember"}},
		{name: "rule after conversion", row: map[string]string{"username": "bob", "password": "pw", "amount": "500"}, fields: []string{"inputs.amount"}},
		{name: "conversion and rules together", row: map[string]string{"username": "BOB", "password": "pw", "amount": "x", "remember": "maybe"},
			fields: []string{"inputs.amount", "inputs.remember", "inputs.username"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.InputsFromStrings(c.row)
			if c.fields == nil {
				if err != nil {
					t.Fatalf("unexpected error %v %#v", err, err.(*protocol.Error).Details)
				}
				if !reflect.DeepEqual(got, c.want) {
					t.Fatalf("got %#v, want %#v", got, c.want)
				}
				return
			}
			ps := problemsOf(t, err, protocol.CodeUnprocessableEntity)
			if f := fieldNames(ps); !slices.Equal(f, c.fields) {
				t.Fatalf("fields = %v, want %v (%+v)", f, c.fields, ps)
			}
		})
	}
}

func TestRedactInputs(t *testing.T) {
	d := inputsDef()
	in := map[string]any{"username": "bob", "password": "hunter2", "pin": "1234", "amount": 3.0, "PASSWORD": "raw"}
	got := d.RedactInputs(in)
	want := map[string]any{"username": "bob", "password": "[redacted]", "pin": "[redacted]", "amount": 3.0, "PASSWORD": "[redacted]"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if in["password"] != "hunter2" {
		t.Fatalf("input modified")
	}
	if got := d.RedactInputs(nil); got == nil || len(got) != 0 {
		t.Fatalf("RedactInputs(nil) = %#v, want empty map", got)
	}
	if protocol.RedactedValue != "[redacted]" {
		t.Fatal("RedactedValue")
	}
}

func TestSecretValues(t *testing.T) {
	d := inputsDef()
	got := d.SecretValues(map[string]any{"username": "bob", "password": "pw", "pin": "1234", "note": "1234567"})
	if want := []string{"1234", "pw"}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if got := d.SecretValues(map[string]any{"password": "", "pin": 5}); len(got) != 0 {
		t.Fatalf("got %v, want none", got)
	}
	if got := d.SecretValues(map[string]any{"password": "x", "pin": "x"}); !slices.Equal(got, []string{"x"}) {
		t.Fatalf("got %v, want [x]", got)
	}
}

func TestReferences(t *testing.T) {
	cases := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"plain text", nil},
		{"{{a}}", []string{"a"}},
		{"x {{ a }} y {{b}}{{a}}", []string{"a", "b", "a"}},
		{"{{run.id}}-{{ iteration.index }}", []string{"run.id", "iteration.index"}},
		{"{{}}", []string{""}},
		{"{{\ta\n}}", []string{"a"}},
		{"{{{a}}}", []string{"a"}},
		{"{{a}b}} {{c}}", []string{"c"}},
		{"{{a", nil},
		{"a}}", nil},
		{"{ {a} }", nil},
		{"{{ {{b}} }}", []string{"b"}},
		{"{{a}}}}", []string{"a"}},
	}
	for _, c := range cases {
		if got := protocol.References(c.in); !slices.Equal(got, c.want) {
			t.Errorf("References(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestReferencesLinear(t *testing.T) {
	// Many opening braces before a single close must not be quadratic.
	s := strings.Repeat("{", 1<<20) + "a}}"
	if got := protocol.References(s); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("got %q", got)
	}
	s = strings.Repeat("{{x}", 1<<18) + "}}"
	protocol.References(s)
}

func TestInterpolate(t *testing.T) {
	vars := map[string]string{"a": "1", "b": "{{a}}", "run.id": "run_x", "empty": ""}
	cases := []struct{ in, want string }{
		{"", ""},
		{"no refs", "no refs"},
		{"{{a}}", "1"},
		{"x{{ a }}y{{a}}", "x1y1"},
		{"{{b}}", "{{a}}"}, // values are not interpolated again
		{"{{unknown}} {{a}}", "{{unknown}} 1"},
		{"{{ unknown }}", "{{ unknown }}"},
		{"{{run.id}}/{{empty}}/", "run_x//"},
		{"{{{a}}}", "{1}"},
		{"{{a", "{{a"},
	}
	for _, c := range cases {
		if got := protocol.Interpolate(c.in, vars); got != c.want {
			t.Errorf("Interpolate(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	if got := protocol.Interpolate("{{a}}", nil); got != "{{a}}" {
		t.Errorf("nil vars: %q", got)
	}
}
