package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Hook is a place a program attaches to on an interface.
type Hook string

const (
	// HookPodIngress is tc ingress of a pod's host-side veth: packets the
	// pod sends.
	HookPodIngress Hook = "ingress"
	// HookUplinkIngress is tc ingress of the node's uplink: replies to
	// masqueraded pod traffic. One attachment per node.
	HookUplinkIngress Hook = "uplink"
	// HookPodEgress is tc egress of a pod's host-side veth: what the host
	// stack delivers to the pod (NetworkPolicy ingress).
	HookPodEgress Hook = "egress"
	// HookUplinkEgress is tc egress of the node's uplink: pod traffic the
	// host stack translated (a Service DNATed to a backend off the node)
	// meets the sender's egress policy there. One attachment per node.
	HookUplinkEgress Hook = "uplink-egress"
	// HookTunnelIngress is tc ingress of the node's VXLAN device (package
	// routing, VXLAN mode): decapsulated traffic from other nodes' pods.
	HookTunnelIngress Hook = "tunnel"
	// HookUplinkXDP is XDP (native, driver mode) of the node's uplink:
	// NodePort acceleration (services "ebpf"), before tc ingress. Always
	// an XDP bpf_link, pinned; there is no legacy mode.
	HookUplinkXDP Hook = "uplink-xdp"
	// HookTunnelEgress is tc egress of the node's VXLAN device: what
	// HookUplinkEgress does at the uplink, for pod traffic the host stack
	// DNATed to a backend on another node, which leaves through the tunnel.
	HookTunnelEgress Hook = "tunnel-egress"
)

func (h Hook) program() string {
	switch h {
	case HookPodIngress:
		return "tern_from_pod"
	case HookUplinkIngress:
		return "tern_from_uplink"
	case HookPodEgress:
		return "tern_to_pod"
	case HookUplinkEgress, HookTunnelEgress:
		return "tern_to_uplink"
	case HookTunnelIngress:
		return "tern_from_tunnel"
	case HookUplinkXDP:
		return "tern_xdp_uplink"
	}
	return cgroupHookProgram(h)
}

func (h Hook) egress() bool {
	return h == HookPodEgress || h == HookUplinkEgress || h == HookTunnelEgress
}

func (h Hook) xdp() bool { return h == HookUplinkXDP }

func (h Hook) tcxAttach() ebpf.AttachType {
	if h.egress() {
		return ebpf.AttachTCXEgress
	}
	return ebpf.AttachTCXIngress
}

func (h Hook) clsactParent() uint32 {
	if h.egress() {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

// Mode is how a program is attached.
type Mode string

const (
	ModeAuto   Mode = ""       // TCX when the kernel has it, else legacy
	ModeTCX    Mode = "tcx"    // bpf_link on the TCX hook, pinned
	ModeLegacy Mode = "legacy" // clsact qdisc with a cls_bpf filter
	// ModeClsactFirst is auto mode's choice for an unshaped pod's veth
	// (not a configuration value): a cls_bpf filter, where a TCX attach
	// would wait for an RCU grace period with the RTNL held
	// (docs/cni-add-profile.md); TCX when the device refuses a clsact
	// qdisc (another plugin's ingress qdisc is there) or a foreign filter
	// holds Tern's priority.
	ModeClsactFirst Mode = "clsact-first"
	// ModeXDP is what Attach reports for HookUplinkXDP, whatever mode it
	// was asked for: an XDP bpf_link in driver mode, pinned. Not a mode
	// configuration selects.
	ModeXDP Mode = "xdp"
)

// ParseMode validates a mode name from configuration.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeAuto, ModeTCX, ModeLegacy:
		return Mode(s), nil
	case "auto":
		return ModeAuto, nil
	}
	return "", fmt.Errorf("unknown attach mode %q (want auto, tcx or legacy)", s)
}

func attachmentName(ifname string, hook Hook) string { return ifname + "@" + string(hook) }

