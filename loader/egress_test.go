package loader

import (
	"fmt"
	"slices"
	"testing"

	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// hookPrograms lists the program IDs at one tc hook of v: TCX links and
// cls_bpf filters alike.
func hookPrograms(t *testing.T, n ns.NetNS, v veth, hook Hook) []int {
	t.Helper()
	var ids []int
	do(t, n, func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: v.index, Attach: hook.tcxAttach()})
		if err != nil {
			return fmt.Errorf("query tcx %s of %s: %w", hook, v.name, err)
		}
		for _, p := range res.Programs {
			ids = append(ids, int(p.ID))
		}
		l, err := netlinksafe.LinkByName(v.name)
		if err != nil {
			return err
		}
		filters, err := netlinksafe.FilterList(l, hook.clsactParent())
		if err != nil {
			return fmt.Errorf("list filters of %s: %w", v.name, err)
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				ids = append(ids, bf.Id)
			}
		}
		return nil
	})
	return ids
}

func programID(t *testing.T, objs *Objects, name string) int {
	t.Helper()
	p, err := objs.Program(name)
	if err != nil {
		t.Fatal(err)
	}
	id, err := ProgramID(p)
	if err != nil {
		t.Fatal(err)
	}
	return int(id)
}

// TestPodEgressHook: tern_to_pod at tc egress of a pod veth, next to
// tern_from_pod at ingress, in both modes: the two attachments do not
// disturb each other (attaching one keeps the other's filter or link),
// both follow an upgrade, Attachments lists each hook's own, and Detach
// removes one without the other.
func TestPodEgressHook(t *testing.T) {
	for _, mode := range []Mode{ModeTCX, ModeLegacy} {
		t.Run(string(mode), func(t *testing.T) {
			testutil.RequirePrivileged(t)
			n := testutil.NewNetNS(t, "ldr")
			v1 := versioned(newLoader(t), "v1")
			old := loadIn(t, n, v1)
			v := addVeth(t, n)
			for _, hook := range []Hook{HookPodIngress, HookPodEgress} {
				do(t, n, func() error {
					_, err := v1.Attach(old, v.name, v.index, hook, mode)
					return err
				})
			}
			in, eg := programID(t, old, ternbpf.TernProgTernFromPod), programID(t, old, ternbpf.TernProgTernToPod)
			if got := hookPrograms(t, n, v, HookPodIngress); !slices.Equal(got, []int{in}) {
				t.Errorf("ingress runs %v, want tern_from_pod %d", got, in)
			}
			if got := hookPrograms(t, n, v, HookPodEgress); !slices.Equal(got, []int{eg}) {
				t.Errorf("egress runs %v, want tern_to_pod %d", got, eg)
			}
			// Inside the namespace: Attachments drops legacy records whose
			// interface it cannot find.
			for _, hook := range []Hook{HookPodIngress, HookPodEgress} {
				do(t, n, func() error {
					if got, err := v1.Attachments(hook); err != nil || !slices.Equal(got, []string{v.name}) {
						t.Errorf("Attachments(%s) = %v, %v", hook, got, err)
					}
					return nil
				})
			}

			v2 := versioned(v1, "v2")
			cur := loadIn(t, n, v2)
			in2, eg2 := programID(t, cur, ternbpf.TernProgTernFromPod), programID(t, cur, ternbpf.TernProgTernToPod)
			if got := hookPrograms(t, n, v, HookPodIngress); !slices.Equal(got, []int{in2}) {
				t.Errorf("ingress after the upgrade runs %v, want v2's %d", got, in2)
			}
			if got := hookPrograms(t, n, v, HookPodEgress); !slices.Equal(got, []int{eg2}) {
				t.Errorf("egress after the upgrade runs %v, want v2's %d (v1 was %d)", got, eg2, eg)
			}
			do(t, n, func() error { return v2.CheckAttached(cur, v.name, v.index, HookPodEgress) })

			do(t, n, func() error { return v2.Detach(v.name, HookPodEgress) })
			if got := hookPrograms(t, n, v, HookPodEgress); len(got) != 0 {
				t.Errorf("egress after Detach runs %v", got)
			}
			if got := hookPrograms(t, n, v, HookPodIngress); !slices.Equal(got, []int{in2}) {
				t.Errorf("ingress after detaching egress runs %v, want %d", got, in2)
			}
			do(t, n, func() error { return v2.Detach(v.name, HookPodIngress) })
			for _, hook := range []Hook{HookPodIngress, HookPodEgress} {
				do(t, n, func() error {
					if got, _ := v2.Attachments(hook); len(got) != 0 {
						t.Errorf("Attachments(%s) after Detach: %v", hook, got)
					}
					return nil
				})
			}
		})
	}
}
