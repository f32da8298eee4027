package browser

import (
	"bytes"
	"image/png"
	"strings"
	"testing"
	"time"

	"github.com/copelf/copelf/protocol"
)

const widgets = `{"type":"navigate","url":"http://127.0.0.1:0/widgets.html"}`

func TestSelectAndCheck(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"select","selector":"#color","value":"g"},
		{"type":"assert","selector":"#color-state","equals":"g"},
		{"type":"select","selector":"#color","value":"Blue"},
		{"type":"assert","selector":"#color-state","equals":"b"},
		{"type":"check","selector":"#agree","checked":false},
		{"type":"assert","selector":"#agree-state","equals":"false"},
		{"type":"check","selector":"#agree","checked":false},
		{"type":"assert","selector":"#agree-state","equals":"false"},
		{"type":"check","selector":"xpath=//input[@id='agree']","checked":true},
		{"type":"assert","selector":"#agree-state","equals":"true"}`)
	wantSucceeded(t, runDef(t, def, nil))
}

func TestSelectUnknownOption(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,{"type":"select","selector":"#color","value":"purple"}`)
	res := runDef(t, def, nil)
	wantFailure(t, res, protocol.RunFailed, protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, 1)
	if res.Error.Details["value"] != "purple" {
		t.Errorf("details = %v", res.Error.Details)
	}
}

func TestTypeClearAndPress(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"type","selector":"#echo","text":"abc","clear":true},
		{"type":"extract","selector":"#echo","attribute":"value","output":"first"},
		{"type":"type","selector":"#echo","text":"def"},
		{"type":"extract","selector":"#echo","attribute":"value","output":"second"},
		{"type":"press","key":"Enter"},
		{"type":"assert","selector":"#submitted","equals":"submitted: abcdef"},
		{"type":"press","key":"Tab"},
		{"type":"press","key":"x"},
		{"type":"press","key":"Shift+Tab"},
		{"type":"press","key":"escape"},
		{"type":"extract","selector":"#keys","output":"keys"}`)
	res := runDef(t, def, nil)
	wantSucceeded(t, res)
	if res.Outputs["first"] != "abc" || res.Outputs["second"] != "abcdef" {
		t.Errorf("outputs = %v", res.Outputs)
	}
	keys, _ := res.Outputs["keys"].(string)
	for _, k := range []string{"[Enter]", "[Tab][x]", "[Shift+Tab]", "[Escape]"} {
		if !strings.Contains(keys, k) {
			t.Errorf("keys %q lack %s", keys, k)
		}
	}
}

func TestUnknownKey(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,{"type":"press","key":"NoSuchKey","retries":3}`)
	rec := &recorder{}
	res := runDef(t, def, rec)
	if res.Status != protocol.RunFailed || res.Error.Code != protocol.CodeUnprocessableEntity {
		t.Fatalf("result %+v", res)
	}
	if e, _ := rec.end(1); e.attempts != 1 {
		t.Errorf("a definition error was retried: %d attempts", e.attempts)
	}
}

