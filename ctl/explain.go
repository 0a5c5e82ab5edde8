package ctl

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/cni"
	"github.com/ternlabs/tern/datapath"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/datapath/iptables"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/reference"
)

// explainSrcPort is the source port of the packets explain builds: an
// ephemeral one (policy never looks at it).
const explainSrcPort = 45678

// explainEnd is one end of the explained packet.
type explainEnd struct {
	Arg      string `json:"arg"`
	IP       string `json:"ip"`
	Pod      string `json:"pod,omitempty"`
	Local    bool   `json:"local"`          // a pod of this node
	Host     bool   `json:"host,omitempty"` // an address of this node
	HostVeth string `json:"hostVeth,omitempty"`
	Ifindex  int    `json:"ifindex,omitempty"`
	Identity uint32 `json:"identity,omitempty"` // eBPF: local identity in tern_ep_policy

	addr netip.Addr
	ep   *datapath.Endpoint
}

// explainStep is the decision of one policy direction.
type explainStep struct {
	Direction        string `json:"direction"`
	Pod              string `json:"pod"`
	Reference        string `json:"reference"` // the reference evaluator's reason
	ReferenceAllowed bool   `json:"referenceAllowed"`
	Policy           string `json:"policy,omitempty"` // allowing policy and rule, per the reference
	Isolated         bool   `json:"isolated"`
	Datapath         string `json:"datapath"` // what the datapath did in this direction
	DatapathAllowed  bool   `json:"datapathAllowed"`
	Reached          bool   `json:"reached"` // the datapath decided this direction (not stopped before)
}

// explainResult is the output of `ternctl explain`.
type explainResult struct {
	Packet           string        `json:"packet"`
	Datapath         string        `json:"datapath"` // ebpf or iptables
	From             explainEnd    `json:"from"`
	To               explainEnd    `json:"to"`
	Program          string        `json:"program,omitempty"`
	Steps            []explainStep `json:"steps"`
	Action           string        `json:"action"`
	Counted          []string      `json:"counted,omitempty"`
	Allowed          bool          `json:"allowed"` // the datapath lets the connection open
	ReferenceAllowed bool          `json:"referenceAllowed"`
	Reference        string        `json:"reference"`
	Agree            bool          `json:"agree"`
	Notes            []string      `json:"notes,omitempty"`

	otherDrop bool // dropped before or beside policy
}

type explainOpts struct {
	from, to string
	port     int
	proto    uint8
}

func parseExplainFlags(args []string, output *string, stderr io.Writer) (*explainOpts, error) {
	fs := flag.NewFlagSet("ternctl explain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	from := fs.String("from", "", "source: NS/POD or an IPv4 address")
	to := fs.String("to", "", "destination: NS/POD or an IPv4 address")
	port := fs.Int("port", 0, "destination port (TCP, UDP, SCTP)")
	proto := fs.String("protocol", "TCP", "TCP, UDP, SCTP or ICMP (echo request)")
	fs.StringVar(output, "o", *output, "output format: table or json")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("explain: unexpected argument %q", fs.Arg(0))
	}
	o := &explainOpts{from: *from, to: *to, port: *port}
	if o.from == "" || o.to == "" {
		return nil, errors.New("explain: --from and --to are required")
	}
	switch strings.ToUpper(*proto) {
	case "TCP":
		o.proto = unix.IPPROTO_TCP
	case "UDP":
		o.proto = unix.IPPROTO_UDP
	case "SCTP":
		o.proto = unix.IPPROTO_SCTP
	case "ICMP":
		o.proto = unix.IPPROTO_ICMP
	default:
		return nil, fmt.Errorf("explain: unknown protocol %q", *proto)
	}
	if o.proto != unix.IPPROTO_ICMP && (o.port < 1 || o.port > 65535) {
		return nil, errors.New("explain: --port 1-65535 is required")
	}
	return o, nil
}

