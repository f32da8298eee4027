package video

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"time"

	mp4 "github.com/abema/go-mp4"
)

// Bounds of the MP4 probe. Real recordings stay far below them; a crafted
// file that goes past one is refused instead of being read further.
const (
	maxRootBoxes   = 1 << 20  // top-level boxes (a fragmented file has two per fragment)
	maxBoxes       = 4 << 20  // boxes visited in all
	maxHeaderBox   = 4 << 10  // ftyp, mvhd, mdhd, tkhd, mehd, trex, tfhd, tfdt
	maxTableBox    = 16 << 20 // stts, trun
	maxMP4Duration = 1 << 62  // ticks; beyond this a sum is nonsense
)

// topLevelBoxes are the box types an ISO BMFF or QuickTime file may start
// with; Probe sniffs MP4 by them.
var topLevelBoxes = map[string]bool{
	"ftyp": true, "moov": true, "mdat": true, "free": true, "skip": true, "wide": true,
	"pnot": true, "styp": true, "sidx": true, "moof": true, "uuid": true, "pdin": true,
}

func isTopLevelBox(t string) bool { return topLevelBoxes[t] }

// mp4Track is what the probe gathers of one track.
type mp4Track struct {
	id          uint32
	timescale   uint32
	mdhdTicks   uint64 // mdhd duration
	sttsTicks   uint64 // sum of the sample durations (stts)
	hasFrag     bool
	fragStart   uint64 // start of the first fragment (tfdt)
	fragEnd     uint64 // end of the latest fragment's samples (tfdt + trun durations)
	defaultDur  uint32 // trex default sample duration
	fragRunning uint64 // where the next fragment starts when it has no tfdt
}

// mp4Probe is the state of one ProbeMP4.
type mp4Probe struct {
	major     [4]byte
	hasFtyp   bool
	hasMoov   bool
	hasMvhd   bool
	timescale uint32 // mvhd
	mvhdTicks uint64
	mehdTicks uint64
	tracks    map[uint32]*mp4Track
	cur       *mp4Track // the trak being read
	order     []*mp4Track
	// the traf being read
	trafTrack   *mp4Track
	trafDefault uint32
	trafBase    uint64
	boxes       int
}

// ProbeMP4 reads an ISO BMFF (MP4) or QuickTime (MOV) file of size bytes.
// It walks the box structure, reading only headers and the small timing
// boxes (mvhd, mdhd, stts, mehd, trex, tfhd, tfdt, trun): mdat is skipped,
// so the cost does not grow with the media. The duration is the longest of
// the movie header's, the tracks' and the fragments'.
func ProbeMP4(r io.ReaderAt, size int64) (info Info, err error) {
	defer guard(&err)
	if err := scanRootBoxes(r, size); err != nil {
		return Info{}, err
	}
	p := &mp4Probe{tracks: map[uint32]*mp4Track{}}
	rs := io.NewSectionReader(r, 0, size)
	if _, err := mp4.ReadBoxStructure(rs, p.handle); err != nil {
		var ue *UnsupportedError
		if errors.As(err, &ue) {
			return Info{}, err
		}
		return Info{}, unsupported("corrupt container", err)
	}
	if !p.hasMoov || !p.hasMvhd {
		return Info{}, unsupported("no movie header (moov)", nil)
	}
	info.Container = MP4
	if !p.hasFtyp || p.major == mp4.BrandQT() {
		info.Container = MOV
	}
	info.Duration = p.duration()
	if info.Duration <= 0 {
		return Info{}, unsupported("no playable media", nil)
	}
	return info, nil
}

