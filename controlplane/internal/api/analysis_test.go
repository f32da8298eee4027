package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/controlplane/internal/store/sqlstore"
	"github.com/copelf/copelf/controlplane/internal/video"
	"github.com/copelf/copelf/protocol"
)

func init() {
	// Video bodies (downloads, multipart parts) are checked as files.
	for _, ct := range []string{"video/mp4", "video/quicktime", "video/webm", "video/x-matroska"} {
		openapi3filter.RegisterBodyDecoder(ct, openapi3filter.FileBodyDecoder)
	}
}

// testVideos is the repository's testdata/videos: real recordings of a few
// KB, made once with ffmpeg and Chromium's MediaRecorder.
const testVideos = "../../../testdata/videos"

func readTestVideo(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testVideos, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// multipartUpload is a multipart/form-data body with the fields given (a
// nil value leaves the field out) and its content type.
func multipartUpload(t testing.TB, name *string, filename string, data []byte) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	if name != nil {
		if err := mw.WriteField("name", *name); err != nil {
			t.Fatal(err)
		}
	}
	if data != nil {
		fw, err := mw.CreateFormFile("video", filename)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), mw.FormDataContentType()
}

func strPtr(s string) *string { return &s }

// upload posts a recording as a new workflow.
func (e *env) upload(token, name string, data []byte) *response {
	e.t.Helper()
	body, ct := multipartUpload(e.t, &name, name, data)
	return e.do(request{Method: "POST", Path: "/v1/workflows", Token: token, Body: body, Header: map[string]string{"Content-Type": ct}})
}

// analyzerToken has the admin create a token of kind analyzer.
func (e *env) analyzerToken(name string) string {
	e.t.Helper()
	r := e.post("/v1/tokens", e.Admin, map[string]any{"name": name, "kind": "analyzer"})
	expectStatus(e.t, r, http.StatusCreated)
	return r.Map(e.t)["token"].(string)
}

