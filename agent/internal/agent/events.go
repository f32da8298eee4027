package agent

import (
	"bytes"
	"context"
	"net/http"
	"regexp"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/cenkalti/backoff/v4"
	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/protocol"
)

// Event frames stay well below the 1 MiB frame limit (a larger frame closes
// the connection, and the outbox would resend it forever).
const (
	maxEventBytes = protocol.MaxFrameBytes - 16<<10
	maxTextBytes  = 4096
)

// emitLocked gives ev the next seq of r's lease, keeps it in the outbox
// until acknowledged, and sends it when connected. Events of a dropped run
// are discarded.
func (a *Agent) emitLocked(r *run, ev *protocol.Event) {
	if r.dropped {
		return
	}
	ev.RunID, ev.LeaseID, ev.Seq = r.id, r.leaseID, r.nextSeq
	data, ok := sealEvent(ev, r.secrets, r.log)
	if !ok {
		return
	}
	r.nextSeq++
	r.outbox = append(r.outbox, outEvent{seq: ev.Seq, kind: ev.Kind, data: data})
	if a.conn != nil {
		a.conn.sendRaw(data)
	}
}

// sealEvent scrubs secret values from ev, fits it to the protocol's limits
// and encodes it. An event that cannot be made valid is dropped (logged).
func sealEvent(ev *protocol.Event, secrets []string, log logrus.FieldLogger) ([]byte, bool) {
	sc := scrubber(secrets)
	ev.Message = truncate(sc.str(ev.Message), maxTextBytes)
	if ev.Kind == protocol.EventApprovalRequested && strings.TrimSpace(ev.Message) == "" {
		ev.Message = "Approval requested."
	}
	ev.Error = sc.err(ev.Error)
	if ev.Error != nil {
		ev.Error.Message = truncate(ev.Error.Message, maxTextBytes)
		if !ev.Error.Code.Valid() {
			ev.Error.Code = protocol.CodeInternal
		}
	}
	ev.Output = sc.value(ev.Output)
	if ev.Outputs != nil {
		ev.Outputs = sc.value(ev.Outputs).(map[string]any)
	}
	if ev.Attempts > 11 {
		ev.Attempts = 11
	}
	if err := ev.Validate(); err != nil {
		log.WithError(err).WithField("kind", ev.Kind).Error("dropping an invalid event")
		return nil, false
	}
	data, err := protocol.EncodeFrame(ev)
	if err == nil && len(data) > maxEventBytes {
		log.WithFields(logrus.Fields{"kind": ev.Kind, "bytes": len(data)}).Warn("event too large; dropping its output values")
		ev.Output, ev.Outputs = nil, nil
		if ev.Error != nil {
			ev.Error = &protocol.Error{Code: ev.Error.Code, Message: ev.Error.Message}
		}
		data, err = protocol.EncodeFrame(ev)
	}
	if err != nil || len(data) > maxEventBytes {
		log.WithError(err).WithField("kind", ev.Kind).Error("dropping an event that cannot be encoded")
		return nil, false
	}
	return data, true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// scrubber replaces secret input values, longest first, in reported text.
type scrubber []string

func (s scrubber) str(v string) string {
	for _, sec := range s {
		if sec != "" && strings.Contains(v, sec) {
			v = strings.ReplaceAll(v, sec, protocol.RedactedValue)
		}
	}
	return v
}

func (s scrubber) value(v any) any {
	if len(s) == 0 || v == nil {
		return v
	}
	switch x := v.(type) {
	case string:
		return s.str(x)
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = s.value(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = s.value(e)
		}
		return out
	case []string:
		out := make([]string, len(x))
		for i, e := range x {
			out[i] = s.str(e)
		}
		return out
	}
	return v
}

func (s scrubber) err(e *protocol.Error) *protocol.Error {
	if e == nil {
		return nil
	}
	cp := *e
	cp.Message = s.str(e.Message)
	if e.Details != nil {
		cp.Details = s.value(e.Details).(map[string]any)
	}
	return &cp
}

// artifactNameRE is what the server accepts as an artifact name.
var artifactNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// artifactName makes name acceptable to the server.
func artifactName(name string) string {
	if artifactNameRE.MatchString(name) {
		return name
	}
	b := []byte(name)
	for i, c := range b {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	name = strings.TrimLeft(string(b), "._-")
	if name == "" {
		name = "artifact"
	}
	return truncate(name, 128)
}

// upload PUTs an artifact to the run's server with the run's lease,
// retrying transient failures (the server restarting, say) for up to
// Config.UploadTimeout.
func (a *Agent) upload(r *run, name, contentType string, data []byte) {
	name = artifactName(name)
	log := r.log.WithFields(logrus.Fields{"artifact": name, "bytes": len(data)})
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	attempt := 0
	op := func() error {
		attempt++
		a.mu.Lock()
		base := httpURL(a.base)
		a.mu.Unlock()
		ctx, cancel := context.WithTimeout(r.keep, 60*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, base.JoinPath("v1", "runs", r.id, "artifacts", name).String(), bytes.NewReader(data))
		if err != nil {
			return backoff.Permanent(err)
		}
		req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
		req.Header.Set("X-Copelf-Lease", r.leaseID)
		req.Header.Set("Content-Type", contentType)
		resp, err := a.http.Do(req)
		if err != nil {
			if r.keep.Err() != nil {
				return backoff.Permanent(context.Cause(r.keep))
			}
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return nil
		}
		return classify(responseError(resp))
	}
	expo := newBackoff(200*time.Millisecond, 5*time.Second)
	expo.MaxElapsedTime = a.cfg.UploadTimeout
	bo := backoff.WithContext(expo, r.keep)
	err := backoff.RetryNotify(op, bo, func(err error, d time.Duration) {
		log.WithError(err).WithField("retryIn", d.Round(time.Millisecond).String()).Warn("artifact upload failed; retrying")
	})
	if err != nil {
		log.WithError(err).WithField("attempts", attempt).Error("artifact not uploaded")
		return
	}
	log.Debug("artifact uploaded")
}
