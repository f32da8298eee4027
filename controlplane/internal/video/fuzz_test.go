package video_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/copelf/copelf/controlplane/internal/video"
)

// fuzzProbe checks one probe on untrusted bytes: it never panics (a panic
// inside a parser is caught and reported as ErrUnsupported, which the
// fuzzer flags here so that it gets looked at), and it either refuses the
// file as unsupported or returns a container and a positive duration.
func fuzzProbe(t *testing.T, probe func(*bytes.Reader, int64) (video.Info, error), data []byte) {
	info, err := probe(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		if !errors.Is(err, video.ErrUnsupported) {
			t.Fatalf("error %v is not ErrUnsupported", err)
		}
		if strings.Contains(err.Error(), "parser panic") {
			t.Fatalf("the parser panicked: %v", err)
		}
		return
	}
	if info.Container == "" || info.Duration <= 0 {
		t.Fatalf("accepted with %+v", info)
	}
}

// seedRecordings adds the testdata recordings and a few prefixes of them.
func seedRecordings(f *testing.F, names ...string) {
	for _, name := range names {
		b := readVideo(f, name)
		f.Add(b)
		f.Add(b[:len(b)/2])
		f.Add(b[:min(len(b), 600)])
	}
}

func FuzzProbeMP4(f *testing.F) {
	seedRecordings(f, "sample-20s.mp4", "sample-20s.mov", "fragmented-20s.mp4", "long-16min.mp4")
	f.Add([]byte("\x00\x00\x00\x08ftyp"))
	f.Add([]byte("\x00\x00\x00\x01moov\x00\x00\x00\x00\x00\x00\x00\x10"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzProbe(t, func(r *bytes.Reader, n int64) (video.Info, error) { return video.ProbeMP4(r, n) }, data)
		fuzzProbe(t, func(r *bytes.Reader, n int64) (video.Info, error) { return video.Probe(r, n) }, data)
	})
}

func FuzzProbeWebM(f *testing.F) {
	seedRecordings(f, "sample-20s.webm", "long-16min.webm", "mediarecorder-12s.webm", "live-12s.webm")
	f.Add([]byte{0x1A, 0x45, 0xDF, 0xA3, 0x80})
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzProbe(t, func(r *bytes.Reader, n int64) (video.Info, error) { return video.ProbeWebM(r, n) }, data)
	})
}
