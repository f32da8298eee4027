package app_test

import (
	"bytes"
	"encoding/json"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// uploadRecording posts a recording from testdata/videos as a new workflow.
func uploadRecording(t *testing.T, c *http.Client, url, token, file string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("..", "..", "..", "testdata", "videos", file))
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("name", "recording")
	fw, _ := mw.CreateFormFile("video", file)
	_, _ = fw.Write(data)
	_ = mw.Close()
	req, _ := http.NewRequest("POST", url+"/v1/workflows", &body)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	raw, _ := io.ReadAll(res.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	expect(t, "upload "+file, res.StatusCode, out, http.StatusCreated)
	return out
}

// TestAnalysisTimeoutSurvivesRestart runs the real program: a recording is
// uploaded, the program stops with the workflow analyzing, and the next
// start (on the same database, with -analysis-timeout shorter than the
// time that passed) fails it with analysis.error.code "timeout" — the
// reaper's first pass, before anything else happens. Stale temporary
// uploads in the data directory are removed at start; videos older than an
// hour that no live workflow uses are set aside in videos/.orphaned, and
// those set aside more than 7 days ago deleted.
func TestAnalysisTimeoutSurvivesRestart(t *testing.T) {
	const token = "copelf-test-admin-token-analysis"
	t.Setenv("COPELF_ADMIN_TOKEN", token)
	dir := t.TempDir()
	c := client(t)

	in := startApp(t, append(baseArgs(dir), "-analysis-timeout", "1h")...)
	wf := uploadRecording(t, c, in.URL, token, "sample-20s.mp4")
	id := wf["id"].(string)
	if wf["status"] != "analyzing" {
		t.Fatalf("uploaded: %v", wf)
	}
	if err := in.stop(); err != nil {
		t.Fatal(err)
	}
	videos := filepath.Join(dir, "data", "videos")
	entries, _ := os.ReadDir(videos)
	if len(entries) != 1 {
		t.Fatalf("video directory: %v, want the one video", entries)
	}
	used := filepath.Join(videos, entries[0].Name())
	stale := filepath.Join(videos, ".upload-crashed")
	orphan := filepath.Join(videos, "vid_"+strings.Repeat("a", 26))      // no workflow has it
	youngOrphan := filepath.Join(videos, "vid_"+strings.Repeat("b", 26)) // maybe on its way into one
	setAside := filepath.Join(videos, ".orphaned")
	oldSetAside := filepath.Join(setAside, "vid_"+strings.Repeat("c", 26)) // set aside 8 days ago
	if err := os.MkdirAll(setAside, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{stale, orphan, youngOrphan, oldSetAside} {
		if err := os.WriteFile(f, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	for _, f := range []string{stale, orphan, used} {
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chtimes(oldSetAside, old.Add(-8*24*time.Hour), old.Add(-8*24*time.Hour)); err != nil {
		t.Fatal(err)
	}

	in2 := startApp(t, append(baseArgs(dir), "-analysis-timeout", "1ms")...)
	deadline := time.Now().Add(time.Minute)
	var got map[string]any
	for {
		status, body := call(t, c, "GET", in2.URL+"/v1/workflows/"+id, token, nil)
		expect(t, "GET workflow", status, body, http.StatusOK)
		got = body
		if got["status"] != "analyzing" || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // waiting for the reaper's first pass
	}
	analysis, _ := got["analysis"].(map[string]any)
	errObj, _ := analysis["error"].(map[string]any)
	if got["status"] != "analysis_failed" || errObj["code"] != "timeout" || analysis["finishedAt"] == nil {
		t.Fatalf("after the restart: %v", got)
	}
	for _, f := range []string{stale, orphan, oldSetAside} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s is still there: %v", f, err)
		}
	}
	for _, f := range []string{used, youngOrphan, filepath.Join(setAside, filepath.Base(orphan))} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("%s is not there: %v", f, err)
		}
	}
}
