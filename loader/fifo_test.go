package loader

import (
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// waitTickets waits until the lock's queue holds n tickets.
func waitTickets(t *testing.T, path string, n int) {
	t.Helper()
	for i := 0; i < 2000; i++ {
		q, err := queued(path + ".q")
		if err == nil && len(q) == n {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("queue of %s never held %d tickets", path, n)
}

func lockFIFO(t *testing.T, path string) *FileLock {
	t.Helper()
	l, err := LockFIFO(path)
	if err != nil {
		t.Error(err)
		return nil
	}
	return l
}

// TestLockFIFOOrder: callers that queue behind a holder get the lock in
// the order they asked, one at a time. A bare flock wakes every waiter at
// each release and the order they get it in is a race (fails with Lock).
func TestLockFIFOOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.lock")
	head, err := LockFIFO(path)
	if err != nil {
		t.Fatal(err)
	}
	const waiters = 8
	var (
		mu      sync.Mutex
		order   []int
		holding int
		wg      sync.WaitGroup
	)
	for i := 0; i < waiters; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := lockFIFO(t, path)
			if l == nil {
				return
			}
			mu.Lock()
			holding++
			if holding > 1 {
				t.Errorf("%d holders at once", holding)
			}
			order = append(order, i)
			mu.Unlock()
			time.Sleep(time.Millisecond)
			mu.Lock()
			holding--
			mu.Unlock()
			if err := l.Unlock(); err != nil {
				t.Error(err)
			}
		}()
		waitTickets(t, path, i+2) // the head's ticket and one per waiter
	}
	if err := head.Unlock(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if want := []int{0, 1, 2, 3, 4, 5, 6, 7}; !slices.Equal(order, want) {
		t.Errorf("granted in order %v, want %v", order, want)
	}
	if q, err := queued(path + ".q"); err != nil || len(q) != 0 {
		t.Errorf("tickets left: %v (%v)", q, err)
	}
}

// TestLockFIFONoBarging: a caller that comes as the holder lets go does
// not take the lock before the one that was waiting. With a bare flock it
// usually does: the release only wakes the waiter, and the newcomer, on a
// CPU already, takes the lock first.
func TestLockFIFONoBarging(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.lock")
	barged := 0
	for round := 0; round < 20; round++ {
		head, err := LockFIFO(path)
		if err != nil {
			t.Fatal(err)
		}
		var (
			mu    sync.Mutex
			order []string
		)
		done := make(chan struct{})
		go func() {
			defer close(done)
			l := lockFIFO(t, path)
			if l == nil {
				return
			}
			mu.Lock()
			order = append(order, "waiter")
			mu.Unlock()
			if err := l.Unlock(); err != nil {
				t.Error(err)
			}
		}()
		waitTickets(t, path, 2)
		if err := head.Unlock(); err != nil {
			t.Fatal(err)
		}
		l, err := LockFIFO(path)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		order = append(order, "newcomer")
		mu.Unlock()
		if err := l.Unlock(); err != nil {
			t.Fatal(err)
		}
		<-done
		if order[0] != "waiter" {
			barged++
		}
	}
	if barged > 0 {
		t.Errorf("a newcomer took the lock before the waiter in %d of 20 rounds", barged)
	}
}

// TestLockFIFOExcludesLock: the FIFO queue's head still takes the flock
// that Lock takes (ternctl, ternd and GC lock without queueing), both ways.
func TestLockFIFOExcludesLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.lock")
	plain, err := Lock(path)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *FileLock)
	go func() { got <- lockFIFO(t, path) }()
	select {
	case <-got:
		t.Fatal("LockFIFO granted while Lock holds the lock")
	case <-time.After(100 * time.Millisecond):
	}
	if err := plain.Unlock(); err != nil {
		t.Fatal(err)
	}
	fifo := <-got
	if fifo == nil {
		t.FailNow()
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != unix.EWOULDBLOCK {
		t.Errorf("flock of %s while LockFIFO holds it: %v, want EWOULDBLOCK", path, err)
	}
	if err := fifo.Unlock(); err != nil {
		t.Fatal(err)
	}
}

// TestLockFIFODeadTickets: a ticket whose process died (the file is there,
// its flock is not) neither blocks the queue nor stays: the next caller
// removes it. A waiter that dies in the queue does not let the one behind
// it past the holder.
func TestLockFIFODeadTickets(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net.lock")
	if err := os.MkdirAll(path+".q", 0o700); err != nil {
		t.Fatal(err)
	}
	// Dead before anyone came: ticket 5, no flock on it.
	if err := os.WriteFile(ticketPath(path+".q", 5), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan *FileLock)
	go func() { done <- lockFIFO(t, path) }()
	var head *FileLock
	select {
	case head = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("LockFIFO blocked behind a dead ticket")
	}
	if head == nil {
		t.FailNow()
	}
	if q, _ := queued(path + ".q"); !slices.Equal(q, []uint64{6}) {
		t.Fatalf("tickets %v, want [6] (the dead one removed)", q)
	}

	// A waiter that dies in the queue: ticket 7 locked, then its
	// descriptor closed with the file left, as a killed process would.
	dying, err := os.OpenFile(ticketPath(path+".q", 7), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(dying.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	go func() { done <- lockFIFO(t, path) }()
	waitTickets(t, path, 3)
	dying.Close()
	select {
	case <-done:
		t.Fatal("granted while the head holds the lock")
	case <-time.After(200 * time.Millisecond):
	}
	if err := head.Unlock(); err != nil {
		t.Fatal(err)
	}
	var next *FileLock
	select {
	case next = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("not granted after the head let go")
	}
	if next == nil {
		t.FailNow()
	}
	if err := next.Unlock(); err != nil {
		t.Fatal(err)
	}
	if q, _ := queued(path + ".q"); len(q) != 0 {
		t.Errorf("tickets left: %v", q)
	}
}