// scanRootBoxes checks the top level of the file before the parser sees
// it: the first box is one a movie starts with, every box lies inside the
// file (a truncated file fails here) and is at least its header long, and
// an ftyp is small (the parser reads it whole).
func scanRootBoxes(r io.ReaderAt, size int64) error {
	var off int64
	var hdr [16]byte
	for n := 0; off < size; n++ {
		if n >= maxRootBoxes {
			return unsupported("too many boxes", nil)
		}
		if size-off < 8 {
			return unsupported("truncated", fmt.Errorf("%d stray bytes at the end", size-off))
		}
		if _, err := r.ReadAt(hdr[:8], off); err != nil {
			return unsupported("truncated", err)
		}
		boxSize, headerSize := int64(binary.BigEndian.Uint32(hdr[:4])), int64(8)
		typ := string(hdr[4:8])
		if n == 0 && !isTopLevelBox(typ) {
			return unsupported("not an MP4, MOV or WebM file", nil)
		}
		switch boxSize {
		case 0: // to the end of the file
			boxSize = size - off
		case 1:
			if size-off < 16 {
				return unsupported("truncated", nil)
			}
			if _, err := r.ReadAt(hdr[8:16], off+8); err != nil {
				return unsupported("truncated", err)
			}
			large := binary.BigEndian.Uint64(hdr[8:16])
			if large > uint64(size) {
				return unsupported("truncated", fmt.Errorf("box %q of %d bytes at %d", typ, large, off))
			}
			boxSize, headerSize = int64(large), 16
		}
		if boxSize < headerSize {
			return unsupported("corrupt container", fmt.Errorf("box %q at %d is %d bytes", typ, off, boxSize))
		}
		if boxSize > size-off {
			return unsupported("truncated", fmt.Errorf("box %q of %d bytes at %d ends past the file (%d bytes)", typ, boxSize, off, size))
		}
		if typ == "ftyp" && boxSize > maxHeaderBox {
			return unsupported("corrupt container", fmt.Errorf("ftyp of %d bytes", boxSize))
		}
		off += boxSize
	}
	return nil
}

