package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// openapiFile is the document the server embeds and serves.
const openapiFile = "openapi.yaml"

// spec is the OpenAPI document, loaded and validated once per test binary.
var spec struct {
	once   sync.Once
	raw    []byte
	doc    *openapi3.T
	router routers.Router
	err    error
}

// observed records "METHOD /path/template status" of every exchange checked,
// for TestOpenAPITour.
var observed sync.Map

// loadOpenAPI returns the validated document and a router over its paths.
func loadOpenAPI(t testing.TB) (*openapi3.T, routers.Router) {
	t.Helper()
	spec.once.Do(func() {
		spec.raw, spec.err = os.ReadFile(openapiFile)
		if spec.err != nil {
			return
		}
		loader := openapi3.NewLoader()
		spec.doc, spec.err = loader.LoadFromData(spec.raw)
		if spec.err != nil {
			return
		}
		if spec.err = spec.doc.Validate(loader.Context); spec.err != nil {
			return
		}
		// Route on paths alone: servers names a deployment, not the test
		// server's random port.
		spec.doc.Servers = nil
		spec.router, spec.err = gorillamux.NewRouter(spec.doc)
	})
	if spec.err != nil {
		t.Fatalf("%s: %v", openapiFile, spec.err)
	}
	return spec.doc, spec.router
}

// methodsOf lists the methods a path item documents, sorted.
func methodsOf(item *openapi3.PathItem) []string {
	var out []string
	for m := range item.Operations() {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}

// findPathItem finds the documented path that req's path matches, whatever
// its method.
func findPathItem(router routers.Router, req *http.Request) *openapi3.PathItem {
	probe := req.Clone(context.Background())
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		probe.Method = m
		if route, _, err := router.FindRoute(probe); err == nil {
			return route.PathItem
		}
	}
	return nil
}

// errorRoute is a route whose only response is the named component response:
// what the server answers to an unknown path or an unsupported method.
func errorRoute(doc *openapi3.T, req *http.Request, item *openapi3.PathItem, name string) *routers.Route {
	op := openapi3.NewOperation()
	op.Responses = openapi3.NewResponses(openapi3.WithStatus(http.StatusNotFound, doc.Components.Responses[name]))
	return &routers.Route{Spec: doc, Path: req.URL.Path, PathItem: item, Method: req.Method, Operation: op}
}

// checkOpenAPI validates one real exchange against the OpenAPI document: the
// route must be documented (a deliberately unknown path must answer the
// RouteNotFound envelope, an unsupported method MethodNotSupported with the
// documented methods in Allow), a successful request must match its
// operation, and every response — status, headers and body — must match the
// operation's response for that status. Requests that fail (4xx/5xx) are not
// validated: tests send malformed ones on purpose. Failures are reported with
// t.Errorf, so it may run on any goroutine.
func checkOpenAPI(t *testing.T, req *http.Request, res *response) {
	t.Helper()
	doc, router := loadOpenAPI(t)
	ctx := context.Background()
	if res.Request != nil { // after redirects, the request that was answered
		req = res.Request
	}
	where := req.Method + " " + req.URL.RequestURI()
	fail := func(format string, args ...any) {
		t.Helper()
		body := res.Body
		if len(body) > 2000 {
			body = append(body[:2000:2000], "…"...)
		}
		t.Errorf("openapi: %s → %d: %s\nresponse body: %s", where, res.StatusCode, fmt.Sprintf(format, args...), body)
	}

	// HEAD is answered on GET routes like GET, without a body.
	lookup := req.Clone(ctx)
	if req.Method == http.MethodHead {
		lookup.Method = http.MethodGet
	}
	route, params, err := router.FindRoute(lookup)
	known := err == nil
	switch {
	case known:
	case errors.Is(err, routers.ErrPathNotFound):
		// A path not in the document must be a deliberately unknown one.
		if res.StatusCode != http.StatusNotFound {
			fail("the path is not in %s", openapiFile)
			return
		}
		route = errorRoute(doc, req, nil, "RouteNotFound")
	case errors.Is(err, routers.ErrMethodNotAllowed):
		item := findPathItem(router, req)
		route = errorRoute(doc, req, item, "MethodNotSupported")
		if want := strings.Join(methodsOf(item), ", "); item != nil && res.Header.Get("Allow") != want {
			fail("Allow %q, but the document gives this path %q", res.Header.Get("Allow"), want)
		}
	default:
		fail("find route: %v", err)
		return
	}

	// The request as the server read it.
	vreq := lookup
	vreq.Body = http.NoBody
	var sent []byte
	if req.GetBody != nil {
		if rc, err := req.GetBody(); err == nil {
			sent, _ = io.ReadAll(rc)
			rc.Close()
		}
	}
	if len(sent) > 0 {
		vreq.Body = io.NopCloser(bytes.NewReader(sent))
		vreq.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(sent)), nil }
		if vreq.Header.Get("Content-Type") == "" {
			vreq.Header.Set("Content-Type", "application/json") // the server reads a body without a type as JSON
		}
	}
	opts := &openapi3filter.Options{
		AuthenticationFunc:    openapi3filter.NoopAuthenticationFunc, // authentication is tested on its own
		IncludeResponseStatus: true,
		MultiError:            true,
		SkipSettingDefaults:   true,
		ExcludeResponseBody:   req.Method == http.MethodHead,
	}
	in := &openapi3filter.RequestValidationInput{Request: vreq, PathParams: params, Route: route, Options: opts}
	if known && res.StatusCode < 400 {
		if err := openapi3filter.ValidateRequest(ctx, in); err != nil {
			fail("the request does not match the document: %v\nrequest body: %s", err, sent)
		}
		vreq.Body = http.NoBody
	}

	if known {
		observed.Store(req.Method+" "+route.Path+" "+strconv.Itoa(res.StatusCode), true)
	}
	out := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: res.StatusCode, Header: res.Header, Options: opts}
	out.SetBodyBytes(res.Body)
	if err := openapi3filter.ValidateResponse(ctx, out); err != nil {
		fail("the response does not match the document: %v", err)
	}
	if res.StatusCode >= 400 && req.Method != http.MethodHead {
		var env struct {
			RequestID string `json:"requestId"`
		}
		if err := json.Unmarshal(res.Body, &env); err != nil || env.RequestID != res.Header.Get("X-Request-Id") {
			fail("requestId %q differs from X-Request-Id %q", env.RequestID, res.Header.Get("X-Request-Id"))
		}
	}
}
