package ebpf

import (
	"testing"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/loader"
)

// TestHostServicesLifecycle: with the load balancer on and a cgroup
// configured, EnsureNode attaches the socket programs there and records
// the node's netns cookie; the node's teardown (ReleaseNode with no
// endpoint left) detaches them and clears the cookie. Without a cgroup
// nothing is attached.
func TestHostServicesLifecycle(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	cg := testutil.NewCgroup(t)
	l := loader.New(n.bpffs, n.state)
	t.Cleanup(func() { _ = l.DetachCgroup() }) // before the cgroup goes

	off := New(Config{BPFFSDir: n.bpffs, StateDir: n.state, LoadBalancer: true})
	t.Cleanup(off.Close)
	n.do(t, off.EnsureNode)
	if l.CgroupAttached() {
		t.Fatal("socket programs attached without a cgroup configured")
	}

	n.dp = New(Config{BPFFSDir: n.bpffs, StateDir: n.state, LoadBalancer: true, HostServicesCgroup: cg})
	t.Cleanup(n.dp.Close)
	n.do(t, n.dp.EnsureNode)
	if !l.CgroupAttached() {
		t.Fatal("EnsureNode: socket programs not attached")
	}
	var want uint64
	n.do(t, func() (err error) { want, err = NetnsCookie(); return err })
	m, err := n.dp.objs.Map(ternbpf.TernSockMapTernSockConfig)
	if err != nil {
		t.Fatal(err)
	}
	var got ternbpf.TernSockSockConfig
	if err := m.Lookup(uint32(0), &got); err != nil || got.NetnsCookie != want || want == 0 {
		t.Errorf("tern_sock_config: %+v (%v), want the node's netns cookie %d", got, err, want)
	}

	n.do(t, func() error { return n.dp.ReleaseNode(0) })
	if l.CgroupAttached() {
		t.Error("ReleaseNode(0): socket programs still attached")
	}
	if err := m.Lookup(uint32(0), &got); err != nil || got.NetnsCookie != 0 {
		t.Errorf("tern_sock_config after ReleaseNode: %+v (%v), want cleared", got, err)
	}
}