func parseAttachmentName(name string) (string, Hook, error) {
	ifname, hook, ok := strings.Cut(name, "@")
	if !ok || Hook(hook).program() == "" {
		return "", "", fmt.Errorf("not an attachment name: %q", name)
	}
	return ifname, Hook(hook), nil
}

func (l *Loader) linkPin(ifname string, hook Hook) string {
	return filepath.Join(l.BPFFSDir, linksDir, attachmentName(ifname, hook))
}

func (l *Loader) legacyDir() string { return filepath.Join(l.StateDir, "bpf-legacy") }

// Attach attaches the hook's program to the interface and records the
// attachment so that it outlives this process and follows upgrades. It
// returns the mode used. Attaching again replaces the previous attachment.
func (l *Loader) Attach(objs *Objects, ifname string, ifindex int, hook Hook, mode Mode) (Mode, error) {
	prog, err := objs.Program(hook.program())
	if err != nil {
		return "", err
	}
	var used Mode
	err = l.Held(func() error {
		if err := l.current(objs); err != nil {
			return err
		}
		if hook.xdp() {
			used = ModeXDP
			return l.attachXDP(prog, ifname, ifindex)
		}
		if mode == ModeAuto || mode == ModeClsactFirst {
			// Re-attaching (restore, upgrade of an old pod's hooks,
			// a changed tcAttach): stay with the kind the interface
			// has, which attaching the other kind would not remove,
			// and the program would run twice.
			switch l.attachedKind(ifname, ifindex, hook) {
			case ModeTCX:
				mode = ModeTCX
			case ModeLegacy:
				mode = ModeLegacy
			}
		}
		if mode == ModeClsactFirst {
			err := l.attachLegacy(prog, ifname, ifindex, hook)
			if err == nil {
				used = ModeLegacy
				return nil
			}
			if !errors.Is(err, errClsactRefused) {
				return err
			}
			mode = ModeTCX
		}
		if mode == ModeAuto || mode == ModeTCX {
			err := l.attachTCX(prog, ifname, ifindex, hook)
			if err == nil {
				used = ModeTCX
				return nil
			}
			if mode == ModeTCX || !errors.Is(err, ebpf.ErrNotSupported) {
				return err
			}
		}
		if err := l.attachLegacy(prog, ifname, ifindex, hook); err != nil {
			return err
		}
		used = ModeLegacy
		return nil
	})
	return used, err
}

func (l *Loader) attachTCX(prog *ebpf.Program, ifname string, ifindex int, hook Hook) error {
	pin := l.linkPin(ifname, hook)
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("create link pin dir: %w", err)
	}
	// Already attached here: swap the link's program in place. Unpinning
	// and attaching anew would leave the interface without its program in
	// between, and fails with EEXIST while the kernel has not yet released
	// the unpinned link (it does so asynchronously).
	if updated, err := updatePinnedTCX(pin, ifindex, hook, prog); err != nil || updated {
		return err
	}
	// A pin left by an earlier attachment of a since-recreated interface
	// would block the new pin; it refers to a dead or replaced link.
	if err := os.Remove(pin); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove stale link pin %s: %w", pin, err)
	}
	// At the head of the chain: anti-spoofing and policy must see every
	// packet before a foreign program can pass it for good, and Tern
	// passes with TCX_NEXT so what comes after still runs. A program
	// attached later with its own Head anchor goes in front of Tern:
	// CheckAttached reports that.
	lk, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    hook.tcxAttach(),
		Anchor:    link.Head(),
	})
	if err != nil {
		return fmt.Errorf("attach tcx %s to %s: %w", hook, ifname, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		return fmt.Errorf("pin tcx link %s: %w", pin, err)
	}
	return nil
}

