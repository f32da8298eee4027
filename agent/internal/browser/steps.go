package browser

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/chromedp/cdproto"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/dom"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"
	"github.com/copelf/copelf/protocol"
)

// objectGroup holds the JavaScript handles a run resolves. They are never
// released one by one (that would cost a round trip per call): the session's
// browser context, and every handle with it, is disposed after the run.
const objectGroup = "copelf"

// compiled is one step of a definition, interpolated and turned into a
// chromedp action.
type compiled struct {
	index   int
	step    protocol.Step // with every {{reference}} replaced
	timeout time.Duration // 0: no step timeout (approval without timeoutMs)

	// selector is set for steps that first wait for an element. found is
	// set once the element met the wait condition in the current attempt,
	// so that a timeout before that is element_not_found and a timeout
	// after it is step_timeout.
	selector      string
	waitsForFound bool
	found         atomic.Bool

	// do runs one attempt. It returns the step's output (extract) or an
	// error: a *failure for causes it knows, anything else is classified
	// by the runner.
	do func(ctx context.Context, r *runner) (any, error)
}

// interpolate returns a copy of st with {{name}} replaced in every string
// field (the output name excepted: it names the result and cannot hold
// references).
func interpolate(st protocol.Step, vars map[string]string) protocol.Step {
	in := func(s string) string { return protocol.Interpolate(s, vars) }
	st.URL = in(st.URL)
	st.Selector = in(st.Selector)
	st.Text = in(st.Text)
	st.Value = in(st.Value)
	st.Key = in(st.Key)
	st.State = in(st.State)
	st.Attribute = in(st.Attribute)
	st.Name = in(st.Name)
	st.Message = in(st.Message)
	if st.TextContains != nil {
		v := in(*st.TextContains)
		st.TextContains = &v
	}
	if st.Equals != nil {
		v := in(*st.Equals)
		st.Equals = &v
	}
	return st
}