// videoFiles lists the video store's directory, temporary uploads included.
func videoFiles(t testing.TB, dataDir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dataDir, "videos"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func wantVideoFiles(t testing.TB, dataDir string, n int) []string {
	t.Helper()
	files := videoFiles(t, dataDir)
	if len(files) != n {
		t.Fatalf("video store holds %v, want %d file(s)", files, n)
	}
	for _, f := range files {
		if strings.HasPrefix(f, ".") {
			t.Fatalf("a temporary upload is left: %v", files)
		}
	}
	return files
}

type workflowJSON struct {
	ID         string          `json:"id"`
	AccountID  string          `json:"accountId"`
	Status     string          `json:"status"`
	Definition json.RawMessage `json:"definition"`
	ClaimID    string          `json:"claimId"`
	Video      *struct {
		SizeBytes  int64  `json:"sizeBytes"`
		DurationMs int64  `json:"durationMs"`
		Container  string `json:"container"`
	} `json:"video"`
	Analysis *struct {
		StartedAt  time.Time  `json:"startedAt"`
		FinishedAt *time.Time `json:"finishedAt"`
		Error      *struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	} `json:"analysis"`
}

func decodeWorkflow(t testing.TB, r *response) workflowJSON {
	t.Helper()
	var w workflowJSON
	if err := json.Unmarshal(r.Body, &w); err != nil {
		t.Fatalf("decode workflow: %v\n%s", err, r.Body)
	}
	return w
}

func wantReason(t testing.TB, e *protocol.Error, reason string) {
	t.Helper()
	if got, _ := e.Details["reason"].(string); got != reason {
		t.Fatalf("details.reason = %q, want %q (%+v)", got, reason, e)
	}
}

// TestRecordedWorkflow follows a recording from upload to a queued run: a
// 20-second MP4 is analyzing, an analyzer claims it, downloads it (whole
// and by ranges), posts an invalid then a valid definition, the workflow
// is ready and a run is queued.
func TestRecordedWorkflow(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir})
	owner := e.newUser(store.RoleMember, store.PlanPro, 10)
	other := e.newUser(store.RoleMember, store.PlanPro, 10)
	analyzer := e.analyzerToken("analyzer-1")
	mp4 := readTestVideo(t, "sample-20s.mp4")

	r := e.upload(owner.Token, "checkout", mp4)
	expectStatus(t, r, http.StatusCreated)
	wf := decodeWorkflow(t, r)
	if wf.Status != "analyzing" || string(wf.Definition) != "null" || wf.Video == nil || wf.Analysis == nil {
		t.Fatalf("uploaded workflow: %s", r.Body)
	}
	if wf.Video.SizeBytes != int64(len(mp4)) || wf.Video.DurationMs != 20_000 || wf.Video.Container != "mp4" {
		t.Errorf("video = %+v, want %d bytes, 20000 ms, mp4", *wf.Video, len(mp4))
	}
	if wf.Analysis.FinishedAt != nil || wf.Analysis.Error != nil || time.Since(wf.Analysis.StartedAt) > time.Minute {
		t.Errorf("analysis = %s", r.Body)
	}
	wantVideoFiles(t, dataDir, 1)

	// Not runnable yet.
	er := expectError(t, e.post("/v1/workflows/"+wf.ID+"/runs", owner.Token, goodInputs()), protocol.CodeWorkflowNotReady)
	if er.Details["status"] != "analyzing" {
		t.Errorf("details = %v", er.Details)
	}

	// The analyzer's queue: every account's waiting recordings, oldest first.
	r = e.get("/v1/analysis/workflows", analyzer)
	expectStatus(t, r, http.StatusOK)
	ids, _ := listIDs(t, r)
	if !contains(ids, wf.ID) {
		t.Fatalf("waiting = %v, want %s", ids, wf.ID)
	}
	var list struct {
		Items []workflowJSON `json:"items"`
	}
	r.JSON(t, &list)
	if list.Items[0].AccountID != owner.ID {
		t.Errorf("accountId = %q, want %q", list.Items[0].AccountID, owner.ID)
	}
	expectError(t, e.get("/v1/analysis/workflows", owner.Token), protocol.CodeForbidden)

	// Claim; a second analyzer is refused.
	r = e.post("/v1/workflows/"+wf.ID+"/analysis/claim", analyzer, nil)
	expectStatus(t, r, http.StatusOK)
	claimed := decodeWorkflow(t, r)
	if claimed.ClaimID == "" || claimed.Status != "analyzing" {
		t.Fatalf("claim: %s", r.Body)
	}
	second := e.analyzerToken("analyzer-2")
	wantReason(t, expectError(t, e.post("/v1/workflows/"+wf.ID+"/analysis/claim", second, nil), protocol.CodeConflict), "already_claimed")
	if ids, _ := listIDs(t, e.get("/v1/analysis/workflows", analyzer)); contains(ids, wf.ID) {
		t.Errorf("a claimed workflow is still waiting: %v", ids)
	}

	// Download: whole, by ranges, conditionally; the owner too, no one else.
	r = e.get("/v1/workflows/"+wf.ID+"/video", analyzer)
	expectStatus(t, r, http.StatusOK)
	if !bytes.Equal(r.Body, mp4) || r.Header.Get("Content-Type") != "video/mp4" {
		t.Fatalf("video: %d bytes, %s", len(r.Body), r.Header.Get("Content-Type"))
	}
	r = e.do(request{Method: "GET", Path: "/v1/workflows/" + wf.ID + "/video", Token: analyzer, Header: map[string]string{"Range": "bytes=100-199"}})
	expectStatus(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.Body, mp4[100:200]) || r.Header.Get("Content-Range") != fmt.Sprintf("bytes 100-199/%d", len(mp4)) {
		t.Errorf("range: %q, %d bytes", r.Header.Get("Content-Range"), len(r.Body))
	}
	r = e.do(request{Method: "GET", Path: "/v1/workflows/" + wf.ID + "/video", Token: analyzer, Header: map[string]string{"Range": fmt.Sprintf("bytes=-%d", 10)}})
	expectStatus(t, r, http.StatusPartialContent)
	if !bytes.Equal(r.Body, mp4[len(mp4)-10:]) {
		t.Errorf("suffix range: %d bytes", len(r.Body))
	}
	etag := e.get("/v1/workflows/"+wf.ID+"/video", owner.Token).Header.Get("ETag")
	expectStatus(t, e.do(request{Method: "GET", Path: "/v1/workflows/" + wf.ID + "/video", Token: owner.Token, Header: map[string]string{"If-None-Match": etag}}), http.StatusNotModified)
	wantReason(t, expectError(t, e.do(request{Method: "GET", Path: "/v1/workflows/" + wf.ID + "/video", Token: analyzer,
		Header: map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(mp4)+10)}}), protocol.CodeBadRequest), "range_not_satisfiable")
	expectError(t, e.get("/v1/workflows/"+wf.ID+"/video", other.Token), protocol.CodeForbidden)

	// An invalid definition is refused like any other; then the real one.
	bad := map[string]any{"definition": map[string]any{"version": 1, "variables": []any{map[string]any{"name": "env", "type": "string"}}, "steps": []any{}}}
	er = expectError(t, e.post("/v1/workflows/"+wf.ID+"/analysis", analyzer, bad), protocol.CodeUnprocessableEntity)
	if !hasField(t, er, "definition.variables[0].name") {
		t.Errorf("fields = %v", fieldNames(t, er))
	}
	r = e.post("/v1/workflows/"+wf.ID+"/analysis", analyzer, map[string]any{"claimId": claimed.ClaimID, "definition": json.RawMessage(sampleDefinition)})
	expectStatus(t, r, http.StatusOK)
	ready := decodeWorkflow(t, r)
	if ready.Status != "ready" || ready.Analysis == nil || ready.Analysis.FinishedAt == nil || ready.Analysis.Error != nil || string(ready.Definition) == "null" {
		t.Fatalf("after the analysis: %s", r.Body)
	}
	wantReason(t, expectError(t, e.post("/v1/workflows/"+wf.ID+"/analysis", analyzer, map[string]any{"definition": json.RawMessage(sampleDefinition)}), protocol.CodeConflict), "not_analyzing")

	// Runnable now.
	r = e.post("/v1/workflows/"+wf.ID+"/runs", owner.Token, goodInputs())
	expectStatus(t, r, http.StatusCreated)
	if st := r.Map(t)["status"]; st != "queued" {
		t.Errorf("run status %v", st)
	}
	got := decodeWorkflow(t, e.get("/v1/workflows/"+wf.ID, owner.Token))
	if got.Video == nil || got.Video.DurationMs != 20_000 || got.Analysis == nil || got.Analysis.FinishedAt == nil {
		t.Errorf("workflow: %+v", got)
	}
}

