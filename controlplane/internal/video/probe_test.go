package video_test

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/copelf/copelf/controlplane/internal/video"
)

// videos is the repository's testdata/videos: real recordings, a few KB
// each, made once with ffmpeg and with Chromium's MediaRecorder.
const videos = "../../../testdata/videos"

func readVideo(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(videos, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func probeBytes(b []byte) (video.Info, error) {
	return video.Probe(bytes.NewReader(b), int64(len(b)))
}

func TestProbeRecordings(t *testing.T) {
	for _, tc := range []struct {
		file      string
		container video.Container
		duration  time.Duration
		tolerance time.Duration
	}{
		{"sample-20s.mp4", video.MP4, 20 * time.Second, 0},
		{"sample-20s.mov", video.MOV, 20 * time.Second, 0},
		{"fragmented-20s.mp4", video.MP4, 20 * time.Second, 0}, // empty moov, every sample in fragments
		{"long-16min.mp4", video.MP4, 16 * time.Minute, 0},
		{"sample-20s.webm", video.WebM, 20 * time.Second, 0},
		{"long-16min.webm", video.WebM, 16 * time.Minute, 0},
		// No Duration element, unknown-size segment and clusters: Chromium's
		// MediaRecorder ran 12.004 s on a canvas; ffmpeg's live mode 12 s.
		{"mediarecorder-12s.webm", video.WebM, 12004 * time.Millisecond, time.Second},
		{"live-12s.webm", video.WebM, 12 * time.Second, time.Second},
	} {
		t.Run(tc.file, func(t *testing.T) {
			info, err := probeBytes(readVideo(t, tc.file))
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			if info.Container != tc.container {
				t.Errorf("container = %q, want %q", info.Container, tc.container)
			}
			if d := info.Duration - tc.duration; d < -tc.tolerance || d > tc.tolerance {
				t.Errorf("duration = %v, want %v ± %v", info.Duration, tc.duration, tc.tolerance)
			}
		})
	}
}

func TestProbeRefusesGarbage(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 64<<10)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	mp4 := readVideo(t, "sample-20s.mp4")
	webm := readVideo(t, "sample-20s.webm")
	flipped := bytes.Clone(mp4)
	for i := 40; i < len(flipped); i += 97 {
		flipped[i] ^= 0xFF
	}
	for name, b := range map[string][]byte{
		"empty":            nil,
		"one byte":         {0},
		"text":             []byte("this is not a video, it is a text file\n"),
		"png":              append([]byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), random[:200]...),
		"random":           random,
		"ftyp only":        mp4[:32],
		"mdat only":        []byte("\x00\x00\x00\x10mdat\x00\x00\x00\x00\x00\x00\x00\x00"),
		"box size 0 first": append([]byte("\x00\x00\x00\x00ftyp"), random[:100]...),
		"box size 4":       []byte("\x00\x00\x00\x04ftypisom"),
		"ebml magic":       append([]byte{0x1A, 0x45, 0xDF, 0xA3}, random[:500]...),
		"ebml header only": webm[:40],
		"mp4 bits flipped": flipped,
		"mp4 then garbage": append(bytes.Clone(mp4), random[:3]...),
	} {
		t.Run(name, func(t *testing.T) {
			info, err := probeBytes(b)
			if !errors.Is(err, video.ErrUnsupported) {
				t.Fatalf("Probe = %+v, %v; want ErrUnsupported", info, err)
			}
			var ue *video.UnsupportedError
			if !errors.As(err, &ue) || ue.Reason == "" {
				t.Errorf("error %v has no reason", err)
			}
		})
	}
}

