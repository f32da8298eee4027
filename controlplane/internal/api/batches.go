package api

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const (
	maxIterations       = 10_000
	maxBatchConcurrency = 100
)

type iterationView struct {
	Index  int            `json:"index"`
	Inputs map[string]any `json:"inputs"`
	RunID  *string        `json:"runId,omitempty"`
	Status string         `json:"status"`
}

type batchView struct {
	ID            string               `json:"id"`
	AccountID     string               `json:"accountId"`
	WorkflowID    string               `json:"workflowId"`
	Status        protocol.BatchStatus `json:"status"`
	Concurrency   int                  `json:"concurrency"`
	StopOnFailure bool                 `json:"stopOnFailure"`
	Counts        protocol.BatchCounts `json:"counts"`
	Iterations    []iterationView      `json:"iterations"`
	CreatedAt     time.Time            `json:"createdAt"`
	StartedAt     *time.Time           `json:"startedAt,omitempty"`
	FinishedAt    *time.Time           `json:"finishedAt,omitempty"`
}

func viewBatch(b *store.Batch, secrets []string) batchView {
	v := batchView{ID: b.ID, AccountID: b.AccountID, WorkflowID: b.WorkflowID, Status: b.Status, Concurrency: b.Concurrency,
		StopOnFailure: b.StopOnFailure, CreatedAt: b.CreatedAt, StartedAt: b.StartedAt, FinishedAt: b.FinishedAt,
		Iterations: make([]iterationView, len(b.Iterations))}
	for i, it := range b.Iterations {
		v.Iterations[i] = iterationView{Index: it.Index, Inputs: redactInputs(it.Inputs, secrets), RunID: optString(it.RunID), Status: it.Status}
		v.Counts.Add(it.Status)
	}
	return v
}

func requirePro(p *Principal) error {
	if p.User.Plan != store.PlanPro {
		return protocol.Errorf(protocol.CodeForbidden, "Batches need the pro plan.").With("requiredPlan", store.PlanPro)
	}
	return nil
}

type batchBody struct {
	Iterations []struct {
		Inputs map[string]any `json:"inputs"`
	} `json:"iterations"`
	Concurrency   *int  `json:"concurrency"`
	StopOnFailure *bool `json:"stopOnFailure"`
}

// createBatch takes JSON or text/csv (a header row of variable names; the
// query parameters concurrency and stopOnFailure apply to CSV).
func (s *Server) createBatch(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if err := requirePro(p); err != nil {
		return err
	}
	wf, err := s.ownWorkflow(r, p)
	if err != nil {
		return err
	}
	def, err := readyDefinition(wf)
	if err != nil {
		return err
	}
	params := store.BatchCreateParams{AccountID: p.AccountID(), WorkflowID: wf.ID, Concurrency: 1, SecretNames: secretNames(def)}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt == "text/csv" {
		params.Iterations, err = csvIterations(w, r, def)
		if err != nil {
			return err
		}
		q := r.URL.Query()
		if c := q.Get("concurrency"); c != "" {
			n, err := strconv.Atoi(c)
			if err != nil {
				return badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "concurrency", Problem: "must be a whole number"})
			}
			params.Concurrency = n
		}
		if v := q.Get("stopOnFailure"); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "stopOnFailure", Problem: "must be true or false"})
			}
			params.StopOnFailure = b
		}
	} else {
		var b batchBody
		if err := decodeJSON(w, r, &b); err != nil {
			return err
		}
		if b.Iterations == nil {
			return badRequest("Required fields are missing.", fieldRequired("iterations"))
		}
		if b.Concurrency != nil {
			params.Concurrency = *b.Concurrency
		}
		if b.StopOnFailure != nil {
			params.StopOnFailure = *b.StopOnFailure
		}
		var bad []protocol.FieldProblem
		for i, it := range b.Iterations {
			inputs, err := def.ValidateInputs(it.Inputs)
			if err != nil {
				bad = append(bad, prefixFields(err, fmt.Sprintf("iterations[%d].", i))...)
				continue
			}
			params.Iterations = append(params.Iterations, inputs)
		}
		if len(bad) > 0 {
			return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some iterations have invalid inputs.", bad)
		}
	}
	var bad []protocol.FieldProblem
	if n := len(params.Iterations); n == 0 || n > maxIterations {
		bad = append(bad, protocol.FieldProblem{Field: "iterations", Problem: fmt.Sprintf("must have 1 to %d entries", maxIterations)})
	}
	if params.Concurrency < 1 || params.Concurrency > maxBatchConcurrency {
		bad = append(bad, protocol.FieldProblem{Field: "concurrency", Problem: fmt.Sprintf("must be from 1 to %d", maxBatchConcurrency)})
	}
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	b, err := s.store.BatchCreate(r.Context(), params)
	if err != nil {
		return err
	}
	addLogField(r.Context(), "batchId", b.ID)
	if s.feed != nil {
		s.feed.Batch(b.ID) // a new batch shows on the event streams at once
	}
	return writeJSON(w, http.StatusCreated, viewBatch(b, secretNames(def)))
}

