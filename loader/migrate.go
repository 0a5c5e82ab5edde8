package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// Map migration. Maps are pinned by name and reused across versions, so
// their contents (endpoints, NAT, conntrack, policy) survive an upgrade.
// When a new version changes a map's definition (type, key or value size,
// max entries, flags) or the layout of its key or value (their BTF, which
// sizes alone do not show: two fields swapped, a field retyped), reusing
// the pin would fail every ADD (ErrMapIncompatible) or, worse, have the new
// programs read old bytes with a new meaning. Instead the loader creates
// the new map, copies what is compatible, and swaps the pin in one rename:
//
//   - same key and value layout (only max entries or flags changed): every
//     entry is copied, up to the new capacity;
//   - anything else: nothing is copied (the bytes would mean something
//     else); the map starts empty.
//
// Either way the map is reported in Objects.Created, so the endpoints and
// the policy are restored from the node's records (datapath/ebpf Restore).
// NAT and conntrack entries of a map that could not be copied are lost:
// flows through them start over. Per-CPU maps (counters) start at zero.
// Programs of the old version keep the old map until their attachments are
// moved to the new programs, moments later under the same lock.

// migrateMaps makes every existing pin under mapPins fit its spec, and
// returns the names of the maps it replaced.
func migrateMaps(specs []*ebpf.CollectionSpec, mapPins string) (map[string]bool, error) {
	migrated := map[string]bool{}
	seen := map[string]bool{}
	for _, spec := range specs {
		for name, ms := range spec.Maps {
			if seen[name] || ms.Pinning != ebpf.PinByName {
				continue
			}
			seen[name] = true
			path := filepath.Join(mapPins, name)
			old, err := ebpf.LoadPinnedMap(path, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("open pinned map %s: %w", name, err)
			}
			why, sameLayout, err := incompatibility(ms, old)
			if err == nil && why != "" {
				err = migrateMap(ms, old, path, sameLayout)
			}
			old.Close()
			if err != nil {
				return nil, fmt.Errorf("migrate pinned map %s (%s): %w", name, why, err)
			}
			if why != "" {
				migrated[name] = true
			}
		}
	}
	return migrated, nil
}

// incompatibility says why the pinned map m cannot serve spec ms ("" when
// it can), and whether its entries keep their meaning in the new map (key
// and value of the same size and layout).
func incompatibility(ms *ebpf.MapSpec, m *ebpf.Map) (why string, sameLayout bool, err error) {
	sameSizes := m.Type() == ms.Type && m.KeySize() == ms.KeySize && m.ValueSize() == ms.ValueSize
	layoutDiff, err := btfDifference(ms, m)
	if err != nil {
		return "", false, err
	}
	sameLayout = sameSizes && layoutDiff == ""
	var reasons []string
	if cerr := ms.Compatible(m); cerr != nil {
		reasons = append(reasons, cerr.Error())
	}
	if layoutDiff != "" {
		reasons = append(reasons, layoutDiff)
	}
	return strings.Join(reasons, "; "), sameLayout, nil
}

// btfDifference compares the layouts of the pinned map's key and value,
// from the BTF it was created with, to the spec's. A map without BTF, or a
// spec without key and value types, has nothing to compare.
func btfDifference(ms *ebpf.MapSpec, m *ebpf.Map) (string, error) {
	if ms.Key == nil && ms.Value == nil {
		return "", nil
	}
	info, err := m.Info()
	if err != nil {
		return "", fmt.Errorf("map info: %w", err)
	}
	id, ok := info.BTFID()
	if !ok {
		return "", nil
	}
	h, err := btf.NewHandleFromID(id)
	if err != nil {
		return "", fmt.Errorf("open map BTF %d: %w", id, err)
	}
	defer h.Close()
	pinned, err := h.Spec(nil)
	if err != nil {
		return "", fmt.Errorf("read map BTF %d: %w", id, err)
	}
	var b btf.Builder
	for _, t := range []btf.Type{ms.Key, ms.Value} {
		if t != nil {
			if _, err := b.Add(t); err != nil {
				return "", fmt.Errorf("spec BTF: %w", err)
			}
		}
	}
	want, err := b.Spec()
	if err != nil {
		return "", fmt.Errorf("spec BTF: %w", err)
	}
	got, wantL := layouts(pinned), layouts(want)
	if slices.Equal(got, wantL) {
		return "", nil
	}
	return fmt.Sprintf("key/value layout changed: %s -> %s", strings.Join(got, "; "), strings.Join(wantL, "; ")), nil
}

// layouts describes every named struct, union and typedef of a map's BTF
// as a Go declaration (field names, types and padding give offsets),
// sorted and without repeats: the order types were added in does not
// matter.
func layouts(spec *btf.Spec) []string {
	var out []string
	gf := btf.GoFormatter{}
	for t, err := range spec.All() {
		if err != nil {
			break
		}
		switch t.(type) {
		case *btf.Struct, *btf.Union, *btf.Typedef:
		default:
			continue
		}
		name := t.TypeName()
		if name == "" {
			continue
		}
		decl, err := gf.TypeDeclaration("T", t)
		if err != nil {
			decl = fmt.Sprint(t)
		}
		out = append(out, name+": "+decl)
	}
	// A type can appear more than once (the BTF a map was created with is
	// not deduplicated): compare the set.
	slices.Sort(out)
	return slices.Compact(out)
}

// migrateMap creates ms's map, copies old's entries when they keep their
// meaning, and renames the new pin over the old one.
func migrateMap(ms *ebpf.MapSpec, old *ebpf.Map, path string, copyEntries bool) error {
	spec := ms.Copy()
	spec.Pinning = ebpf.PinNone
	spec.Contents = nil
	nm, err := ebpf.NewMap(spec)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	defer nm.Close()
	if copyEntries && !perCPU(ms.Type) {
		key := make([]byte, ms.KeySize)
		val := make([]byte, ms.ValueSize)
		it := old.Iterate()
		for it.Next(&key, &val) {
			if err := nm.Update(key, val, ebpf.UpdateAny); err != nil {
				if errors.Is(err, unix.E2BIG) {
					break // smaller than before: keep what fits
				}
				return fmt.Errorf("copy entry: %w", err)
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("iterate: %w", err)
		}
	}
	tmp := path + "_migrating" // bpffs rejects dots in names
	_ = os.Remove(tmp)
	if err := nm.Pin(tmp); err != nil {
		return fmt.Errorf("pin: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("swap pin: %w", err)
	}
	return nil
}

func perCPU(t ebpf.MapType) bool {
	switch t {
	case ebpf.PerCPUHash, ebpf.PerCPUArray, ebpf.LRUCPUHash, ebpf.PerCPUCGroupStorage:
		return true
	}
	return false
}
