package loader

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
)

// objectNames is what opening a pinned version needs to know of its
// objects: the names of the maps pinned by name and of the programs. Every
// CNI command opens the pins; parsing the embedded ELF objects to learn
// these names cost about 40 % of an ADD's CPU time, so the loader keeps
// them on record (namesFile), per version, and parses only on a miss.
type objectNames struct {
	Version  string   `json:"version"`
	Maps     []string `json:"maps"`
	Programs []string `json:"programs"`
}

// namesFile holds the objectNames of the version last loaded or opened.
// It is a cache: missing, garbled or of another version, the loader parses
// the objects as before and writes it again.
const namesFile = "bpf-objects.json"

func namesOf(version string, specs []*ebpf.CollectionSpec) *objectNames {
	n := &objectNames{Version: version}
	for _, spec := range specs {
		for name, ms := range spec.Maps {
			if ms.Pinning == ebpf.PinByName && !slices.Contains(n.Maps, name) {
				n.Maps = append(n.Maps, name)
			}
		}
		for name := range spec.Programs {
			n.Programs = append(n.Programs, name)
		}
	}
	slices.Sort(n.Maps)
	slices.Sort(n.Programs)
	return n
}

// readNames returns the recorded names of this loader's version.
func (l *Loader) readNames() (*objectNames, bool) {
	b, err := os.ReadFile(filepath.Join(l.StateDir, namesFile))
	if err != nil {
		return nil, false
	}
	var n objectNames
	if json.Unmarshal(b, &n) != nil || n.Version != l.Version || len(n.Programs) == 0 {
		return nil, false
	}
	return &n, true
}

// writeNames records names, best effort (the record only saves time):
// written to a temporary file and renamed, so a reader sees the old record
// or the new one, never a torn one; no fsync, as a record lost in a crash
// only costs the next command a parse.
func (l *Loader) writeNames(n *objectNames) {
	if cur, ok := l.readNames(); ok && slices.Equal(cur.Maps, n.Maps) && slices.Equal(cur.Programs, n.Programs) {
		return
	}
	b, err := json.Marshal(n)
	if err != nil {
		return
	}
	f, err := os.CreateTemp(l.StateDir, "."+namesFile+"-")
	if err != nil {
		return
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(l.StateDir, namesFile))
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
}