// attachXDP attaches prog at XDP of the interface in driver (native) mode,
// by a pinned bpf_link, or points the pinned link there at prog. Generic
// (skb) mode is not a fallback: it runs after the skb is allocated, which
// is what this program exists to avoid; the caller falls back to tc alone.
// A driver without native XDP fails with ErrNotSupported or EOPNOTSUPP.
func (l *Loader) attachXDP(prog *ebpf.Program, ifname string, ifindex int) error {
	pin := l.linkPin(ifname, HookUplinkXDP)
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		return fmt.Errorf("create link pin dir: %w", err)
	}
	if updated, err := updatePinnedXDP(pin, ifindex, prog); err != nil || updated {
		return err
	}
	if err := os.Remove(pin); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove stale link pin %s: %w", pin, err)
	}
	lk, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: link.XDPDriverMode})
	if err != nil {
		return fmt.Errorf("attach xdp to %s: %w", ifname, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		return fmt.Errorf("pin xdp link %s: %w", pin, err)
	}
	return nil
}

// updatePinnedXDP points the XDP link pinned at pin to prog, if that link
// is still attached to ifindex, and reports whether it did.
func updatePinnedXDP(pin string, ifindex int, prog *ebpf.Program) (bool, error) {
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return false, nil
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return false, nil
	}
	xdp := info.XDP()
	if xdp == nil || int(xdp.Ifindex) != ifindex {
		return false, nil
	}
	if err := lk.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) {
			return false, nil
		}
		return false, fmt.Errorf("update xdp link %s: %w", pin, err)
	}
	return true, nil
}

// updatePinnedTCX points the TCX link pinned at pin to prog, if that link
// is still attached at hook of ifindex, and reports whether it did.
func updatePinnedTCX(pin string, ifindex int, hook Hook, prog *ebpf.Program) (bool, error) {
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return false, nil // no pin, or not a link: replaced by the caller
	}
	defer lk.Close()
	info, err := lk.Info()
	if err != nil {
		return false, nil
	}
	tcx := info.TCX()
	if tcx == nil || int(tcx.Ifindex) != ifindex || ebpf.AttachType(tcx.AttachType) != hook.tcxAttach() {
		return false, nil // the link of a deleted or other interface
	}
	if err := lk.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) {
			return false, nil // its interface went away meanwhile
		}
		return false, fmt.Errorf("update tcx link %s: %w", pin, err)
	}
	return true, nil
}

// detachPinnedTCX detaches the TCX link pinned at pin, if any, so that the
// program is off the interface when Detach returns: unpinning alone lets
// the kernel release the link asynchronously.
func detachPinnedTCX(pin string) {
	lk, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return
	}
	defer lk.Close()
	_ = lk.Detach() // best effort: fails only for a link already severed
}

func (l *Loader) attachLegacy(prog *ebpf.Program, ifname string, ifindex int, hook Hook) error {
	if !l.freshClsact[clsactDevice{ifname, ifindex}] {
		if err := netlink.QdiscReplace(clsactQdisc(ifindex)); err != nil {
			return fmt.Errorf("add clsact qdisc to %s: %w (%w)", ifname, err, errClsactRefused)
		}
		if err := checkClsBPFSlot(ifindex, hook); err != nil {
			return fmt.Errorf("attach cls_bpf %s to %s: %w (%w)", hook, ifname, err, errClsactRefused)
		}
	}
	if err := replaceClsBPF(ifindex, hook, prog); err != nil {
		return fmt.Errorf("attach cls_bpf %s to %s: %w", hook, ifname, err)
	}
	if err := os.MkdirAll(l.legacyDir(), 0o700); err != nil {
		return fmt.Errorf("create legacy attachment dir: %w", err)
	}
	rec := filepath.Join(l.legacyDir(), attachmentName(ifname, hook))
	if err := os.WriteFile(rec, []byte(strconv.Itoa(ifindex)), 0o600); err != nil {
		return fmt.Errorf("record legacy attachment: %w", err)
	}
	return nil
}

func clsactQdisc(ifindex int) *netlink.GenericQdisc {
	return &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
}

// clsactDevice names a device by name and index: a device deleted and
// created again under the same name has another index.
type clsactDevice struct {
	name  string
	index int
}

