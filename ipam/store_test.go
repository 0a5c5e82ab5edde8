package ipam

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func mustPool(t *testing.T, c Config) *Pool {
	t.Helper()
	p, err := ParseConfig(c)
	if err != nil {
		t.Fatalf("ParseConfig(%+v): %v", c, err)
	}
	return p
}

func mustStore(t *testing.T, dir string, p *Pool) *Store {
	t.Helper()
	s, err := NewStore(dir, p)
	if err != nil {
		t.Fatalf("NewStore: %v", err)
	}
	return s
}

func mustAllocate(t *testing.T, s *Store, id, ifname, want string) {
	t.Helper()
	ip, err := s.Allocate(id, ifname)
	if err != nil {
		t.Fatalf("Allocate(%s, %s): %v", id, ifname, err)
	}
	if ip.String() != want {
		t.Fatalf("Allocate(%s, %s) = %s, want %s", id, ifname, ip, want)
	}
	if len(ip) != net.IPv4len {
		t.Fatalf("Allocate returned %d-byte IP, want 4", len(ip))
	}
}

func mustRelease(t *testing.T, s *Store, id, ifname string) {
	t.Helper()
	if err := s.Release(id, ifname); err != nil {
		t.Fatalf("Release(%s, %s): %v", id, ifname, err)
	}
}

func mustFree(t *testing.T, s *Store, want int) {
	t.Helper()
	got, err := s.Free()
	if err != nil {
		t.Fatalf("Free: %v", err)
	}
	if got != want {
		t.Fatalf("Free = %d, want %d", got, want)
	}
}

// dirNames lists dir, sorted, to catch stray temp files.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func listString(t *testing.T, s *Store) string {
	t.Helper()
	as, err := s.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var parts []string
	for _, a := range as {
		parts = append(parts, fmt.Sprintf("%s=%s/%s", a.IP, a.ContainerID, a.IfName))
	}
	return strings.Join(parts, " ")
}

func TestNewStoreCreatesPrivateDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ipam", "tern")
	mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("dir mode = %o, want 700", perm)
	}
}

func TestNewStoreRejectsBadPool(t *testing.T) {
	if _, err := NewStore(t.TempDir(), nil); err == nil {
		t.Error("NewStore(nil pool) succeeded")
	}
	if _, err := NewStore(t.TempDir(), &Pool{}); err == nil {
		t.Error("NewStore(empty pool) succeeded")
	}
}

func TestAllocateReleaseReallocate(t *testing.T) {
	dir := t.TempDir()
	s := mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	mustFree(t, s, 253)

	mustAllocate(t, s, "ctr-a", "eth0", "10.244.1.2")
	mustAllocate(t, s, "ctr-b", "eth0", "10.244.1.3")
	// Same container, other interface: a different owner.
	mustAllocate(t, s, "ctr-a", "net1", "10.244.1.4")
	mustFree(t, s, 250)

	data, err := os.ReadFile(filepath.Join(dir, "10.244.1.2"))
	if err != nil {
		t.Fatal(err)
	}
	if string(data) != "ctr-a\neth0\n" {
		t.Errorf("record = %q, want %q", data, "ctr-a\neth0\n")
	}
	if got, want := listString(t, s), "10.244.1.2=ctr-a/eth0 10.244.1.3=ctr-b/eth0 10.244.1.4=ctr-a/net1"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
	ips, err := s.Lookup("ctr-a", "eth0")
	if err != nil || len(ips) != 1 || ips[0].String() != "10.244.1.2" {
		t.Errorf("Lookup(ctr-a, eth0) = %v, %v; want [10.244.1.2]", ips, err)
	}

	mustRelease(t, s, "ctr-a", "eth0")
	if ips, err := s.Lookup("ctr-a", "eth0"); err != nil || len(ips) != 0 {
		t.Errorf("Lookup after release = %v, %v; want nothing", ips, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "10.244.1.2")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record of released IP still there: %v", err)
	}
	mustFree(t, s, 251)

	// Round-robin: the freed .2 is not handed out again straight away.
	mustAllocate(t, s, "ctr-c", "eth0", "10.244.1.5")
	// The released owner can allocate again.
	mustAllocate(t, s, "ctr-a", "eth0", "10.244.1.6")
	if got, want := listString(t, s), "10.244.1.3=ctr-b/eth0 10.244.1.4=ctr-a/net1 10.244.1.5=ctr-c/eth0 10.244.1.6=ctr-a/eth0"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
}

