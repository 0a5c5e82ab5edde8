package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// LockFIFO is Lock, granted in the order the LockFIFO callers asked.
//
// A bare flock is not fair: its release wakes every waiter, the first one
// to run takes it, and a process that arrives while the others are being
// woken can take it before all of them. With ten CNI ADDs of one network
// in flight on a busy node, an unlucky ADD lost that race several times in
// a row, and the slowest ADD of a burst (the p99) waited for up to twice
// as many holders as there were ADDs in flight (docs/cni-add-profile.md,
// "The tail of the parallel ADD"). LockFIFO queues first: each caller
// takes a ticket, a file numbered one past the highest in
// <path>.q/ that it holds an exclusive flock on while it waits and holds
// the lock, and it waits for the flock of the ticket just before its own
// only. When that ticket goes (released, or its process died: the kernel
// drops the flock with it), the next one in line wakes, and no other.
// The head of the queue then takes the flock on path itself, so callers
// of Lock (ternctl, ternd, GC) still exclude and are excluded as before,
// just without a place in the queue.
//
// A ticket left behind by a process that died is removed by the one
// after it (its flock is free while the file is still there).
func LockFIFO(path string) (*FileLock, error) {
	dir := path + ".q"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create lock queue: %w", err)
	}
	ticket, mine, err := takeTicket(dir)
	if err != nil {
		return nil, err
	}
	release := func() {
		os.Remove(ticket.Name())
		ticket.Close()
	}
	if err := waitForTurn(dir, mine); err != nil {
		release()
		return nil, err
	}
	l, err := Lock(path)
	if err != nil {
		release()
		return nil, err
	}
	l.ticket = ticket
	return l, nil
}

// takeTicket creates this caller's ticket, one past the highest in dir,
// and locks it, under the queue's own short flock so that no two callers
// take the same number and a ticket is never seen unlocked by a caller
// behind it.
func takeTicket(dir string) (*os.File, uint64, error) {
	gate, err := Lock(filepath.Join(dir, "gate"))
	if err != nil {
		return nil, 0, err
	}
	defer gate.Unlock()
	tickets, err := queued(dir)
	if err != nil {
		return nil, 0, err
	}
	var n uint64 = 1
	if len(tickets) > 0 {
		n = tickets[len(tickets)-1] + 1
	}
	f, err := os.OpenFile(ticketPath(dir, n), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("take lock ticket: %w", err)
	}
	if err := flockRetry(f, unix.LOCK_EX); err != nil {
		os.Remove(f.Name())
		f.Close()
		return nil, 0, fmt.Errorf("lock ticket %s: %w", f.Name(), err)
	}
	return f, n, nil
}

// waitForTurn returns once no ticket before mine is left: it waits on the
// flock of the one just before (shared, so it takes nothing from it), and
// removes that ticket if it is still there once its flock is free (its
// process died before removing it).
func waitForTurn(dir string, mine uint64) error {
	for {
		tickets, err := queued(dir)
		if err != nil {
			return err
		}
		i, _ := slices.BinarySearch(tickets, mine)
		if i == 0 {
			return nil
		}
		prev := ticketPath(dir, tickets[i-1])
		f, err := os.Open(prev)
		if errors.Is(err, os.ErrNotExist) {
			continue // gone meanwhile
		}
		if err != nil {
			return fmt.Errorf("open lock ticket: %w", err)
		}
		err = flockRetry(f, unix.LOCK_SH)
		f.Close()
		if err != nil {
			return fmt.Errorf("wait for lock ticket %s: %w", prev, err)
		}
		// Free, so its owner is done or dead; a live owner removes its
		// ticket before it lets go of it, so this removes only a dead
		// one's (and a file already gone is no error).
		if err := os.Remove(prev); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale lock ticket: %w", err)
		}
	}
}

// queued lists the ticket numbers in dir, in order.
func queued(dir string) ([]uint64, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read lock queue: %w", err)
	}
	var out []uint64
	for _, e := range entries {
		if n, err := strconv.ParseUint(e.Name(), 10, 64); err == nil {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

func ticketPath(dir string, n uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%020d", n))
}

func flockRetry(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			return err
		}
	}
}
