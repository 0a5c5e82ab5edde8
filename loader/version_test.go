package loader

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestVersionsOrdered: a node upgraded to release 5 is not downgraded by a
// release 4 plugin (Load fails with ErrDowngrade, the interface keeps
// release 5's program, release 4 is not pinned); release 6 upgrades it;
// an unordered build (release 0) replaces whatever is pinned.
func TestVersionsOrdered(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	r5 := versioned(newLoader(t), "r5-aaaa")
	objs5 := loadIn(t, n, r5)
	v := addVeth(t, n)
	attach(t, n, r5, objs5, v, ModeTCX)
	id5 := progID(t, objs5)

	r4 := versioned(r5, "r4-bbbb")
	var err error
	do(t, n, func() error {
		var objs *Objects
		objs, err = r4.Load()
		if err == nil {
			objs.Close()
		}
		return nil
	})
	if !errors.Is(err, ErrDowngrade) {
		t.Fatalf("release 4 over release 5: Load = %v, want ErrDowngrade", err)
	}
	if got := tcxPrograms(t, n, v); !slices.Equal(got, []ebpf.ProgramID{id5}) {
		t.Errorf("after the refused downgrade %s runs %v, want release 5's [%d]", v.name, got, id5)
	}
	if got := dirNames(t, filepath.Join(r5.BPFFSDir, "progs")); !slices.Equal(got, []string{"r5-aaaa"}) {
		t.Errorf("progs/ after the refused downgrade: %v", got)
	}

	for _, next := range []string{"r6-cccc", "dddd"} {
		l := versioned(r5, next)
		objs := loadIn(t, n, l)
		if got := tcxPrograms(t, n, v); !slices.Equal(got, []ebpf.ProgramID{progID(t, objs)}) {
			t.Errorf("after loading %s, %s runs %v, want its program %d", next, v.name, got, progID(t, objs))
		}
	}
}

// TestAttachRefusesReplacedObjects: a plugin process loaded v1, another
// upgraded the node to v2 meanwhile; the first one's Attach of a new
// interface must fail (so ADD fails and is retried) rather than put the
// new interface on v1's program while every other runs v2.
func TestAttachRefusesReplacedObjects(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	v1 := versioned(newLoader(t), "v1")
	old := loadIn(t, n, v1)
	loadIn(t, n, versioned(v1, "v2"))

	v := addVeth(t, n)
	var err error
	do(t, n, func() error {
		_, err = v1.Attach(old, v.name, v.index, HookPodIngress, ModeTCX)
		return nil
	})
	if !errors.Is(err, ErrObjectsReplaced) {
		t.Fatalf("Attach with replaced objects = %v, want ErrObjectsReplaced", err)
	}
	if got := tcxPrograms(t, n, v); len(got) != 0 {
		t.Errorf("%s runs %v after the refused attach", v.name, got)
	}
}
