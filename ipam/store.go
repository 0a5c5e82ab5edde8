package ipam

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
)

var (
	// ErrExhausted means the pool has no allocatable address left.
	ErrExhausted = errors.New("pool exhausted")
	// ErrAlreadyAllocated means the owner (container ID and interface)
	// already holds an address from this pool.
	ErrAlreadyAllocated = errors.New("already allocated")
)

const (
	lockFile     = "lock"
	lastFile     = "last_reserved_ip"
	tempPrefix   = ".tmp-"
	dirPerm      = 0o700
	recordPerm   = 0o600
	maxOwnerPart = 1024 // generous bound; container IDs are 64 hex chars
)

// Allocation is one reserved address and its owner.
type Allocation struct {
	IP          net.IP
	ContainerID string
	IfName      string
}

// Store is the on-disk allocation state of one network. The directory holds
// one file per allocated address, named by the address and containing
// "containerID\nifname\n", plus the lock file and the last reserved address.
//
// Every operation holds an exclusive flock on the lock file, opened afresh
// per operation, so Stores in different processes, and different Store
// values in one process, exclude each other. The mutex is for goroutines
// sharing one Store value.
//
// Durability: nothing is fsynced. A record is complete before its name
// exists (written to a temp file, then hard-linked), and the page cache
// survives the crash of any process, so a killed plugin loses or doubles
// nothing. What an fsync would add is a record that survives a crash of
// the kernel or the machine, and such a crash takes with it everything an
// allocation stands for: the pod's network namespace, its veth and the
// datapath's pinned maps live in kernel memory only, and after the reboot
// the runtime adds every pod again (and deletes the old sandboxes, whose
// records are released if they survived and are nothing to release if
// not). A lost record therefore frees an address no live pod holds, and
// cannot lead to one address for two pods. The one crash leftover that
// needs care is a record whose name reached the disk before its contents
// (an empty file): readRecords removes it, as nothing else can leave one.
// The reference host-local plugin does not fsync either; the two fsyncs
// cost each ADD 2-5 ms while the store's lock is held (36 ms at worst on
// the shared test machine), which ten ADDs in parallel pay one after the
// other (docs/cni-add-profile.md).
type Store struct {
	dir  string
	pool *Pool
	mu   sync.Mutex
}

