package api

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

// Redacted replaces secret values in every response.
const Redacted = "[redacted]"

type queueView struct {
	Reason protocol.QueueReason `json:"reason"`
	Since  time.Time            `json:"since"`
}

type costView struct {
	Reserved int64 `json:"reserved"`
	Charged  int64 `json:"charged"`
}

// runView is a run as the API shows it (API.md §5, §12).
type runView struct {
	ID              string             `json:"id"`
	AccountID       string             `json:"accountId"`
	WorkflowID      string             `json:"workflowId"`
	BatchID         *string            `json:"batchId,omitempty"`
	Iteration       *int               `json:"iteration,omitempty"`
	Status          protocol.RunStatus `json:"status"`
	Inputs          map[string]any     `json:"inputs"`
	Outputs         map[string]any     `json:"outputs"`
	Error           *protocol.Error    `json:"error,omitempty"`
	AgentID         *string            `json:"agentId,omitempty"`
	Attempt         int                `json:"attempt"`
	Steps           []store.StepRecord `json:"steps"`
	Queue           *queueView         `json:"queue,omitempty"`
	Labels          map[string]string  `json:"labels,omitempty"`
	QueueTimeoutMs  int64              `json:"queueTimeoutMs,omitempty"`
	Cost            costView           `json:"cost"`
	CancelRequested bool               `json:"cancelRequested,omitempty"`
	QueuedAt        time.Time          `json:"queuedAt"`
	StartedAt       *time.Time         `json:"startedAt,omitempty"`
	FinishedAt      *time.Time         `json:"finishedAt,omitempty"`
}

func optString(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// redactInputs hides the values of the run's secret inputs.
func redactInputs(inputs map[string]any, secrets []string) map[string]any {
	out := make(map[string]any, len(inputs))
	for k, v := range inputs {
		out[k] = v
	}
	for _, name := range secrets {
		if _, ok := out[name]; ok {
			out[name] = Redacted
		}
	}
	return out
}

// viewRun shows a run; a queued run's reason is live when agents are known.
func (s *Server) viewRun(r *store.Run) runView {
	v := viewRun(r)
	if v.Queue != nil && s.Agents != nil {
		v.Queue.Reason = s.Agents.QueueReason(r.AccountID, r.Labels)
	}
	return v
}

func viewRun(r *store.Run) runView {
	v := runView{
		ID: r.ID, AccountID: r.AccountID, WorkflowID: r.WorkflowID, BatchID: optString(r.BatchID), Iteration: r.Iteration,
		Status: r.Status, Inputs: redactInputs(r.Inputs, r.SecretNames), Outputs: r.Outputs, Error: r.Error, AgentID: optString(r.AgentID),
		Attempt: r.Attempt, Steps: r.Steps, Labels: r.Labels, QueueTimeoutMs: r.QueueTimeoutMs,
		Cost:            costView{Reserved: r.CostReserved, Charged: r.CostCharged},
		CancelRequested: r.CancelRequestedAt != nil && !r.Status.Terminal(),
		QueuedAt:        r.QueuedAt, StartedAt: r.StartedAt, FinishedAt: r.FinishedAt,
	}
	if v.Outputs == nil {
		v.Outputs = map[string]any{}
	}
	if v.Steps == nil {
		v.Steps = []store.StepRecord{}
	}
	if r.Status == protocol.RunQueued && r.QueueReason != "" {
		since := r.QueuedAt
		if r.QueueSince != nil {
			since = *r.QueueSince
		}
		v.Queue = &queueView{Reason: r.QueueReason, Since: since}
	}
	return v
}

// initialSteps is a run's step records before it starts.
func initialSteps(def *protocol.Definition) []store.StepRecord {
	steps := make([]store.StepRecord, len(def.Steps))
	for i, st := range def.Steps {
		steps[i] = store.StepRecord{Index: i, Type: st.Type, Status: protocol.StepPending}
	}
	return steps
}

// secretNames lists the definition's secret variables.
func secretNames(def *protocol.Definition) []string {
	var out []string
	for _, v := range def.Variables {
		if v.Type == protocol.VarSecret {
			out = append(out, v.Name)
		}
	}
	return out
}

// readyDefinition checks that a workflow can run and decodes its definition.
func readyDefinition(wf *store.Workflow) (*protocol.Definition, error) {
	if wf.Status != protocol.WorkflowReady {
		return nil, protocol.NewError(protocol.CodeWorkflowNotReady).With("status", wf.Status)
	}
	var def protocol.Definition
	if err := json.Unmarshal(wf.Definition, &def); err != nil {
		return nil, err
	}
	return &def, nil
}

type runBody struct {
	Inputs         map[string]any    `json:"inputs"`
	Labels         map[string]string `json:"labels"`
	QueueTimeoutMs *int64            `json:"queueTimeoutMs"`
}

// maxQueueTimeout bounds queueTimeoutMs (one week).
const maxQueueTimeout = 7 * 24 * time.Hour

// createRun: checks in the order of API.md §5 — auth, workflow exists, owner,
// ready, inputs valid, then (in the store's transaction) no active run or
// batch and credits.
func (s *Server) createRun(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
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
	var b runBody
	if err := decodeJSON(w, r, &b); err != nil {
		return err
	}
	inputs, err := def.ValidateInputs(b.Inputs)
	if err != nil {
		return err
	}
	var bad []protocol.FieldProblem
	if b.QueueTimeoutMs != nil && (*b.QueueTimeoutMs <= 0 || *b.QueueTimeoutMs > maxQueueTimeout.Milliseconds()) {
		bad = append(bad, protocol.FieldProblem{Field: "queueTimeoutMs", Problem: "must be between 1 and 604800000"})
	}
	bad = append(bad, checkLabels(b.Labels)...)
	if len(bad) > 0 {
		return protocol.FieldErrors(protocol.CodeUnprocessableEntity, "Some fields are invalid.", bad)
	}
	params := store.RunCreateParams{
		AccountID: p.AccountID(), WorkflowID: wf.ID, Inputs: inputs, SecretNames: secretNames(def), Steps: initialSteps(def),
		Labels: b.Labels, TimeoutMs: def.TimeoutMs, Cost: s.cfg.RunCost,
	}
	if b.QueueTimeoutMs != nil {
		params.QueueTimeoutMs = *b.QueueTimeoutMs
	}
	run, err := s.store.RunCreate(r.Context(), params)
	if err != nil {
		return err
	}
	addLogField(r.Context(), "runId", run.ID)
	if s.Hooks != nil {
		s.Hooks.RunQueued(r.Context(), run)
	}
	return writeJSON(w, http.StatusCreated, s.viewRun(run))
}

func checkLabels(labels map[string]string) []protocol.FieldProblem {
	var bad []protocol.FieldProblem
	if len(labels) > 32 {
		bad = append(bad, protocol.FieldProblem{Field: "labels", Problem: "must have at most 32 entries"})
	}
	for k, v := range labels {
		if k == "" || len(k) > 63 || len(v) > 255 {
			bad = append(bad, protocol.FieldProblem{Field: "labels." + k, Problem: "keys must be 1 to 63 bytes and values at most 255"})
		}
	}
	return bad
}

// visibleRun loads a run the principal may read (its own, or any as an
// operator).
func (s *Server) visibleRun(r *http.Request, p *Principal) (*store.Run, error) {
	id := r.PathValue("id")
	addLogField(r.Context(), "runId", id)
	run, err := s.store.RunGet(r.Context(), id)
	if err != nil {
		if protocol.ErrorCode(err) == protocol.CodeNotFound {
			return nil, protocol.Errorf(protocol.CodeNotFound, "The run does not exist.")
		}
		return nil, err
	}
	if err := owns(p, run.AccountID, true); err != nil {
		return nil, err
	}
	return run, nil
}

func (s *Server) getRun(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	run, err := s.visibleRun(r, p)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, s.viewRun(run))
}

