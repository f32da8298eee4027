package protocol

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"reflect"
	"testing"
)

// strictFrameUnmarshal is encoding/json refusing unknown fields and trailing data.
func strictFrameUnmarshal(data []byte, v any) error {
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

func FuzzDecodeFrame(f *testing.F) {
	for _, fr := range SampleFrames() {
		b, err := EncodeFrame(fr)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{
		``, `null`, `[]`, `{}`, `"hello"`, `{"type":7}`, `{"type":"goodbye"}`,
		`{"type":"ready","slots":1,"slots":2}`,
		`{"type":"ready","Slots":1.5,"x":[1e999]}`,
		`{"type":"ready","slots":1} {}`,
		`{"type":"hello","protocol":1,"token":"t","agent":{"id":"a","kind":"headless","labels":{"k":"v","k":null}}}`,
		`{"type":"event","runId":"run_aaaaaaaaaa","leaseId":"lse_aaaaaaaaaa","seq":1,"kind":"finished","status":"failed","error":{"code":"timeout","message":"","details":{"step":-0}},"output":{"a":[{},[]]}}`,
		`{"type":"assign","runId":"run_aaaaaaaaaa","attempt":1,"leaseId":"lse_aaaaaaaaaa","workflow":{"id":"wf_aaaaaaaaaa","definition":{"version":1,"steps":[{"type":"sleep","ms":5}]}},"inputs":null}`,
		"{\"type\":\"cancel\",\"runId\":\"run_aaaaaaaaaa\",\"reason\":\"\xff\\ud800\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := DecodeFrame(data)
		if err != nil {
			if fr != nil {
				t.Fatalf("a frame returned with an error")
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v (%T) is not a *Error", err, err)
			}
			if !e.Code.Valid() || e.Message == "" {
				t.Fatalf("error without catalog code or message: %#v", e)
			}
			switch e.Code {
			case CodeBadRequest:
				switch e.Details["reason"] {
				case "malformed_frame", "unknown_frame_type", "frame_too_large":
				default:
					t.Fatalf("bad_request with reason %v", e.Details["reason"])
				}
			case CodeUnprocessableEntity:
				if ps, _ := e.Details["fields"].([]FieldProblem); len(ps) == 0 {
					t.Fatalf("unprocessable_entity without details.fields: %#v", e.Details)
				}
			default:
				t.Fatalf("code %q", e.Code)
			}
			if _, err := json.Marshal(e); err != nil {
				t.Fatalf("the error does not marshal: %v", err)
			}
			return
		}

		if fr == nil {
			t.Fatal("nil frame without error")
		}
		if got := reflect.ValueOf(fr).Elem().FieldByName("Type").String(); got != string(fr.FrameType()) {
			t.Fatalf("Type field %q of a %s frame", got, fr.FrameType())
		}
		if err := fr.Validate(); err != nil {
			t.Fatalf("decoded frame does not validate: %v", err)
		}
		// encoding/json reads what DecodeFrame reads (it is only more lenient).
		probe := newFrame(fr.FrameType())
		if err := strictFrameUnmarshal(data, probe); err != nil {
			t.Fatalf("encoding/json refuses a frame DecodeFrame accepts: %v", err)
		}

		b, err := EncodeFrame(fr)
		if err != nil {
			t.Fatalf("EncodeFrame: %v", err)
		}
		if len(b) > MaxFrameBytes {
			return // re-encoding may grow a frame near the limit ("<" is escaped, 1e9 spelled out)
		}
		fr2, err := DecodeFrame(b)
		if err != nil {
			t.Fatalf("re-decoding %s: %v", b, err)
		}
		if !sameFrame(fr, fr2) {
			t.Fatalf("round trip differs:\n%#v\n%#v", fr, fr2)
		}
		if b2, err := EncodeFrame(fr2); err != nil || !bytes.Equal(b, b2) {
			t.Fatalf("encoding is not stable (%v):\n%s\n%s", err, b, b2)
		}
	})
}
