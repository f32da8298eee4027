package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"
)

// RedactedValue replaces the value of every secret input in responses, events and logs.
const RedactedValue = "[redacted]"

// Limits of a definition (API.md §4).
const (
	maxRunTimeoutMs  = 24 * 60 * 60 * 1000 // definition timeoutMs
	maxStepTimeoutMs = 60 * 60 * 1000      // step timeoutMs
	maxSleepMs       = 60 * 60 * 1000      // sleep ms
	maxRetries       = 10
	maxSteps         = 1000
	maxDecodeIssues  = 50 // decoding problems reported at most
)

const (
	msgDefinitionMalformed = "The workflow definition is malformed."
	msgDefinitionInvalid   = "The workflow definition is invalid."
	msgInputsInvalid       = "The run inputs are invalid."
	rootField              = "definition" // field name of problems about the whole document
)

var (
	varNameRE        = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,63}$`)
	screenshotNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	jsonNumberRE     = regexp.MustCompile(`^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$`)

	reservedNames = map[string]bool{
		"run": true, "batch": true, "iteration": true, "env": true, "secrets": true,
		"now": true, "true": true, "false": true, "null": true,
	}
	builtinRefs = map[string]bool{"run.id": true, "iteration.index": true, "batch.id": true}
)

// ---------------------------------------------------------------------------
// Strict decoding

// DecodeDefinition strictly decodes a definition from JSON. Malformed JSON,
// wrong JSON types, unknown or duplicate fields and trailing data are a
// CodeBadRequest *Error whose details.fields name the offending field
// ("steps[2].timeoutMs"; "definition" for the document as a whole). JSON null
// is accepted for any field and leaves it at its zero value. A well-formed
// definition is then checked by Validate, whose CodeUnprocessableEntity error
// is returned as is.
func DecodeDefinition(data []byte) (*Definition, error) {
	if problems := checkShape(data, reflect.TypeFor[Definition]()); len(problems) > 0 {
		return nil, FieldErrors(CodeBadRequest, msgDefinitionMalformed, problems)
	}
	var d Definition
	if err := json.Unmarshal(data, &d); err != nil {
		// The shape check accepts only what Unmarshal reads; this is a safety net.
		return nil, FieldErrors(CodeBadRequest, msgDefinitionMalformed,
			[]FieldProblem{{Field: rootField, Problem: "cannot be decoded"}})
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	if d.Variables == nil {
		d.Variables = []Variable{} // arrays are [], never null (API.md §12)
	}
	return &d, nil
}

// shapeChecker walks the JSON token stream against a Go type and records every
// type mismatch, unknown field and duplicate field with its path. Field names
// match exactly (encoding/json alone would also accept other letter cases).
type shapeChecker struct {
	dec      *json.Decoder
	problems []FieldProblem
	root     string
}

// errStop aborts the walk after a syntax error or too many problems.
var errStop = errors.New("stop")

func checkShape(data []byte, t reflect.Type) []FieldProblem {
	return checkShapeAt(data, t, rootField)
}

// checkShapeAt is checkShape naming problems about the whole document root.
func checkShapeAt(data []byte, t reflect.Type, root string) []FieldProblem {
	c := &shapeChecker{dec: json.NewDecoder(bytes.NewReader(data)), root: root}
	c.dec.UseNumber()
	if err := c.value(t, ""); err != nil {
		return c.problems
	}
	if _, err := c.dec.Token(); err != io.EOF {
		c.add("", "unexpected data after the JSON value")
	}
	return c.problems
}

func (c *shapeChecker) add(path, problem string) error {
	if path == "" {
		path = c.root
	}
	c.problems = append(c.problems, FieldProblem{Field: path, Problem: problem})
	if len(c.problems) >= maxDecodeIssues {
		return errStop
	}
	return nil
}

// token reads the next token; a read or syntax error is recorded and stops the walk.
func (c *shapeChecker) token(path string) (json.Token, error) {
	tok, err := c.dec.Token()
	if err != nil {
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			c.add(path, "malformed JSON: unexpected end of input")
		} else {
			var se *json.SyntaxError
			if errors.As(err, &se) {
				c.add(path, "malformed JSON: "+se.Error())
			} else {
				c.add(path, "malformed JSON")
			}
		}
		return nil, errStop
	}
	return tok, nil
}

func joinField(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

var fieldCache sync.Map // reflect.Type → map[string]reflect.Type

// jsonFields maps the exact JSON names of a struct's fields to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	if f, ok := fieldCache.Load(t); ok {
		return f.(map[string]reflect.Type)
	}
	fields := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fields[name] = f.Type
	}
	fieldCache.Store(t, fields)
	return fields
}

func (c *shapeChecker) value(t reflect.Type, path string) error {
	tok, err := c.token(path)
	if err != nil {
		return err
	}
	return c.valueTok(t, path, tok)
}

// valueTok checks the value that starts with tok against t.
func (c *shapeChecker) valueTok(t reflect.Type, path string, tok json.Token) error {
	if tok == nil { // null leaves any field at its zero value
		return nil
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Interface:
		return c.anyValue(path, tok)
	case reflect.Struct:
		if tok != json.Delim('{') {
			return c.mismatch(path, tok, "must be an object")
		}
		fields := jsonFields(t)
		seen := make(map[string]bool)
		for c.dec.More() {
			kt, err := c.token(path)
			if err != nil {
				return err
			}
			key, _ := kt.(string)
			fp := joinField(path, key)
			ft, known := fields[key]
			switch {
			case !known:
				if err := c.add(fp, "unknown field"); err != nil {
					return err
				}
				if err := c.skip(fp); err != nil {
					return err
				}
				continue
			case seen[key]:
				if err := c.add(fp, "duplicate field"); err != nil {
					return err
				}
				if err := c.skip(fp); err != nil {
					return err
				}
				continue
			}
			seen[key] = true
			if err := c.value(ft, fp); err != nil {
				return err
			}
		}
		_, err := c.token(path)
		return err
	case reflect.Map:
		if tok != json.Delim('{') || t.Key().Kind() != reflect.String {
			return c.mismatch(path, tok, "must be an object")
		}
		seen := make(map[string]bool)
		for c.dec.More() {
			kt, err := c.token(path)
			if err != nil {
				return err
			}
			key, _ := kt.(string)
			fp := joinField(path, key)
			if seen[key] {
				if err := c.add(fp, "duplicate field"); err != nil {
					return err
				}
				if err := c.skip(fp); err != nil {
					return err
				}
				continue
			}
			seen[key] = true
			if err := c.value(t.Elem(), fp); err != nil {
				return err
			}
		}
		_, err := c.token(path)
		return err
	case reflect.Slice:
		if tok != json.Delim('[') {
			return c.mismatch(path, tok, "must be an array")
		}
		for i := 0; c.dec.More(); i++ {
			if err := c.value(t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		_, err := c.token(path)
		return err
	case reflect.String:
		if _, ok := tok.(string); !ok {
			return c.mismatch(path, tok, "must be a string")
		}
	case reflect.Bool:
		if _, ok := tok.(bool); !ok {
			return c.mismatch(path, tok, "must be a boolean")
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		n, ok := tok.(json.Number)
		if !ok {
			return c.mismatch(path, tok, "must be a number")
		}
		if _, err := strconv.ParseInt(string(n), 10, t.Bits()); err != nil {
			return c.add(path, "must be an integer in range")
		}
	case reflect.Float32, reflect.Float64:
		n, ok := tok.(json.Number)
		if !ok {
			return c.mismatch(path, tok, "must be a number")
		}
		if _, err := strconv.ParseFloat(string(n), t.Bits()); err != nil {
			return c.add(path, "must be a number in range")
		}
	default:
		return c.mismatch(path, tok, "is not supported")
	}
	return nil
}

// mismatch records a wrong JSON type and skips the rest of the value.
func (c *shapeChecker) mismatch(path string, tok json.Token, problem string) error {
	if err := c.add(path, problem); err != nil {
		return err
	}
	return c.skipRest(path, tok)
}

// skip reads and discards one whole value.
func (c *shapeChecker) skip(path string) error {
	tok, err := c.token(path)
	if err != nil {
		return err
	}
	return c.skipRest(path, tok)
}

// skipRest discards the rest of a value that started with tok.
func (c *shapeChecker) skipRest(path string, tok json.Token) error {
	depth := 0
	for {
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
		if depth == 0 {
			return nil
		}
		var err error
		if tok, err = c.token(path); err != nil {
			return err
		}
	}
}

// anyValue checks a value decoded into an interface: any JSON goes, as long as
// every number fits a float64 (what encoding/json decodes numbers into).
func (c *shapeChecker) anyValue(path string, tok json.Token) error {
	depth := 0
	for {
		switch v := tok.(type) {
		case json.Delim:
			if v == '{' || v == '[' {
				depth++
			} else {
				depth--
			}
		case json.Number:
			if _, err := strconv.ParseFloat(string(v), 64); err != nil {
				if err := c.add(path, "must be a number in range"); err != nil {
					return err
				}
			}
		}
		if depth == 0 {
			return nil
		}
		var err error
		if tok, err = c.token(path); err != nil {
			return err
		}
	}
}

// ---------------------------------------------------------------------------
// Definition validation

type problems []FieldProblem

func (p *problems) add(field, format string, args ...any) {
	*p = append(*p, FieldProblem{Field: field, Problem: fmt.Sprintf(format, args...)})
}

// Validate checks a decoded definition against the rules of API.md §4 and
// returns every problem in one CodeUnprocessableEntity *Error with
// details.fields, or nil.
func (d *Definition) Validate() error {
	if d == nil {
		return FieldErrors(CodeUnprocessableEntity, msgDefinitionInvalid,
			[]FieldProblem{{Field: rootField, Problem: "is required"}})
	}
	var ps problems
	if d.Version != DefinitionVersion {
		ps.add("version", "must be %d", DefinitionVersion)
	}
	if d.TimeoutMs < 0 || d.TimeoutMs > maxRunTimeoutMs {
		ps.add("timeoutMs", "must be between 0 and %d", maxRunTimeoutMs)
	}
	declared := d.validateVariables(&ps)
	d.validateSteps(&ps, declared)
	if len(ps) > 0 {
		return FieldErrors(CodeUnprocessableEntity, msgDefinitionInvalid, ps)
	}
	return nil
}

// validateVariables checks the variables and returns the declared names.
func (d *Definition) validateVariables(ps *problems) map[string]bool {
	declared := make(map[string]bool, len(d.Variables))
	first := make(map[string]int, len(d.Variables)) // lower-cased name → index
	for i := range d.Variables {
		v := &d.Variables[i]
		p := fmt.Sprintf("variables[%d]", i)
		lower := strings.ToLower(v.Name)
		switch {
		case v.Name == "":
			ps.add(p+".name", "is required")
		case !varNameRE.MatchString(v.Name):
			ps.add(p+".name", "must match %s", varNameRE)
		case reservedNames[lower]:
			ps.add(p+".name", "%q is a reserved name", v.Name)
		default:
			if j, dup := first[lower]; dup {
				ps.add(p+".name", "duplicates the name of variables[%d] (names are case-insensitive)", j)
			} else {
				first[lower] = i
			}
		}
		if v.Name != "" {
			declared[v.Name] = true // reported above if invalid; not reported again as undeclared
		}

		typeOK := true
		switch v.Type {
		case VarString, VarNumber, VarBoolean, VarSecret:
		default:
			typeOK = false
			ps.add(p+".type", "must be one of string, number, boolean, secret")
		}
		text := v.Type == VarString || v.Type == VarSecret

		// rules keeps the rules that are valid, to check the default against.
		rules := Variable{Name: v.Name, Type: v.Type}
		if v.Pattern != "" {
			if _, err := regexp.Compile(v.Pattern); err != nil {
				ps.add(p+".pattern", "is not a valid regular expression: %v", err)
			} else if typeOK && !text {
				ps.add(p+".pattern", "is only allowed on string and secret variables")
			} else {
				rules.Pattern = v.Pattern
			}
		}
		if v.Min != nil || v.Max != nil {
			ok := true
			for _, m := range []struct {
				name string
				val  *float64
			}{{"min", v.Min}, {"max", v.Max}} {
				if m.val == nil {
					continue
				}
				if math.IsNaN(*m.val) || math.IsInf(*m.val, 0) {
					ps.add(p+"."+m.name, "must be a finite number")
					ok = false
				} else if typeOK && v.Type != VarNumber {
					ps.add(p+"."+m.name, "is only allowed on number variables")
					ok = false
				}
			}
			if ok && v.Min != nil && v.Max != nil && *v.Min > *v.Max {
				ps.add(p+".max", "must be greater than or equal to min")
				ok = false
			}
			if ok {
				rules.Min, rules.Max = v.Min, v.Max
			}
		}
		if v.MaxLength != nil {
			switch {
			case *v.MaxLength < 0:
				ps.add(p+".maxLength", "must be at least 0")
			case typeOK && !text:
				ps.add(p+".maxLength", "is only allowed on string and secret variables")
			default:
				rules.MaxLength = v.MaxLength
			}
		}
		if v.Default != nil {
			switch {
			case v.Type == VarSecret:
				ps.add(p+".default", "is not allowed on a secret variable")
			case typeOK:
				re, _ := compileAnchored(rules.Pattern)
				if _, problem := checkValue(&rules, v.Default, re); problem != "" {
					ps.add(p+".default", "%s", problem)
				}
			}
		}
	}
	return declared
}

func (d *Definition) validateSteps(ps *problems, declared map[string]bool) {
	switch {
	case len(d.Steps) == 0:
		ps.add("steps", "must contain at least one step")
		return
	case len(d.Steps) > maxSteps:
		ps.add("steps", "must contain at most %d steps", maxSteps)
		return
	}
	outputs := make(map[string]int)
	shots := make(map[string]int) // lower-cased: artifact names must not collide on any file system
	for i := range d.Steps {
		s := &d.Steps[i]
		p := fmt.Sprintf("steps[%d]", i)
		if s.TimeoutMs < 0 || s.TimeoutMs > maxStepTimeoutMs {
			ps.add(p+".timeoutMs", "must be between 0 and %d", maxStepTimeoutMs)
		}
		if s.Retries < 0 || s.Retries > maxRetries {
			ps.add(p+".retries", "must be between 0 and %d", maxRetries)
		}

		type textField struct{ name, value string }
		var refs []textField // the step's string fields that may hold {{references}}
		selector := func() {
			refs = append(refs, textField{"selector", s.Selector})
			checkSelector(ps, p+".selector", s.Selector)
		}
		switch s.Type {
		case StepNavigate:
			refs = append(refs, textField{"url", s.URL})
			switch {
			case strings.TrimSpace(s.URL) == "":
				ps.add(p+".url", "is required")
			case len(References(s.URL)) == 0 && !validURL(s.URL):
				ps.add(p+".url", "must be an absolute http, https, file or about URL")
			}
		case StepClick:
			selector()
		case StepTypeText:
			selector()
			refs = append(refs, textField{"text", s.Text})
		case StepSelect:
			selector()
			refs = append(refs, textField{"value", s.Value})
			if s.Value == "" {
				ps.add(p+".value", "is required")
			}
		case StepCheck:
			selector()
			if s.Checked == nil {
				ps.add(p+".checked", "is required")
			}
		case StepPress:
			refs = append(refs, textField{"key", s.Key})
			if strings.TrimSpace(s.Key) == "" {
				ps.add(p+".key", "is required")
			}
		case StepWaitFor:
			selector()
			switch s.State {
			case "", "visible", "hidden", "attached":
			default:
				ps.add(p+".state", "must be one of visible, hidden, attached")
			}
		case StepSleep:
			if s.Ms < 1 || s.Ms > maxSleepMs {
				ps.add(p+".ms", "must be between 1 and %d", maxSleepMs)
			}
		case StepScroll:
			switch {
			case s.Selector != "" && s.Y != nil:
				ps.add(p, "must have either selector or y, not both")
			case s.Selector != "":
				selector()
			case s.Y == nil:
				ps.add(p, "must have a selector or y")
			}
		case StepExtract:
			selector()
			refs = append(refs, textField{"attribute", s.Attribute})
			switch {
			case s.Output == "":
				ps.add(p+".output", "is required")
			case !varNameRE.MatchString(s.Output):
				ps.add(p+".output", "must match %s", varNameRE)
			default:
				if j, dup := outputs[s.Output]; dup {
					ps.add(p+".output", "duplicates the output of steps[%d]", j)
				} else {
					outputs[s.Output] = i
				}
			}
		case StepAssert:
			selector()
			if s.TextContains != nil {
				refs = append(refs, textField{"textContains", *s.TextContains})
			}
			if s.Equals != nil {
				refs = append(refs, textField{"equals", *s.Equals})
			}
			if (s.TextContains == nil) == (s.Equals == nil) {
				ps.add(p, "must have exactly one of textContains or equals")
			}
		case StepScreenshot:
			refs = append(refs, textField{"name", s.Name})
			// A reference stands for a value checked when the screenshot is stored.
			literal := replaceRefs(s.Name, func(string) (string, bool) { return "0", true })
			switch {
			case s.Name == "":
				ps.add(p+".name", "is required")
			case !screenshotNameRE.MatchString(literal):
				ps.add(p+".name", "must match %s", screenshotNameRE)
			default:
				key := strings.ToLower(s.Name)
				if j, dup := shots[key]; dup {
					ps.add(p+".name", "duplicates the screenshot name of steps[%d]", j)
				} else {
					shots[key] = i
				}
			}
		case StepApproval:
			refs = append(refs, textField{"message", s.Message})
			if strings.TrimSpace(s.Message) == "" {
				ps.add(p+".message", "is required")
			}
		default:
			ps.add(p+".type", "unknown step type")
		}

		for _, f := range refs {
			reported := map[string]bool{}
			for _, name := range References(f.value) {
				if declared[name] || builtinRefs[name] || reported[name] {
					continue
				}
				reported[name] = true
				ps.add(p+"."+f.name, "references undeclared variable %q", name)
			}
		}
	}
}

// checkSelector: CSS selectors are only checked to be non-empty; an "xpath="
// prefix selects XPath, whose expression must be non-empty too.
func checkSelector(ps *problems, field, sel string) {
	switch {
	case strings.TrimSpace(sel) == "":
		ps.add(field, "is required")
	case strings.HasPrefix(sel, "xpath=") && strings.TrimSpace(strings.TrimPrefix(sel, "xpath=")) == "":
		ps.add(field, "must have an XPath expression after \"xpath=\"")
	}
}

// validURL reports whether s is an absolute http, https, file or about URL.
func validURL(s string) bool {
	u, err := url.Parse(s)
	if err != nil {
		return false
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		return u.Host != ""
	case "file":
		return u.Path != "" || u.Opaque != ""
	case "about":
		return u.Opaque != "" || u.Path != ""
	}
	return false
}

// ---------------------------------------------------------------------------
// Inputs

// compileAnchored compiles pattern so that it must match the whole value; nil
// for an empty pattern.
func compileAnchored(pattern string) (*regexp.Regexp, error) {
	if pattern == "" {
		return nil, nil
	}
	if _, err := regexp.Compile(pattern); err != nil { // "a)|(b" is only valid once wrapped
		return nil, err
	}
	return regexp.Compile(`^(?:` + pattern + `)$`)
}

// toFloat converts a JSON-ish number to float64.
func toFloat(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case json.Number:
		if !jsonNumberRE.MatchString(string(n)) {
			return 0, false
		}
		f, err := strconv.ParseFloat(string(n), 64)
		return f, err == nil
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return float64(rv.Int()), true
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return float64(rv.Uint()), true
	case reflect.Float32, reflect.Float64:
		return rv.Float(), true
	}
	return 0, false
}

func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// checkValue checks one value against a variable's type and rules and returns
// it normalized (numbers as float64), or a problem. Problems never contain the
// value itself (it may be a secret).
func checkValue(v *Variable, val any, re *regexp.Regexp) (any, string) {
	switch v.Type {
	case VarNumber:
		f, ok := toFloat(val)
		if !ok {
			return nil, "must be a number"
		}
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return nil, "must be a finite number"
		}
		if v.Min != nil && f < *v.Min {
			return nil, "must be at least " + formatFloat(*v.Min)
		}
		if v.Max != nil && f > *v.Max {
			return nil, "must be at most " + formatFloat(*v.Max)
		}
		return f, ""
	case VarBoolean:
		b, ok := val.(bool)
		if !ok {
			return nil, "must be a boolean"
		}
		return b, ""
	case VarString, VarSecret:
		s, ok := val.(string)
		if !ok {
			return nil, "must be a string"
		}
		if v.MaxLength != nil && *v.MaxLength >= 0 && utf8.RuneCountInString(s) > *v.MaxLength {
			return nil, fmt.Sprintf("must be at most %d characters long", *v.MaxLength)
		}
		if re != nil && !re.MatchString(s) {
			return nil, fmt.Sprintf("must match the pattern %q", v.Pattern)
		}
		return s, ""
	}
	return nil, "has a variable of unknown type"
}

// variablesByName indexes the variables by exact name (the first of duplicates wins).
func (d *Definition) variablesByName() map[string]*Variable {
	if d == nil {
		return nil
	}
	m := make(map[string]*Variable, len(d.Variables))
	for i := range d.Variables {
		if _, dup := m[d.Variables[i].Name]; !dup {
			m[d.Variables[i].Name] = &d.Variables[i]
		}
	}
	return m
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// ValidateInputs checks run inputs against the variables: unknown names,
// missing required inputs, JSON types (a number is a float64, an integer or a
// json.Number; a boolean a bool; a string or secret a string), patterns (which
// must match the whole value), min/max and maxLength (in runes). A nil value
// counts as absent. It returns the resolved inputs: numbers as float64, and
// defaults applied for absent variables that have one; absent optional
// variables without default are left out. Errors are a
// CodeUnprocessableEntity *Error with details.fields ("inputs.username").
func (d *Definition) ValidateInputs(inputs map[string]any) (map[string]any, error) {
	out, ps := d.validateInputs(inputs, nil)
	if len(ps) > 0 {
		return nil, FieldErrors(CodeUnprocessableEntity, msgInputsInvalid, ps)
	}
	return out, nil
}

// validateInputs resolves inputs; variables in skip were reported already.
func (d *Definition) validateInputs(inputs map[string]any, skip map[string]bool) (map[string]any, problems) {
	var ps problems
	byName := d.variablesByName()
	for _, k := range sortedKeys(inputs) {
		if byName[k] == nil {
			ps.add("inputs."+k, "is not a variable of this workflow")
		}
	}
	out := make(map[string]any)
	if d == nil {
		return out, ps
	}
	for i := range d.Variables {
		v := &d.Variables[i]
		if byName[v.Name] != v || skip[v.Name] {
			continue
		}
		field := "inputs." + v.Name
		val, present := inputs[v.Name]
		if !present || val == nil {
			switch {
			case v.Default != nil && v.Type != VarSecret:
				val = v.Default
			case v.Required:
				ps.add(field, "is required")
				continue
			default:
				continue
			}
		}
		var re *regexp.Regexp
		if v.Type == VarString || v.Type == VarSecret {
			var err error
			if re, err = compileAnchored(v.Pattern); err != nil {
				ps.add(field, "has a variable with an invalid pattern")
				continue
			}
		}
		norm, problem := checkValue(v, val, re)
		if problem != "" {
			ps.add(field, "%s", problem)
			continue
		}
		out[v.Name] = norm
	}
	return out, ps
}

// InputsFromStrings converts one CSV row keyed by the header to typed inputs
// and validates them with ValidateInputs. An empty cell is an absent input; a
// number cell must be a JSON number ("42", "-1.5e3"); a boolean cell is true,
// false, 1 or 0 (letter case ignored); number and boolean cells are trimmed of
// spaces. Unknown columns and cells that cannot be converted are
// CodeUnprocessableEntity field problems, reported with the rule problems of
// the other inputs. A column with an empty name and an empty cell (a trailing
// comma) is ignored.
func (d *Definition) InputsFromStrings(row map[string]string) (map[string]any, error) {
	var ps problems
	byName := d.variablesByName()
	typed := make(map[string]any, len(row))
	failed := make(map[string]bool)
	for _, k := range sortedKeys(row) {
		cell := row[k]
		v := byName[k]
		if v == nil {
			if k == "" && cell == "" {
				continue
			}
			ps.add("inputs."+k, "is not a variable of this workflow")
			continue
		}
		switch v.Type {
		case VarNumber:
			t := strings.TrimSpace(cell)
			if t == "" {
				continue
			}
			f, err := strconv.ParseFloat(t, 64)
			if !jsonNumberRE.MatchString(t) || err != nil {
				ps.add("inputs."+k, "must be a number")
				failed[k] = true
				continue
			}
			typed[k] = f
		case VarBoolean:
			switch strings.ToLower(strings.TrimSpace(cell)) {
			case "":
				continue
			case "true", "1":
				typed[k] = true
			case "false", "0":
				typed[k] = false
			default:
				ps.add("inputs."+k, "must be true, false, 1 or 0")
				failed[k] = true
			}
		default:
			if cell == "" {
				continue
			}
			typed[k] = cell
		}
	}
	out, more := d.validateInputs(typed, failed)
	ps = append(ps, more...)
	if len(ps) > 0 {
		return nil, FieldErrors(CodeUnprocessableEntity, msgInputsInvalid, ps)
	}
	return out, nil
}

// secretNames returns the lower-cased names of the secret variables.
func (d *Definition) secretNames() map[string]bool {
	m := make(map[string]bool)
	if d == nil {
		return m
	}
	for _, v := range d.Variables {
		if v.Type == VarSecret {
			m[strings.ToLower(v.Name)] = true
		}
	}
	return m
}

// RedactInputs returns a copy of inputs with the value of every secret
// variable replaced by RedactedValue. Keys are matched case-insensitively so
// that unvalidated inputs are redacted too. The copy is never nil.
func (d *Definition) RedactInputs(inputs map[string]any) map[string]any {
	secret := d.secretNames()
	out := make(map[string]any, len(inputs))
	for k, v := range inputs {
		if secret[strings.ToLower(k)] {
			out[k] = RedactedValue
		} else {
			out[k] = v
		}
	}
	return out
}

// SecretValues returns the distinct non-empty string values of the secret
// inputs, longest first, for scrubbing logs and events.
func (d *Definition) SecretValues(inputs map[string]any) []string {
	secret := d.secretNames()
	seen := make(map[string]bool)
	var out []string
	for k, v := range inputs {
		s, ok := v.(string)
		if !ok || s == "" || !secret[strings.ToLower(k)] || seen[s] {
			continue
		}
		seen[s] = true
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if len(out[i]) != len(out[j]) {
			return len(out[i]) > len(out[j])
		}
		return out[i] < out[j]
	})
	return out
}

// ---------------------------------------------------------------------------
// References

// forEachRef calls fn for every reference "{{ name }}" in s, with the byte
// offsets of the whole reference and the name trimmed of spaces. The text
// between the braces holds no brace; "{{{a}}}" is "{" + ref a + "}".
func forEachRef(s string, fn func(start, end int, name string)) {
	i := 0
	for i < len(s) {
		j := strings.Index(s[i:], "{{")
		if j < 0 {
			return
		}
		start := i + j
		k := strings.Index(s[start+2:], "}}")
		if k < 0 {
			return
		}
		inner := s[start+2 : start+2+k]
		if q := strings.LastIndexAny(inner, "{}"); q >= 0 {
			// No reference can start before the last brace of inner minus one.
			i = start + 2 + q - 1
			continue
		}
		end := start + 2 + k + 2
		fn(start, end, strings.TrimSpace(inner))
		i = end
	}
}

// References returns the names referenced as {{name}} in s (trimmed of the
// spaces inside the braces), in order of appearance.
func References(s string) []string {
	var names []string
	forEachRef(s, func(_, _ int, name string) { names = append(names, name) })
	return names
}

// replaceRefs replaces every reference for which fn returns true.
func replaceRefs(s string, fn func(name string) (string, bool)) string {
	var b strings.Builder
	last := 0
	forEachRef(s, func(start, end int, name string) {
		v, ok := fn(name)
		if !ok {
			return
		}
		b.WriteString(s[last:start])
		b.WriteString(v)
		last = end
	})
	if last == 0 {
		return s
	}
	b.WriteString(s[last:])
	return b.String()
}

// Interpolate replaces every {{name}} in s with vars[name], in one pass (values
// are not interpolated again); references to unknown names are left as they are.
func Interpolate(s string, vars map[string]string) string {
	return replaceRefs(s, func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	})
}