// PrepareClsact creates the clsact qdisc on a device that has none, before
// the caller takes the lock under which it attaches (CNI ADD: the records
// lock that serialises a network's ADDs; the qdisc is the pod's own veth's
// and shares nothing with other pods). It reports whether it created the
// qdisc. When it did, this loader's later cls_bpf attach to the device
// skips what attachLegacy otherwise does first: replacing the qdisc and
// listing the filters for a foreign one at Tern's priority. A qdisc
// created here had no filter, and the device is one the caller has just
// created for a pod that does not run yet. Each of those two is a netlink
// request that waits for the RTNL, which ten parallel ADDs creating their
// veths keep busy, and it was waited for with the records lock held
// (docs/cni-add-profile.md, "Third pass"). Where the
// device has a qdisc already (an ingress qdisc, a clsact with filters) it
// does nothing and returns false: the attach then checks as before, and
// may refuse clsact and fall back to TCX.
func (l *Loader) PrepareClsact(ifname string, ifindex int) (bool, error) {
	err := netlink.QdiscAdd(clsactQdisc(ifindex))
	if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EINVAL) {
		return false, nil // a qdisc is there (ingress and clsact exclude each other)
	}
	if err != nil {
		return false, fmt.Errorf("add clsact qdisc to %s: %w", ifname, err)
	}
	if l.freshClsact == nil {
		l.freshClsact = make(map[clsactDevice]bool)
	}
	l.freshClsact[clsactDevice{ifname, ifindex}] = true
	return true, nil
}

// errClsactRefused marks an attachLegacy failure before Tern's filter is in
// place: the device has a qdisc that excludes clsact (the ingress qdisc), or
// a foreign filter holds Tern's priority. Nothing of Tern's is left behind,
// so ModeClsactFirst can attach with TCX instead.
var errClsactRefused = errors.New("clsact refused")

// attachedKind says how hook is attached to the interface ifindex
// (ifname) now, by Tern's records: ModeTCX for a pinned link of that
// hook and device, ModeLegacy for a clsact record of that device, ""
// for neither (records of a deleted or recreated device do not count).
func (l *Loader) attachedKind(ifname string, ifindex int, hook Hook) Mode {
	if lk, err := link.LoadPinnedLink(l.linkPin(ifname, hook), nil); err == nil {
		info, err := lk.Info()
		lk.Close()
		if err == nil {
			if tcx := info.TCX(); tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == hook.tcxAttach() {
				return ModeTCX
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(l.legacyDir(), attachmentName(ifname, hook)))
	if err == nil {
		if idx, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && idx == ifindex {
			return ModeLegacy
		}
	}
	return ""
}

// AttachedKind is attachedKind for callers outside the package that must
// attach a device's second hook the way its first one is (ModeTCX,
// ModeLegacy or "" for none).
func (l *Loader) AttachedKind(ifname string, ifindex int, hook Hook) Mode {
	return l.attachedKind(ifname, ifindex, hook)
}

// Tern's cls_bpf filter: handle, so replace finds it, and priority 1, the
// first that runs (tc runs the lowest priority number first). Tern passes
// with TC_ACT_UNSPEC, so the filters of later priorities still run.
const (
	clsBPFHandle   = 0x7e51
	clsBPFPriority = 1
)

func clsBPFAttrs(ifindex int, hook Hook) netlink.FilterAttrs {
	return netlink.FilterAttrs{
		LinkIndex: ifindex,
		Parent:    hook.clsactParent(),
		Handle:    clsBPFHandle,
		Protocol:  unix.ETH_P_ALL,
		Priority:  clsBPFPriority,
	}
}

// isTernClsBPF reports whether f is a filter Tern put at hook: its handle,
// priority and protocol, a bpf filter named after the hook's program.
func isTernClsBPF(f netlink.Filter, hook Hook) bool {
	bf, ok := f.(*netlink.BpfFilter)
	if !ok {
		return false
	}
	a := bf.Attrs()
	return a.Handle == clsBPFHandle && a.Priority == clsBPFPriority &&
		a.Protocol == unix.ETH_P_ALL && strings.HasPrefix(bf.Name, hook.program())
}

// checkClsBPFSlot refuses to attach where a foreign filter holds Tern's
// priority: replacing would clobber it if it had Tern's handle, and joining
// its priority would leave the order between the two to the classifier.
// Tern must run first, so it does not move to another priority either.
func checkClsBPFSlot(ifindex int, hook Hook) error {
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return err
	}
	filters, err := netlinksafe.FilterList(lk, hook.clsactParent())
	if err != nil {
		return fmt.Errorf("list filters: %w", err)
	}
	for _, f := range filters {
		a := f.Attrs()
		if a.Priority != clsBPFPriority || isTernClsBPF(f, hook) {
			continue
		}
		return fmt.Errorf("priority %d of clsact %s is held by a foreign %s filter (handle %#x); "+
			"Tern runs first there and will not replace or join it", clsBPFPriority, hook, f.Type(), a.Handle)
	}
	return nil
}

func clsBPFFilter(ifindex int, hook Hook, prog *ebpf.Program) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs:  clsBPFAttrs(ifindex, hook),
		Fd:           prog.FD(),
		Name:         hook.program(),
		DirectAction: true,
	}
}

