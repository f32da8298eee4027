package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

// checkFieldError asserts err is an *Error with one of codes, a message and field problems.
func checkFieldError(t *testing.T, err error, codes ...Code) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *Error", err, err)
	}
	ok := false
	for _, c := range codes {
		ok = ok || e.Code == c
	}
	if !ok {
		t.Fatalf("code %q, want one of %v", e.Code, codes)
	}
	if e.Message == "" {
		t.Fatalf("empty message")
	}
	ps, _ := e.Details["fields"].([]FieldProblem)
	if len(ps) == 0 {
		t.Fatalf("no details.fields: %#v", e.Details)
	}
	for _, p := range ps {
		if p.Field == "" || p.Problem == "" {
			t.Fatalf("empty field problem %+v", p)
		}
	}
	if _, err := json.Marshal(e); err != nil {
		t.Fatalf("error envelope does not marshal: %v", err)
	}
	return e
}

// strictUnmarshal is encoding/json with unknown fields and trailing data refused.
func strictUnmarshal(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data")
	}
	return nil
}

func FuzzDecodeDefinition(f *testing.F) {
	seeds := []string{
		`{"version":1,"steps":[{"type":"navigate","url":"https://example.com"}]}`,
		`{"version":1,"timeoutMs":1000,"variables":[{"name":"u","type":"string","required":true,"pattern":"[a-z]+","maxLength":3,"default":"ab"},` +
			`{"name":"n","type":"number","min":1,"max":2,"default":1.5},{"name":"s","type":"secret"},{"name":"b","type":"boolean","default":true}],` +
			`"steps":[{"type":"type","selector":"#a","text":"{{u}}","clear":true,"timeoutMs":5,"retries":1,"optional":true},` +
			`{"type":"check","selector":"xpath=//a","checked":false},{"type":"scroll","y":-3},{"type":"assert","selector":"b","equals":"{{ n }}"},` +
			`{"type":"extract","selector":"c","attribute":"href","output":"o"},{"type":"screenshot","name":"x-{{run.id}}","fullPage":true},` +
			`{"type":"approval","message":"ok?"},{"type":"waitFor","selector":"d","state":"hidden"},{"type":"sleep","ms":1},` +
			`{"type":"press","key":"Enter"},{"type":"select","selector":"e","value":"v"},{"type":"click","selector":"f"}]}`,
		`{"version":1,"steps":[{"type":"hover"}]}`,
		`{"version":"1","steps":{}}`,
		`{"version":1,"Steps":[],"x":null,"version":2}`,
		`{"version":1,"variables":[{"name":"a","type":"number","default":[1e999,{"k":[]}]}],"steps":[null]}`,
		`{"version":1,"steps":[{"type":"click","selector":"a"}]} {}`,
		`[{"version":1}]`,
		`{"version":1e2,"timeoutMs":-0,"steps":[{"type":"sleep","ms":99999999999999999999}]}`,
		`{"version":1,"steps":[{"type":"navigate","url":"{{{x}}}"}`,
		"\xff{\"version\":1}",
		``,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := DecodeDefinition(data)

		// The shape check and encoding/json agree: whatever encoding/json
		// refuses is refused by the shape check, and whatever the shape check
		// accepts decodes. (It is stricter on duplicate and wrong-case keys.)
		shapeOK := len(checkShape(data, reflect.TypeFor[Definition]())) == 0
		var probe Definition
		stdErr := strictUnmarshal(data, &probe)
		if shapeOK && stdErr != nil {
			t.Fatalf("shape check accepted what encoding/json refuses: %v", stdErr)
		}

		if err != nil {
			if d != nil {
				t.Fatalf("definition returned with an error")
			}
			e := checkFieldError(t, err, CodeBadRequest, CodeUnprocessableEntity)
			if e.Code == CodeBadRequest && shapeOK {
				t.Fatalf("bad_request for a well-formed definition: %v", err)
			}
			if e.Code == CodeUnprocessableEntity && !shapeOK {
				t.Fatalf("unprocessable_entity for a malformed definition")
			}
			return
		}
		if !shapeOK {
			t.Fatalf("decoded a definition the shape check refused")
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("decoded definition does not validate: %v", err)
		}
		// Round trip.
		b, err := json.Marshal(d)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		d2, err := DecodeDefinition(b)
		if err != nil {
			t.Fatalf("round trip: %v\n%s", err, b)
		}
		if !reflect.DeepEqual(d, d2) {
			t.Fatalf("round trip differs:\n%#v\n%#v", d, d2)
		}
		// The declared variables' defaults are valid inputs.
		if _, err := d.ValidateInputs(map[string]any{}); err != nil {
			checkFieldError(t, err, CodeUnprocessableEntity) // only "is required" problems
			for _, p := range err.(*Error).Details["fields"].([]FieldProblem) {
				if p.Problem != "is required" {
					t.Fatalf("defaults refused: %+v", p)
				}
			}
		}
		for _, s := range d.Steps {
			for _, v := range []string{s.URL, s.Selector, s.Text, s.Value, s.Key, s.Attribute, s.Name, s.Message} {
				Interpolate(v, map[string]string{"run.id": "run_1"})
			}
		}
	})
}

