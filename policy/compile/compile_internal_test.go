package compile

import (
	"math/rand/v2"
	"testing"
)

// TestPortBlocks checks that a range becomes prefix-aligned blocks that
// cover it exactly, and that the cover is minimal: no two blocks are the
// halves of one larger aligned block.
func TestPortBlocks(t *testing.T) {
	cases := []struct {
		lo, hi uint16
		n      int // expected number of blocks
	}{
		{80, 80, 1},
		{0, 65535, 1},
		{1, 65535, 16},
		{1024, 2047, 1},
		{1000, 1100, 6}, // 1000/13 1008/12 1024/10 1088/13 1096/14 1100/16
		{8000, 8100, 4}, // 8000/10 8064/11 8096/14 8100/16
		{65535, 65535, 1},
		{0, 0, 1},
		{32767, 32768, 2},
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		a, b := uint16(r.Uint32()), uint16(r.Uint32())
		if r.IntN(2) == 0 {
			b = a + uint16(r.IntN(300))
		}
		cases = append(cases, struct {
			lo, hi uint16
			n      int
		}{min(a, b), max(a, b), -1})
	}
	for _, c := range cases {
		blocks := portBlocks(c.lo, c.hi)
		next := uint32(c.lo)
		for i, b := range blocks {
			size := uint32(1) << (16 - b.bits)
			if uint32(b.port) != next || uint32(b.port)%size != 0 {
				t.Fatalf("[%d,%d]: block %d = %d/%d: not aligned or not contiguous", c.lo, c.hi, i, b.port, b.bits)
			}
			next += size
			if i > 0 {
				p := blocks[i-1]
				if p.bits == b.bits && b.bits > 0 && uint32(p.port)%(2*size) == 0 {
					t.Fatalf("[%d,%d]: blocks %d/%d and %d/%d could be one", c.lo, c.hi, p.port, p.bits, b.port, b.bits)
				}
			}
		}
		if next != uint32(c.hi)+1 {
			t.Fatalf("[%d,%d]: blocks end at %d", c.lo, c.hi, next-1)
		}
		if c.n >= 0 && len(blocks) != c.n {
			t.Errorf("[%d,%d]: %d blocks %v, want %d", c.lo, c.hi, len(blocks), blocks, c.n)
		}
	}
}

func TestMaskBits(t *testing.T) {
	data := []byte{0xff, 0xff, 0xff}
	for n, want := range map[int][]byte{
		0:  {0, 0, 0},
		3:  {0xe0, 0, 0},
		8:  {0xff, 0, 0},
		12: {0xff, 0xf0, 0},
		24: {0xff, 0xff, 0xff},
	} {
		if got := maskBits(data, n); string(got) != string(want) {
			t.Errorf("maskBits(%d) = %x, want %x", n, got, want)
		}
	}
}
