package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/loader"
)

func TestKernelRelease(t *testing.T) {
	cases := []struct {
		release string
		ok      bool
	}{
		{"6.18.44-cloud-amd64", true},
		{"6.3.0", true},
		{"6.3-rc1", true},
		{"7.0.1", true},
		{"10.1", true},
		{"6.2.16-generic", false},
		{"6.1.0-28-amd64", false},
		{"5.15.0-91-generic", false},
		{"4.19.0", false},
		{"6", false},
		{"garbage", false},
	}
	for _, c := range cases {
		err := checkKernelRelease(c.release)
		if (err == nil) != c.ok {
			t.Errorf("checkKernelRelease(%q) = %v, want ok %v", c.release, err, c.ok)
		}
		if _, _, perr := kernelRelease(c.release); err != nil && perr == nil && !strings.Contains(err.Error(), "older than 6.3") {
			t.Errorf("checkKernelRelease(%q): %v does not name the minimum 6.3", c.release, err)
		}
	}
}

// TestProbeFIBSkipNeigh: this kernel (6.18) accepts the flag, and the
// probe runs the helper for real: without the flag bits it would not tell.
func TestProbeFIBSkipNeigh(t *testing.T) {
	testutil.RequirePrivileged(t)
	if err := probeFIBSkipNeigh(); err != nil {
		t.Fatalf("probe on this kernel: %v", err)
	}
	if err := checkKernel(); err != nil {
		t.Fatalf("checkKernel on this kernel: %v", err)
	}
}

func TestNATMapEntries(t *testing.T) {
	for _, c := range []struct {
		mib  int
		want uint32
	}{{12, 65536}, {1, 5461}, {48, 262144}} {
		if got := NATMapEntries(c.mib); got != c.want {
			t.Errorf("NATMapEntries(%d) = %d, want %d", c.mib, got, c.want)
		}
	}
	if NATMapEntries(DefaultNATMemoryMiB) != 65536 {
		t.Error("the default budget does not keep the former 65,536 flows")
	}
}