// prefixFields returns the field problems of a validation error with a prefix.
func prefixFields(err error, prefix string) []protocol.FieldProblem {
	var e *protocol.Error
	if !errors.As(err, &e) {
		return []protocol.FieldProblem{{Field: strings.TrimSuffix(prefix, "."), Problem: "is invalid"}}
	}
	fields, _ := e.Details["fields"].([]protocol.FieldProblem)
	if len(fields) == 0 {
		return []protocol.FieldProblem{{Field: strings.TrimSuffix(prefix, "."), Problem: e.Message}}
	}
	out := make([]protocol.FieldProblem, len(fields))
	for i, f := range fields {
		out[i] = protocol.FieldProblem{Field: prefix + f.Field, Problem: f.Problem}
	}
	return out
}

// csvIterations reads a CSV body: a header row of variable names, then one
// iteration per row, each value converted to its variable's type.
func csvIterations(w http.ResponseWriter, r *http.Request, def *protocol.Definition) ([]map[string]any, error) {
	cr := csv.NewReader(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	cr.ReuseRecord = false
	header, err := cr.Read()
	if err != nil {
		return nil, csvError(err, "header")
	}
	seen := map[string]bool{}
	for i, h := range header {
		h = strings.TrimSpace(strings.TrimPrefix(h, "\ufeff"))
		header[i] = h
		if h == "" || seen[h] {
			return nil, badRequest("The CSV header is invalid.", protocol.FieldProblem{Field: fmt.Sprintf("header[%d]", i), Problem: "must be a unique, non-empty variable name"})
		}
		seen[h] = true
	}
	var out []map[string]any
	var bad []protocol.FieldProblem
	for row := 0; ; row++ {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, csvError(err, fmt.Sprintf("rows[%d]", row))
		}
		if len(out)+len(bad) >= maxIterations {
			return nil, protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Too many rows.", []protocol.FieldProblem{{Field: "iterations", Problem: fmt.Sprintf("must have 1 to %d entries", maxIterations)}})
		}
		cells := make(map[string]string, len(header))
		for i, h := range header {
			cells[h] = rec[i]
		}
		inputs, err := def.InputsFromStrings(cells)
		if err != nil {
			bad = append(bad, prefixFields(err, fmt.Sprintf("iterations[%d].", row))...)
			continue
		}
		out = append(out, inputs)
	}
	if len(bad) > 0 {
		return nil, protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some rows have invalid inputs.", bad)
	}
	return out, nil
}

func csvError(err error, where string) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return jsonError(err)
	}
	if errors.Is(err, io.EOF) {
		return badRequest("The CSV body is empty; a header row is expected.").With("reason", "malformed_csv")
	}
	var pe *csv.ParseError
	if errors.As(err, &pe) {
		return badRequest(fmt.Sprintf("The CSV body is malformed at line %d: %v.", pe.Line, pe.Err)).With("reason", "malformed_csv").With("line", pe.Line)
	}
	return badRequest("The CSV body is malformed.").With("reason", "malformed_csv").With("at", where)
}

