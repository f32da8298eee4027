package protocol_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/copelf/copelf/protocol"
)

var (
	schemasOnce sync.Once
	schemas     map[protocol.FrameType]*jsonschema.Schema
	schemasErr  error
)

// frameSchemas compiles protocol/schema/<type>.json for every frame type.
func frameSchemas(t *testing.T) map[protocol.FrameType]*jsonschema.Schema {
	t.Helper()
	schemasOnce.Do(func() {
		c := jsonschema.NewCompiler()
		c.DefaultDraft(jsonschema.Draft2020)
		out := map[protocol.FrameType]*jsonschema.Schema{}
		for _, ft := range protocol.FrameTypes() {
			path, err := filepath.Abs(filepath.Join("schema", string(ft)+".json"))
			if err != nil {
				schemasErr = err
				return
			}
			sch, err := c.Compile(path)
			if err != nil {
				schemasErr = err
				return
			}
			out[ft] = sch
		}
		schemas = out
	})
	if schemasErr != nil {
		t.Fatalf("compiling the frame schemas: %v", schemasErr)
	}
	return schemas
}

func instance(t *testing.T, b []byte) any {
	t.Helper()
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("UnmarshalJSON(%s): %v", b, err)
	}
	return v
}

// accepting lists the frame types whose schema accepts b.
func accepting(t *testing.T, b []byte) []protocol.FrameType {
	t.Helper()
	v := instance(t, b)
	var out []protocol.FrameType
	for ft, sch := range frameSchemas(t) {
		if sch.Validate(v) == nil {
			out = append(out, ft)
		}
	}
	return out
}

func TestSchemaFiles(t *testing.T) {
	frameSchemas(t)
	files, err := filepath.Glob(filepath.Join("schema", "*"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, filepath.Base(f))
	}
	var want []string
	for _, ft := range protocol.FrameTypes() {
		want = append(want, string(ft)+".json")
	}
	slices.Sort(names)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Fatalf("schema files %v, want one per frame type %v", names, want)
	}
	for _, ft := range protocol.FrameTypes() {
		b, err := os.ReadFile(filepath.Join("schema", string(ft)+".json"))
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Schema     string `json:"$schema"`
			ID         string `json:"$id"`
			Type       string `json:"type"`
			Required   []string
			Properties map[string]json.RawMessage
			Additional *bool `json:"additionalProperties"`
		}
		if err := json.Unmarshal(b, &doc); err != nil {
			t.Fatalf("%s: %v", ft, err)
		}
		if doc.Schema != "https://json-schema.org/draft/2020-12/schema" {
			t.Errorf("%s: $schema %q", ft, doc.Schema)
		}
		if !strings.HasSuffix(doc.ID, "/protocol/schema/"+string(ft)+".json") {
			t.Errorf("%s: $id %q", ft, doc.ID)
		}
		if doc.Type != "object" || doc.Additional == nil || *doc.Additional || !slices.Contains(doc.Required, "type") {
			t.Errorf("%s: must be an object with a required type and no additional properties", ft)
		}
		if got := string(doc.Properties["type"]); strings.Join(strings.Fields(got), "") != `{"const":"`+string(ft)+`"}` {
			t.Errorf("%s: properties.type is %s", ft, got)
		}
	}
}

