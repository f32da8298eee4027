package video_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/video"
)

func newDir(t *testing.T) (*video.Dir, string) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "videos")
	d, err := video.NewDir(root)
	if err != nil {
		t.Fatal(err)
	}
	return d, root
}

// files lists the directory's entries, temporary files included.
func files(t *testing.T, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func TestDirPutOpenDelete(t *testing.T) {
	ctx := context.Background()
	d, root := newDir(t)
	data := readVideo(t, "sample-20s.mp4")
	key, size, err := d.Put(ctx, bytes.NewReader(data), int64(len(data)))
	if err != nil || size != int64(len(data)) {
		t.Fatalf("Put = %q, %d, %v", key, size, err)
	}
	if got := files(t, root); len(got) != 1 || got[0] != key {
		t.Fatalf("directory holds %v, want only %s", got, key)
	}
	obj, err := d.Open(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if obj.Size() != int64(len(data)) || time.Since(obj.ModTime()) > time.Hour {
		t.Errorf("object size %d, modified %v", obj.Size(), obj.ModTime())
	}
	tail := make([]byte, 100)
	if _, err := obj.ReadAt(tail, int64(len(data)-100)); err != nil || !bytes.Equal(tail, data[len(data)-100:]) {
		t.Errorf("ReadAt the tail: %v", err)
	}
	all, err := io.ReadAll(obj)
	if err != nil || !bytes.Equal(all, data) {
		t.Errorf("read back %d bytes, %v", len(all), err)
	}
	obj.Close()

	if err := d.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Open(ctx, key); !errors.Is(err, video.ErrNotFound) {
		t.Errorf("Open after Delete: %v, want ErrNotFound", err)
	}
	if err := d.Delete(ctx, key); err != nil {
		t.Errorf("second Delete: %v", err)
	}
	if got := files(t, root); len(got) != 0 {
		t.Errorf("directory holds %v after Delete", got)
	}
}

func TestDirLimit(t *testing.T) {
	ctx := context.Background()
	d, root := newDir(t)
	const limit = 1000
	key, size, err := d.Put(ctx, bytes.NewReader(make([]byte, limit)), limit)
	if err != nil || size != limit {
		t.Fatalf("exactly the limit: %q, %d, %v", key, size, err)
	}
	_, _, err = d.Put(ctx, bytes.NewReader(make([]byte, limit+1)), limit)
	if !errors.Is(err, video.ErrTooLarge) {
		t.Fatalf("one byte over: %v, want ErrTooLarge", err)
	}
	if got := files(t, root); len(got) != 1 || got[0] != key {
		t.Errorf("directory holds %v, want only %s", got, key)
	}
}

// failingReader yields some bytes, then an error.
type failingReader struct {
	n   int
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, f.err
	}
	n := min(len(p), f.n)
	clear(p[:n])
	f.n -= n
	return n, nil
}

func TestDirPutKeepsNothingOnError(t *testing.T) {
	d, root := newDir(t)
	boom := errors.New("client went away")
	_, _, err := d.Put(context.Background(), &failingReader{n: 5000, err: boom}, 1<<20)
	if !errors.Is(err, boom) {
		t.Fatalf("Put: %v, want the reader's error", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err = d.Put(ctx, bytes.NewReader(make([]byte, 10)), 100)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Put with a cancelled context: %v", err)
	}
	if got := files(t, root); len(got) != 0 {
		t.Errorf("directory holds %v after failed uploads", got)
	}
}

func TestDirKeysAreNotPaths(t *testing.T) {
	ctx := context.Background()
	d, root := newDir(t)
	secret := filepath.Join(filepath.Dir(root), "secret")
	if err := os.WriteFile(secret, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"", "../secret", "/etc/passwd", "vid_../../secret", ".upload-1"} {
		if _, err := d.Open(ctx, key); !errors.Is(err, video.ErrNotFound) {
			t.Errorf("Open(%q): %v, want ErrNotFound", key, err)
		}
		if err := d.Delete(ctx, key); err != nil {
			t.Errorf("Delete(%q): %v", key, err)
		}
	}
	if _, err := os.Stat(secret); err != nil {
		t.Errorf("a file outside the store was touched: %v", err)
	}
}

func TestDirRemoveStaleUploads(t *testing.T) {
	d, root := newDir(t)
	stale := filepath.Join(root, ".upload-123")
	fresh := filepath.Join(root, ".upload-456")
	for _, p := range []string{stale, fresh} {
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	key, _, err := d.Put(context.Background(), bytes.NewReader([]byte("video")), 100)
	if err != nil {
		t.Fatal(err)
	}
	n, err := d.RemoveStaleUploads(time.Hour)
	if err != nil || n != 1 {
		t.Fatalf("RemoveStaleUploads = %d, %v; want 1", n, err)
	}
	got := files(t, root)
	if len(got) != 2 || !contains(got, key) || !contains(got, ".upload-456") {
		t.Errorf("directory holds %v", got)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Keys lists stored videos old enough, never uploads in progress or the
// set-aside folder; a video set aside is no longer found, and set-aside
// videos are purged by age.
func TestDirKeysSetAsidePurge(t *testing.T) {
	ctx := context.Background()
	d, root := newDir(t)
	old := time.Now().Add(-2 * time.Hour)
	var keys []string
	for range 2 {
		key, _, err := d.Put(ctx, bytes.NewReader([]byte("video")), 100)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, key)
	}
	if err := os.Chtimes(filepath.Join(root, keys[0]), old, old); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, ".upload-123"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := d.Keys(time.Hour)
	if err != nil || len(got) != 1 || got[0] != keys[0] {
		t.Fatalf("Keys(1h) = %v, %v; want [%s]", got, err, keys[0])
	}
	if err := d.SetAside("../etc/passwd"); !errors.Is(err, video.ErrNotFound) {
		t.Fatalf("SetAside of a path: %v", err)
	}
	if err := d.SetAside(keys[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Open(ctx, keys[0]); !errors.Is(err, video.ErrNotFound) {
		t.Fatalf("Open after SetAside: %v", err)
	}
	if got, _ := d.Keys(0); len(got) != 1 || got[0] != keys[1] {
		t.Fatalf("Keys(0) after SetAside = %v; want [%s]", got, keys[1])
	}
	// Set aside just now: kept by a purge of older ones, gone with age 0.
	if n, err := d.PurgeSetAside(time.Hour); n != 0 || err != nil {
		t.Fatalf("PurgeSetAside(1h) = %d, %v", n, err)
	}
	if n, err := d.PurgeSetAside(0); n != 1 || err != nil {
		t.Fatalf("PurgeSetAside(0) = %d, %v", n, err)
	}
	if _, err := os.Stat(filepath.Join(root, video.OrphanDir, keys[0])); !os.IsNotExist(err) {
		t.Fatalf("purged video still there: %v", err)
	}
}