func (p *mp4Probe) handle(h *mp4.ReadHandle) (any, error) {
	p.boxes++
	if p.boxes > maxBoxes {
		return nil, unsupported("too many boxes", nil)
	}
	bi := h.BoxInfo
	if bi.Size < bi.HeaderSize {
		return nil, unsupported("corrupt container", fmt.Errorf("box %s is shorter than its header", bi.Type))
	}
	switch path := pathString(h.Path); path {
	case "ftyp":
		ftyp, err := payload[*mp4.Ftyp](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		if !p.hasFtyp {
			p.major, p.hasFtyp = ftyp.MajorBrand, true
		}
	case "moov":
		if p.hasMoov {
			return nil, unsupported("corrupt container", errors.New("two movie headers"))
		}
		p.hasMoov = true
		return h.Expand()
	case "moov/mvhd":
		mvhd, err := payload[*mp4.Mvhd](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.hasMvhd, p.timescale, p.mvhdTicks = true, mvhd.Timescale, known(mvhd.GetDuration())
	case "moov/trak":
		p.cur = &mp4Track{}
		defer func() { p.cur = nil }()
		vals, err := h.Expand()
		if err != nil {
			return nil, err
		}
		if p.cur.id != 0 {
			if _, dup := p.tracks[p.cur.id]; !dup {
				p.tracks[p.cur.id] = p.cur
			}
		}
		p.order = append(p.order, p.cur)
		return vals, nil
	case "moov/trak/tkhd":
		tkhd, err := payload[*mp4.Tkhd](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.cur.id = tkhd.TrackID
	case "moov/trak/mdia", "moov/trak/mdia/minf", "moov/trak/mdia/minf/stbl", "moov/mvex", "moof", "moof/traf":
		if path == "moof/traf" {
			p.trafTrack, p.trafDefault, p.trafBase = nil, 0, 0
		}
		return h.Expand()
	case "moov/trak/mdia/mdhd":
		mdhd, err := payload[*mp4.Mdhd](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.cur.timescale, p.cur.mdhdTicks = mdhd.Timescale, known(mdhd.GetDuration())
	case "moov/trak/mdia/minf/stbl/stts":
		stts, err := payload[*mp4.Stts](h, maxTableBox)
		if err != nil {
			return nil, err
		}
		var sum uint64
		for _, e := range stts.Entries {
			sum = addTicks(sum, min(uint64(e.SampleCount)*uint64(e.SampleDelta), maxMP4Duration))
		}
		p.cur.sttsTicks = sum
	case "moov/mvex/mehd":
		mehd, err := payload[*mp4.Mehd](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.mehdTicks = known(mehd.GetFragmentDuration())
	case "moov/mvex/trex":
		trex, err := payload[*mp4.Trex](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.track(trex.TrackID).defaultDur = trex.DefaultSampleDuration
	case "moof/traf/tfhd":
		tfhd, err := payload[*mp4.Tfhd](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		t := p.track(tfhd.TrackID)
		p.trafTrack, p.trafBase, p.trafDefault = t, t.fragRunning, t.defaultDur
		if tfhd.CheckFlag(mp4.TfhdDefaultSampleDurationPresent) {
			p.trafDefault = tfhd.DefaultSampleDuration
		}
	case "moof/traf/tfdt":
		tfdt, err := payload[*mp4.Tfdt](h, maxHeaderBox)
		if err != nil {
			return nil, err
		}
		p.trafBase = tfdt.GetBaseMediaDecodeTime()
	case "moof/traf/trun":
		if p.trafTrack == nil {
			return nil, unsupported("corrupt container", errors.New("trun before tfhd"))
		}
		trun, err := payload[*mp4.Trun](h, maxTableBox)
		if err != nil {
			return nil, err
		}
		var sum uint64
		if trun.CheckFlag(0x000100) { // sample-duration-present
			for _, e := range trun.Entries {
				sum = addTicks(sum, uint64(e.SampleDuration))
			}
		} else {
			sum = min(uint64(trun.SampleCount)*uint64(p.trafDefault), maxMP4Duration)
		}
		start, end := p.trafBase, addTicks(p.trafBase, sum)
		p.trafBase = end
		t := p.trafTrack
		if !t.hasFrag || start < t.fragStart {
			t.fragStart = start
		}
		t.hasFrag, t.fragRunning, t.fragEnd = true, end, max(t.fragEnd, end)
	}
	return nil, nil
}

// track returns the track of an id, creating it for fragments of a track
// the movie header did not describe (their times are then unusable).
func (p *mp4Probe) track(id uint32) *mp4Track {
	t, ok := p.tracks[id]
	if !ok {
		t = &mp4Track{id: id}
		p.tracks[id] = t
	}
	return t
}

// duration is the longest of the durations the file states: the movie
// header's, the fragments' (mehd), and each track's (mdhd, the sum of its
// samples, the span of its fragments).
func (p *mp4Probe) duration() time.Duration {
	movie := uint64(p.timescale)
	d := max(seconds(p.mvhdTicks, movie), seconds(p.mehdTicks, movie))
	tracks := slices.Collect(maps.Values(p.tracks))
	for _, t := range append(tracks, p.order...) {
		ts := uint64(t.timescale)
		d = max(d, seconds(t.mdhdTicks, ts), seconds(t.sttsTicks, ts))
		if t.hasFrag {
			d = max(d, seconds(t.fragEnd-t.fragStart, ts))
		}
	}
	return d
}

func pathString(path mp4.BoxPath) string {
	b := make([]byte, 0, len(path)*5)
	for i, t := range path {
		if i > 0 {
			b = append(b, '/')
		}
		b = append(b, t[:]...)
	}
	return string(b)
}

// payload reads a box's payload as T, refusing boxes larger than limit.
func payload[T mp4.IBox](h *mp4.ReadHandle, limit uint64) (T, error) {
	var zero T
	if h.BoxInfo.Size-h.BoxInfo.HeaderSize > limit {
		return zero, unsupported("corrupt container", fmt.Errorf("%s box of %d bytes", h.BoxInfo.Type, h.BoxInfo.Size))
	}
	box, _, err := h.ReadPayload()
	if err != nil {
		return zero, unsupported("corrupt container", err)
	}
	v, ok := box.(T)
	if !ok {
		return zero, unsupported("corrupt container", fmt.Errorf("%s box has an unexpected layout", h.BoxInfo.Type))
	}
	return v, nil
}

// known is a header duration, 0 for "unknown" (all ones).
func known(d uint64) uint64 {
	if d == 0xFFFFFFFF || d == 0xFFFFFFFFFFFFFFFF {
		return 0
	}
	return d
}

// addTicks adds without wrapping around.
func addTicks(a, b uint64) uint64 {
	if a+b < a || a+b > maxMP4Duration {
		return maxMP4Duration
	}
	return a + b
}