func TestWaitForStates(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"waitFor","selector":"#later","timeoutMs":5000},
		{"type":"waitFor","selector":"#going","state":"hidden","timeoutMs":5000},
		{"type":"waitFor","selector":"#never-there","state":"hidden"},
		{"type":"waitFor","selector":"#title","state":"attached"},
		{"type":"waitFor","selector":"xpath=//p[@id='later']","state":"visible"}`)
	wantSucceeded(t, runDef(t, def, nil))
}

func TestSleep(t *testing.T) {
	t.Parallel()
	def := steps(t, "", `{"type":"sleep","ms":150}`)
	rec := &recorder{}
	wantSucceeded(t, runDef(t, def, rec))
	if e, _ := rec.end(0); e.durationMs < 150 {
		t.Errorf("sleep took %d ms", e.durationMs)
	}
}

func TestScroll(t *testing.T) {
	t.Parallel()
	// The page reports scrolls from its own listeners, a frame later: the
	// asserts retry.
	def := steps(t, "", widgets+`,
		{"type":"scroll","y":500},
		{"type":"assert","selector":"#scroll-y","equals":"500","retries":5},
		{"type":"scroll","selector":"#bottom"},
		{"type":"assert","selector":"#bottom-state","equals":"visible","retries":5}`)
	wantSucceeded(t, runDef(t, def, nil))
}

func TestExtract(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"extract","selector":"#title","output":"title"},
		{"type":"extract","selector":"#profile","attribute":"data-id","output":"id"},
		{"type":"extract","selector":"#profile","attribute":"href","output":"href"},
		{"type":"extract","selector":"#profile","attribute":"title","output":"tooltip"},
		{"type":"extract","selector":"#profile","attribute":"nope","output":"missing"},
		{"type":"extract","selector":"#echo","attribute":"value","output":"value"},
		{"type":"extract","selector":"xpath=//a[@data-id='42']","output":"xpathText"},
		{"type":"assert","selector":"#profile","textContains":"rofil"}`)
	rec := &recorder{}
	res := runDef(t, def, rec)
	wantSucceeded(t, res)
	want := map[string]any{
		"title": "Widgets", "id": "42", "href": "/profile/42", "tooltip": "Profile of user 42",
		"missing": nil, "value": "initial", "xpathText": "Profile",
	}
	for k, v := range want {
		got, ok := res.Outputs[k]
		if !ok || got != v {
			t.Errorf("outputs.%s = %#v (present %v), want %#v", k, got, ok, v)
		}
	}
	if e, _ := rec.end(2); e.output != "42" {
		t.Errorf("StepFinished output = %#v", e.output)
	}
}

func TestScreenshots(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,
		{"type":"screenshot","name":"viewport"},
		{"type":"screenshot","name":"page-{{run.id}}","fullPage":true}`)
	rec := &recorder{}
	wantSucceeded(t, runDef(t, def, rec))
	wantPNG(t, rec, "viewport.png")
	wantPNG(t, rec, "page-run_test.png")
	height := func(name string) int {
		cfg, err := png.DecodeConfig(bytes.NewReader(rec.artifacts[name].data))
		if err != nil {
			t.Fatal(err)
		}
		return cfg.Height
	}
	if v, f := height("viewport.png"), height("page-run_test.png"); f <= v || f < 3000 {
		t.Errorf("full page %d px high, viewport %d px", f, v)
	}
}

func TestInterpolation(t *testing.T) {
	t.Parallel()
	def := steps(t, `[
		{"name":"name","type":"string"},
		{"name":"n","type":"number"},
		{"name":"price","type":"number"},
		{"name":"flag","type":"boolean"},
		{"name":"field","type":"string"}]`,
		widgets+`,
		{"type":"type","selector":"#{{field}}","text":"{{name}}|{{n}}|{{price}}|{{flag}}|{{run.id}}|{{iteration.index}}|{{batch.id}}|{{ name }}","clear":true},
		{"type":"extract","selector":"#{{field}}","attribute":"value","output":"echo"}`)
	it := 4
	res := runDef(t, def, nil,
		withInputs(map[string]any{"name": "Ada", "n": 3, "price": 2.50, "flag": true, "field": "echo"}),
		func(s *RunSpec) { s.RunID, s.BatchID, s.Iteration = "run_interp", "bat_1", &it })
	wantSucceeded(t, res)
	if want := "Ada|3|2.5|true|run_interp|4|bat_1|Ada"; res.Outputs["echo"] != want {
		t.Errorf("echo = %q, want %q", res.Outputs["echo"], want)
	}
}

func TestStepDurations(t *testing.T) {
	t.Parallel()
	def := steps(t, "", widgets+`,{"type":"click","selector":"#submit"}`)
	rec := &recorder{}
	start := time.Now()
	wantSucceeded(t, runDef(t, def, rec))
	var sum int64
	for _, e := range rec.ends {
		sum += e.durationMs
	}
	if sum > time.Since(start).Milliseconds() {
		t.Errorf("step durations %d ms exceed the run", sum)
	}
}
