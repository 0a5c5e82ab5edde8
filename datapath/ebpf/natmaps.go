package ebpf

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"unsafe"

	cilium "github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/loader"
)

// NAT map sizing. The two NAT maps (tern_nat, tern_nat_rev) are
// preallocated hashes of 16-byte keys and values: the kernel charges 96
// bytes per entry (measured: 6,292,528 bytes of memlock for 65,536
// entries), so a budget of B bytes holds B / 192 flows.
const (
	natEntryBytes = 96
	// DefaultNATMemoryMiB is the default budget: 65,536 flows, the size
	// the maps had before they were configurable.
	DefaultNATMemoryMiB = 12
	MinNATMemoryMiB     = 1
	MaxNATMemoryMiB     = 4096
)

// NATMapEntries is the number of flows (entries per NAT map) a budget of
// memMiB MiB holds.
func NATMapEntries(memMiB int) uint32 {
	return uint32(uint64(memMiB) << 20 / (2 * natEntryBytes))
}

// mapEntries is the size of each NAT map for these settings.
func (n NAT) mapEntries() uint32 {
	mem := n.MemoryMiB
	if mem == 0 {
		mem = DefaultNATMemoryMiB
	}
	return NATMapEntries(mem)
}

// natKey returns the node's secret for the NAT port choice: the one in the
// pinned tern_nat_key when there is one, else a new random key. Called
// under the loader lock, so two processes never pick two keys.
func natKey(mapsDir string) (ternbpf.TernNatKey, error) {
	var k ternbpf.TernNatKey
	m, err := cilium.LoadPinnedMap(filepath.Join(mapsDir, ternbpf.TernMapTernNatKey), nil)
	if err == nil {
		err = m.Lookup(uint32(0), &k)
		m.Close()
		if err != nil {
			return k, fmt.Errorf("read NAT key: %w", err)
		}
		if k != (ternbpf.TernNatKey{}) {
			return k, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return k, fmt.Errorf("open pinned NAT key: %w", err)
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return k, fmt.Errorf("random NAT key: %w", err)
	}
	k.K0 = binary.LittleEndian.Uint64(b[:8])
	k.K1 = binary.LittleEndian.Uint64(b[8:])
	return k, nil
}

// prepareNATMaps fits the NAT map specs of every object to the settings
// before load: their size from the memory budget, the node's NAT key, and
// pinned NAT maps of another type or size (LRU maps of older versions, a
// changed budget) re-created under their pin with their entries copied.
func (n NAT) prepareNATMaps(specs []*cilium.CollectionSpec, mapsDir string) error {
	key, err := natKey(mapsDir)
	if err != nil {
		return err
	}
	entries := n.mapEntries()
	migrated := map[string]bool{}
	for _, spec := range specs {
		for _, name := range []string{ternbpf.TernMapTernNat, ternbpf.TernMapTernNatRev} {
			ms, ok := spec.Maps[name]
			if !ok {
				continue
			}
			ms.MaxEntries = entries
			if !migrated[name] && ms.Pinning == cilium.PinByName {
				if err := migrateMap(filepath.Join(mapsDir, name), ms); err != nil {
					return err
				}
				migrated[name] = true
			}
		}
		if ms, ok := spec.Maps[ternbpf.TernMapTernNatKey]; ok {
			ms.Contents = []cilium.MapKV{{Key: uint32(0), Value: key}}
		}
	}
	return nil
}

// migrateMap re-creates the map pinned at pin when it does not match spec
// (type, size, key or value size, flags), copying what fits: the entries
// of an older version's map go on working with the new programs. Entries
// the old programs add between the copy and the switch to the new
// programs are lost (those flows allocate again). Called under the loader
// lock.
func migrateMap(pin string, spec *cilium.MapSpec) error {
	old, err := cilium.LoadPinnedMap(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned map %s: %w", pin, err)
	}
	defer old.Close()
	if old.Type() == spec.Type && old.MaxEntries() == spec.MaxEntries && old.KeySize() == spec.KeySize &&
		old.ValueSize() == spec.ValueSize && old.Flags() == spec.Flags {
		return nil
	}
	fresh := spec.Copy()
	fresh.Pinning = cilium.PinNone
	m, err := cilium.NewMap(fresh)
	if err != nil {
		return fmt.Errorf("re-create map %s: %w", pin, err)
	}
	defer m.Close()
	if old.KeySize() == spec.KeySize && old.ValueSize() == spec.ValueSize {
		var (
			k  = make([]byte, spec.KeySize)
			v  = make([]byte, spec.ValueSize)
			it = old.Iterate()
		)
		for it.Next(&k, &v) {
			if err := m.Put(k, v); err != nil {
				break // smaller and full: the rest allocate again
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("copy map %s: %w", pin, err)
		}
	}
	// Swap the pin: programs loaded from now on find the new map.
	tmp := pin + "_new"
	_ = os.Remove(tmp)
	if err := m.Pin(tmp); err != nil {
		return fmt.Errorf("pin re-created map %s: %w", pin, err)
	}
	if err := os.Rename(tmp, pin); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("replace pinned map %s: %w", pin, err)
	}
	return nil
}

// runNATGC runs the program tern_nat_gc once: it (re)arms the NAT garbage
// collector's timer with the loaded programs' code and collects expired
// pairs now. Returns the entries removed.
func runNATGC(objs interface {
	Program(string) (*cilium.Program, error)
}) (int, error) {
	p, err := objs.Program(ternbpf.TernProgTernNatGc)
	if err != nil {
		return 0, err
	}
	ret, _, err := p.Test(make([]byte, 14))
	if err != nil {
		return 0, fmt.Errorf("run NAT garbage collector: %w", err)
	}
	if int32(ret) < 0 {
		return 0, fmt.Errorf("arm NAT garbage collector: error %d", int32(ret))
	}
	return int(ret), nil
}

// natGCStampFile records, in the state directory, which timer the NAT
// garbage collector runs on: "<boot id> <program id> <timer map id>" of
// the last successful runNATGC. The timer re-arms itself at every tick and
// lives as long as its map, so while the pinned program and timer map are
// the ones on record, running tern_nat_gc again (a BPF_PROG_TEST_RUN and a
// pass over both NAT maps, about 1 ms of CPU) at every CNI command changes
// nothing: the timer collects every nat_gc_interval seconds, and the port
// allocator reclaims idle ports by itself when it needs one. A new program
// version, a recreated timer map (lost pins, resized maps) or a reboot
// (kernel object IDs start over; the boot ID tells) does not match the
// record, and the command that opens it arms the timer, as every command
// did before. The record is written after the run succeeded, so a crash in
// between makes the next command arm again; it is not synced (lost in a
// crash with the page cache, it only costs one more run).
const natGCStampFile = "nat-gc-armed"

// bootIDPath is the kernel's random ID of this boot (a variable for tests).
var bootIDPath = "/proc/sys/kernel/random/boot_id"

// armNATGC runs tern_nat_gc unless the record says this program already
// armed this timer map since boot.
func (d *Datapath) armNATGC(objs *loader.Objects) error {
	stamp := natGCStamp(objs)
	path := filepath.Join(d.cfg.StateDir, natGCStampFile)
	if stamp != "" && d.cfg.StateDir != "" {
		if b, err := os.ReadFile(path); err == nil && string(b) == stamp {
			return nil
		}
	}
	if _, err := runNATGC(objs); err != nil {
		return err
	}
	if stamp != "" && d.cfg.StateDir != "" {
		writeStamp(d.cfg.StateDir, natGCStampFile, stamp) // best effort: a missing record costs one more run
	}
	return nil
}

// natGCStamp returns the record of the running collector's identity, ""
// if any part of it is unknown (then every open runs the collector).
func natGCStamp(objs *loader.Objects) string {
	boot, err := os.ReadFile(bootIDPath)
	if err != nil || len(boot) == 0 {
		return ""
	}
	p, err := objs.Program(ternbpf.TernProgTernNatGc)
	if err != nil {
		return ""
	}
	m := objs.Maps[ternbpf.TernMapTernNatGcTimer]
	if m == nil {
		return ""
	}
	pid, err := objID(p.FD())
	if err != nil {
		return ""
	}
	mid, err := objID(m.FD())
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%s %d %d\n", bytes.TrimSpace(boot), pid, mid)
}

// objID returns the kernel ID of the program or map behind fd: the
// second field of bpf_prog_info and bpf_map_info, read with
// BPF_OBJ_GET_INFO_BY_FD into a buffer just large enough for it (the
// kernel copies no more than info_len). Program.Info would also read
// /proc/self/fdinfo and the program's instructions.
func objID(fd int) (uint32, error) {
	var info [2]uint32 // type, id
	attr := struct {
		bpfFD   uint32
		infoLen uint32
		info    uint64
	}{bpfFD: uint32(fd), infoLen: uint32(unsafe.Sizeof(info)), info: uint64(uintptr(unsafe.Pointer(&info)))}
	for {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		runtime.KeepAlive(&info)
		switch errno {
		case 0:
			if info[1] == 0 {
				return 0, errors.New("no object id")
			}
			return info[1], nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// writeStamp replaces dir/name with data (temp file and rename: a reader
// sees the old record or the new one), ignoring errors.
func writeStamp(dir, name, data string) {
	f, err := os.CreateTemp(dir, "."+name+"-")
	if err != nil {
		return
	}
	_, err = f.WriteString(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, name))
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
}
