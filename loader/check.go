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

	// A TCX program stays attached only as long as its pinned link exists;
	// without the pin the kernel releases it, asynchronously, so a query
	// alone could still see it for a moment.
	_, pinErr := os.Stat(l.linkPin(ifname, hook))
	_, legacyErr := os.Stat(filepath.Join(l.legacyDir(), attachmentName(ifname, hook)))
	if pinErr != nil && legacyErr != nil {
		return fmt.Errorf("program %s is not attached at tc %s of %s: no link pin and no clsact record", hook.program(), hook, ifname)
	}

	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: hook.tcxAttach()})
	if err == nil && pinErr == nil {
		for _, p := range res.Programs {
			if p.ID == want {
				return nil
			}
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
				return nil
			}
		}
	}
	return fmt.Errorf("program %s (id %d) is not attached at tc %s of %s", hook.program(), want, hook, ifname)
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
