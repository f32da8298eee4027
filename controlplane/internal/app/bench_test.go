//go:build unix

package app_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/protocol"
)

// benchDefinition is a small workflow with one required input.
const benchDefinition = `{"version":1,"variables":[{"name":"username","type":"string","required":true},{"name":"password","type":"secret"}],
"steps":[{"type":"navigate","url":"http://127.0.0.1/login"},{"type":"type","selector":"#user","text":"{{username}}"},{"type":"type","selector":"#pw","text":"{{password}}"}]}`

// BenchmarkRunCreateHTTP measures POST /v1/workflows/{id}/runs → 201 over
// real HTTP (loopback, keep-alive) against the API on a SQLite file, with
// `clients` concurrent callers. Every creation uses its own workflow, made
// up front, so the timed operation is exactly one successful run creation
// (one active run per workflow is enforced). Reports creations/s and the
// p50/p99 latency of a request as the client sees it.
func BenchmarkRunCreateHTTP(b *testing.B) {
	for _, clients := range []int{1, 32} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) { benchRunCreate(b, clients) })
	}
}

func benchRunCreate(b *testing.B, clients int) {
	ctx := context.Background()
	st, err := sqlstore.Open(ctx, "sqlite://"+filepath.Join(b.TempDir(), "copelf.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	log := logrus.New()
	log.SetOutput(io.Discard)
	log.SetLevel(logrus.WarnLevel)
	log.SetFormatter(&logrus.JSONFormatter{})
	hs := httptest.NewServer(api.New(st, log, api.Config{RunCost: 1}))
	defer hs.Close()

	u, err := st.UserCreate(ctx, store.UserCreateParams{Email: "bench@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: u.ID, Amount: int64(b.N) + 1, Kind: store.LedgerGrant, Reason: "bench"}); err != nil {
		b.Fatal(err)
	}
	token, err := api.CreateToken(ctx, st, u.ID, store.TokenAPI, "bench")
	if err != nil {
		b.Fatal(err)
	}
	def, err := protocol.DecodeDefinition(json.RawMessage(benchDefinition))
	if err != nil {
		b.Fatal(err)
	}
	norm, err := json.Marshal(def)
	if err != nil {
		b.Fatal(err)
	}
	urls := make([]string, b.N)
	for i := range urls {
		wf, err := st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: u.ID, Name: fmt.Sprintf("bench %d", i), Status: protocol.WorkflowReady, Definition: norm})
		if err != nil {
			b.Fatal(err)
		}
		urls[i] = hs.URL + "/v1/workflows/" + wf.ID + "/runs"
	}
	body := []byte(`{"inputs":{"username":"ada","password":"hunter2"}}`)

	tr := &http.Transport{MaxIdleConns: 2 * clients, MaxIdleConnsPerHost: max(32, 2*clients), IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	create := func(url string) error {
		req, err := http.NewRequest("POST", url, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		res, err := c.Do(req)
		if err != nil {
			return err
		}
		raw, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil {
			return err
		}
		if res.StatusCode != http.StatusCreated {
			return fmt.Errorf("status %d: %s", res.StatusCode, raw)
		}
		return nil
	}
	// Warm one connection per client, outside the timing, with reads.
	var warm sync.WaitGroup
	for range clients {
		warm.Add(1)
		go func() {
			defer warm.Done()
			req, _ := http.NewRequest("GET", hs.URL+"/v1/me", nil)
			req.Header.Set("Authorization", "Bearer "+token)
			if res, err := c.Do(req); err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
		}()
	}
	warm.Wait()

	latencies := make([]time.Duration, b.N)
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				t0 := time.Now()
				if err := create(urls[i]); err != nil {
					if failed.Add(1) == 1 {
						b.Errorf("create run: %v", err)
					}
					continue
				}
				latencies[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()

	if failed.Load() > 0 {
		b.Fatalf("%d of %d creations failed", failed.Load(), b.N)
	}
	if c, err := st.CreditsGet(ctx, u.ID); err != nil || c.Held != int64(b.N) {
		b.Fatalf("after %d creations: credits %+v, %v", b.N, c, err)
	}
	slices.Sort(latencies)
	pct := func(p float64) float64 {
		i := min(len(latencies)-1, int(p*float64(len(latencies))))
		return float64(latencies[i].Microseconds()) / 1000
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "creations/s")
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	// The process's CPU time (server and clients) per creation: on 2 cores,
	// 1000 µs of it caps throughput at 2000 creations/s.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
}

// cpuTime is the CPU time (user and system) this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
