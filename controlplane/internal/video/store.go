package video

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// ErrTooLarge is returned by Store.Put when the video is over its limit;
// nothing is kept.
var ErrTooLarge = errors.New("video: larger than the limit")

// ErrNotFound is returned for a key the store does not hold.
var ErrNotFound = errors.New("video: not found")

// Store keeps videos. Callers know a video by the key Put gave it; the
// local directory is one implementation, an S3-compatible bucket can be
// another without changing them.
type Store interface {
	// Put stores what r yields, at most limit bytes, and returns its new
	// key and size. The video appears whole or not at all: on any error
	// (ErrTooLarge, or r's own error, returned as is) nothing is kept.
	Put(ctx context.Context, r io.Reader, limit int64) (key string, size int64, err error)
	// Open opens a stored video for reading (ErrNotFound).
	Open(ctx context.Context, key string) (Object, error)
	// Delete removes a video; a key that is not there is not an error.
	Delete(ctx context.Context, key string) error
}

// Object is an open stored video. It reads at any offset (probes, Range
// requests) and must be closed.
type Object interface {
	io.ReadSeeker
	io.ReaderAt
	io.Closer
	Size() int64
	ModTime() time.Time
}

// Dir is a Store in a local directory: each video is one file named by its
// key. Put writes to a hidden temporary file beside them and renames it
// into place once complete and synced, so a crash never leaves a partial
// video under a key.
type Dir struct {
	root string
}

// tempPrefix starts the names of uploads in progress.
const tempPrefix = ".upload-"

// keyRE is the shape of keys Dir makes; anything else is not found (no
// path can be smuggled in through a key).
var keyRE = regexp.MustCompile(`^vid_[a-z2-7]{26}$`)

// NewDir returns a Dir on root, creating the directory.
func NewDir(root string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("video dir: %w", err)
	}
	return &Dir{root: root}, nil
}

// Root is the directory.
func (d *Dir) Root() string { return d.root }

func newKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return "vid_" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))[:26]
}

// Put streams r to a temporary file, counting bytes: one byte over limit
// stops the copy and removes the file.
func (d *Dir) Put(ctx context.Context, r io.Reader, limit int64) (key string, size int64, err error) {
	f, err := os.CreateTemp(d.root, tempPrefix+"*")
	if err != nil {
		return "", 0, fmt.Errorf("video temp file: %w", err)
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	n, err := io.Copy(f, io.LimitReader(&ctxReader{ctx: ctx, r: r}, limit+1))
	if err != nil {
		return "", n, err
	}
	if n > limit {
		return "", n, ErrTooLarge
	}
	if err := f.Sync(); err != nil {
		return "", n, fmt.Errorf("video sync: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", n, fmt.Errorf("video close: %w", err)
	}
	key = newKey()
	if err := os.Rename(f.Name(), filepath.Join(d.root, key)); err != nil {
		return "", n, fmt.Errorf("video rename: %w", err)
	}
	return key, n, nil
}

// Open opens the file of key.
func (d *Dir) Open(ctx context.Context, key string) (Object, error) {
	if !keyRE.MatchString(key) {
		return nil, ErrNotFound
	}
	f, err := os.Open(filepath.Join(d.root, key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &fileObject{File: f, size: fi.Size(), mod: fi.ModTime()}, nil
}

// Delete removes the file of key.
func (d *Dir) Delete(ctx context.Context, key string) error {
	if !keyRE.MatchString(key) {
		return nil
	}
	err := os.Remove(filepath.Join(d.root, key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// RemoveStaleUploads deletes temporary files older than age: uploads a
// crash or a kill interrupted. It returns how many it removed.
func (d *Dir) RemoveStaleUploads(age time.Duration) (int, error) {
	entries, err := os.ReadDir(d.root)
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), tempPrefix) {
			continue
		}
		fi, err := e.Info()
		if err != nil || time.Since(fi.ModTime()) < age {
			continue
		}
		if os.Remove(filepath.Join(d.root, e.Name())) == nil {
			removed++
		}
	}
	return removed, nil
}

// Keys lists the stored videos last written more than age ago (uploads in
// progress are not videos yet; younger ones may be on their way into a
// workflow).
func (d *Dir) Keys(age time.Duration) ([]string, error) {
	entries, err := os.ReadDir(d.root)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if !keyRE.MatchString(e.Name()) {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) >= age {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// OrphanDir is the folder, inside the store's, where SetAside keeps videos
// no workflow used: a start against the wrong database moves them there
// rather than losing them, and moving them back restores them.
const OrphanDir = ".orphaned"

// SetAside moves a stored video into OrphanDir, stamped with the time it was
// set aside; it is no longer found under its key.
func (d *Dir) SetAside(key string) error {
	if !keyRE.MatchString(key) {
		return ErrNotFound
	}
	dir := filepath.Join(d.root, OrphanDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	to := filepath.Join(dir, key)
	if err := os.Rename(filepath.Join(d.root, key), to); err != nil {
		return err
	}
	now := time.Now()
	return os.Chtimes(to, now, now)
}

// PurgeSetAside deletes the videos set aside more than age ago and returns
// how many it deleted.
func (d *Dir) PurgeSetAside(age time.Duration) (int, error) {
	dir := filepath.Join(d.root, OrphanDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, e := range entries {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() || time.Since(fi.ModTime()) < age {
			continue
		}
		if os.Remove(filepath.Join(dir, e.Name())) == nil {
			removed++
		}
	}
	return removed, nil
}

type fileObject struct {
	*os.File
	size int64
	mod  time.Time
}

func (o *fileObject) Size() int64        { return o.size }
func (o *fileObject) ModTime() time.Time { return o.mod }

// ctxReader stops reading once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