// NewStore opens the allocation state of pool in dir (conventionally
// <stateDir>/ipam/<network name>), creating dir if needed. Existing records
// are kept, so a new Store sees the allocations of earlier ones.
func NewStore(dir string, pool *Pool) (*Store, error) {
	if err := checkPool(pool); err != nil {
		return nil, fmt.Errorf("open ipam store %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, dirPerm); err != nil {
		return nil, fmt.Errorf("open ipam store: %w", err)
	}
	s := &Store{dir: dir, pool: pool}
	// Temp files are only created while the lock is held, so any seen
	// under the lock were left by a process that died mid-write.
	err := s.withLock(func() error {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), tempPrefix) {
				if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
					return fmt.Errorf("remove stale temp file: %w", err)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open ipam store %s: %w", dir, err)
	}
	return s, nil
}

// checkPool guards against a hand-built Pool that would break the address
// arithmetic; pools from ParseConfig always pass.
func checkPool(p *Pool) error {
	if p == nil {
		return errors.New("nil pool")
	}
	if p.Subnet.IP.To4() == nil || p.Start.To4() == nil || p.End.To4() == nil || p.Gateway.To4() == nil {
		return errors.New("pool is not a valid IPv4 pool")
	}
	if ipToU32(p.Start) > ipToU32(p.End) {
		return fmt.Errorf("pool range start %s is after end %s", p.Start, p.End)
	}
	if !p.Subnet.Contains(p.Start) || !p.Subnet.Contains(p.End) {
		return fmt.Errorf("pool range %s-%s is outside subnet %s", p.Start, p.End, &p.Subnet)
	}
	return nil
}

// Allocate reserves the next free address for containerID and ifname,
// going round-robin from the last reserved address so that a just-freed
// address is not handed out again at once. It fails with ErrAlreadyAllocated
// if the owner already holds an address and with ErrExhausted if none is
// free.
func (s *Store) Allocate(containerID, ifname string) (net.IP, error) {
	if err := checkOwner(containerID, ifname); err != nil {
		return nil, fmt.Errorf("allocate ip: %w", err)
	}
	var ip net.IP
	err := s.withLock(func() error {
		records, err := s.readRecords()
		if err != nil {
			return err
		}
		used := make(map[uint32]bool, len(records))
		for _, r := range records {
			if r.ContainerID == containerID && r.IfName == ifname {
				return fmt.Errorf("holds %s: %w", r.IP, ErrAlreadyAllocated)
			}
			used[ipToU32(r.IP)] = true
		}

		start, end := ipToU32(s.pool.Start), ipToU32(s.pool.End)
		gw := ipToU32(s.pool.Gateway)
		// Offsets are uint64 so that the size of a range spanning the whole
		// IPv4 space cannot wrap to zero.
		n := uint64(end) - uint64(start) + 1
		first := uint64(0)
		if last, ok := s.readLast(); ok && last >= start && last <= end {
			first = (uint64(last-start) + 1) % n
		}
		for i := uint64(0); i < n; i++ {
			cand := start + uint32((first+i)%n)
			if cand == gw || used[cand] {
				continue
			}
			c := u32ToIP(cand)
			ok, err := s.reserve(c, containerID, ifname)
			if err != nil {
				return err
			}
			if !ok {
				// A record appeared that readRecords did not see; only
				// something outside this package can do that. Skip it.
				continue
			}
			s.commit(c)
			ip = c
			return nil
		}
		return fmt.Errorf("no free IP in %s (range %s): %w", &s.pool.Subnet, s.pool.rangeString(), ErrExhausted)
	})
	if err != nil {
		return nil, fmt.Errorf("allocate ip for container %s interface %s: %w", containerID, ifname, err)
	}
	return ip, nil
}

// commit records ip as the last reserved address, best effort: readLast
// takes a missing or garbled hint for "start at the beginning", so failing
// to write it costs at most a different next address, never the
// reservation.
func (s *Store) commit(ip net.IP) {
	_ = writeFileAtomic(s.dir, lastFile, []byte(ip.String()+"\n"))
}

// Release frees every address held by containerID and ifname. Releasing an
// owner that holds nothing succeeds, so CNI DEL can be repeated.
func (s *Store) Release(containerID, ifname string) error {
	if err := checkOwner(containerID, ifname); err != nil {
		return fmt.Errorf("release ip: %w", err)
	}
	err := s.withLock(func() error {
		records, err := s.readRecords()
		if err != nil {
			return err
		}
		for _, r := range records {
			if r.ContainerID != containerID || r.IfName != ifname {
				continue
			}
			if err := os.Remove(filepath.Join(s.dir, r.IP.String())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove record of %s: %w", r.IP, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("release ip of container %s interface %s: %w", containerID, ifname, err)
	}
	return nil
}

// Lookup returns the addresses held by containerID and ifname, in address
// order; none is not an error.
func (s *Store) Lookup(containerID, ifname string) ([]net.IP, error) {
	if err := checkOwner(containerID, ifname); err != nil {
		return nil, fmt.Errorf("look up ip: %w", err)
	}
	var ips []net.IP
	err := s.withLock(func() error {
		records, err := s.readRecords()
		if err != nil {
			return err
		}
		for _, r := range records {
			if r.ContainerID == containerID && r.IfName == ifname {
				ips = append(ips, r.IP)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("look up ip of container %s interface %s: %w", containerID, ifname, err)
	}
	return ips, nil
}

// List returns every allocation in the store in address order, including
// records outside the current pool range (left by an earlier config).
func (s *Store) List() ([]Allocation, error) {
	var out []Allocation
	err := s.withLock(func() error {
		var err error
		out, err = s.readRecords()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list ipam allocations: %w", err)
	}
	return out, nil
}

// Free returns how many addresses can still be allocated.
func (s *Store) Free() (int, error) {
	var free uint64
	err := s.withLock(func() error {
		records, err := s.readRecords()
		if err != nil {
			return err
		}
		free = uint64(s.pool.size())
		if s.pool.inRange(s.pool.Gateway) {
			free--
		}
		for _, r := range records {
			if s.pool.contains(r.IP) {
				free--
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("count free ips: %w", err)
	}
	return int(free), nil
}

// withLock runs fn holding the store's mutex and an exclusive flock.
func (s *Store) withLock(fn func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()

	// A fresh open file description per operation: flock locks belong to
	// the description, so two Store values (or goroutines of two Stores)
	// in one process block each other just like two processes do.
	f, err := os.OpenFile(filepath.Join(s.dir, lockFile), os.O_RDWR|os.O_CREATE, recordPerm)
	if err != nil {
		return fmt.Errorf("open lock file: %w", err)
	}
	// Closing the only descriptor of the description drops the flock, so
	// no explicit LOCK_UN is needed.
	defer f.Close()

	fd := int(f.Fd())
	for {
		err = syscall.Flock(fd, syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return fn()
}

// readRecords reads every allocation record, sorted by address. Files whose
// name is not an IPv4 address (lock, last_reserved_ip, temp files) are not
// records.
func (s *Store) readRecords() ([]Allocation, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("read store dir: %w", err)
	}
	var out []Allocation
	for _, e := range entries {
		ip := net.ParseIP(e.Name()).To4()
		if ip == nil || ip.String() != e.Name() || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(s.dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read record of %s: %w", ip, err)
		}
		if len(bytes.TrimSpace(data)) == 0 {
			// Only a crash of the machine leaves an empty record (its name
			// reached the disk, its contents did not: see Store), and that
			// crash took the pod that held the address with it. Callers
			// hold the lock, so no writer is half way through it.
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("remove empty record of %s: %w", ip, err)
			}
			continue
		}
		id, ifname := parseOwner(data)
		out = append(out, Allocation{IP: ip, ContainerID: id, IfName: ifname})
	}
	sort.Slice(out, func(i, j int) bool { return ipToU32(out[i].IP) < ipToU32(out[j].IP) })
	return out, nil
}

// parseOwner reads "containerID\nifname\n". It also accepts the "\r\n"
// separator of host-local records.
func parseOwner(data []byte) (containerID, ifname string) {
	lines := strings.Split(string(bytes.TrimRight(data, "\r\n")), "\n")
	containerID = strings.TrimSpace(lines[0])
	if len(lines) > 1 {
		ifname = strings.TrimSpace(lines[1])
	}
	return containerID, ifname
}

// readLast returns the last reserved address; a missing or garbled file
// just means the search starts at the beginning of the range.
func (s *Store) readLast() (uint32, bool) {
	data, err := os.ReadFile(filepath.Join(s.dir, lastFile))
	if err != nil {
		return 0, false
	}
	ip := net.ParseIP(strings.TrimSpace(string(data))).To4()
	if ip == nil {
		return 0, false
	}
	return ipToU32(ip), true
}

// reserve creates the record of ip with its full contents in one step: the
// contents go to a temp file that is then hard-linked to the record name.
// link fails if the name exists, so two writers can never both hold ip,
// and a reader never sees a half-written record. It reports false if ip
// was already taken.
func (s *Store) reserve(ip net.IP, containerID, ifname string) (bool, error) {
	tmp, err := createTemp(s.dir, []byte(containerID+"\n"+ifname+"\n"))
	if err != nil {
		return false, fmt.Errorf("reserve %s: %w", ip, err)
	}
	// The record name keeps the inode alive; a temp name left behind by a
	// failed remove is cleaned up by the next NewStore.
	defer func() { _ = os.Remove(tmp) }()

	err = os.Link(tmp, filepath.Join(s.dir, ip.String()))
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reserve %s: %w", ip, err)
	}
	return true, nil
}

// writeFileAtomic replaces dir/name with data via a temp file and rename.
func writeFileAtomic(dir, name string, data []byte) error {
	tmp, err := createTemp(dir, data)
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// createTemp writes data to a new temp file in dir and returns its path.
// Not synced: see Store on durability.
func createTemp(dir string, data []byte) (string, error) {
	f, err := os.CreateTemp(dir, tempPrefix)
	if err != nil {
		return "", fmt.Errorf("create temp file: %w", err)
	}
	name := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(recordPerm)
	}
	if closeErr := f.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		_ = os.Remove(name)
		return "", fmt.Errorf("write temp file: %w", err)
	}
	return name, nil
}

// checkOwner rejects owners that cannot round-trip through a record file.
func checkOwner(containerID, ifname string) error {
	if containerID == "" {
		return errors.New("empty container id")
	}
	if ifname == "" {
		return errors.New("empty interface name")
	}
	for _, v := range []string{containerID, ifname} {
		if len(v) > maxOwnerPart || strings.ContainsAny(v, "\r\n") || strings.TrimSpace(v) != v {
			return fmt.Errorf("invalid owner %q: must be at most %d bytes without line breaks or surrounding space", v, maxOwnerPart)
		}
	}
	return nil
}
