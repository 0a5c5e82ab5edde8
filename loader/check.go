package loader

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
)

// CheckAttached reports an error unless the hook's current program is
// attached to the interface, either by a pinned TCX link or by Tern's
// cls_bpf filter.
func (l *Loader) CheckAttached(objs *Objects, ifname string, ifindex int, hook Hook) error {
	prog, err := objs.Program(hook.program())
	if err != nil {
		return err
	}
	info, err := prog.Info()
	if err != nil {
		return fmt.Errorf("program info: %w", err)
	}
	want, ok := info.ID()
	if !ok {
		return fmt.Errorf("kernel does not report program IDs")
	}

	if hook.xdp() {
		return l.checkXDP(ifname, ifindex, want)
	}

	// A TCX program stays attached only as long as its pinned link exists;
	// without the pin the kernel releases it, asynchronously, so a query
	// alone could still see it for a moment.
	_, pinErr := os.Stat(l.linkPin(ifname, hook))
	_, legacyErr := os.Stat(filepath.Join(l.legacyDir(), attachmentName(ifname, hook)))
	if pinErr != nil && legacyErr != nil {
		return fmt.Errorf("program %s is not attached at tc %s of %s: no link pin and no clsact record", hook.program(), hook, ifname)
	}

	// Attached, and first: a program or filter that runs before Tern can
	// pass a packet for good, past anti-spoofing and policy.
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: hook.tcxAttach()})
	if err == nil && pinErr == nil {
		for i, p := range res.Programs {
			if p.ID != want {
				continue
			}
			if i > 0 {
				return fmt.Errorf("program %s (id %d) is attached at tcx %s of %s but runs after %d foreign program(s), first id %d",
					hook.program(), want, hook, ifname, i, res.Programs[0].ID)
			}
			return nil
		}
	}
	lk, err := netlinksafe.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("interface %s: %w", ifname, err)
	}
	filters, err := netlinksafe.FilterList(lk, hook.clsactParent())
	if err == nil {
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Id == int(want) {
				return checkClsBPFFirst(ifname, hook, bf, filters, res)
			}
		}
	}
	return fmt.Errorf("program %s (id %d) is not attached at tc %s of %s", hook.program(), want, hook, ifname)
}

// checkClsBPFFirst reports an error unless Tern's filter is where Tern
// puts it and nothing runs before it: no TCX program (TCX runs before
// clsact), no filter of a lower priority, and no other filter sharing its
// priority.
func checkClsBPFFirst(ifname string, hook Hook, ours *netlink.BpfFilter, filters []netlink.Filter, tcx *link.QueryResult) error {
	if !isTernClsBPF(ours, hook) {
		return fmt.Errorf("program %s is attached at clsact %s of %s by a filter that is not Tern's (priority %d, handle %#x)",
			hook.program(), hook, ifname, ours.Priority, ours.Handle)
	}
	if tcx != nil && len(tcx.Programs) > 0 {
		return fmt.Errorf("program %s (clsact %s of %s) runs after %d TCX program(s), first id %d",
			hook.program(), hook, ifname, len(tcx.Programs), tcx.Programs[0].ID)
	}
	for _, f := range filters {
		a := f.Attrs()
		if a.Priority < ours.Priority || (a.Priority == ours.Priority && a.Handle != ours.Handle) {
			return fmt.Errorf("program %s (clsact %s of %s, priority %d) does not run first: foreign %s filter at priority %d, handle %#x",
				hook.program(), hook, ifname, ours.Priority, f.Type(), a.Priority, a.Handle)
		}
	}
	return nil
}

// ProgramID returns the kernel ID of a loaded program, for diagnostics.
func ProgramID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, fmt.Errorf("program info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, fmt.Errorf("kernel does not report program IDs")
	}
	return id, nil
}

// checkXDP reports an error unless the pinned XDP link of the interface
// runs the program want. XDP has one program per interface: attached, it
// is the first.
func (l *Loader) checkXDP(ifname string, ifindex int, want ebpf.ProgramID) error {
	lk, err := link.LoadPinnedLink(l.linkPin(ifname, HookUplinkXDP), nil)
	if err != nil {
		return fmt.Errorf("program %s is not attached at xdp of %s: no link pin: %w", HookUplinkXDP.program(), ifname, err)
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return fmt.Errorf("xdp link of %s: %w", ifname, err)
	}
	if xdp := info.XDP(); xdp == nil || int(xdp.Ifindex) != ifindex || info.Program != want {
		return fmt.Errorf("program %s (id %d) is not attached at xdp of %s (link of program %d)", HookUplinkXDP.program(), want, ifname, info.Program)
	}
	return nil
}
