// Package cli is the copelf command-line client for users and operators. It
// speaks only the public HTTP API (and the protocol package's types).
package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/copelf/copelf/protocol"
)

// maxBody bounds one API answer the client reads.
const maxBody = 64 << 20

// Client calls the control plane's API.
type Client struct {
	Server string
	Token  string
	// HTTP makes requests (a 30 s timeout when nil); Stream holds event
	// streams open (no overall timeout when nil).
	HTTP   *http.Client
	Stream *http.Client
}

// APIError is an error envelope the server answered with.
type APIError struct {
	Status    int            `json:"-"`
	Code      protocol.Code  `json:"code"`
	Message   string         `json:"message"`
	RequestID string         `json:"requestId"`
	Details   map[string]any `json:"details"`
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s: %s (requestId %s)", e.Code, e.Message, e.RequestID)
}

// errNoStream: the server has no event stream at that path (it answered
// 404); the caller polls instead.
var errNoStream = errors.New("no event stream on this server")

func (c *Client) url(path string) string { return strings.TrimSuffix(c.Server, "/") + path }

func (c *Client) newRequest(ctx context.Context, method, path string, body any) (*http.Request, error) {
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path), rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	req.Header.Set("User-Agent", "copelf-cli")
	return req, nil
}

// Do sends a JSON request (body nil: none) and returns the answer's raw
// JSON, decoded into out as well when out is not nil. An error answer is
// returned as *APIError.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) (json.RawMessage, error) {
	req, err := c.newRequest(ctx, method, path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	res, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("cannot reach %s: %w", c.Server, err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(res.Body, maxBody+1))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer: %w", method, path, err)
	}
	if len(raw) > maxBody {
		return nil, fmt.Errorf("%s %s: the answer is larger than %d bytes", method, path, maxBody)
	}
	if res.StatusCode >= 400 {
		return nil, errorFrom(res, raw)
	}
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			return nil, fmt.Errorf("%s %s: the answer is not the expected JSON: %w", method, path, err)
		}
	}
	return raw, nil
}

// errorFrom turns an error answer into *APIError, or a plain error when the
// body is not an envelope (a proxy's page, say).
func errorFrom(res *http.Response, raw []byte) error {
	var e APIError
	if json.Unmarshal(raw, &e) == nil && e.Code != "" {
		e.Status = res.StatusCode
		if e.RequestID == "" {
			e.RequestID = res.Header.Get("X-Request-Id")
		}
		return &e
	}
	return fmt.Errorf("%s %s: HTTP %d without an error envelope", res.Request.Method, res.Request.URL.Path, res.StatusCode)
}

// OpenStream opens an event stream at path, resuming after lastEventID when
// set. A 404 answer is errNoStream; another error answer is *APIError. The
// caller closes the body.
func (c *Client) OpenStream(ctx context.Context, path, lastEventID string) (*http.Response, error) {
	req, err := c.newRequest(ctx, "GET", path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	hc := c.Stream
	if hc == nil {
		hc = &http.Client{}
	}
	res, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("cannot reach %s: %w", c.Server, err)
	}
	if res.StatusCode == http.StatusNotFound {
		res.Body.Close()
		return nil, errNoStream
	}
	if res.StatusCode >= 400 {
		defer res.Body.Close()
		raw, _ := io.ReadAll(io.LimitReader(res.Body, 1<<20))
		return nil, errorFrom(res, raw)
	}
	if mt, _, _ := mime.ParseMediaType(res.Header.Get("Content-Type")); res.StatusCode != http.StatusOK || mt != "text/event-stream" {
		res.Body.Close()
		return nil, errNoStream
	}
	return res, nil
}