// resolve finds an end given as NS/POD or IP in the network's view.
func resolve(v *cni.PolicyView, arg string) (explainEnd, error) {
	e := explainEnd{Arg: arg}
	if strings.Contains(arg, "/") {
		ns, name, _ := strings.Cut(arg, "/")
		for _, ep := range v.Endpoints {
			if ep.PodNamespace == ns && ep.PodName == name {
				e.addr, _ = netip.AddrFromSlice(ep.IP.IP.To4())
			}
		}
		if !e.addr.IsValid() {
			for ip, ep := range v.Topology.Endpoints {
				if ep.Namespace == ns && ep.Name == name {
					e.addr = netip.MustParseAddr(ip)
				}
			}
		}
		if !e.addr.IsValid() {
			return e, fmt.Errorf("explain: no pod %s (not on this node, and no IP of it in the policy state)", arg)
		}
	} else {
		a, err := netip.ParseAddr(arg)
		if err != nil || !a.Is4() {
			return e, fmt.Errorf("explain: %q is neither NS/POD nor an IPv4 address", arg)
		}
		e.addr = a
	}
	e.IP = e.addr.String()
	if tep, ok := v.Topology.Endpoints[e.IP]; ok {
		e.Pod = tep.Namespace + "/" + tep.Name
	}
	for _, ep := range v.Endpoints {
		if ep.IP.IP.Equal(net.IP(e.addr.AsSlice())) {
			e.ep, e.Local, e.HostVeth, e.Ifindex = ep, true, ep.HostVeth, ep.HostIfindex
			if e.Pod == "" && ep.PodName != "" {
				e.Pod = ep.PodNamespace + "/" + ep.PodName
			}
		}
	}
	for _, h := range v.Topology.Hosts {
		if h.Equal(net.IP(e.addr.AsSlice())) {
			e.Host = true
		}
	}
	return e, nil
}

func (e explainEnd) String() string {
	var b strings.Builder
	if e.Pod != "" {
		b.WriteString(e.Pod + " ")
	}
	b.WriteString(e.IP)
	var what []string
	switch {
	case e.Local:
		what = append(what, "pod on this node", "veth "+e.HostVeth, fmt.Sprintf("ifindex %d", e.Ifindex))
	case e.Host:
		what = append(what, "this node")
	case e.Pod != "":
		what = append(what, "pod on another node")
	default:
		what = append(what, "not a pod")
	}
	if e.Identity != 0 {
		what = append(what, fmt.Sprintf("identity %d", e.Identity))
	}
	return b.String() + " (" + strings.Join(what, ", ") + ")"
}

// explain answers "what happens to the first packet of a connection from
// --from to --to": the datapath's answer (a dry run of the eBPF programs,
// or a walk of the iptables policy chains) next to the reference
// evaluator's. It fails when they disagree.
func explain(conf *cni.NetConf, args []string, output string, stdout, stderr io.Writer) error {
	o, err := parseExplainFlags(args, &output, stderr)
	if err != nil {
		return err
	}
	if output != "table" && output != "json" {
		return fmt.Errorf("unknown output format %q", output)
	}
	v, err := conf.PolicyView()
	if err != nil {
		return err
	}
	from, err := resolve(v, o.from)
	if err != nil {
		return err
	}
	to, err := resolve(v, o.to)
	if err != nil {
		return err
	}
	r := &explainResult{From: from, To: to, Datapath: "iptables"}
	r.Packet = fmt.Sprintf("%s %s:%d -> %s:%d", protoName(o.proto), from.IP, explainSrcPort, to.IP, o.port)
	if o.proto == unix.IPPROTO_ICMP {
		r.Packet = fmt.Sprintf("ICMP echo request %s -> %s", from.IP, to.IP)
	}
	pkt := policy.Packet{SrcIP: from.addr.AsSlice(), DstIP: to.addr.AsSlice(), Proto: o.proto, DstPort: uint16(o.port)}
	if o.proto == unix.IPPROTO_ICMP {
		pkt.DstPort = 0
	}
	ref := reference.Decide(v.State, v.Topology, pkt)
	r.ReferenceAllowed, r.Reference = ref.Allowed, ref.Reason
	for _, d := range reference.Directions(v.State, v.Topology, pkt) {
		s := explainStep{Direction: d.Direction, Pod: d.Pod, ReferenceAllowed: d.Allowed, Isolated: d.Isolated, Reference: d.Why}
		if d.Policy != "" {
			s.Policy = fmt.Sprintf("%s %s[%d]", d.Policy, d.Direction, d.Rule)
		}
		if !d.Allowed {
			self := pkt.SrcIP
			if d.Direction == "ingress" {
				self = pkt.DstIP
			}
			s.Reference += " (isolated by " + strings.Join(reference.Selecting(v.State, v.Topology, self, d.Direction), ", ") + ")"
		}
		r.Steps = append(r.Steps, s)
	}
	if conf.IsEBPF() {
		r.Datapath = "ebpf"
		err = explainEBPF(conf, r, o)
	} else {
		err = explainIPTables(conf, r, o)
	}
	if err != nil {
		return err
	}
	// A drop for another reason (spoofing, a NAT failure) says nothing
	// about policy: then only the directions the datapath decided count.
	r.Agree = r.Allowed == r.ReferenceAllowed || r.otherDrop
	for _, s := range r.Steps {
		if s.Reached && s.DatapathAllowed != s.ReferenceAllowed {
			r.Agree = false
		}
	}
	if output == "json" {
		if err := writeJSON(stdout, r); err != nil {
			return err
		}
	} else {
		printExplain(stdout, r)
	}
	if !r.Agree {
		return errors.New("explain: the datapath and the reference evaluator disagree: this is a bug in Tern")
	}
	return nil
}