// screenshotNameRE is the rule of protocol.Definition.Validate, checked again
// once references are replaced.
var screenshotNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// compileStep turns an interpolated step into its action.
func compileStep(index int, st protocol.Step) *compiled {
	c := &compiled{index: index, step: st}
	switch {
	case st.TimeoutMs > 0:
		c.timeout = time.Duration(st.TimeoutMs) * time.Millisecond
	case st.Type == protocol.StepApproval:
		// A person answers an approval: only the run timeout (or an
		// explicit step timeout) bounds the wait.
	default:
		c.timeout = protocol.DefaultStepTimeoutMs * time.Millisecond
	}

	switch st.Type {
	case protocol.StepNavigate:
		c.do = c.navigate
	case protocol.StepClick:
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			_, err := chromedp.MouseClickNode(n)(ctx, t)
			return nil, err
		}, chromedp.NodeVisible)
	case protocol.StepTypeText:
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			if typ, _ := n.Attribute("type"); n.NodeName == "INPUT" && strings.EqualFold(typ, "file") {
				// As chromedp.SendKeys: the text is the path of the file to upload.
				_, err := cdp.Call(ctx, t, dom.SetFileInputFiles, dom.SetFileInputFilesParams{Files: []string{st.Text}, NodeID: n.NodeID})
				return nil, err
			}
			if st.Clear {
				// clearJS also focuses the field: one round trip less than
				// KeyEventNode's DOM.focus.
				if _, err := callOn[chromedp.Void](ctx, t, n, clearJS); err != nil {
					return nil, err
				}
				_, err := chromedp.KeyEvent(st.Text)(ctx, t)
				return nil, err
			}
			_, err := chromedp.KeyEventNode(n, st.Text)(ctx, t)
			return nil, err
		}, chromedp.NodeVisible)
	case protocol.StepSelect:
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			problem, err := callOn[string](ctx, t, n, selectJS, st.Value)
			if err != nil {
				return nil, err
			}
			switch problem {
			case "":
				return nil, nil
			case "no-option":
				return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, false,
					fmt.Sprintf("Step %d (select): %s has no option %q.", index, quoteSel(c.selector), st.Value)).
					with("selector", c.selector).with("value", st.Value)
			default:
				return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, false,
					fmt.Sprintf("Step %d (select): %s is not a <select> element.", index, quoteSel(c.selector))).
					with("selector", c.selector)
			}
		})
	case protocol.StepCheck:
		want := st.Checked != nil && *st.Checked
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			ok, err := callOn[bool](ctx, t, n, checkJS, want)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, false,
					fmt.Sprintf("Step %d (check): %s is not a checkbox or radio button that can be set.", index, quoteSel(c.selector))).
					with("selector", c.selector)
			}
			return nil, nil
		})
	case protocol.StepPress:
		keys, mods, ok := parseKey(st.Key)
		if !ok {
			c.do = func(context.Context, *runner) (any, error) {
				return nil, c.fail(protocol.CodeUnprocessableEntity, "", false,
					fmt.Sprintf("Step %d (press): unknown key %q.", index, st.Key)).with("key", st.Key)
			}
			break
		}
		c.do = func(ctx context.Context, _ *runner) (any, error) {
			return nil, chromedp.Do(ctx, chromedp.KeyEvent(keys, chromedp.KeyModifiers(mods...)))
		}
	case protocol.StepWaitFor:
		noop := func(context.Context, *chromedp.Target, *chromedp.Node) (any, error) { return nil, nil }
		switch st.State {
		case "hidden":
			// Hidden is also absent: AtLeast(0) lets no match pass.
			c.element(noop, chromedp.NodeNotVisible, chromedp.AtLeast(0))
			c.waitsForFound = false // still visible at the timeout is step_timeout
		case "attached":
			c.element(noop)
		default:
			c.element(noop, chromedp.NodeVisible)
		}
	case protocol.StepSleep:
		d := time.Duration(st.Ms) * time.Millisecond
		c.do = func(ctx context.Context, _ *runner) (any, error) {
			return nil, chromedp.Do(ctx, chromedp.Sleep(d))
		}
	case protocol.StepScroll:
		if st.Selector == "" {
			var y int64
			if st.Y != nil {
				y = *st.Y
			}
			js := "window.scrollTo(0, " + strconv.FormatInt(y, 10) + ")"
			c.do = func(ctx context.Context, _ *runner) (any, error) {
				return nil, chromedp.Do(ctx, chromedp.Evaluate[chromedp.Void](js))
			}
			break
		}
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			_, err := cdp.Call(ctx, t, dom.ScrollIntoViewIfNeeded, dom.ScrollIntoViewIfNeededParams{NodeID: n.NodeID})
			return nil, err
		})
	case protocol.StepExtract:
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			if st.Attribute == "" {
				return callOn[string](ctx, t, n, textJS)
			}
			if st.Attribute != "value" && st.Attribute != "checked" {
				// chromedp keeps the node's attributes in step with the
				// page (DOM.attributeModified): no round trip.
				if v, ok := n.Attribute(st.Attribute); ok {
					return v, nil
				}
				return nil, nil // a missing attribute extracts null
			}
			v, err := callOn[*string](ctx, t, n, attributeJS, st.Attribute)
			if err != nil || v == nil {
				return nil, err
			}
			return *v, nil
		})
	case protocol.StepAssert:
		c.element(func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error) {
			text, err := callOn[string](ctx, t, n, textJS)
			if err != nil {
				return nil, err
			}
			var ok bool
			var comparison, expected string
			if st.Equals != nil {
				comparison, expected, ok = "equals", *st.Equals, text == *st.Equals
			} else if st.TextContains != nil {
				comparison, expected, ok = "textContains", *st.TextContains, strings.Contains(text, *st.TextContains)
			}
			if ok {
				return nil, nil
			}
			verb := "to equal"
			if comparison == "textContains" {
				verb = "to contain"
			}
			return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonAssertionFailed, true,
				fmt.Sprintf("Step %d (assert): expected the text of %s %s %q, got %q.", index, quoteSel(c.selector), verb,
					truncate(expected, 200), truncate(text, 200))).
				with("selector", c.selector).with("comparison", comparison).
				with("expected", expected).with("actual", truncate(text, 1000))
		})
	case protocol.StepScreenshot:
		c.do = c.screenshot
	case protocol.StepApproval:
		c.do = c.approval
	default:
		c.do = func(context.Context, *runner) (any, error) {
			return nil, c.fail(protocol.CodeUnprocessableEntity, "", false,
				fmt.Sprintf("Step %d: unknown step type %q.", index, st.Type))
		}
	}
	return c
}