func replaceClsBPF(ifindex int, hook Hook, prog *ebpf.Program) error {
	return netlink.FilterReplace(clsBPFFilter(ifindex, hook, prog))
}

type legacyAttachment struct {
	Ifname  string
	Hook    Hook
	Ifindex int
}

func (l *Loader) legacyAttachments() ([]legacyAttachment, error) {
	entries, err := os.ReadDir(l.legacyDir())
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list legacy attachments: %w", err)
	}
	var out []legacyAttachment
	for _, e := range entries {
		ifname, hook, err := parseAttachmentName(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(l.legacyDir(), e.Name()))
		if err != nil {
			return nil, fmt.Errorf("read legacy attachment %s: %w", e.Name(), err)
		}
		ifindex, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return nil, fmt.Errorf("parse legacy attachment %s: %w", e.Name(), err)
		}
		// An interface deleted behind our back leaves a stale record.
		if lk, err := netlink.LinkByIndex(ifindex); err != nil || lk.Attrs().Name != ifname {
			_ = os.Remove(filepath.Join(l.legacyDir(), e.Name()))
			continue
		}
		out = append(out, legacyAttachment{Ifname: ifname, Hook: hook, Ifindex: ifindex})
	}
	return out, nil
}

// Detach removes the attachment of hook on ifname, whatever its mode.
// Missing pieces are fine: the interface may already be gone.
func (l *Loader) Detach(ifname string, hook Hook) error {
	for d := range l.freshClsact {
		if d.name == ifname {
			delete(l.freshClsact, d) // a filter may come back: check again
		}
	}
	return l.Held(func() error {
		var errs []error
		detachPinnedTCX(l.linkPin(ifname, hook))
		if err := os.Remove(l.linkPin(ifname, hook)); err != nil && !os.IsNotExist(err) {
			errs = append(errs, fmt.Errorf("unpin tcx link of %s: %w", ifname, err))
		}
		rec := filepath.Join(l.legacyDir(), attachmentName(ifname, hook))
		if b, err := os.ReadFile(rec); err == nil {
			if ifindex, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				if lk, err := netlink.LinkByIndex(ifindex); err == nil && lk.Attrs().Name == ifname {
					f := &netlink.BpfFilter{FilterAttrs: clsBPFAttrs(ifindex, hook)}
					if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
						errs = append(errs, fmt.Errorf("delete cls_bpf filter on %s: %w", ifname, err))
					}
				}
			}
			if err := os.Remove(rec); err != nil && !os.IsNotExist(err) {
				errs = append(errs, fmt.Errorf("remove legacy record of %s: %w", ifname, err))
			}
		}
		return errors.Join(errs...)
	})
}