func printExplain(w io.Writer, r *explainResult) {
	fmt.Fprintf(w, "packet     %s, first packet of a new connection\n", r.Packet)
	fmt.Fprintf(w, "from       %s\n", r.From)
	fmt.Fprintf(w, "to         %s\n", r.To)
	if r.Program != "" {
		fmt.Fprintf(w, "program    %s\n", r.Program)
	}
	if len(r.Steps) == 0 {
		fmt.Fprintf(w, "policy     neither end is a pod of this node: no policy of this node applies\n")
	}
	for _, s := range r.Steps {
		ref := "allowed"
		if !s.ReferenceAllowed {
			ref = "denied"
		}
		fmt.Fprintf(w, "%-10s %s: %s, %s\n", s.Direction, s.Pod, ref, s.Reference)
		fmt.Fprintf(w, "%-10s   datapath: %s\n", "", s.Datapath)
	}
	fmt.Fprintf(w, "action     %s\n", r.Action)
	verdict := "allowed"
	if !r.Allowed {
		verdict = "denied"
	}
	agree := "the reference evaluator agrees"
	if !r.Agree {
		agree = fmt.Sprintf("THE REFERENCE EVALUATOR DISAGREES (allowed=%v: %s): a bug", r.ReferenceAllowed, r.Reference)
	}
	fmt.Fprintf(w, "verdict    %s; %s\n", verdict, agree)
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note       %s\n", n)
	}
}

// --- eBPF ---

// explainFrame builds the Ethernet frame of the connection's first packet:
// a TCP SYN, a UDP datagram, an SCTP INIT-sized header or an ICMP echo.
func explainFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, proto uint8, dport uint16) []byte {
	var l4 []byte
	switch proto {
	case unix.IPPROTO_TCP:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint16(l4[0:], explainSrcPort)
		binary.BigEndian.PutUint16(l4[2:], dport)
		binary.BigEndian.PutUint32(l4[4:], 1)
		l4[12] = 5 << 4 // data offset
		l4[13] = 0x02   // SYN
		binary.BigEndian.PutUint16(l4[14:], 64240)
	case unix.IPPROTO_UDP:
		payload := []byte("ternctl explain")
		l4 = make([]byte, 8, 8+len(payload))
		binary.BigEndian.PutUint16(l4[0:], explainSrcPort)
		binary.BigEndian.PutUint16(l4[2:], dport)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(payload)))
		l4 = append(l4, payload...)
	case unix.IPPROTO_SCTP:
		l4 = make([]byte, 12)
		binary.BigEndian.PutUint16(l4[0:], explainSrcPort)
		binary.BigEndian.PutUint16(l4[2:], dport)
	default: // ICMP echo request
		l4 = []byte{8, 0, 0, 0, 0x7e, 0x41, 0, 1}
		binary.BigEndian.PutUint16(l4[2:], inetChecksum(l4))
	}
	ip := make([]byte, 20, 20+len(l4))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(ip[4:], 0x7e41)
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8] = 64
	ip[9] = proto
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], inetChecksum(ip))
	frame := make([]byte, 0, 14+len(ip)+len(l4))
	frame = append(frame, dstMAC...)
	frame = append(frame, srcMAC...)
	frame = append(frame, 0x08, 0x00)
	frame = append(frame, ip...)
	return append(frame, l4...)
}

func inetChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// policyStateOf reads a local pod's identity and isolation flags from the
// live tern_ep_policy (zero: no policy state).
func policyStateOf(conf *cni.NetConf, a netip.Addr) (id, flags uint32) {
	m, err := ebpf.LoadPinnedMap(conf.BPFFSDir+"/maps/tern_ep_policy", &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return 0, 0
	}
	defer m.Close()
	key, err := ebpfdp.EndpointKey(net.IP(a.AsSlice()))
	if err != nil {
		return 0, 0
	}
	var v [8]byte // compile.EndpointPolicy: local identity, flags
	if err := m.Lookup(key, &v); err != nil {
		return 0, 0
	}
	return binary.NativeEndian.Uint32(v[:4]), binary.NativeEndian.Uint32(v[4:])
}

// ep_policy flags (bpf/include/tern_types.h).
const (
	epPolicyIngress = 1 << 0
	epPolicyEgress  = 1 << 1
)

func hostMAC(ep *datapath.Endpoint) net.HardwareAddr {
	if len(ep.HostMAC) == 6 {
		return ep.HostMAC
	}
	if l, err := netlink.LinkByIndex(ep.HostIfindex); err == nil {
		return l.Attrs().HardwareAddr
	}
	return net.HardwareAddr{2, 0, 0, 0, 0, 1}
}