// element makes c wait for its selector to meet the query options (chromedp
// waits by itself until then) and then run f on the first match (nil when an
// AtLeast(0) wait matched nothing).
func (c *compiled) element(f func(ctx context.Context, t *chromedp.Target, n *chromedp.Node) (any, error), opts ...chromedp.QueryOption) {
	c.selector = c.step.Selector
	c.waitsForFound = true
	after := func(ctx context.Context, t *chromedp.Target, nodes []*chromedp.Node) (any, error) {
		c.found.Store(true)
		var n *chromedp.Node
		if len(nodes) > 0 {
			n = nodes[0]
		}
		if n == nil {
			return nil, nil
		}
		return f(ctx, t, n)
	}
	var action chromedp.Action[any]
	if x, ok := strings.CutPrefix(c.selector, "xpath="); ok {
		action = chromedp.QueryAfter(chromedp.Search(x), after, opts...)
	} else {
		action = chromedp.QueryAfter(chromedp.CSS(c.selector), after, opts...)
	}
	c.do = func(ctx context.Context, _ *runner) (any, error) {
		for try := 0; ; try++ {
			c.found.Store(false)
			out, err := chromedp.Run(ctx, action)
			var pe *cdproto.Error
			switch {
			case err == nil || ctx.Err() != nil || !errors.As(err, &pe):
				return out, err
			case !c.found.Load():
				// chromedp retries lookups by itself; the one protocol error
				// it returns from a lookup is an invalid selector.
				return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonElementNotFound, false,
					fmt.Sprintf("Step %d (%s): %s is not a valid selector.", c.index, c.step.Type, quoteSel(c.selector))).
					with("selector", c.selector)
			case try >= maxRequery:
				return out, err
			}
			// The element went away between the query and the action (the
			// page re-rendered it or navigated): query again.
		}
	}
}

// maxRequery bounds the new queries of an element that disappears between
// its query and the action on it, within one attempt.
const maxRequery = 3

// navigate loads the URL and waits for its load event. A network error and
// an HTTP error status are navigation_failed.
func (c *compiled) navigate(ctx context.Context, _ *runner) (any, error) {
	url := c.step.URL
	resp, err := chromedp.Run(ctx, chromedp.NavigateResponse(url))
	var le *chromedp.LoadError
	switch {
	case errors.As(err, &le):
		return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonNavigationFailed, true,
			fmt.Sprintf("Step %d (navigate): loading %s failed: %s.", c.index, truncate(url, 300), le.ErrorText)).
			with("url", url).with("error", le.ErrorText)
	case err != nil:
		return nil, err
	case resp != nil && resp.Status >= 400:
		return nil, c.fail(protocol.CodeUnprocessableEntity, protocol.ReasonNavigationFailed, true,
			fmt.Sprintf("Step %d (navigate): %s answered HTTP %d.", c.index, truncate(url, 300), resp.Status)).
			with("url", url).with("status", resp.Status)
	}
	return nil, nil
}

// screenshot captures the viewport (or the whole page) as PNG and hands it
// to the reporter.
func (c *compiled) screenshot(ctx context.Context, r *runner) (any, error) {
	name := c.step.Name
	if !screenshotNameRE.MatchString(name) {
		return nil, c.fail(protocol.CodeUnprocessableEntity, "", false,
			fmt.Sprintf("Step %d (screenshot): the name %q is not a valid artifact name.", c.index, truncate(name, 200))).
			with("name", name)
	}
	shot := chromedp.CaptureScreenshot()
	if c.step.FullPage {
		shot = chromedp.FullScreenshot(100) // quality 100 is PNG
	}
	data, err := chromedp.Run(ctx, shot)
	if err != nil {
		return nil, err
	}
	r.rep.Artifact(name+".png", "image/png", data)
	return nil, nil
}

// approval asks the reporter and waits for the answer.
func (c *compiled) approval(ctx context.Context, r *runner) (any, error) {
	approved, comment, err := r.rep.ApprovalRequested(ctx, c.index, r.scrub.str(c.step.Message))
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, err // cancelled or timed out: classified by the runner
	case err != nil:
		// Asking again could open a second approval: no retry.
		return nil, c.fail(protocol.CodeInternal, "", false,
			fmt.Sprintf("Step %d (approval): the approval could not be requested: %s", c.index, truncate(err.Error(), 300)))
	}
	if !approved {
		f := c.fail(protocol.CodeForbidden, protocol.ReasonApprovalRejected, false,
			fmt.Sprintf("Step %d (approval): the approval was rejected.", c.index))
		f.rejected = true
		if comment != "" {
			f = f.with("comment", comment)
		}
		return nil, f
	}
	return nil, nil
}

