package loader

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// countingLoader is a loader of the embedded objects that counts how often
// it parses them.
func countingLoader(bpffs, state string, parses *int) *Loader {
	l := New(bpffs, state)
	specs := l.Specs
	l.Specs = func() ([]*ebpf.CollectionSpec, error) {
		*parses++
		return specs()
	}
	return l
}

// TestLoadPinnedSkipsParsing: once a version is pinned and its names are
// on record, opening it parses no object, and yields the same programs and
// maps as a load that parses.
func TestLoadPinnedSkipsParsing(t *testing.T) {
	testutil.RequirePrivileged(t)
	bpffs, state := testutil.MountBPFFS(t), t.TempDir()
	parses := 0
	first := load(t, countingLoader(bpffs, state, &parses))
	if parses != 1 {
		t.Fatalf("first load parsed %d times, want 1", parses)
	}
	second := load(t, countingLoader(bpffs, state, &parses))
	if parses != 1 {
		t.Errorf("opening the pinned version parsed the objects again (%d parses)", parses)
	}
	if progID(t, first) != progID(t, second) {
		t.Errorf("pinned open: program %d, want %d", progID(t, second), progID(t, first))
	}
	for _, objs := range []*Objects{first, second} {
		if _, err := objs.Map(ternbpf.TernMapTernEndpoints); err != nil {
			t.Error(err)
		}
	}
	names := func(m map[string]*ebpf.Map) []string {
		var out []string
		for k := range m {
			out = append(out, k)
		}
		slices.Sort(out)
		return out
	}
	if a, b := names(first.Maps), names(second.Maps); !slices.Equal(a, b) {
		t.Errorf("maps of the pinned open %v, of the load %v", b, a)
	}
	if len(first.Programs) != len(second.Programs) {
		t.Errorf("programs of the pinned open: %d, of the load: %d", len(second.Programs), len(first.Programs))
	}
}

// TestLoadNamesRecordMisses: a garbled record, a record of another
// version, or a map pin gone since the record was written all fall back to
// parsing; a lost map is created anew and reported in Created, as without
// the record.
func TestLoadNamesRecordMisses(t *testing.T) {
	testutil.RequirePrivileged(t)
	bpffs, state := testutil.MountBPFFS(t), t.TempDir()
	parses := 0
	load(t, countingLoader(bpffs, state, &parses))
	record := filepath.Join(state, namesFile)

	if err := os.WriteFile(record, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	load(t, countingLoader(bpffs, state, &parses))
	if parses != 2 {
		t.Errorf("garbled record: %d parses, want 2", parses)
	}
	if _, ok := countingLoader(bpffs, state, &parses).readNames(); !ok {
		t.Error("the load after a garbled record did not write it again")
	}

	if err := os.WriteFile(record, []byte(`{"version":"other","maps":["x"],"programs":["y"]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	load(t, countingLoader(bpffs, state, &parses))
	if parses != 3 {
		t.Errorf("record of another version: %d parses, want 3", parses)
	}

	if err := os.Remove(filepath.Join(bpffs, "maps", ternbpf.TernMapTernEndpoints)); err != nil {
		t.Fatal(err)
	}
	objs := load(t, countingLoader(bpffs, state, &parses))
	if parses != 4 {
		t.Errorf("map pin lost: %d parses, want 4", parses)
	}
	if !objs.Created[ternbpf.TernMapTernEndpoints] {
		t.Errorf("map pin lost: Created = %v, want %s in it", objs.Created, ternbpf.TernMapTernEndpoints)
	}
	if !exists(filepath.Join(bpffs, "maps", ternbpf.TernMapTernEndpoints)) {
		t.Error("lost map not pinned again")
	}
}
