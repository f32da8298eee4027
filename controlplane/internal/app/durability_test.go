//go:build unix

package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// buildCopelfd builds the real binary into dir.
func buildCopelfd(t *testing.T, dir string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		//lint:ignore SA1019 the fallback for a test run outside a Go-enabled PATH
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(dir, "copelfd")
	cmd := exec.Command(goTool, "build", "-o", bin, "github.com/copelf/copelf/controlplane/cmd/copelfd")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build copelfd: %v\n%s", err, out)
	}
	return bin
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// process is copelfd running as a child process.
type process struct {
	URL    string
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
	err    error // Wait's result, once exited is closed
}

// startProcess runs bin on dbFile with the admin token in its environment
// and waits until /healthz answers.
func startProcess(t *testing.T, bin, dir, adminToken string) *process {
	t.Helper()
	return startProcessOn(t, bin, "sqlite://"+filepath.Join(dir, "copelf.db"), dir, adminToken)
}

// startProcessOn is startProcess on the database at dbURL.
func startProcessOn(t *testing.T, bin, dbURL, dir, adminToken string) *process {
	t.Helper()
	addr := freeAddr(t)
	p := &process{URL: "http://" + addr, out: &syncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin,
		"-addr", addr,
		"-db", dbURL,
		"-data-dir", filepath.Join(dir, "data"),
		"-log-level", "warn",
		"-shutdown-timeout", "5s",
	)
	p.cmd.Env = append(os.Environ(), "COPELF_ADMIN_TOKEN="+adminToken)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
	})

	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if res, err := c.Get(p.URL + "/healthz"); err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-tick.C:
		case <-p.exited:
			t.Fatalf("copelfd exited before it was healthy: %v\n%s", p.err, p.out)
		case <-deadline.C:
			t.Fatalf("copelfd not healthy within %v\n%s", readyTimeout, p.out)
		}
	}
}

// signal sends sig and waits for the process to exit, at most within.
func (p *process) signal(t *testing.T, sig os.Signal, within time.Duration) (exitCode int, took time.Duration) {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(within):
		t.Fatalf("copelfd did not exit within %v of %v\n%s", within, sig, p.out)
	}
	return p.cmd.ProcessState.ExitCode(), time.Since(start)
}

// apiClient calls the API of a process; it returns an error instead of
// failing, so that it can be used from goroutines and across a kill.
type apiClient struct {
	c *http.Client
}

func newAPIClient(t *testing.T) *apiClient {
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	t.Cleanup(tr.CloseIdleConnections)
	return &apiClient{c: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// do sends a request. A transport error (no answer) is returned as err; a
// complete answer as its status and decoded JSON object.
func (a *apiClient) do(method, url, token string, body any) (int, map[string]any, error) {
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := a.c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		return 0, nil, err
	}
	var out map[string]any
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			return 0, nil, fmt.Errorf("%s %s: status %d, incomplete or non-JSON body: %w", method, url, res.StatusCode, err)
		}
	}
	return res.StatusCode, out, nil
}

// must is do for the test goroutine, expecting want.
func (a *apiClient) must(t *testing.T, want int, method, url, token string, body any) map[string]any {
	t.Helper()
	status, out, err := a.do(method, url, token, body)
	if err != nil {
		t.Fatal(err)
	}
	if status != want {
		t.Fatalf("%s %s: status %d, want %d: %v", method, url, status, want, out)
	}
	return out
}

// ackLog records what the server acknowledged (a complete 2xx answer) and
// what was in flight when it was killed (outcome unknown).
type ackLog struct {
	mu sync.Mutex
	// runs: run id → last acknowledged status; runInFlight: a cancel was
	// sent for the run and not answered.
	runs        map[string]string
	runInFlight map[string]bool
	// workflowCreateInFlight counts run creations never answered, per workflow.
	workflowCreateInFlight map[string]int
	grants                 map[string]int64 // ledger entry id → amount
	grantsInFlight         int64            // sum of unanswered grants
	writes                 atomic.Int64
}