func TestReleaseIdempotent(t *testing.T) {
	s := mustStore(t, t.TempDir(), mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	mustRelease(t, s, "never-added", "eth0")
	mustAllocate(t, s, "ctr", "eth0", "10.244.1.2")
	mustRelease(t, s, "ctr", "eth0")
	mustRelease(t, s, "ctr", "eth0")
	mustFree(t, s, 253)
}

func TestReleaseRemovesEveryIPOfOwner(t *testing.T) {
	dir := t.TempDir()
	s := mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	mustAllocate(t, s, "ctr", "eth0", "10.244.1.2")
	mustAllocate(t, s, "other", "eth0", "10.244.1.3")
	// A second record of the same owner, as a crashed older version might
	// have left behind.
	if err := os.WriteFile(filepath.Join(dir, "10.244.1.9"), []byte("ctr\neth0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ips, err := s.Lookup("ctr", "eth0")
	if err != nil || len(ips) != 2 {
		t.Fatalf("Lookup = %v, %v; want two IPs", ips, err)
	}
	mustRelease(t, s, "ctr", "eth0")
	if got, want := listString(t, s), "10.244.1.3=other/eth0"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
}

func TestAllocateAlreadyAllocated(t *testing.T) {
	dir := t.TempDir()
	s := mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	mustAllocate(t, s, "ctr", "eth0", "10.244.1.2")
	ip, err := s.Allocate("ctr", "eth0")
	if !errors.Is(err, ErrAlreadyAllocated) {
		t.Fatalf("second Allocate = %v, %v; want ErrAlreadyAllocated", ip, err)
	}
	if !strings.Contains(err.Error(), "10.244.1.2") {
		t.Errorf("error %q does not name the held IP", err)
	}
	if got, want := listString(t, s), "10.244.1.2=ctr/eth0"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
}

func TestAllocateRoundRobinWraps(t *testing.T) {
	s := mustStore(t, t.TempDir(), mustPool(t, Config{Subnet: "10.0.0.0/24", RangeStart: "10.0.0.10", RangeEnd: "10.0.0.12"}))
	mustAllocate(t, s, "a", "eth0", "10.0.0.10")
	mustAllocate(t, s, "b", "eth0", "10.0.0.11")
	mustAllocate(t, s, "c", "eth0", "10.0.0.12")
	mustRelease(t, s, "b", "eth0")
	// After .12 the search wraps to the start and finds the hole at .11.
	mustAllocate(t, s, "d", "eth0", "10.0.0.11")
	mustRelease(t, s, "a", "eth0")
	mustRelease(t, s, "c", "eth0")
	// Last reserved is .11, so .12 comes before .10.
	mustAllocate(t, s, "e", "eth0", "10.0.0.12")
	mustAllocate(t, s, "f", "eth0", "10.0.0.10")
}

func TestAllocateSkipsGateway(t *testing.T) {
	s := mustStore(t, t.TempDir(), mustPool(t, Config{
		Subnet: "10.0.0.0/24", Gateway: "10.0.0.2", RangeStart: "10.0.0.1", RangeEnd: "10.0.0.3",
	}))
	mustFree(t, s, 2)
	mustAllocate(t, s, "a", "eth0", "10.0.0.1")
	mustAllocate(t, s, "b", "eth0", "10.0.0.3")
	mustFree(t, s, 0)
	if _, err := s.Allocate("c", "eth0"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate = %v, want ErrExhausted", err)
	}
}

func TestRestart(t *testing.T) {
	dir := t.TempDir()
	pool := mustPool(t, Config{Subnet: "10.244.1.0/24"})
	s1 := mustStore(t, dir, pool)
	mustAllocate(t, s1, "a", "eth0", "10.244.1.2")
	mustAllocate(t, s1, "b", "eth0", "10.244.1.3")
	mustRelease(t, s1, "a", "eth0")

	// A new Store, as after an agent restart or in the next CNI process,
	// and with a freshly parsed pool.
	s2 := mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	if got, want := listString(t, s2), "10.244.1.3=b/eth0"; got != want {
		t.Errorf("List after restart = %s, want %s", got, want)
	}
	ips, err := s2.Lookup("b", "eth0")
	if err != nil || len(ips) != 1 || ips[0].String() != "10.244.1.3" {
		t.Errorf("Lookup after restart = %v, %v; want [10.244.1.3]", ips, err)
	}
	if _, err := s2.Allocate("b", "eth0"); !errors.Is(err, ErrAlreadyAllocated) {
		t.Errorf("Allocate of existing owner after restart = %v, want ErrAlreadyAllocated", err)
	}
	mustFree(t, s2, 252)
	// Round-robin state survives too: .4, not the freed .2.
	mustAllocate(t, s2, "c", "eth0", "10.244.1.4")
}

func TestExhaustion(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		ips     []string
		wantMsg string
	}{
		{
			name:    "/30",
			cfg:     Config{Subnet: "10.0.0.0/30"},
			ips:     []string{"10.0.0.2"},
			wantMsg: "no free IP in 10.0.0.0/30 (range .2-.2)",
		},
		{
			name:    "small range in a /24",
			cfg:     Config{Subnet: "10.244.1.0/24", RangeStart: "10.244.1.2", RangeEnd: "10.244.1.4"},
			ips:     []string{"10.244.1.2", "10.244.1.3", "10.244.1.4"},
			wantMsg: "no free IP in 10.244.1.0/24 (range .2-.4)",
		},
		{
			name:    "range across octets",
			cfg:     Config{Subnet: "10.0.0.0/16", RangeStart: "10.0.0.254", RangeEnd: "10.0.1.1"},
			ips:     []string{"10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1"},
			wantMsg: "no free IP in 10.0.0.0/16 (range 10.0.0.254-10.0.1.1)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := mustStore(t, dir, mustPool(t, tt.cfg))
			for i, want := range tt.ips {
				mustAllocate(t, s, fmt.Sprintf("ctr-%d", i), "eth0", want)
			}
			mustFree(t, s, 0)
			before := dirNames(t, dir)

			ip, err := s.Allocate("one-too-many", "eth0")
			if !errors.Is(err, ErrExhausted) {
				t.Fatalf("Allocate = %v, %v; want ErrExhausted", ip, err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantMsg)
			}
			if after := dirNames(t, dir); strings.Join(after, ",") != strings.Join(before, ",") {
				t.Errorf("failed Allocate changed the dir from %v to %v", before, after)
			}
			want := append([]string{"last_reserved_ip", "lock"}, tt.ips...)
			sort.Strings(want)
			if got := dirNames(t, dir); strings.Join(got, ",") != strings.Join(want, ",") {
				t.Errorf("dir holds %v, want %v", got, want)
			}

			// Freeing one address makes the pool usable again.
			mustRelease(t, s, "ctr-0", "eth0")
			mustAllocate(t, s, "one-too-many", "eth0", tt.ips[0])
		})
	}
}

func TestOwnerValidation(t *testing.T) {
	s := mustStore(t, t.TempDir(), mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	for _, o := range []struct{ id, ifname string }{
		{"", "eth0"},
		{"ctr", ""},
		{"ctr\nx", "eth0"},
		{"ctr", "eth0\r"},
		{" ctr", "eth0"},
		{strings.Repeat("a", 2000), "eth0"},
	} {
		if ip, err := s.Allocate(o.id, o.ifname); err == nil {
			t.Errorf("Allocate(%q, %q) = %s, want error", o.id, o.ifname, ip)
		}
		if err := s.Release(o.id, o.ifname); err == nil {
			t.Errorf("Release(%q, %q) succeeded, want error", o.id, o.ifname)
		}
		if _, err := s.Lookup(o.id, o.ifname); err == nil {
			t.Errorf("Lookup(%q, %q) succeeded, want error", o.id, o.ifname)
		}
	}
	mustFree(t, s, 253)
}

func TestForeignFilesAndStaleTemps(t *testing.T) {
	dir := t.TempDir()
	// A temp file left by a process that died mid-write, a host-local style
	// record with "\r\n", and files that are not records.
	files := map[string]string{
		".tmp-123456":      "dead\neth0\n",
		"10.244.1.7":       "hostlocal\r\neth0",
		"last_reserved_ip": "garbage",
		"README":           "not a record",
		"010.244.1.8":      "not canonical\neth0\n",
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := mustStore(t, dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	if _, err := os.Stat(filepath.Join(dir, ".tmp-123456")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale temp file survived NewStore: %v", err)
	}
	if got, want := listString(t, s), "10.244.1.7=hostlocal/eth0"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
	// A garbled last_reserved_ip restarts the search at the range start.
	mustAllocate(t, s, "new", "eth0", "10.244.1.2")
	mustFree(t, s, 251)
}

// TestConcurrentStores has 100 goroutines, each with its own Store on one
// dir, allocate at once; flock on separate open file descriptions must keep
// them apart just as it does separate processes.
func TestConcurrentStores(t *testing.T) {
	const n = 100
	dir := t.TempDir()
	pool := mustPool(t, Config{Subnet: "10.244.1.0/24"})

	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		ips   = make([]net.IP, n)
		errs  = make([]error, n)
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := NewStore(dir, pool)
			if err != nil {
				errs[i] = err
				return
			}
			<-start
			ips[i], errs[i] = s.Allocate(fmt.Sprintf("ctr-%03d", i), "eth0")
		}()
	}
	close(start)
	wg.Wait()

	seen := map[string]int{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("goroutine %d: %v", i, errs[i])
		}
		if j, dup := seen[ips[i].String()]; dup {
			t.Fatalf("goroutines %d and %d both got %s", j, i, ips[i])
		}
		seen[ips[i].String()] = i
	}
	checkRecords(t, dir, pool, func(i int) (string, string) { return fmt.Sprintf("ctr-%03d", i), "eth0" }, n, ips)
}

// checkRecords asserts that dir holds exactly the n allocations in ips,
// owned as owner(i) says, and nothing else but the lock and last files.
func checkRecords(t *testing.T, dir string, pool *Pool, owner func(int) (string, string), n int, ips []net.IP) {
	t.Helper()
	s := mustStore(t, dir, pool)
	as, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != n {
		t.Fatalf("List has %d records, want %d", len(as), n)
	}
	byIP := map[string]Allocation{}
	for _, a := range as {
		byIP[a.IP.String()] = a
	}
	for i := range n {
		id, ifname := owner(i)
		a, ok := byIP[ips[i].String()]
		if !ok || a.ContainerID != id || a.IfName != ifname {
			t.Errorf("record of %s = %+v, want owner %s/%s", ips[i], a, id, ifname)
		}
	}
	if names := dirNames(t, dir); len(names) != n+2 {
		t.Errorf("dir holds %d files, want %d records + lock + last_reserved_ip: %v", len(names), n, names)
	}
	mustFree(t, s, 253-n)
}

const (
	helperDirEnv   = "TERN_IPAM_HELPER_DIR"
	helperIDEnv    = "TERN_IPAM_HELPER_ID"
	helperStartEnv = "TERN_IPAM_HELPER_START"
	helperAllocs   = 10
)

func helperOwner(proc, i int) (string, string) {
	return fmt.Sprintf("proc%d-ctr%d", proc, i), "eth0"
}

// TestHelperProcess is not a test: TestMultiProcess runs the test binary
// again with it selected and the helper variables set. It waits for the
// start file, allocates helperAllocs addresses and prints them.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv(helperDirEnv)
	if dir == "" {
		return // only does work when TestMultiProcess re-executes the binary
	}
	proc, err := strconv.Atoi(os.Getenv(helperIDEnv))
	if err != nil {
		t.Fatalf("bad %s: %v", helperIDEnv, err)
	}
	s, err := NewStore(dir, mustPool(t, Config{Subnet: "10.244.1.0/24"}))
	if err != nil {
		t.Fatal(err)
	}
	// Start together so that the processes really contend for the lock.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(os.Getenv(helperStartEnv)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("start file never appeared")
		}
	}
	for i := range helperAllocs {
		ip, err := s.Allocate(helperOwner(proc, i))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("IP %d %s\n", i, ip)
	}
}

