package loader

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// TestMigrateMaps pins tern_endpoints as an older version could have
// defined it, with entries, then loads the current objects: instead of
// failing with ErrMapIncompatible (or reusing a map whose bytes mean
// something else), the loader replaces the pin with a map of the current
// definition, keeps the entries when their layout is unchanged, and reports
// the map as created so the datapath restores it.
func TestMigrateMaps(t *testing.T) {
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	cur := spec.Maps[ternbpf.TernMapTernEndpoints]
	for _, tc := range []struct {
		name     string
		old      func() *ebpf.MapSpec
		wantKept int
	}{
		{"max entries changed", func() *ebpf.MapSpec {
			ms := cur.Copy()
			ms.MaxEntries = 16
			return ms
		}, 3},
		{"value size changed", func() *ebpf.MapSpec {
			ms := cur.Copy()
			ms.ValueSize += 4
			ms.Key, ms.Value = nil, nil
			return ms
		}, 0},
		{"value layout changed, same size", func() *ebpf.MapSpec {
			ms := cur.Copy()
			// Same name and size, other fields: only BTF tells.
			ms.Value = &btf.Struct{Name: "endpoint", Size: ms.ValueSize, Members: []btf.Member{{
				Name: "blob",
				Type: &btf.Array{Type: &btf.Int{Name: "unsigned char", Size: 1}, Index: &btf.Int{Name: "__ARRAY_SIZE_TYPE__", Size: 4}, Nelems: ms.ValueSize},
			}}}
			return ms
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			l := versioned(newLoader(t), "v1")
			mapPins := filepath.Join(l.BPFFSDir, mapsDir)
			if err := os.MkdirAll(mapPins, 0o700); err != nil {
				t.Fatal(err)
			}
			old := tc.old()
			old.Pinning = ebpf.PinNone
			om, err := ebpf.NewMap(old)
			if err != nil {
				t.Fatal(err)
			}
			val := make([]byte, old.ValueSize)
			val[0] = 7
			for k := range uint32(3) {
				if err := om.Put(k+1, val); err != nil {
					t.Fatal(err)
				}
			}
			if err := om.Pin(filepath.Join(mapPins, ternbpf.TernMapTernEndpoints)); err != nil {
				t.Fatal(err)
			}
			om.Close()

			objs := load(t, l)
			if !objs.Created[ternbpf.TernMapTernEndpoints] {
				t.Errorf("tern_endpoints not reported as created (Created: %v)", objs.Created)
			}
			m, err := ebpf.LoadPinnedMap(filepath.Join(mapPins, ternbpf.TernMapTernEndpoints), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if why, _, err := incompatibility(cur, m); err != nil || why != "" {
				t.Errorf("the pinned map still differs from the current definition: %q, %v", why, err)
			}
			n := 0
			var k uint32
			got := make([]byte, m.ValueSize())
			for it := m.Iterate(); it.Next(&k, &got); {
				if got[0] != 7 {
					t.Errorf("entry %d copied as %v", k, got)
				}
				n++
			}
			if n != tc.wantKept {
				t.Errorf("%d entries in the migrated map, want %d", n, tc.wantKept)
			}
			if _, err := os.Stat(filepath.Join(mapPins, ternbpf.TernMapTernEndpoints+"_migrating")); !os.IsNotExist(err) {
				t.Errorf("temporary pin left: %v", err)
			}

			// Loaded again, nothing differs: no further migration.
			again := load(t, versioned(l, "v2"))
			if len(again.Created) != 0 {
				t.Errorf("second load created %v", again.Created)
			}
		})
	}
}
