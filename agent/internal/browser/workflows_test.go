package browser

import (
	"testing"

	"github.com/copelf/copelf/protocol"
)

func TestLoginSearchWorkflow(t *testing.T) {
	t.Parallel()
	def := loadWorkflow(t, "login-search")
	rec := &recorder{}
	res := runDef(t, def, rec, withInputs(map[string]any{"username": "ada", "password": "hunter2-secret"}))
	wantSucceeded(t, res)
	if got := res.Outputs["firstResult"]; got != "chromium" {
		t.Errorf("outputs.firstResult = %#v, want chromium", got)
	}
	wantPNG(t, rec, "results.png")
	if len(rec.ends) != len(def.Steps) {
		t.Fatalf("%d steps finished, want %d", len(rec.ends), len(def.Steps))
	}
	for i, e := range rec.ends {
		if e.step != i || e.status != protocol.StepSucceeded || e.attempts != 1 || e.err != nil {
			t.Errorf("step %d: %+v", i, e)
		}
	}
	if e, _ := rec.end(7); e.output != "chromium" {
		t.Errorf("extract step output = %#v", e.output)
	}
}

func TestOrderWorkflow(t *testing.T) {
	t.Parallel()
	def := loadWorkflow(t, "order")
	rec := &recorder{}
	res := runDef(t, def, rec)
	wantSucceeded(t, res)
	want := map[string]any{"itemId": "7", "currency": "EUR", "price": "42.50"}
	for k, v := range want {
		if res.Outputs[k] != v {
			t.Errorf("outputs.%s = %#v, want %#v", k, res.Outputs[k], v)
		}
	}
}