func (s *Server) cancelRun(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	if _, err := s.visibleRun(r, p); err != nil {
		return err
	}
	run, err := s.store.RunCancel(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	if s.Hooks != nil {
		s.Hooks.RunChanged(r.Context(), run)
	}
	return writeJSON(w, http.StatusOK, s.viewRun(run))
}

func (s *Server) listRuns(w http.ResponseWriter, r *http.Request) error {
	p, err := s.auth(r)
	if err != nil {
		return err
	}
	page, err := pageFrom(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	params := store.RunListParams{AccountID: p.AccountID(), WorkflowID: q.Get("workflowId"), BatchID: q.Get("batchId"), Status: protocol.RunStatus(q.Get("status")), Page: page}
	if p.Can(store.RoleOperator) {
		params.AccountID = q.Get("accountId")
	} else if a := q.Get("accountId"); a != "" && a != p.AccountID() {
		return protocol.Errorf(protocol.CodeForbidden, "Only operators list other accounts' runs.").With("requiredRole", store.RoleOperator)
	}
	if params.Status != "" && !params.Status.Valid() {
		return badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "status", Problem: "must be a run status"})
	}
	items, next, err := s.store.RunList(r.Context(), params)
	if err != nil {
		return err
	}
	views := make([]runView, len(items))
	for i, run := range items {
		views[i] = s.viewRun(run)
	}
	return writeJSON(w, http.StatusOK, listBody(views, next))
}

// pageFrom reads ?limit= (1–500, default 50) and ?cursor=.
func pageFrom(r *http.Request) (store.Page, error) {
	q := r.URL.Query()
	page := store.Page{Cursor: q.Get("cursor"), Limit: 50}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 500 {
			return page, badRequest("A query parameter is invalid.", protocol.FieldProblem{Field: "limit", Problem: "must be a whole number from 1 to 500"})
		}
		page.Limit = n
	}
	return page, nil
}
