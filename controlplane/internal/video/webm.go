package video

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/at-wat/ebml-go"
)

// Bounds of the WebM probe.
const (
	// maxLeafElement bounds one element the parser reads into memory (a
	// block: one frame). A screen recording's frames are far smaller.
	maxLeafElement = 16 << 20
	// defaultTimecodeScale is Matroska's default: timestamps in ms.
	defaultTimecodeScale = 1_000_000
)

// The parts of a Matroska document the probe decodes. Every other element
// is read and dropped by the parser. Cluster, SimpleBlock and BlockGroup
// are single values, not slices: each new one overwrites the previous, so
// memory does not grow with the recording; the read hooks see every one.
type (
	ebmlDoc struct {
		Header  ebmlHeader  `ebml:"EBML"`
		Segment ebmlSegment `ebml:"Segment"`
	}
	ebmlHeader struct {
		DocType string `ebml:"EBMLDocType"`
	}
	ebmlSegment struct {
		Info    ebmlInfo    `ebml:"Info"`
		Cluster ebmlCluster `ebml:"Cluster"`
	}
	ebmlInfo struct {
		TimecodeScale uint64  `ebml:"TimestampScale"`
		Duration      float64 `ebml:"Duration"`
	}
	ebmlCluster struct {
		Timecode    uint64         `ebml:"Timestamp"`
		SimpleBlock ebml.Block     `ebml:"SimpleBlock"`
		BlockGroup  ebmlBlockGroup `ebml:"BlockGroup"`
	}
	ebmlBlockGroup struct {
		Block         ebml.Block `ebml:"Block"`
		BlockDuration uint64     `ebml:"BlockDuration"`
	}
)

// webmClock follows the blocks' timestamps (in timecode-scale ticks).
type webmClock struct {
	cluster    int64 // current cluster's timestamp
	groupStart int64 // the current block group's block
	first      int64
	last       int64 // end of the latest block
	seen       bool
}

func (c *webmClock) hook(e *ebml.Element) {
	switch e.Type {
	case ebml.ElementTimestamp:
		if v, ok := e.Value.(uint64); ok && e.Parent != nil && e.Parent.Type == ebml.ElementCluster {
			c.cluster = int64(min(v, math.MaxInt64/2))
		}
	case ebml.ElementSimpleBlock, ebml.ElementBlock:
		if b, ok := e.Value.(ebml.Block); ok {
			t := c.cluster + int64(b.Timecode)
			c.groupStart = t
			c.block(t, t)
		}
	case ebml.ElementBlockDuration:
		if v, ok := e.Value.(uint64); ok {
			c.block(c.groupStart, c.groupStart+int64(min(v, math.MaxInt64/4)))
		}
	}
}

func (c *webmClock) block(start, end int64) {
	if !c.seen || start < c.first {
		c.first = start
	}
	if !c.seen || end > c.last {
		c.last = end
	}
	c.seen = true
}

// ProbeWebM reads a WebM or Matroska file of size bytes. It parses the
// whole document (so that a truncated or corrupt one is refused), keeping
// only the current cluster and block in memory. The duration is the longer
// of the Info element's Duration and the span of the blocks' timestamps; a
// browser's MediaRecorder file has no Duration and is measured by its
// blocks alone.
func ProbeWebM(r io.ReaderAt, size int64) (info Info, err error) {
	defer guard(&err)
	segEnd, err := segmentEnd(r, size)
	if err != nil {
		return Info{}, err
	}
	if segEnd > size {
		return Info{}, unsupported("truncated", fmt.Errorf("the segment ends at %d, the file at %d", segEnd, size))
	}
	var doc ebmlDoc
	var clock webmClock
	br := bufio.NewReaderSize(io.NewSectionReader(r, 0, size), 64<<10)
	err = ebml.Unmarshal(br, &doc,
		ebml.WithMaxLeafElementSize(min(maxLeafElement, uint64(size))),
		ebml.WithElementReadHooks(clock.hook))
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return Info{}, unsupported("truncated", err)
		}
		return Info{}, unsupported("corrupt container", err)
	}
	switch doc.Header.DocType {
	case "webm":
		info.Container = WebM
	case "matroska":
		info.Container = Matroska
	default:
		return Info{}, unsupported("not an MP4, MOV or WebM file", fmt.Errorf("EBML document type %q", doc.Header.DocType))
	}
	scale := doc.Segment.Info.TimecodeScale
	if scale == 0 {
		scale = defaultTimecodeScale
	}
	if !math.IsInf(doc.Segment.Info.Duration, 0) {
		info.Duration = saturate(doc.Segment.Info.Duration * float64(scale))
	}
	if clock.seen {
		info.Duration = max(info.Duration, saturate(float64(clock.last-clock.first)*float64(scale)))
	}
	if info.Duration <= 0 {
		return Info{}, unsupported("no playable media", nil)
	}
	return info, nil
}

// segmentEnd reads the EBML header's and the Segment's element headers and
// returns where the Segment ends, -1 when its size is unknown (a live
// recording) or when no Segment follows the header.
func segmentEnd(r io.ReaderAt, size int64) (int64, error) {
	rd := &offsetReader{r: r, size: size}
	id, err := rd.vint(false)
	if err != nil || id != 0x1A45DFA3 {
		return 0, unsupported("not an MP4, MOV or WebM file", err)
	}
	hdrSize, err := rd.vint(true)
	if err != nil || hdrSize < 0 || hdrSize > size-rd.off {
		return 0, unsupported("truncated", err)
	}
	rd.off += hdrSize
	if rd.off == size {
		return 0, unsupported("no playable media", nil)
	}
	if id, err = rd.vint(false); err != nil {
		return 0, unsupported("truncated", err)
	}
	if id != 0x18538067 {
		return -1, nil
	}
	segSize, err := rd.vint(true)
	if err != nil {
		return 0, unsupported("truncated", err)
	}
	if segSize < 0 {
		return -1, nil
	}
	return rd.off + segSize, nil
}

// offsetReader reads EBML variable-length integers from a position.
type offsetReader struct {
	r    io.ReaderAt
	size int64
	off  int64
}

// vint reads an element id (marker kept) or a data size (marker dropped;
// -1 when all value bits are ones, "unknown size").
func (o *offsetReader) vint(isSize bool) (int64, error) {
	var b [8]byte
	if o.off >= o.size {
		return 0, io.ErrUnexpectedEOF
	}
	if _, err := o.r.ReadAt(b[:1], o.off); err != nil {
		return 0, err
	}
	n := 1
	for n <= 8 && b[0]&(0x80>>(n-1)) == 0 {
		n++
	}
	if n > 8 || (!isSize && n > 4) {
		return 0, errors.New("invalid variable-length integer")
	}
	if o.off+int64(n) > o.size {
		return 0, io.ErrUnexpectedEOF
	}
	if _, err := o.r.ReadAt(b[1:n], o.off+1); err != nil {
		return 0, err
	}
	o.off += int64(n)
	var v uint64
	if isSize {
		v = uint64(b[0] & (0xFF >> n))
	} else {
		v = uint64(b[0])
	}
	allOnes := b[0]&(0xFF>>n) == 0xFF>>n
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
		allOnes = allOnes && c == 0xFF
	}
	if isSize && allOnes {
		return -1, nil
	}
	if v > math.MaxInt64/2 {
		return 0, errors.New("size out of range")
	}
	return int64(v), nil
}