// TestRecordingLimits: long recordings, other formats, garbage and cut
// files are refused with their reason, and nothing of them is kept.
func TestRecordingLimits(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	mp4 := readTestVideo(t, "sample-20s.mp4")
	webm := readTestVideo(t, "sample-20s.webm")
	for _, tc := range []struct {
		name   string
		data   []byte
		reason string
	}{
		{"long-16min.mp4", readTestVideo(t, "long-16min.mp4"), "video_too_long"},
		{"long-16min.webm", readTestVideo(t, "long-16min.webm"), "video_too_long"},
		{"garbage.mp4", bytes.Repeat([]byte("garbage "), 4000), "unsupported_video"},
		{"empty.mp4", []byte{}, "unsupported_video"},
		{"picture.png", append([]byte("\x89PNG\r\n\x1a\n"), mp4[8:]...), "unsupported_video"},
		{"cut.mp4", mp4[:len(mp4)/2], "unsupported_video"},
		{"cut-header.mp4", mp4[:40], "unsupported_video"},
		{"cut.webm", webm[:len(webm)*2/3], "unsupported_video"},
		{"cut-header.webm", webm[:30], "unsupported_video"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := e.forT(t)
			er := expectError(t, e.upload(u.Token, tc.name, tc.data), protocol.CodeUnprocessableEntity)
			wantReason(t, er, tc.reason)
			if tc.reason == "video_too_long" {
				if er.Details["durationMs"] != float64(960_000) || er.Details["maxDurationMs"] != float64(900_000) {
					t.Errorf("details = %v", er.Details)
				}
			}
			wantVideoFiles(t, dataDir, 0)
		})
	}

	// Malformed requests.
	body, ct := multipartUpload(t, nil, "v.mp4", mp4)
	er := expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Token: u.Token, Body: body, Header: map[string]string{"Content-Type": ct}}), protocol.CodeBadRequest)
	if !hasField(t, er, "name") {
		t.Errorf("fields = %v", fieldNames(t, er))
	}
	body, ct = multipartUpload(t, strPtr("no video"), "", nil)
	er = expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Token: u.Token, Body: body, Header: map[string]string{"Content-Type": ct}}), protocol.CodeBadRequest)
	if !hasField(t, er, "video") {
		t.Errorf("fields = %v", fieldNames(t, er))
	}
	body, ct = multipartUpload(t, strPtr("  "), "v.mp4", mp4)
	er = expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Token: u.Token, Body: body, Header: map[string]string{"Content-Type": ct}}), protocol.CodeUnprocessableEntity)
	if !hasField(t, er, "name") {
		t.Errorf("fields = %v", fieldNames(t, er))
	}
	wantReason(t, expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Token: u.Token, Body: "not multipart",
		Header: map[string]string{"Content-Type": "multipart/form-data"}}), protocol.CodeBadRequest), "malformed_multipart")
	wantReason(t, expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Token: u.Token, Body: "--x\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nabc",
		Header: map[string]string{"Content-Type": "multipart/form-data; boundary=x"}}), protocol.CodeBadRequest), "upload_incomplete")
	expectError(t, e.do(request{Method: "POST", Path: "/v1/workflows", Body: body, Header: map[string]string{"Content-Type": ct}}), protocol.CodeUnauthenticated)
	wantVideoFiles(t, dataDir, 0)
}