// callOn calls a JavaScript function with the node as this. Two round trips
// (resolve, call); the handle stays in objectGroup.
func callOn[T any](ctx context.Context, t *chromedp.Target, n *chromedp.Node, fn string, args ...any) (T, error) {
	res, err := cdp.Call(ctx, t, dom.ResolveNode, dom.ResolveNodeParams{NodeID: n.NodeID, ObjectGroup: objectGroup})
	if err != nil || res.Object == nil {
		var zero T
		if err == nil {
			err = errors.New("node has no JavaScript object")
		}
		return zero, err
	}
	id := res.Object.ObjectID
	return chromedp.CallFunctionOn[T](fn, func(p *runtime.CallFunctionOnParams) { p.ObjectID = id }, args...)(ctx, t)
}

// Page-side functions. They dispatch the events a user's action would, and
// set values through the prototype's setter so that frameworks that track
// the value on the element (React) see the change.
const (
	textJS = `function() { return (this.textContent || "").trim(); }`

	// attributeJS reads the live value of form fields (the value and
	// checked attributes only hold the initial state).
	attributeJS = `function(name) {
	if (name in this) return String(this[name]);
	return this.getAttribute(name);
}`

	clearJS = `function() {
	this.focus();
	if (this.isContentEditable) { this.textContent = ""; }
	else {
		const d = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(this), "value");
		if (d && d.set) d.set.call(this, ""); else this.value = "";
	}
	this.dispatchEvent(new Event("input", {bubbles: true}));
}`

	selectJS = `function(v) {
	if (this.tagName !== "SELECT") return "not-select";
	const opts = Array.from(this.options);
	const o = opts.find(o => o.value === v) || opts.find(o => o.label === v || o.text.trim() === v);
	if (!o) return "no-option";
	if (!o.selected) {
		o.selected = true;
		this.dispatchEvent(new Event("input", {bubbles: true}));
		this.dispatchEvent(new Event("change", {bubbles: true}));
	}
	return "";
}`

	checkJS = `function(want) {
	if (!("checked" in this)) return false;
	if (this.checked !== want) this.click();
	return this.checked === want;
}`
)

// keyNames maps DOM key names ("Enter", "Tab", "ArrowDown") to the rune kb
// encodes them from; lowerKeyNames does the same case-insensitively.
var keyNames, lowerKeyNames = func() (map[string]rune, map[string]rune) {
	m := make(map[string]rune)
	for r, k := range kb.Keys {
		if utf8.RuneCountInString(k.Key) < 2 {
			continue
		}
		if old, ok := m[k.Key]; !ok || r < old {
			m[k.Key] = r
		}
	}
	m["Space"] = ' '
	lower := make(map[string]rune, len(m))
	for k, r := range m {
		lower[strings.ToLower(k)] = r
	}
	return m, lower
}()

var modifierNames = map[string]chromedp.Modifier{
	"alt": chromedp.ModifierAlt, "control": chromedp.ModifierCtrl, "ctrl": chromedp.ModifierCtrl,
	"meta": chromedp.ModifierMeta, "cmd": chromedp.ModifierMeta, "command": chromedp.ModifierMeta,
	"shift": chromedp.ModifierShift,
}

// parseKey reads a press key: a single character ("a", "+"), a DOM key name
// ("Enter", "Tab", "Escape", "ArrowDown", "F5"; letter case ignored), or
// either after modifiers joined with "+" ("Control+a", "Shift+Tab").
func parseKey(s string) (keys string, mods []chromedp.Modifier, ok bool) {
	key := s
	if utf8.RuneCountInString(s) > 1 {
		if i := strings.LastIndex(s[:len(s)-1], "+"); i >= 0 {
			key = s[i+1:]
			for _, m := range strings.Split(s[:i], "+") {
				mod, ok := modifierNames[strings.ToLower(strings.TrimSpace(m))]
				if !ok {
					return "", nil, false
				}
				mods = append(mods, mod)
			}
		}
	}
	if utf8.RuneCountInString(key) == 1 {
		return key, mods, true
	}
	if r, ok := keyNames[key]; ok {
		return string(r), mods, true
	}
	if r, ok := lowerKeyNames[strings.ToLower(key)]; ok {
		return string(r), mods, true
	}
	return "", nil, false
}

func truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n]) + "…"
}

func quoteSel(sel string) string { return strconv.Quote(truncate(sel, 200)) }