// explainEBPF runs the packet through the program that sees it first on
// this node: tern_from_pod on the source's veth when the source is a local
// pod, else tern_to_pod on the destination's veth (what the host stack
// delivers to a local pod).
func explainEBPF(conf *cni.NetConf, r *explainResult, o *explainOpts) error {
	var fromFlags, toFlags uint32
	r.From.Identity, fromFlags = policyStateOf(conf, r.From.addr)
	r.To.Identity, toFlags = policyStateOf(conf, r.To.addr)
	var (
		prog  string
		ep    *datapath.Endpoint
		frame []byte
	)
	switch {
	case r.From.Local:
		prog, ep = "tern_from_pod", r.From.ep
		frame = explainFrame(hostMAC(ep), ep.PodMAC, r.From.addr, r.To.addr, o.proto, uint16(o.port))
	case r.To.Local:
		prog, ep = "tern_to_pod", r.To.ep
		frame = explainFrame(r.To.ep.PodMAC, hostMAC(ep), r.From.addr, r.To.addr, o.proto, uint16(o.port))
	default:
		r.Action = "not seen by this node's pod programs (neither end is a pod of this node)"
		r.Allowed = true
		return nil
	}
	run, err := ebpfdp.DryRunProgram(conf.BPFFSDir, prog, ep.HostIfindex, frame)
	if err != nil {
		return err
	}
	r.Program = fmt.Sprintf("%s on %s (BPF_PROG_TEST_RUN of a copy of the programs on the node's endpoint and policy maps; private conntrack and NAT: no side effects)", prog, ep.HostVeth)
	if !ebpfdp.DryRunVersionMatches(conf.BPFFSDir) {
		r.Notes = append(r.Notes, "the node runs another build of the programs than this ternctl's")
	}
	r.Counted = run.Metrics
	policyDrop := false
	for _, m := range run.Metrics {
		if strings.HasPrefix(m, "drop_policy_") {
			policyDrop = true
		}
	}
	for i := range r.Steps {
		s := &r.Steps[i]
		s.DatapathAllowed = true
		s.Datapath = "no decision: not isolated"
		for _, ev := range run.Events {
			if ev.Kind != "policy" || ev.Direction != s.Direction {
				continue
			}
			s.Reached = true
			s.DatapathAllowed = ev.Allowed
			verdict := "allowed"
			if !ev.Allowed {
				verdict = "denied"
			}
			s.Datapath = fmt.Sprintf("%s (identity %d, remote class %d)", verdict, ev.LocalID, ev.RemoteClass)
		}
		isolated := (s.Direction == "egress" && fromFlags&epPolicyEgress != 0) || (s.Direction == "ingress" && toFlags&epPolicyIngress != 0)
		if !s.Reached {
			switch {
			case !isolated:
				s.Reached = true // nothing to decide: it passes
			case policyDrop:
				s.Datapath = "not decided: the other direction denied first"
			case run.Action == "drop":
				s.Datapath = "not reached: dropped before policy"
			default:
				s.Reached = true
				s.Datapath = "passed without a decision"
			}
		}
	}
	r.Allowed = !policyDrop
	what := strings.Join(run.Metrics, ", ")
	words := ""
	if len(run.Metrics) > 0 {
		words = " (" + describeReason(run.Metrics[len(run.Metrics)-1]) + ")"
	}
	switch run.Action {
	case "redirect":
		if r.To.Local && contains(run.Metrics, "redirect_peer") {
			r.Action = fmt.Sprintf("redirect_peer into %s (%s)", orIP(r.To), what)
		} else {
			r.Action = "redirect: " + what + words
		}
	case "pass":
		r.Action = "pass: " + what + words
	case "drop":
		r.Action = "drop: " + what + words
		if !policyDrop {
			r.Allowed = false
			r.Notes = append(r.Notes, "dropped for a reason other than policy: the reference evaluator only decides policy")
			r.otherDrop = true
		}
	default:
		r.Action = run.Action + ": " + what
	}
	if r.From.Local && !r.To.Local && r.To.Pod != "" && !r.To.Host {
		r.Notes = append(r.Notes, "the destination's ingress policy is decided on its own node")
	}
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func orIP(e explainEnd) string {
	if e.Pod != "" {
		return e.Pod
	}
	return e.IP
}

// --- iptables ---

// explainIPTables walks the network's policy chains as installed: the
// dispatch chain's rule for the pod, then the policy chain's first
// matching rule, for each direction the reference evaluator decides.
// Traffic between a pod and the node goes through INPUT and OUTPUT, which
// have no policy chains.
func explainIPTables(conf *cni.NetConf, r *explainResult, o *explainOpts) error {
	r.Allowed = true
	dport := uint16(o.port)
	if o.proto == unix.IPPROTO_ICMP {
		dport = 0
	}
	for i := range r.Steps {
		s := &r.Steps[i]
		s.Reached = true
		if r.From.Host || r.To.Host {
			s.DatapathAllowed = true
			s.Datapath = "node traffic (INPUT/OUTPUT): no policy chain"
			continue
		}
		cv, err := iptables.ExplainDirection(conf.Name, s.Direction, r.From.addr, r.To.addr, o.proto, dport)
		if err != nil {
			return err
		}
		if !cv.Isolated {
			s.DatapathAllowed = true
			s.Datapath = fmt.Sprintf("no rule in %s for the pod: not isolated", iptables.DispatchChain(conf.Name))
			continue
		}
		s.DatapathAllowed = cv.Allowed
		verdict := "RETURN (allowed)"
		if !cv.Allowed {
			verdict = "DROP (denied)"
		}
		s.Datapath = fmt.Sprintf("%s rule %d: %s -> %s", cv.Chain, cv.RuleNum, cv.Rule, verdict)
		if !cv.Allowed {
			r.Allowed = false
		}
	}
	r.Action = "forwarded by the bridge (FORWARD accepts what the policy chains return)"
	if !r.Allowed {
		r.Action = "drop (policy chain DROP)"
	}
	if r.From.Host || r.To.Host {
		r.Action = "delivered by the node's stack (INPUT/OUTPUT)"
	}
	return nil
}