// TestMediaRecorderDuration: Chromium's MediaRecorder writes WebM without a
// Duration element; the duration is measured from the blocks.
func TestMediaRecorderDuration(t *testing.T) {
	e := newEnv(t, api.Config{DataDir: t.TempDir()})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	r := e.upload(u.Token, "recorded in the browser", readTestVideo(t, "mediarecorder-12s.webm"))
	expectStatus(t, r, http.StatusCreated)
	wf := decodeWorkflow(t, r)
	// The recorder ran 12,004 ms (measured in the page when it was made).
	if d := wf.Video.DurationMs - 12_004; d < -1000 || d > 1000 || wf.Video.Container != "webm" {
		t.Errorf("video = %+v, want webm of 12004 ± 1000 ms", *wf.Video)
	}
	r = e.get("/v1/workflows/"+wf.ID+"/video", u.Token)
	expectStatus(t, r, http.StatusOK)
	if r.Header.Get("Content-Type") != "video/webm" {
		t.Errorf("content type %q", r.Header.Get("Content-Type"))
	}
}

// zeroReader yields zero bytes forever.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

const testBoundary = "copelf-test-boundary-7f3a9c"

// streamedUpload is a multipart upload whose video part is file (the
// video's first bytes) followed by zeros up to size bytes, made on the
// fly: nothing of it is held in memory.
func streamedUpload(file []byte, size int64) (io.Reader, int64) {
	head := "--" + testBoundary + "\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig recording\r\n" +
		"--" + testBoundary + "\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\nContent-Type: video/mp4\r\n\r\n"
	tail := "\r\n--" + testBoundary + "--\r\n"
	body := io.MultiReader(strings.NewReader(head), bytes.NewReader(file), io.LimitReader(zeroReader{}, size-int64(len(file))), strings.NewReader(tail))
	return body, int64(len(head)) + size + int64(len(tail))
}

// paddedMP4Head is a real MP4 followed by the header of a free box that
// fills the file up to size bytes.
func paddedMP4Head(t testing.TB, size int64) []byte {
	mp4 := readTestVideo(t, "sample-20s.mp4")
	free := make([]byte, 8)
	binary.BigEndian.PutUint32(free, uint32(size-int64(len(mp4))))
	copy(free[4:], "free")
	return append(mp4, free...)
}