// TestDurability runs the real binary: acknowledged writes survive SIGKILL,
// and SIGTERM stops it gracefully.
func TestDurability(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the copelfd binary")
	}
	unsetAdminToken(t)
	bin := buildCopelfd(t, t.TempDir())

	t.Run("SIGKILL loses no acknowledged write", func(t *testing.T) { testKillLosesNothing(t, bin) })
	t.Run("SIGTERM exits 0", func(t *testing.T) {
		dir := t.TempDir()
		p := startProcess(t, bin, dir, "copelf-durability-admin-token")
		a := newAPIClient(t)
		a.must(t, http.StatusOK, "GET", p.URL+"/v1/me", "copelf-durability-admin-token", nil)
		code, took := p.signal(t, syscall.SIGTERM, 10*time.Second)
		if code != 0 {
			t.Fatalf("exit status %d after SIGTERM (%v), want 0\n%s", code, p.err, p.out)
		}
		t.Logf("SIGTERM → exit 0 in %v", took)
	})
}

func testKillLosesNothing(t *testing.T, bin string) {
	const (
		adminToken = "copelf-durability-admin-token"
		workers    = 12 // one workflow each: create a run, cancel it, again
		granters   = 2
		killAfter  = 400 // acknowledged writes before each SIGKILL
		rounds     = 3   // start, load, SIGKILL; again on the same file
		grantStart = 100_000
	)
	dir := t.TempDir()
	p := startProcess(t, bin, dir, adminToken)
	a := newAPIClient(t)

	// Setup: a member with an API token, credits and workflows.
	user := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/users", adminToken,
		map[string]any{"email": "load@example.com", "password": "load-password", "plan": "pro"})
	userID := user["id"].(string)
	sess := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/sessions", "", map[string]any{"email": "load@example.com", "password": "load-password"})
	tok := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/tokens", sess["token"].(string), map[string]any{"name": "load", "kind": "api"})
	token := tok["token"].(string)
	a.must(t, http.StatusCreated, "POST", p.URL+"/v1/accounts/"+userID+"/credits", adminToken, map[string]any{"amount": grantStart, "reason": "load test"})
	def := json.RawMessage(`{"version":1,"variables":[{"name":"n","type":"number","required":true}],"steps":[{"type":"navigate","url":"http://127.0.0.1/{{n}}"}]}`)
	workflows := make([]string, workers)
	for i := range workflows {
		wf := a.must(t, http.StatusCreated, "POST", p.URL+"/v1/workflows", token, map[string]any{"name": fmt.Sprintf("load %d", i), "definition": def})
		workflows[i] = wf["id"].(string)
	}

	acks := &ackLog{runs: map[string]string{}, runInFlight: map[string]bool{}, workflowCreateInFlight: map[string]int{}, grants: map[string]int64{}}
	for round := 1; round <= rounds; round++ {
		if round > 1 {
			p = startProcess(t, bin, dir, adminToken)
		}
		before := acks.writes.Load()
		loadAndKill(t, p, a, acks, loadParams{token: token, adminToken: adminToken, userID: userID, workflows: workflows, granters: granters, killAfter: killAfter})
		t.Logf("round %d: %d writes acknowledged before SIGKILL; in flight at the kills so far: %d run creations, %d cancels, %d credits of grants",
			round, acks.writes.Load()-before, sumInts(acks.workflowCreateInFlight), len(acks.runInFlight), acks.grantsInFlight)
	}

	// Restart on the same file: every acknowledged write is there.
	p2 := startProcess(t, bin, dir, adminToken)
	queued := 0
	for id, want := range acks.runs {
		run := a.must(t, http.StatusOK, "GET", p2.URL+"/v1/runs/"+id, token, nil)
		got := run["status"].(string)
		switch {
		case got == want:
		case want == "queued" && got == "cancelled" && acks.runInFlight[id]:
			// The cancel was in flight at the kill: it may have committed.
		default:
			t.Errorf("run %s: status %q after restart, acknowledged %q", id, got, want)
		}
		if got == "queued" {
			queued++
		}
	}
	// Runs created but never acknowledged may exist too; count every queued
	// run of the account and check one active run per workflow.
	allQueued := 0
	for _, wf := range workflows {
		q := url.Values{"workflowId": {wf}, "status": {"queued"}, "limit": {"500"}}
		list := a.must(t, http.StatusOK, "GET", p2.URL+"/v1/runs?"+q.Encode(), token, nil)
		items := list["items"].([]any)
		if len(items) > 1 {
			t.Errorf("workflow %s has %d queued runs after restart", wf, len(items))
		}
		allQueued += len(items)
		if len(items) == 1 {
			id := items[0].(map[string]any)["id"].(string)
			if _, ok := acks.runs[id]; !ok && acks.workflowCreateInFlight[wf] == 0 {
				t.Errorf("queued run %s on %s was never requested", id, wf)
			}
		}
	}
	if allQueued < queued {
		t.Errorf("%d queued runs listed, %d acknowledged queued runs", allQueued, queued)
	}

	// Credits: every queued run holds its cost, cancelled ones hold nothing
	// and cost nothing; the balance is what was granted.
	var granted int64
	for _, amt := range acks.grants {
		granted += amt
	}
	credits := a.must(t, http.StatusOK, "GET", p2.URL+"/v1/credits", token, nil)
	balance, held := int64(credits["balance"].(float64)), int64(credits["held"].(float64))
	if held != int64(allQueued) {
		t.Errorf("held %d, want %d (one per queued run)", held, allQueued)
	}
	if lo, hi := grantStart+granted, grantStart+granted+acks.grantsInFlight; balance < lo || balance > hi {
		t.Errorf("balance %d, want %d..%d (acknowledged grants, plus those in flight)", balance, lo, hi)
	}
	ledger := map[string]bool{}
	for cursor := ""; ; {
		q := url.Values{"limit": {"500"}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		page := a.must(t, http.StatusOK, "GET", p2.URL+"/v1/credits/ledger?"+q.Encode(), token, nil)
		for _, it := range page["items"].([]any) {
			ledger[it.(map[string]any)["id"].(string)] = true
		}
		next, _ := page["nextCursor"].(string)
		if next == "" {
			break
		}
		cursor = next
	}
	for id := range acks.grants {
		if !ledger[id] {
			t.Errorf("acknowledged grant %s is missing from the ledger", id)
		}
	}

	// The restarted server takes writes: cancel what is queued; held goes
	// back to zero and the balance does not move.
	for _, wf := range workflows {
		q := url.Values{"workflowId": {wf}, "status": {"queued"}}
		for _, it := range a.must(t, http.StatusOK, "GET", p2.URL+"/v1/runs?"+q.Encode(), token, nil)["items"].([]any) {
			a.must(t, http.StatusOK, "POST", p2.URL+"/v1/runs/"+it.(map[string]any)["id"].(string)+"/cancel", token, nil)
		}
	}
	credits = a.must(t, http.StatusOK, "GET", p2.URL+"/v1/credits", token, nil)
	if got := int64(credits["held"].(float64)); got != 0 {
		t.Errorf("held %d after cancelling every queued run", got)
	}
	if got := int64(credits["balance"].(float64)); got != balance {
		t.Errorf("balance %d after cancelling queued runs, was %d", got, balance)
	}
	if code, _ := p2.signal(t, syscall.SIGTERM, 10*time.Second); code != 0 {
		t.Fatalf("exit status %d after SIGTERM (%v)\n%s", code, p2.err, p2.out)
	}

	// The store's own view after the final stop: the ledger sums to the
	// balance, nothing is held.
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(dir, "copelf.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sum, err := st.LedgerSum(ctx, userID)
	if err != nil {
		t.Fatal(err)
	}
	c, err := st.CreditsGet(ctx, userID)
	if err != nil {
		t.Fatal(err)
	}
	if sum != c.Balance || c.Balance != balance || c.Held != 0 {
		t.Errorf("store: ledger sum %d, balance %d (API said %d), held %d", sum, c.Balance, balance, c.Held)
	}
	runs, _, err := st.RunList(ctx, store.RunListParams{AccountID: userID, Status: protocol.RunQueued, Page: store.Page{Limit: 500}})
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 0 {
		t.Errorf("store: %d queued runs left", len(runs))
	}
	for id, want := range acks.runs {
		r, err := st.RunGet(ctx, id)
		if err != nil {
			t.Errorf("store: run %s: %v", id, err)
			continue
		}
		if want == "cancelled" && r.Status != protocol.RunCancelled {
			t.Errorf("store: run %s is %s, acknowledged cancelled", id, r.Status)
		}
	}
}

func sumInts(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

type loadParams struct {
	token, adminToken, userID string
	workflows                 []string
	granters                  int
	killAfter                 int64
}

// loadAndKill fires acknowledged writes at p from concurrent goroutines, one
// per workflow (create a run, cancel it, again) plus granters (admin credit
// grants), and SIGKILLs p once killAfter writes are acknowledged, while the
// stream goes on. Every complete 2xx answer is recorded in acks; requests
// that got no answer are recorded as in flight.
func loadAndKill(t *testing.T, p *process, a *apiClient, acks *ackLog, lp loadParams) {
	t.Helper()
	var killed atomic.Bool
	killNow := make(chan struct{})
	var killOnce sync.Once
	var n atomic.Int64
	acked := func() {
		acks.writes.Add(1)
		if n.Add(1) == lp.killAfter {
			killOnce.Do(func() { close(killNow) })
		}
	}
	unexpected := make(chan string, len(lp.workflows)+lp.granters)
	fail := func(format string, args ...any) {
		select {
		case unexpected <- fmt.Sprintf(format, args...):
		default:
		}
	}
	var wg sync.WaitGroup
	for _, wf := range lp.workflows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; !killed.Load(); n++ {
				status, run, err := a.do("POST", p.URL+"/v1/workflows/"+wf+"/runs", lp.token, map[string]any{"inputs": map[string]any{"n": n}})
				if err != nil {
					if !killed.Load() {
						fail("create run before the kill: %v", err)
					}
					acks.mu.Lock()
					acks.workflowCreateInFlight[wf]++
					acks.mu.Unlock()
					return
				}
				var id string
				switch {
				case status == http.StatusCreated && run["status"] == "queued":
					id = run["id"].(string)
					acks.mu.Lock()
					acks.runs[id] = "queued"
					acks.mu.Unlock()
					acked()
				case status == http.StatusConflict && run["code"] == "workflow_already_running":
					// A run left queued by an earlier kill: cancel it.
					details, _ := run["details"].(map[string]any)
					id, _ = details["runId"].(string)
					if id == "" {
						fail("workflow_already_running without details.runId: %v", run)
						return
					}
				default:
					fail("create run: status %d: %v", status, run)
					return
				}

				status, run, err = a.do("POST", p.URL+"/v1/runs/"+id+"/cancel", lp.token, nil)
				if err != nil {
					if !killed.Load() {
						fail("cancel run before the kill: %v", err)
					}
					acks.mu.Lock()
					acks.runInFlight[id] = true
					acks.mu.Unlock()
					return
				}
				if status != http.StatusOK || run["status"] != "cancelled" {
					fail("cancel run %s: status %d: %v", id, status, run)
					return
				}
				acks.mu.Lock()
				acks.runs[id] = "cancelled"
				acks.mu.Unlock()
				acked()
			}
		}()
	}
	for g := 0; g < lp.granters; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; !killed.Load(); n++ {
				amount := int64(1 + (n+g)%3)
				status, body, err := a.do("POST", p.URL+"/v1/accounts/"+lp.userID+"/credits", lp.adminToken, map[string]any{"amount": amount, "reason": fmt.Sprintf("grant %d/%d", g, n)})
				if err != nil {
					if !killed.Load() {
						fail("grant before the kill: %v", err)
					}
					acks.mu.Lock()
					acks.grantsInFlight += amount
					acks.mu.Unlock()
					return
				}
				entry, _ := body["entry"].(map[string]any)
				if status != http.StatusCreated || entry == nil {
					fail("grant: status %d: %v", status, body)
					return
				}
				acks.mu.Lock()
				acks.grants[entry["id"].(string)] = amount
				acks.mu.Unlock()
				acked()
			}
		}()
	}

	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-killNow:
	case <-allDone: // every goroutine failed: reported below
	case <-time.After(120 * time.Second):
	}
	killed.Store(true)
	p.signal(t, syscall.SIGKILL, 10*time.Second)
	select {
	case <-allDone:
	case <-time.After(60 * time.Second):
		t.Fatal("load goroutines did not stop after the kill")
	}
	close(unexpected)
	for msg := range unexpected {
		t.Error(msg)
	}
	if t.Failed() {
		t.FailNow()
	}
	if n.Load() < lp.killAfter {
		t.Fatalf("only %d writes acknowledged before the kill", n.Load())
	}
}
