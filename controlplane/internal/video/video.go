// Package video reads what the control plane needs to know of an uploaded
// screen recording — its container and how long it plays — and keeps the
// recordings (Store). Uploads are untrusted: the probes read only the
// container's structure, never more than the file holds, never the media
// whole into memory, and answer ErrUnsupported for anything they cannot
// vouch for (garbage, truncated or corrupt files, other formats).
//
// MP4 and MOV (ISO BMFF, fragmented files included) are read with
// github.com/abema/go-mp4; WebM and Matroska with github.com/at-wat/ebml-go,
// including the files browsers' MediaRecorder writes, which carry no Duration
// element: their duration is measured from the clusters' block timestamps.
package video

import (
	"errors"
	"fmt"
	"io"
	"math"
	"time"
)

// Limits of an upload (API.md §4, §12).
const (
	// MaxBytes is the largest video accepted: 300 MiB.
	MaxBytes int64 = 314_572_800
	// MaxDuration is the longest recording accepted.
	MaxDuration = 15 * time.Minute
)

// Container is the file format of a video.
type Container string

const (
	MP4      Container = "mp4"
	MOV      Container = "mov"
	WebM     Container = "webm"
	Matroska Container = "matroska"
)

// ContentType is the media type a container is served with.
func (c Container) ContentType() string {
	switch c {
	case MP4:
		return "video/mp4"
	case MOV:
		return "video/quicktime"
	case WebM:
		return "video/webm"
	case Matroska:
		return "video/x-matroska"
	}
	return "application/octet-stream"
}

// Info is what a probe learns of a video.
type Info struct {
	Container Container
	// Duration is how long the recording plays. Where the container gives
	// several answers (a header and the samples or blocks), the longest
	// one counts, so that a doctored header cannot slip past MaxDuration.
	Duration time.Duration
}

// ErrUnsupported is returned (wrapped, see UnsupportedError) for a file that
// is not an MP4, MOV, WebM or Matroska file the probes can read.
var ErrUnsupported = errors.New("unsupported video")

// UnsupportedError says why a file was refused.
type UnsupportedError struct {
	// Reason is a short, stable phrase ("not a video container",
	// "truncated", "no movie header"…), safe to show to the uploader.
	Reason string
	// Err is the parser's error, if any; it is for logs, not for users.
	Err error
}

func (e *UnsupportedError) Error() string {
	if e.Err != nil {
		return "unsupported video: " + e.Reason + ": " + e.Err.Error()
	}
	return "unsupported video: " + e.Reason
}

// Is makes errors.Is(err, ErrUnsupported) true.
func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

// Unwrap returns the parser's error.
func (e *UnsupportedError) Unwrap() error { return e.Err }

func unsupported(reason string, err error) error {
	return &UnsupportedError{Reason: reason, Err: err}
}

// ebmlMagic starts every EBML document (WebM, Matroska).
var ebmlMagic = []byte{0x1A, 0x45, 0xDF, 0xA3}

// Probe reads the container of the size bytes of r and returns its format
// and duration. Files that are not MP4, MOV, WebM or Matroska, or that are
// truncated or corrupt, give an error that matches ErrUnsupported.
func Probe(r io.ReaderAt, size int64) (Info, error) {
	var head [12]byte
	n, err := r.ReadAt(head[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return Info{}, err
	}
	switch {
	case n >= 4 && string(head[:4]) == string(ebmlMagic):
		return ProbeWebM(r, size)
	case n >= 8 && isTopLevelBox(string(head[4:8])):
		return ProbeMP4(r, size)
	}
	return Info{}, unsupported("not an MP4, MOV or WebM file", nil)
}

// guard turns a panic in a parser into ErrUnsupported: a parser bug on a
// crafted file must not take the server down.
func guard(err *error) {
	if p := recover(); p != nil {
		*err = unsupported("unreadable container", fmt.Errorf("parser panic: %v", p))
	}
}

// seconds converts a count of ticks of a time scale (ticks per second) to a
// duration, saturating instead of overflowing.
func seconds(ticks uint64, scale uint64) time.Duration {
	if scale == 0 {
		return 0
	}
	return saturate(float64(ticks) / float64(scale) * float64(time.Second))
}

func saturate(ns float64) time.Duration {
	switch {
	case math.IsNaN(ns) || ns <= 0:
		return 0
	case ns >= math.MaxInt64:
		return math.MaxInt64
	}
	return time.Duration(ns)
}