const fuzzInputsDefinition = `{
  "version": 1,
  "variables": [
    {"name": "username", "type": "string", "required": true, "pattern": "[a-z]{1,8}", "maxLength": 6},
    {"name": "password", "type": "secret", "required": true, "maxLength": 12},
    {"name": "amount", "type": "number", "default": 10, "min": -5, "max": 100},
    {"name": "remember", "type": "boolean", "default": false},
    {"name": "note", "type": "string"},
    {"name": "pin", "type": "secret", "pattern": "[0-9]+"}
  ],
  "steps": [{"type": "type", "selector": "#u", "text": "{{username}} {{password}} {{pin}}"}]
}`

func FuzzValidateInputs(f *testing.F) {
	d, err := DecodeDefinition([]byte(fuzzInputsDefinition))
	if err != nil {
		f.Fatalf("fuzz definition: %v", err)
	}
	for _, s := range []string{
		`{"username":"bob","password":"hunter2"}`,
		`{"username":"bob","password":"hunter2","amount":100,"remember":true,"note":"","pin":"0042"}`,
		`{"username":"bobbyyy","password":1,"amount":"5","remember":"true","zz":null}`,
		`{"username":"b\u00e4","password":"pässwörd","amount":-5.0e0,"note":null}`,
		`{"amount":1e308,"pin":"12a"}`,
		`{"username":["bob"],"password":{"x":"y"}}`,
		`{}`,
		`null`,
	} {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	secrets := d.secretNames()
	byName := d.variablesByName()
	f.Fuzz(func(t *testing.T, data []byte, useNumber bool) {
		dec := json.NewDecoder(bytes.NewReader(data))
		if useNumber {
			dec.UseNumber()
		}
		var inputs map[string]any
		if dec.Decode(&inputs) != nil {
			return
		}
		secretIn := d.SecretValues(inputs)

		// A CSV row made of the string inputs goes through the same checks.
		row := make(map[string]string)
		for k, v := range inputs {
			if s, ok := v.(string); ok {
				row[k] = s
			}
		}
		if _, err := d.InputsFromStrings(row); err != nil {
			checkFieldError(t, err, CodeUnprocessableEntity)
		}

		out, err := d.ValidateInputs(inputs)
		if err != nil {
			if out != nil {
				t.Fatalf("inputs returned with an error")
			}
			e := checkFieldError(t, err, CodeUnprocessableEntity)
			for _, p := range e.Details["fields"].([]FieldProblem) {
				if !strings.HasPrefix(p.Field, "inputs.") {
					t.Fatalf("field %q", p.Field)
				}
				for _, s := range secretIn {
					if len(s) >= 3 && strings.Contains(p.Problem, s) {
						t.Fatalf("problem %q leaks a secret", p.Problem)
					}
				}
			}
			return
		}
		for _, v := range d.Variables {
			val, ok := out[v.Name]
			if !ok {
				if v.Required {
					t.Fatalf("required %q missing from %v", v.Name, out)
				}
				continue
			}
			var typeOK bool
			switch v.Type {
			case VarNumber:
				_, typeOK = val.(float64)
			case VarBoolean:
				_, typeOK = val.(bool)
			default:
				_, typeOK = val.(string)
			}
			if !typeOK {
				t.Fatalf("%q resolved to %T", v.Name, val)
			}
		}
		for k := range out {
			if byName[k] == nil {
				t.Fatalf("unknown %q in resolved inputs", k)
			}
		}
		// Resolving is idempotent.
		again, err := d.ValidateInputs(out)
		if err != nil || !reflect.DeepEqual(again, out) {
			t.Fatalf("resolving again: %v, %v != %v", err, again, out)
		}
		// Redaction hides every secret.
		red := d.RedactInputs(out)
		for k, v := range red {
			if secrets[strings.ToLower(k)] && v != RedactedValue {
				t.Fatalf("secret %q not redacted", k)
			}
		}
	})
}