func natPinnedMap(t *testing.T, bpffs, name string) *cilium.Map {
	t.Helper()
	m, err := cilium.LoadPinnedMap(filepath.Join(bpffs, "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func natKeyOf(t *testing.T, bpffs string) ternbpf.TernNatKey {
	t.Helper()
	var k ternbpf.TernNatKey
	if err := natPinnedMap(t, bpffs, ternbpf.TernMapTernNatKey).Lookup(uint32(0), &k); err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNATKeyPerNode: each node gets its own random NAT key when its maps
// are created; reloading, also another program version, keeps it.
func TestNATKeyPerNode(t *testing.T) {
	a, b := newNode(t, loader.ModeTCX), newNode(t, loader.ModeTCX)
	for _, n := range []*node{a, b} {
		n.do(t, n.dp.open)
	}
	ka, kb := natKeyOf(t, a.bpffs), natKeyOf(t, b.bpffs)
	if ka == (ternbpf.TernNatKey{}) || kb == (ternbpf.TernNatKey{}) {
		t.Fatalf("zero NAT key: %+v %+v", ka, kb)
	}
	if ka == kb {
		t.Fatalf("two nodes got the same NAT key %+v", ka)
	}
	n := DefaultNAT()
	n.UDP = 90 * 1e9
	again := New(Config{BPFFSDir: a.bpffs, StateDir: a.state, NAT: n})
	t.Cleanup(again.Close)
	a.do(t, again.open)
	if again.loader.Version == a.dp.loader.Version {
		t.Fatal("other settings, same version: the test does not reload")
	}
	if k := natKeyOf(t, a.bpffs); k != ka {
		t.Errorf("reload changed the NAT key: %+v, was %+v", k, ka)
	}
}

// TestNATMapMigration: an older version's LRU NAT map, pinned on the node,
// is re-created as a plain hash of the configured size with its entries;
// a new budget re-creates it again at the new size.
func TestNATMapMigration(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	dir := filepath.Join(n.bpffs, "maps")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	old, err := cilium.NewMap(&cilium.MapSpec{Name: "tern_nat", Type: cilium.LRUHash, KeySize: 16, ValueSize: 16, MaxEntries: 65536})
	if err != nil {
		t.Fatal(err)
	}
	key := ternbpf.TernNatTuple{Saddr: 1, Daddr: 2, Sport: 3, Dport: 4, Proto: 17}
	val := ternbpf.TernNatEntry{LastSeen: 1 << 62, Addr: 5, Port: 6}
	if err := old.Put(key, val); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(filepath.Join(dir, "tern_nat")); err != nil {
		t.Fatal(err)
	}
	old.Close()

	check := func(entries uint32) {
		t.Helper()
		m := natPinnedMap(t, n.bpffs, ternbpf.TernMapTernNat)
		if m.Type() != cilium.Hash || m.MaxEntries() != entries {
			t.Errorf("pinned tern_nat: %s of %d, want a hash of %d", m.Type(), m.MaxEntries(), entries)
		}
		var got ternbpf.TernNatEntry
		if err := m.Lookup(key, &got); err != nil || got != val {
			t.Errorf("entry after migration: %+v %v, want %+v", got, err, val)
		}
		rev := natPinnedMap(t, n.bpffs, ternbpf.TernMapTernNatRev)
		if rev.Type() != cilium.Hash || rev.MaxEntries() != entries {
			t.Errorf("pinned tern_nat_rev: %s of %d, want a hash of %d", rev.Type(), rev.MaxEntries(), entries)
		}
	}
	n.do(t, n.dp.open)
	check(65536)

	nat := DefaultNAT()
	nat.MemoryMiB = 1
	small := New(Config{BPFFSDir: n.bpffs, StateDir: n.state, NAT: nat})
	t.Cleanup(small.Close)
	n.do(t, small.open)
	check(5461)
	// The programs of the new version use the new map.
	info, err := small.objs.Maps[ternbpf.TernMapTernNat].Info()
	if err != nil {
		t.Fatal(err)
	}
	if info.MaxEntries != 5461 {
		t.Errorf("loaded tern_nat has %d entries, want 5461", info.MaxEntries)
	}
}

// TestNATGCOnOpen: opening the datapath arms the in-kernel NAT collector
// and collects expired NAT pairs at once when the collector's timer is not
// on record as armed by the opened program on the opened timer map since
// boot (natGCStampFile): first open, record missing, another boot, another
// program (an upgrade), another timer map. When the record matches, the
// open runs nothing (the timer collects within nat_gc_interval).
func TestNATGCOnOpen(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	bootID := filepath.Join(t.TempDir(), "boot_id")
	if err := os.WriteFile(bootID, []byte("boot-a\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	oldBootID := bootIDPath
	bootIDPath = bootID
	t.Cleanup(func() { bootIDPath = oldBootID })
	n.do(t, n.dp.open)
	stampPath := filepath.Join(n.state, natGCStampFile)
	stamp, err := os.ReadFile(stampPath)
	if err != nil {
		t.Fatalf("no record of the armed collector after the first open: %v", err)
	}
	fwd := natPinnedMap(t, n.bpffs, ternbpf.TernMapTernNat)
	rev := natPinnedMap(t, n.bpffs, ternbpf.TernMapTernNatRev)
	ip := func(a, b, c, d byte) uint32 { return binary.NativeEndian.Uint32([]byte{a, b, c, d}) }
	port := func(p uint16) uint16 { return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, p)) }
	pod, remote, node := ip(10, 244, 1, 2), ip(203, 0, 113, 10), ip(192, 0, 2, 1)
	put := func(lastSeen uint64, sport uint16) (ternbpf.TernNatTuple, ternbpf.TernNatTuple) {
		fk := ternbpf.TernNatTuple{Saddr: pod, Daddr: remote, Sport: port(sport), Dport: port(53), Proto: 17}
		rk := ternbpf.TernNatTuple{Saddr: remote, Daddr: node, Sport: port(53), Dport: port(sport + 20000), Proto: 17}
		if err := fwd.Put(fk, ternbpf.TernNatEntry{LastSeen: lastSeen, Addr: node, Port: port(sport + 20000)}); err != nil {
			t.Fatal(err)
		}
		if err := rev.Put(rk, ternbpf.TernNatEntry{LastSeen: lastSeen, Addr: pod, Port: port(sport)}); err != nil {
			t.Fatal(err)
		}
		return fk, rk
	}
	// openAndCheck puts an expired pair (last_seen 1 ns after boot: idle
	// for as long as the machine is up, more than the 60 s UDP timeout on
	// any test machine) and a live one, opens the datapath anew and checks
	// the expired pair is gone (collected) or still there.
	openAndCheck := func(name string, collected bool) {
		t.Helper()
		efk, erk := put(1, 41000)
		lfk, lrk := put(1<<63, 42000) // far in the future: never idle
		again := New(Config{BPFFSDir: n.bpffs, StateDir: n.state})
		defer again.Close()
		n.do(t, again.open)
		var e ternbpf.TernNatEntry
		for _, c := range []struct {
			m    *cilium.Map
			k    ternbpf.TernNatTuple
			want bool
		}{{fwd, efk, !collected}, {rev, erk, !collected}, {fwd, lfk, true}, {rev, lrk, true}} {
			err := c.m.Lookup(c.k, &e)
			if err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
				t.Fatal(err)
			}
			if (err == nil) != c.want {
				t.Errorf("%s: %+v present %v, want %v", name, c.k, err == nil, c.want)
			}
		}
	}
	// recordIs checks the record after a run names the running collector.
	recordIs := func(name string, want []byte) {
		t.Helper()
		if b, err := os.ReadFile(stampPath); err != nil || string(b) != string(want) {
			t.Errorf("%s: record after the run %q (%v), want %q", name, b, err, want)
		}
	}

	openAndCheck("record current", false)
	counters, err := ReadMetrics(n.dp.objs.Maps[ternbpf.TernMapTernMetrics])
	if err != nil {
		t.Fatal(err)
	}
	if got := counters["nat_gc"].Packets; got != 0 {
		t.Errorf("record current: nat_gc %d, want 0 (the collector ran)", got)
	}

	if err := os.Remove(stampPath); err != nil {
		t.Fatal(err)
	}
	openAndCheck("record missing", true)
	recordIs("record missing", stamp)
	counters, err = ReadMetrics(n.dp.objs.Maps[ternbpf.TernMapTernMetrics])
	if err != nil {
		t.Fatal(err)
	}
	if got := counters["nat_gc"].Packets; got != 2 {
		t.Errorf("nat_gc %d, want 2", got)
	}

	// Another program or another timer map than on record: an upgrade
	// loaded new programs, or the maps were recreated.
	var boot string
	var prog, timer uint64
	if _, err := fmt.Sscanf(string(stamp), "%s %d %d", &boot, &prog, &timer); err != nil {
		t.Fatalf("record %q: %v", stamp, err)
	}
	// The record names the kernel objects the datapath opened.
	pi, err := n.dp.objs.Programs[ternbpf.TernProgTernNatGc].Info()
	if err != nil {
		t.Fatal(err)
	}
	mi, err := n.dp.objs.Maps[ternbpf.TernMapTernNatGcTimer].Info()
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := pi.ID()
	mid, _ := mi.ID()
	if boot != "boot-a" || prog != uint64(pid) || timer != uint64(mid) {
		t.Errorf("record %q, want boot-a, program %d, timer map %d", stamp, pid, mid)
	}
	for _, c := range []struct {
		name   string
		record string
	}{
		{"another program", fmt.Sprintf("%s %d %d\n", boot, prog+1, timer)},
		{"another timer map", fmt.Sprintf("%s %d %d\n", boot, prog, timer+1)},
		{"garbled record", "x"},
	} {
		if err := os.WriteFile(stampPath, []byte(c.record), 0o600); err != nil {
			t.Fatal(err)
		}
		openAndCheck(c.name, true)
		recordIs(c.name, stamp)
	}

	// After a reboot the kernel's object IDs start over: the same IDs on
	// record from another boot do not count.
	if err := os.WriteFile(bootID, []byte("boot-b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	openAndCheck("another boot", true)
	if b, _ := os.ReadFile(stampPath); !strings.HasPrefix(string(b), "boot-b ") {
		t.Errorf("record after a run on another boot: %q", b)
	}
	openAndCheck("record current again", false)
}