// TestSchemaAcceptsEncodedFrames: every frame EncodeFrame writes for a valid
// frame matches its schema, and only its schema.
func TestSchemaAcceptsEncodedFrames(t *testing.T) {
	frames := protocol.SampleFrames()
	for _, c := range protocol.FrameCases() {
		if c.Fields == nil {
			frames = append(frames, c.Frame)
		}
	}
	for _, f := range frames {
		b, err := protocol.EncodeFrame(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := frameSchemas(t)[f.FrameType()].Validate(instance(t, b)); err != nil {
			t.Errorf("%s\n%v", b, err)
			continue
		}
		if got := accepting(t, b); !slices.Equal(got, []protocol.FrameType{f.FrameType()}) {
			t.Errorf("%s is accepted by the schemas of %v", b, got)
		}
	}
}

// schemaLooser names the value rules of Validate that JSON Schema cannot state;
// the schema accepts these invalid frames.
var schemaLooser = map[string]string{
	// maxLength counts characters, Validate counts UTF-8 bytes.
	"hello agent.name 101 runes of 2 bytes": "byte length",
}

// TestSchemaRejectsInvalidValues: every frame Validate refuses is refused by
// the schemas too, except the rules listed in schemaLooser.
func TestSchemaRejectsInvalidValues(t *testing.T) {
	for _, c := range protocol.FrameCases() {
		if c.Fields == nil || c.Direct {
			continue
		}
		b, err := protocol.EncodeFrame(c.Frame)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := protocol.DecodeFrame(b); err == nil {
			t.Fatalf("%s: DecodeFrame accepts %s", c.Name, b)
		}
		got := accepting(t, b)
		if _, looser := schemaLooser[c.Name]; looser {
			if len(got) == 0 {
				t.Errorf("%s: listed in schemaLooser but the schema refuses it", c.Name)
			}
			continue
		}
		if len(got) > 0 {
			t.Errorf("%s: DecodeFrame refuses %s (%v) but the schema of %v accepts it", c.Name, b, c.Fields, got)
		}
	}
}

// TestSchemaRejectsMalformedFrames: frames DecodeFrame refuses as malformed
// (wrong JSON types, unknown fields, unknown types) are refused by every schema.
// Not expressible in JSON Schema, so not listed: malformed JSON, duplicate
// keys, frames over 1 MiB, integers written as 1.0.
func TestSchemaRejectsMalformedFrames(t *testing.T) {
	run, lse, wf := `"run_k4tq2mzx5bv3hn4wp6yc2drfja"`, `"lse_m2zq7t4xkbv5hnw3pc6yd2rfja"`, `"wf_t2kq7m4zxbv5hnw3pc6yd2rfja"`
	agent := `{"id":"a","name":"n","kind":"headless","version":"1","slots":1}`
	def := `{"version":1,"steps":[{"type":"click","selector":"a"}]}`
	cases := []string{
		`[]`, `"hello"`, `null`, `42`, `{}`,
		`{"slots":1}`,
		`{"type":null,"slots":1}`,
		`{"type":1}`,
		`{"type":"goodbye"}`,
		`{"type":""}`,
		`{"type":"Ready","slots":1}`,
		`{"TYPE":"ready","slots":1}`,
		`{"type":"ready","slots":1,"extra":true}`,
		`{"type":"ready","Slots":1}`,
		`{"type":"ready","slots":"1"}`,
		`{"type":"ready","slots":1.5}`,
		`{"type":"ready","slots":true}`,
		`{"type":"hello","protocol":"1","token":"t","agent":` + agent + `}`,
		`{"type":"hello","protocol":1,"token":"t","agent":[]}`,
		`{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","name":"n","kind":"headless","version":"1","slots":1,"cpu":4}}`,
		`{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","name":"n","kind":"headless","version":"1","slots":1,"labels":{"gpu":true}}}`,
		`{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","name":"n","kind":"headless","version":"1","slots":1,"labels":["gpu"]}}`,
		`{"type":"hello","protocol":1,"token":7,"agent":` + agent + `}`,
		`{"type":"welcome","sessionId":"s","agentId":"agt_p7d2kq4mzxv3tbn5hw6yc2rfja","heartbeatMs":1,"leaseMs":1,"runs":[{"runId":` + run + `,"attempt":"1","leaseId":` + lse + `,"status":"running"}]}`,
		`{"type":"welcome","sessionId":"s","agentId":"agt_p7d2kq4mzxv3tbn5hw6yc2rfja","heartbeatMs":1,"leaseMs":1,"runs":{}}`,
		`{"type":"error","code":"internal","message":"x","details":[]}`,
		`{"type":"error","code":"internal","message":["x"],"details":null}`,
		`{"type":"assign","runId":` + run + `,"attempt":1,"leaseId":` + lse + `,"workflow":{"id":` + wf + `,"name":"w","definition":` + def + `},"inputs":[1],"timeoutMs":0}`,
		`{"type":"assign","runId":` + run + `,"attempt":1,"leaseId":` + lse + `,"workflow":{"id":` + wf + `,"name":"w","definition":{"version":1,"steps":[{"type":"sleep","ms":"5"}]}},"inputs":{},"timeoutMs":0}`,
		`{"type":"assign","runId":` + run + `,"attempt":1,"leaseId":` + lse + `,"workflow":{"id":` + wf + `,"name":"w","definition":{"version":1,"steps":[{"type":"click","selector":"a","hover":true}]}},"inputs":{},"timeoutMs":0}`,
		`{"type":"assign","runId":` + run + `,"attempt":1,"leaseId":` + lse + `,"workflow":{"id":` + wf + `,"name":"w","definition":` + def + `,"video":"x"},"inputs":{},"timeoutMs":0}`,
		`{"type":"accept","runId":` + run + `,"leaseId":7}`,
		`{"type":"reject","runId":` + run + `,"leaseId":` + lse + `,"reason":false}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":"1","kind":"started"}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","step":"0"}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","outputs":[]}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","error":"boom"}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","error":{"code":"internal","message":"x","stack":"…"}}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","durationMs":1.5}`,
		`{"type":"ack","runId":` + run + `,"seq":[1]}`,
		`{"type":"ack","runId":` + run + `,"seq":9223372036854775808}`,
		`{"type":"event","runId":` + run + `,"leaseId":` + lse + `,"seq":1,"kind":"started","durationMs":1e20}`,
		`{"type":"approval","runId":` + run + `,"approvalId":"apr_h6kq7m4zxbv5tnw3pc2yd2rfja","approved":"yes"}`,
		`{"type":"cancel","runId":` + run + `,"reason":{"text":"x"}}`,
		`{"type":"heartbeat","runs":` + run + `}`,
		`{"type":"heartbeat","runs":[` + run + `,7]}`,
		`{"type":"heartbeat","runs":[],"agentId":"x"}`,
	}
	for _, in := range cases {
		if f, err := protocol.DecodeFrame([]byte(in)); err == nil {
			t.Errorf("DecodeFrame accepts %s as %#v", in, f)
			continue
		} else if protocol.ErrorCode(err) != protocol.CodeBadRequest {
			t.Errorf("DecodeFrame(%s): %v, want bad_request", in, err)
		}
		if got := accepting(t, []byte(in)); len(got) > 0 {
			t.Errorf("the schema of %v accepts %s", got, in)
		}
	}
}

// TestSchemaStricterThanDecoder documents what the schemas refuse although
// DecodeFrame reads it: senders must send every field the schema requires,
// and null only where the schema allows it.
func TestSchemaStricterThanDecoder(t *testing.T) {
	for _, in := range []string{
		`{"type":"ready"}`,
		`{"type":"ready","slots":null}`,
		`{"type":"heartbeat","runs":null}`,
		`{"type":"reject","runId":"run_k4tq2mzx5bv3hn4wp6yc2drfja","leaseId":"lse_m2zq7t4xkbv5hnw3pc6yd2rfja"}`,
	} {
		if _, err := protocol.DecodeFrame([]byte(in)); err != nil {
			t.Errorf("DecodeFrame(%s): %v", in, err)
		}
		if got := accepting(t, []byte(in)); len(got) > 0 {
			t.Errorf("the schema of %v accepts %s", got, in)
		}
	}
}