// TestMultiProcess runs 8 processes that each allocate 10 addresses from
// one dir at the same time: only the flock keeps them apart.
func TestMultiProcess(t *testing.T) {
	if os.Getenv(helperDirEnv) != "" {
		return // inside a helper process: TestHelperProcess does the work
	}
	const procs = 8
	dir := filepath.Join(t.TempDir(), "ipam", "tern")
	startFile := filepath.Join(t.TempDir(), "start")

	type child struct {
		cmd            *exec.Cmd
		stdout, stderr bytes.Buffer
	}
	children := make([]*child, procs)
	for p := range procs {
		c := &child{cmd: exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1", "-test.v")}
		c.cmd.Env = append(os.Environ(),
			helperDirEnv+"="+dir,
			helperIDEnv+"="+strconv.Itoa(p),
			helperStartEnv+"="+startFile,
		)
		c.cmd.Stdout, c.cmd.Stderr = &c.stdout, &c.stderr
		if err := c.cmd.Start(); err != nil {
			t.Fatalf("start helper %d: %v", p, err)
		}
		children[p] = c
	}
	if err := os.WriteFile(startFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	var (
		ips    []net.IP
		owners [][2]string
	)
	for p, c := range children {
		if err := c.cmd.Wait(); err != nil {
			t.Fatalf("helper %d: %v\nstdout:\n%s\nstderr:\n%s", p, err, &c.stdout, &c.stderr)
		}
		got := 0
		for _, line := range strings.Split(c.stdout.String(), "\n") {
			var i int
			var ip string
			if _, err := fmt.Sscanf(line, "IP %d %s", &i, &ip); err != nil {
				continue
			}
			ips = append(ips, net.ParseIP(ip))
			id, ifname := helperOwner(p, i)
			owners = append(owners, [2]string{id, ifname})
			got++
		}
		if got != helperAllocs {
			t.Fatalf("helper %d reported %d IPs, want %d\nstdout:\n%s", p, got, helperAllocs, &c.stdout)
		}
	}

	seen := map[string]bool{}
	for _, ip := range ips {
		if seen[ip.String()] {
			t.Fatalf("%s handed out twice", ip)
		}
		seen[ip.String()] = true
	}
	pool := mustPool(t, Config{Subnet: "10.244.1.0/24"})
	checkRecords(t, dir, pool, func(i int) (string, string) { return owners[i][0], owners[i][1] }, procs*helperAllocs, ips)
}

// TestEmptyRecordFromCrash: records are not fsynced, so a crash of the
// machine can leave a record whose name is on disk but not its contents.
// Its pod died in that crash: the address is free again (here the only
// one of the pool), and the empty record is gone.
func TestEmptyRecordFromCrash(t *testing.T) {
	dir := t.TempDir()
	s := mustStore(t, dir, mustPool(t, Config{Subnet: "10.0.0.0/30"}))
	if err := os.WriteFile(filepath.Join(dir, "10.0.0.2"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mustFree(t, s, 1)
	if got := listString(t, s); got != "" {
		t.Errorf("List with only an empty record = %q, want none", got)
	}
	if err := os.WriteFile(filepath.Join(dir, "10.0.0.2"), []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustAllocate(t, s, "after-reboot", "eth0", "10.0.0.2")
	if got, want := listString(t, s), "10.0.0.2=after-reboot/eth0"; got != want {
		t.Errorf("List = %s, want %s", got, want)
	}
}