// heapPeak samples the heap until stop is closed and returns the highest
// HeapInuse seen.
func heapPeak(stop <-chan struct{}) <-chan uint64 {
	out := make(chan uint64, 1)
	go func() {
		var peak uint64
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapInuse)
			select {
			case <-stop:
				out <- peak
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// sendStreamed posts a streamed upload and measures the heap meanwhile.
func sendStreamed(t *testing.T, e *env, token string, body io.Reader, length int64) (*http.Response, []byte, uint64) {
	t.Helper()
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	stop := make(chan struct{})
	peak := heapPeak(stop)
	req, err := http.NewRequest("POST", e.Server.URL+"/v1/workflows", body)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = length
	req.Header.Set("Content-Type", "multipart/form-data; boundary="+testBoundary)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := e.Server.Client().Do(req)
	if err != nil {
		close(stop)
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	p := <-peak
	growth := uint64(0)
	if p > base.HeapInuse {
		growth = p - base.HeapInuse
	}
	return res, raw, growth
}

// TestVideoTooLargeStreamed: 300 MiB + 1 byte, streamed from a generator,
// is refused as video_too_large while the server's heap stays small, and
// no temporary file is left.
func TestVideoTooLargeStreamed(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	body, length := streamedUpload(paddedMP4Head(t, video.MaxBytes+1), video.MaxBytes+1)
	start := time.Now()
	res, raw, growth := sendStreamed(t, e, u.Token, body, length)
	t.Logf("300 MiB + 1 byte refused after %v; heap growth %.1f MiB", time.Since(start).Round(time.Millisecond), float64(growth)/(1<<20))
	if problem := envelopeProblem(res.StatusCode, res.Header, raw); problem != "" || res.StatusCode != http.StatusBadRequest {
		t.Fatalf("status %d: %s (%s)", res.StatusCode, raw, problem)
	}
	var er protocol.Error
	if err := json.Unmarshal(raw, &er); err != nil || er.Code != protocol.CodeBadRequest {
		t.Fatalf("envelope %s", raw)
	}
	wantReason(t, &er, "video_too_large")
	if growth >= 64<<20 {
		t.Errorf("heap grew by %d bytes during the upload; want < 64 MiB", growth)
	}
	wantVideoFiles(t, dataDir, 0)

	// A declared length far over the limit is refused before a byte of
	// the body is read.
	conn, err := net.Dial("tcp", e.Server.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST /v1/workflows HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n\r\n", u.Token, 2*video.MaxBytes)
	res, err = http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ = io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusBadRequest || !strings.Contains(string(raw), "video_too_large") || envelopeProblem(res.StatusCode, res.Header, raw) != "" {
		t.Errorf("declared 600 MiB: %d %s", res.StatusCode, raw)
	}
	wantVideoFiles(t, dataDir, 0)
}

// TestVideoExactlyMaxAccepted: exactly 300 MiB (a real MP4 padded with a
// free box) is accepted, and deleting the workflow deletes its video.
func TestVideoExactlyMaxAccepted(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	body, length := streamedUpload(paddedMP4Head(t, video.MaxBytes), video.MaxBytes)
	res, raw, growth := sendStreamed(t, e, u.Token, body, length)
	t.Logf("exactly 300 MiB accepted; heap growth %.1f MiB", float64(growth)/(1<<20))
	if res.StatusCode != http.StatusCreated {
		t.Fatalf("status %d: %s", res.StatusCode, raw)
	}
	var wf workflowJSON
	if err := json.Unmarshal(raw, &wf); err != nil {
		t.Fatal(err)
	}
	if wf.Video == nil || wf.Video.SizeBytes != video.MaxBytes || wf.Video.DurationMs != 20_000 || wf.Status != "analyzing" {
		t.Fatalf("workflow: %s", raw)
	}
	if growth >= 64<<20 {
		t.Errorf("heap grew by %d bytes during the upload; want < 64 MiB", growth)
	}
	files := wantVideoFiles(t, dataDir, 1)
	if fi, err := os.Stat(filepath.Join(dataDir, "videos", files[0])); err != nil || fi.Size() != video.MaxBytes {
		t.Errorf("stored file: %v, %v", fi, err)
	}
	expectStatus(t, e.del("/v1/workflows/"+wf.ID, u.Token), http.StatusNoContent)
	wantVideoFiles(t, dataDir, 0)
}

// slowBody writes the head of an upload, then one byte every interval
// until ctx is done: a client that trickles (or, with a zero byte count,
// stalls).
func slowBody(ctx context.Context, head string, trickle bool) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		defer pw.Close()
		if _, err := pw.Write([]byte(head)); err != nil {
			return
		}
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if !trickle {
				continue
			}
			if _, err := pw.Write([]byte{0}); err != nil {
				return
			}
		}
	}()
	return pr
}

// TestUploadDeadline: a client that trickles bytes is cut by the upload's
// deadline, one that stalls by the idle deadline; both answer timeout and
// leave no file.
func TestUploadDeadline(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir, VideoIdleTimeout: 500 * time.Millisecond, VideoUploadTimeout: 2 * time.Second})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	head := "--" + testBoundary + "\r\nContent-Disposition: form-data; name=\"video\"; filename=\"slow.mp4\"\r\n\r\n" + string(readTestVideo(t, "sample-20s.mp4")[:100])
	for _, trickle := range []bool{true, false} {
		t.Run(fmt.Sprintf("trickle=%v", trickle), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "POST", e.Server.URL+"/v1/workflows", slowBody(ctx, head, trickle))
			req.ContentLength = 10 << 20
			req.Header.Set("Content-Type", "multipart/form-data; boundary="+testBoundary)
			req.Header.Set("Authorization", "Bearer "+u.Token)
			start := time.Now()
			res, err := e.Server.Client().Do(req)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			raw, _ := io.ReadAll(res.Body)
			res.Body.Close()
			t.Logf("cut after %v", time.Since(start).Round(time.Millisecond))
			if problem := envelopeProblem(res.StatusCode, res.Header, raw); problem != "" || res.StatusCode != http.StatusRequestTimeout {
				t.Fatalf("status %d: %s (%s)", res.StatusCode, raw, problem)
			}
			var er protocol.Error
			_ = json.Unmarshal(raw, &er)
			if er.Code != protocol.CodeTimeout {
				t.Fatalf("code %q", er.Code)
			}
			wantReason(t, &er, "upload_timeout")
			wantVideoFiles(t, dataDir, 0)
		})
	}
}

// openEnvAt starts a server on the SQLite file at path (made or reopened).
func openEnvAt(t *testing.T, path string, cfg api.Config) (*env, func()) {
	t.Helper()
	st, err := sqlstore.Open(context.Background(), "sqlite://"+path)
	if err != nil {
		t.Fatal(err)
	}
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	srv := api.New(st, log, cfg)
	hs := httptest.NewServer(srv)
	e := &env{t: t, Store: st, API: srv, Server: hs, Logs: hook}
	return e, func() { hs.Close(); st.Close() }
}