// TestProbeRefusesTruncated cuts every recording whose container states
// its size at many places: each cut is refused. MediaRecorder files state
// no size (they are written as they are recorded), so a cut one is a
// shorter recording: it must probe to no more than the whole.
func TestProbeRefusesTruncated(t *testing.T) {
	for _, file := range []string{"sample-20s.mp4", "sample-20s.mov", "fragmented-20s.mp4", "long-16min.mp4", "sample-20s.webm", "long-16min.webm", "mediarecorder-12s.webm", "live-12s.webm"} {
		t.Run(file, func(t *testing.T) {
			b := readVideo(t, file)
			whole, err := probeBytes(b)
			if err != nil {
				t.Fatal(err)
			}
			live := file == "mediarecorder-12s.webm" || file == "live-12s.webm"
			for k := 1; k < 64; k++ {
				n := len(b) * k / 64
				info, err := probeBytes(b[:n])
				switch {
				case err == nil && live && info.Duration <= whole.Duration:
				case errors.Is(err, video.ErrUnsupported):
				default:
					t.Errorf("cut at %d of %d: Probe = %+v, %v; want ErrUnsupported", n, len(b), info, err)
				}
			}
		})
	}
}

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// paddedMP4 is a recording followed by a free box that fills the file to
// size: the media is small, the file is not.
type paddedMP4 struct {
	head []byte // the recording and the free box's header
}

func newPaddedMP4(mp4 []byte, size int64) *paddedMP4 {
	free := make([]byte, 8)
	free[0], free[1], free[2], free[3] = byte(uint32(size-int64(len(mp4)))>>24), byte(uint32(size-int64(len(mp4)))>>16), byte(uint32(size-int64(len(mp4)))>>8), byte(uint32(size-int64(len(mp4))))
	copy(free[4:], "free")
	return &paddedMP4{head: append(bytes.Clone(mp4), free...)}
}

func (p *paddedMP4) ReadAt(b []byte, off int64) (int, error) {
	n := 0
	if off < int64(len(p.head)) {
		n = copy(b, p.head[off:])
	}
	clear(b[n:])
	return len(b), nil
}

// TestProbeReadsHeadersOnly: a 300 MiB MP4 is probed by reading its boxes'
// headers, not its media.
func TestProbeReadsHeadersOnly(t *testing.T) {
	r := &countingReaderAt{r: newPaddedMP4(readVideo(t, "sample-20s.mp4"), video.MaxBytes)}
	info, err := video.Probe(r, video.MaxBytes)
	if err != nil || info.Duration != 20*time.Second {
		t.Fatalf("Probe = %+v, %v", info, err)
	}
	if n := r.n.Load(); n > 64<<10 {
		t.Errorf("read %d bytes of a %d-byte file; want the headers only", n, video.MaxBytes)
	}
}

// TestProbeBoundedByTheFile: a small file claiming huge boxes or elements
// is refused without the probe allocating for what it claims.
func TestProbeBoundedByTheFile(t *testing.T) {
	for name, b := range map[string][]byte{
		"huge box":             []byte("\x00\x00\x00\x01moov\x7f\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00"),
		"huge stts":            append(readVideo(t, "sample-20s.mp4")[:32], []byte("\x00\x00\x00\x20moov\x00\x00\x00\x18stts\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x01")...),
		"huge ebml header":     {0x1A, 0x45, 0xDF, 0xA3, 0x01, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE},
		"huge segment element": append(readVideo(t, "sample-20s.webm")[:40], 0x18, 0x53, 0x80, 0x67, 0x01, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00),
		"huge block":           append(readVideo(t, "sample-20s.webm")[:40], 0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x43, 0xB6, 0x75, 0xFF, 0xA3, 0x08, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x81),
	} {
		t.Run(name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := probeBytes(b)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, video.ErrUnsupported) {
				t.Fatalf("Probe: %v, want ErrUnsupported", err)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 4<<20 {
				t.Errorf("probing %d bytes allocated %d bytes", len(b), n)
			}
		})
	}
}

func TestContentTypes(t *testing.T) {
	for c, want := range map[video.Container]string{video.MP4: "video/mp4", video.MOV: "video/quicktime", video.WebM: "video/webm", video.Matroska: "video/x-matroska", "": "application/octet-stream"} {
		if got := c.ContentType(); got != want {
			t.Errorf("%q.ContentType() = %q, want %q", c, got, want)
		}
	}
}