// ownBatch loads a batch the principal owns.
func (s *Server) ownBatch(r *http.Request, p *Principal) (*store.Batch, error) {
	id := r.PathValue("id")
	addLogField(r.Context(), "batchId", id)
	b, err := s.store.BatchGet(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if err := owns(p, b.AccountID, false); err != nil {
		return nil, err
	}
	return b, nil
}

// workflowSecrets returns the secret variable names of a workflow's current
// definition. It fails rather than answer without them: a batch's inputs
// must never be shown unredacted.
func (s *Server) workflowSecrets(ctx context.Context, workflowID string) ([]string, error) {
	wf, err := s.store.WorkflowGet(ctx, workflowID)
	if err != nil {
		return nil, err
	}
	var def protocol.Definition
	if err := json.Unmarshal(wf.Definition, &def); err != nil {
		return nil, err
	}
	return secretNames(&def), nil
}

// batchSecrets are the inputs a batch's views and runs redact: those secret
// when the batch was created and those secret in its workflow now (an input
// made secret later is hidden too; one made plain later stays hidden).
func batchSecrets(b *store.Batch, current []string) []string {
	out := slices.Clone(b.SecretNames)
	for _, n := range current {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// writeBatch answers with a batch, its secret inputs redacted.
func (s *Server) writeBatch(w http.ResponseWriter, r *http.Request, status int, b *store.Batch) error {
	current, err := s.workflowSecrets(r.Context(), b.WorkflowID)
	if err != nil {
		return err
	}
	return writeJSON(w, status, viewBatch(b, batchSecrets(b, current)))
}

func (s *Server) getBatch(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	b, err := s.ownBatch(r, p)
	if err != nil {
		return err
	}
	return s.writeBatch(w, r, http.StatusOK, b)
}

func (s *Server) listBatches(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	items, next, err := s.store.BatchList(r.Context(), p.AccountID(), page)
	if err != nil {
		return err
	}
	// Batches of one workflow share its current secret names: look each
	// workflow up once.
	secrets := map[string][]string{}
	views := make([]batchView, len(items))
	for i, b := range items {
		full, err := s.store.BatchGet(r.Context(), b.ID)
		if err != nil {
			return err
		}
		names, ok := secrets[full.WorkflowID]
		if !ok {
			if names, err = s.workflowSecrets(r.Context(), full.WorkflowID); err != nil {
				return err
			}
			secrets[full.WorkflowID] = names
		}
		views[i] = viewBatch(full, batchSecrets(full, names))
	}
	return writeJSON(w, http.StatusOK, listBody(views, next))
}

func (s *Server) startBatch(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if err := requirePro(p); err != nil {
		return err
	}
	b, err := s.ownBatch(r, p)
	if err != nil {
		return err
	}
	if b.Status == protocol.BatchCompleted {
		return protocol.NewError(protocol.CodeBatchAlreadyCompleted)
	}
	wf, err := s.store.WorkflowGet(r.Context(), b.WorkflowID)
	if err != nil {
		return err
	}
	if wf.DeletedAt != nil {
		return protocol.NewError(protocol.CodeWorkflowNotFound)
	}
	def, err := readyDefinition(wf)
	if err != nil {
		return err
	}
	secrets := batchSecrets(b, secretNames(def))
	started, err := s.store.BatchStart(r.Context(), store.BatchStartParams{ID: b.ID, Steps: initialSteps(def), SecretNames: secrets, TimeoutMs: def.TimeoutMs, Cost: s.cfg.RunCost})
	if err != nil {
		return err
	}
	if s.Hooks != nil {
		for _, it := range started.Iterations {
			if run, err := s.store.RunGet(r.Context(), it.RunID); err == nil {
				s.Hooks.RunQueued(r.Context(), run)
			}
		}
	}
	return writeJSON(w, http.StatusOK, viewBatch(started, secrets))
}

func (s *Server) cancelBatch(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if _, err := s.ownBatch(r, p); err != nil {
		return err
	}
	b, err := s.store.BatchCancel(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	// Agents holding the batch's runs are told at once (a cancel for running
	// runs; a queued run's assign is withdrawn).
	if s.Hooks != nil {
		for _, it := range b.Iterations {
			if it.RunID == "" {
				continue
			}
			if run, err := s.store.RunGet(r.Context(), it.RunID); err == nil {
				s.Hooks.RunChanged(r.Context(), run)
			}
		}
	}
	return s.writeBatch(w, r, http.StatusOK, b)
}

type resultView struct {
	Index   int             `json:"index"`
	RunID   *string         `json:"runId,omitempty"`
	Status  string          `json:"status"`
	Outputs map[string]any  `json:"outputs"`
	Error   *protocol.Error `json:"error,omitempty"`
}

// batchResults answers JSON, or CSV with ?format=csv or Accept: text/csv.
func (s *Server) batchResults(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	b, err := s.ownBatch(r, p)
	if err != nil {
		return err
	}
	results := make([]resultView, len(b.Iterations))
	keys := map[string]bool{}
	for i, it := range b.Iterations {
		out := it.Outputs
		if out == nil {
			out = map[string]any{}
		}
		results[i] = resultView{Index: it.Index, RunID: optString(it.RunID), Status: it.Status, Outputs: out, Error: it.Error}
		for k := range out {
			keys[k] = true
		}
	}
	if r.URL.Query().Get("format") != "csv" && !strings.Contains(r.Header.Get("Accept"), "text/csv") {
		return writeJSON(w, http.StatusOK, map[string]any{"batchId": b.ID, "status": b.Status, "items": results})
	}
	cols := make([]string, 0, len(keys))
	for k := range keys {
		cols = append(cols, k)
	}
	sort.Strings(cols)
	w.Header().Set("Content-Type", "text/csv; charset=utf-8")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", b.ID+"-results.csv"))
	cw := csv.NewWriter(w)
	_ = cw.Write(append([]string{"index", "runId", "status", "errorCode", "errorReason"}, cols...))
	for _, res := range results {
		row := []string{strconv.Itoa(res.Index), derefString(res.RunID), res.Status, "", ""}
		if res.Error != nil {
			row[3] = string(res.Error.Code)
			row[4], _ = res.Error.Details["reason"].(string)
		}
		for _, c := range cols {
			row = append(row, csvCell(res.Outputs[c]))
		}
		_ = cw.Write(row)
	}
	cw.Flush()
	return cw.Error()
}

func derefString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func csvCell(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		// A cell that a spreadsheet would run as a formula is quoted.
		if x != "" && strings.ContainsRune("=+-@\t\r", rune(x[0])) {
			return "'" + x
		}
		return x
	default:
		b, _ := json.Marshal(x)
		return string(b)
	}
}