// TestAnalysisTimeoutAcrossRestart: a workflow left analyzing by a server
// that stopped is failed with analysis.error.code "timeout" by the next
// server's reaper; the analyzer's late result is refused; a new video
// (PUT …/video) restarts the analysis and replaces the old file.
func TestAnalysisTimeoutAcrossRestart(t *testing.T) {
	dir, dataDir := t.TempDir(), t.TempDir()
	path := filepath.Join(dir, "copelf.db")
	cfg := api.Config{DataDir: dataDir, AnalysisTimeout: time.Minute}

	first, stop := openEnvAt(t, path, cfg)
	ctx := context.Background()
	owner, err := first.Store.UserCreate(ctx, store.UserCreateParams{Email: "owner@example.com", PasswordHash: "x", Role: store.RoleMember, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	token, err := api.CreateToken(ctx, first.Store, owner.ID, store.TokenAPI, "owner")
	if err != nil {
		t.Fatal(err)
	}
	admin, err := first.Store.UserCreate(ctx, store.UserCreateParams{Email: "admin@example.com", PasswordHash: "x", Role: store.RoleAdmin, Plan: store.PlanPro})
	if err != nil {
		t.Fatal(err)
	}
	analyzer, err := api.CreateToken(ctx, first.Store, admin.ID, store.TokenAnalyzer, "analyzer") // as the admin would
	if err != nil {
		t.Fatal(err)
	}
	r := first.upload(token, "stuck", readTestVideo(t, "sample-20s.webm"))
	expectStatus(t, r, http.StatusCreated)
	wf := decodeWorkflow(t, r)
	expectStatus(t, first.post("/v1/workflows/"+wf.ID+"/analysis/claim", analyzer, nil), http.StatusOK)
	// Within the timeout, nothing happens.
	if expired, err := first.API.ExpireAnalyses(ctx); err != nil || len(expired) != 0 {
		t.Fatalf("ExpireAnalyses before the timeout = %v, %v", expired, err)
	}
	stop() // the server goes away with the analysis in progress

	second, stop2 := openEnvAt(t, path, cfg)
	defer stop2()
	second.API.Now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); second.API.RunAnalysisReaper(rctx, 50*time.Millisecond) }()
	stopReaper := sync.OnceFunc(func() { cancel(); <-done })
	defer stopReaper()
	deadline := time.Now().Add(time.Minute)
	var failed workflowJSON
	for {
		failed = decodeWorkflow(t, second.get("/v1/workflows/"+wf.ID, token))
		if failed.Status != "analyzing" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // waiting for the reaper's first pass
	}
	if failed.Status != "analysis_failed" || failed.Analysis == nil || failed.Analysis.Error == nil || failed.Analysis.Error.Code != "timeout" || failed.Analysis.FinishedAt == nil {
		t.Fatalf("after the restart: %+v", failed)
	}
	er := expectError(t, second.post("/v1/workflows/"+wf.ID+"/analysis", analyzer, map[string]any{"definition": json.RawMessage(sampleDefinition)}), protocol.CodeConflict)
	wantReason(t, er, "not_analyzing")
	if er.Details["status"] != "analysis_failed" {
		t.Errorf("details = %v", er.Details)
	}
	er = expectError(t, second.post("/v1/workflows/"+wf.ID+"/runs", token, goodInputs()), protocol.CodeWorkflowNotReady)
	if er.Details["status"] != "analysis_failed" {
		t.Errorf("details = %v", er.Details)
	}

	// A new video restarts the analysis; the old file is gone. (The
	// reaper, whose clock runs ahead, is stopped first.)
	stopReaper()
	old := wantVideoFiles(t, dataDir, 1)
	mp4 := readTestVideo(t, "sample-20s.mp4")
	r = second.do(request{Method: "PUT", Path: "/v1/workflows/" + wf.ID + "/video", Token: token, Body: mp4, Header: map[string]string{"Content-Type": "video/mp4"}})
	expectStatus(t, r, http.StatusOK)
	restarted := decodeWorkflow(t, r)
	if restarted.Status != "analyzing" || restarted.Video.Container != "mp4" || restarted.Analysis.Error != nil || restarted.Analysis.FinishedAt != nil {
		t.Fatalf("restarted: %s", r.Body)
	}
	if files := wantVideoFiles(t, dataDir, 1); files[0] == old[0] {
		t.Errorf("the old video %s was kept", old[0])
	}
	wantReason(t, expectError(t, second.do(request{Method: "PUT", Path: "/v1/workflows/" + wf.ID + "/video", Token: token, Body: mp4}), protocol.CodeConflict), "analyzing")
	if ids, _ := listIDs(t, second.get("/v1/analysis/workflows", analyzer)); !contains(ids, wf.ID) {
		t.Errorf("the restarted analysis is not waiting: %v", ids)
	}
}

