package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	cilium "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// Dry runs for `ternctl explain`: a packet through a pod program with
// BPF_PROG_TEST_RUN, on the node's live policy and endpoint maps, without
// any side effect on the node.
//
// How it is guaranteed: the program is a fresh load of the embedded
// object in which only the maps the programs never write are the node's
// pinned ones (DryRunLiveMaps: endpoints, node config, nomasq, and the
// three NetworkPolicy tables); every map a program writes (conntrack and
// fragments of policy, both NAT maps, counters, events and their limiter)
// is a private, empty copy that goes away with the run. The loaded
// programs cannot be used: their map references are fixed at load, so
// running them would insert conntrack and NAT entries (a per-run "dry run"
// mark in the context, checked before every write, would have to be kept
// in step with every write site by hand, and one missed write would leak
// state). A copy also sees the flow as new, which is the question explain
// answers: what happens to the first packet of a connection. The copy has
// the embedded object's code: DryRunVersionMatches tells whether the node
// runs the same build.

// DryRunLiveMaps are the maps a dry run shares with the node: read-only to
// every program (TestDryRunLiveMapsReadOnly checks the object for writes).
var DryRunLiveMaps = []string{
	ternbpf.TernMapTernEndpoints, ternbpf.TernMapTernConfig, ternbpf.TernMapTernNomasq,
	ternbpf.TernMapTernEpPolicy, ternbpf.TernMapTernIpcache, ternbpf.TernMapTernPolicy,
}

// TC actions a dry run returns (linux/pkt_cls.h; TERN_PASS is TC_ACT_UNSPEC).
const (
	tcActUnspec   = 0xffffffff
	tcActShot     = 2
	tcActRedirect = 7
)

// DryRun is what a program made of one packet.
type DryRun struct {
	Program string   // tern_from_pod or tern_to_pod
	Ifindex int      // the interface it ran as
	Action  string   // "redirect", "pass" (next program, then the stack) or "drop"
	Metrics []string // what it counted, in enum order
	Events  []Event  // what it reported: policy decisions, traces, drops
}

// skbContext is the head of struct __sk_buff up to ifindex, for
// BPF_PROG_TEST_RUN's ctx_in (bpf/tc_pod_test.go says what the kernel
// does with it): ifindex makes the program run as that interface.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// DryRunVersionMatches reports whether the node's programs under bpffsDir
// are the embedded object's build (the pinned programs' directory is
// named after the object version).
func DryRunVersionMatches(bpffsDir string) bool {
	_, err := os.Stat(filepath.Join(bpffsDir, "progs", ternbpf.ObjectVersion()))
	return err == nil
}

// DryRunProgram runs frame through prog (a program of the pod object) as
// if it arrived on ifindex, in the calling thread's network namespace.
func DryRunProgram(bpffsDir, prog string, ifindex int, frame []byte) (*DryRun, error) {
	spec, err := ternbpf.LoadTern()
	if err != nil {
		return nil, err
	}
	repl := map[string]*cilium.Map{}
	defer func() {
		for _, m := range repl {
			m.Close()
		}
	}()
	for _, name := range DryRunLiveMaps {
		m, err := cilium.LoadPinnedMap(filepath.Join(bpffsDir, "maps", name), nil)
		if err != nil {
			return nil, fmt.Errorf("open %s (is the node's eBPF datapath loaded?): %w", name, err)
		}
		repl[name] = m
	}
	for name, m := range spec.Maps {
		if _, live := repl[name]; !live {
			m.Pinning = cilium.PinNone // private
		}
	}
	coll, err := cilium.NewCollectionWithOptions(spec, cilium.CollectionOptions{MapReplacements: repl})
	if err != nil {
		var verr *cilium.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load a copy of the programs: %+v", verr)
		}
		return nil, fmt.Errorf("load a copy of the programs: %w", err)
	}
	defer coll.Close()
	p := coll.Programs[prog]
	if p == nil {
		return nil, fmt.Errorf("object has no program %s", prog)
	}
	// Every kind of event, unlimited: the run's own ring buffer reports
	// the decisions.
	all := EventConfig{Flags: EventPolicyAllow | EventTrace, Rate: 1_000_000_000, Burst: 1_000_000}
	if err := WriteEventConfig(coll.Maps[EventConfigMap], all); err != nil {
		return nil, err
	}
	out := make([]byte, len(frame)+256)
	verdict, err := p.Run(&cilium.RunOptions{
		Data: frame, DataOut: out,
		Context: skbContext{Ifindex: uint32(ifindex)}, ContextOut: make([]byte, 512),
	})
	if err != nil {
		return nil, fmt.Errorf("BPF_PROG_TEST_RUN %s on ifindex %d: %w", prog, ifindex, err)
	}
	r := &DryRun{Program: prog, Ifindex: ifindex}
	switch verdict {
	case tcActRedirect:
		r.Action = "redirect"
	case tcActUnspec:
		r.Action = "pass"
	case tcActShot:
		r.Action = "drop"
	default:
		r.Action = fmt.Sprintf("tc action %d", int32(verdict))
	}
	counts, err := ReadMetrics(coll.Maps[ternbpf.TernMapTernMetrics])
	if err != nil {
		return nil, err
	}
	for m := ternbpf.TernMetric(0); m < ternbpf.TernMetricMETRIC_MAX; m++ {
		if counts[MetricName(m)].Packets > 0 {
			r.Metrics = append(r.Metrics, MetricName(m))
		}
	}
	rd, err := ringbuf.NewReader(coll.Maps[EventsMap])
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	rd.SetDeadline(time.Now())
	for range 64 {
		rec, err := rd.Read()
		if err != nil {
			break // empty (deadline)
		}
		ev, err := DecodeEvent(rec.RawSample)
		if err != nil {
			return nil, err
		}
		r.Events = append(r.Events, ev)
	}
	return r, nil
}