// TestAnalyzersRace: analyzers racing for one workflow over HTTP, round
// after round: exactly one gets each.
func TestAnalyzersRace(t *testing.T) {
	e := newEnv(t, api.Config{DataDir: t.TempDir()})
	u := e.newUser(store.RoleMember, store.PlanFree, 0)
	const analyzers = 4
	tokens := make([]string, analyzers)
	for i := range tokens {
		tokens[i] = e.analyzerToken(fmt.Sprintf("analyzer-%d", i))
	}
	mp4 := readTestVideo(t, "sample-20s.mp4")
	for round := range 5 {
		r := e.upload(u.Token, fmt.Sprintf("round %d", round), mp4)
		expectStatus(t, r, http.StatusCreated)
		id := decodeWorkflow(t, r).ID
		var wins, conflicts atomic.Int32
		var wg sync.WaitGroup
		start := make(chan struct{})
		results := make([]rawResult, analyzers)
		for i := range analyzers {
			wg.Go(func() {
				<-start
				results[i] = e.raw("POST", "/v1/workflows/"+id+"/analysis/claim", tokens[i], nil, nil)
			})
		}
		close(start)
		wg.Wait()
		for _, res := range results {
			switch {
			case res.Err != nil:
				t.Fatal(res.Err)
			case res.Status == http.StatusOK:
				wins.Add(1)
			case res.code() == protocol.CodeConflict && envelopeProblem(res.Status, res.Header, res.Body) == "" && strings.Contains(string(res.Body), "already_claimed"):
				conflicts.Add(1)
			default:
				t.Errorf("claim: %d %s", res.Status, res.Body)
			}
		}
		if wins.Load() != 1 || conflicts.Load() != analyzers-1 {
			t.Fatalf("round %d: %d claims won, %d refused", round, wins.Load(), conflicts.Load())
		}
	}
}

// TestAnalysisErrors: every refusal of the analysis routes, with its code,
// reason and requestId.
func TestAnalysisErrors(t *testing.T) {
	dataDir := t.TempDir()
	e := newEnv(t, api.Config{DataDir: dataDir})
	owner := e.newUser(store.RoleMember, store.PlanPro, 0)
	analyzer := e.analyzerToken("analyzer")
	mp4 := readTestVideo(t, "sample-20s.mp4")
	r := e.upload(owner.Token, "rec", mp4)
	expectStatus(t, r, http.StatusCreated)
	wf := decodeWorkflow(t, r).ID
	plain := e.newWorkflow(owner.Token)

	// Who may act as an analyzer: analyzer tokens and admins, no one else;
	// an analyzer token serves nothing else.
	agent := e.post("/v1/tokens", owner.Token, map[string]any{"name": "agent", "kind": "agent"}).Map(t)["token"].(string)
	for _, tok := range []string{owner.Token, agent} {
		expectError(t, e.get("/v1/analysis/workflows", tok), protocol.CodeForbidden)
		expectError(t, e.post("/v1/workflows/"+wf+"/analysis/claim", tok, nil), protocol.CodeForbidden)
		expectError(t, e.post("/v1/workflows/"+wf+"/analysis", tok, map[string]any{"error": map[string]any{"message": "x"}}), protocol.CodeForbidden)
	}
	expectError(t, e.get("/v1/analysis/workflows", ""), protocol.CodeUnauthenticated)
	expectError(t, e.get("/v1/workflows", analyzer), protocol.CodeForbidden)
	expectError(t, e.upload(analyzer, "x", mp4), protocol.CodeForbidden)
	expectError(t, e.post("/v1/tokens", owner.Token, map[string]any{"name": "a", "kind": "analyzer"}), protocol.CodeForbidden)
	expectStatus(t, e.get("/v1/analysis/workflows", e.Admin), http.StatusOK)

	// Claims.
	expectError(t, e.post("/v1/workflows/wf_doesnotexist/analysis/claim", analyzer, nil), protocol.CodeWorkflowNotFound)
	er := expectError(t, e.post("/v1/workflows/"+plain+"/analysis/claim", analyzer, nil), protocol.CodeConflict)
	wantReason(t, er, "not_analyzing")

	// Results: a body with both or neither, a bad error, no claim.
	expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{}), protocol.CodeBadRequest)
	expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"definition": json.RawMessage(sampleDefinition), "error": map[string]any{"message": "x"}}), protocol.CodeBadRequest)
	expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"error": map[string]any{"code": "x"}}), protocol.CodeBadRequest)
	er = expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"error": map[string]any{"code": "Not A Code", "message": " "}}), protocol.CodeUnprocessableEntity)
	if !hasField(t, er, "error.code") || !hasField(t, er, "error.message") {
		t.Errorf("fields = %v", fieldNames(t, er))
	}
	wantReason(t, expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"error": map[string]any{"message": "no claim"}}), protocol.CodeConflict), "not_claimed")
	expectError(t, e.post("/v1/workflows/wf_doesnotexist/analysis", analyzer, map[string]any{"error": map[string]any{"message": "x"}}), protocol.CodeWorkflowNotFound)

	// A claim, a wrong claim id, then the analyzer's error: analysis_failed.
	claim := decodeWorkflow(t, e.post("/v1/workflows/"+wf+"/analysis/claim", analyzer, nil)).ClaimID
	wantReason(t, expectError(t, e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"claimId": "clm_other", "error": map[string]any{"message": "x"}}), protocol.CodeConflict), "not_claimed")
	r = e.post("/v1/workflows/"+wf+"/analysis", analyzer, map[string]any{"claimId": claim, "error": map[string]any{"code": "no_browser", "message": "No browser window is visible in the recording."}})
	expectStatus(t, r, http.StatusOK)
	failed := decodeWorkflow(t, r)
	if failed.Status != "analysis_failed" || failed.Analysis.Error == nil || failed.Analysis.Error.Code != "no_browser" {
		t.Fatalf("failed: %s", r.Body)
	}
	er = expectError(t, e.post("/v1/workflows/"+wf+"/batches", owner.Token, batchBody(1)), protocol.CodeWorkflowNotReady)
	if er.Details["status"] != "analysis_failed" {
		t.Errorf("details = %v", er.Details)
	}

	// Videos: a workflow without one; someone else's; a bad replacement.
	expectError(t, e.get("/v1/workflows/"+plain+"/video", owner.Token), protocol.CodeNotFound)
	stranger := e.newUser(store.RoleMember, store.PlanFree, 0)
	expectError(t, e.do(request{Method: "PUT", Path: "/v1/workflows/" + wf + "/video", Token: stranger.Token, Body: mp4}), protocol.CodeForbidden)
	wantReason(t, expectError(t, e.do(request{Method: "PUT", Path: "/v1/workflows/" + wf + "/video", Token: owner.Token, Body: "not a video"}), protocol.CodeUnprocessableEntity), "unsupported_video")
	wantReason(t, expectError(t, e.do(request{Method: "PUT", Path: "/v1/workflows/" + wf + "/video", Token: owner.Token, Body: readTestVideo(t, "long-16min.webm")}), protocol.CodeUnprocessableEntity), "video_too_long")
	expectError(t, e.do(request{Method: "PUT", Path: "/v1/workflows/wf_doesnotexist/video", Token: owner.Token, Body: mp4}), protocol.CodeWorkflowNotFound)
	// The failed workflow kept its video through the refusals.
	r = e.get("/v1/workflows/"+wf+"/video", owner.Token)
	if r.StatusCode != http.StatusOK || !bytes.Equal(r.Body, mp4) {
		t.Errorf("video after refused replacements: %d, %d bytes", r.StatusCode, len(r.Body))
	}
	wantVideoFiles(t, dataDir, 1)

	// Deleting the workflow deletes the video.
	expectStatus(t, e.del("/v1/workflows/"+wf, owner.Token), http.StatusNoContent)
	wantVideoFiles(t, dataDir, 0)
	expectError(t, e.get("/v1/workflows/"+wf+"/video", analyzer), protocol.CodeWorkflowNotFound)
	expectError(t, e.post("/v1/workflows/"+wf+"/analysis/claim", analyzer, nil), protocol.CodeWorkflowNotFound)
}

// TestAnalyzerTokenOfANonAdmin: an analyzer token works only while its
// creator is an admin. One held by a member (its admin demoted in the
// database: the API has no demotion) is forbidden on every analyzer route.
func TestAnalyzerTokenOfANonAdmin(t *testing.T) {
	t.Parallel()
	e := newEnv(t, api.Config{DataDir: t.TempDir()})
	owner := e.newUser(store.RoleMember, store.PlanPro, 10)
	r := e.upload(owner.Token, "recorded", readTestVideo(t, "sample-20s.mp4"))
	expectStatus(t, r, http.StatusCreated)
	wf := decodeWorkflow(t, r)
	stale, err := api.CreateToken(context.Background(), e.Store, owner.ID, store.TokenAnalyzer, "left over")
	if err != nil {
		t.Fatal(err)
	}
	for _, rq := range []request{
		{Method: "GET", Path: "/v1/analysis/workflows"},
		{Method: "POST", Path: "/v1/workflows/" + wf.ID + "/analysis/claim"},
		{Method: "GET", Path: "/v1/workflows/" + wf.ID + "/video"},
	} {
		rq.Token = stale
		if er := expectError(t, e.do(rq), protocol.CodeForbidden); er.Details["requiredRole"] != string(store.RoleAdmin) {
			t.Errorf("%s %s: details %v", rq.Method, rq.Path, er.Details)
		}
	}
	// The admin's own analyzer token works.
	expectStatus(t, e.post("/v1/workflows/"+wf.ID+"/analysis/claim", e.analyzerToken("current"), nil), http.StatusOK)
}
