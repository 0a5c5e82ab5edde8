package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// explainers holds, per test (by name), the check expect runs on every
// case before it probes it: see explainEveryCase.
var explainers sync.Map // string -> func(reach) error

// explainEveryCase makes every expect of the test ask `ternctl explain`
// first, and fail a case whose predicted outcome is not the expected one
// (which the probe then checks against real traffic). The datapath and the
// reference evaluator must also agree (explain exits non-zero otherwise).
// node is the address a probe from the node ("node") is explained from.
func (w *policyWorld) explainEveryCase(node string) {
	t := w.t
	explainers.Store(t.Name(), func(r reach) error {
		from := r.fromS
		if !strings.Contains(from, "/") {
			from = node
		}
		proto := strings.ToUpper(r.proto)
		out, err := w.ternctl("-o", "json", "explain", "--from", from, "--to", r.ip, "--port", strconv.Itoa(r.port), "--protocol", proto)
		if err != nil {
			return fmt.Errorf("ternctl explain for %v: %v\n%s", r, err, out)
		}
		var res struct {
			Allowed, ReferenceAllowed, Agree bool
			Action                           string
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			return fmt.Errorf("ternctl explain for %v: %v\n%s", r, err, out)
		}
		if res.Allowed != r.want || !res.Agree || res.ReferenceAllowed != r.want {
			return fmt.Errorf("ternctl explain predicts allowed=%v (reference %v, agree %v, %s) for %v:\n%s", res.Allowed, res.ReferenceAllowed, res.Agree, res.Action, r, out)
		}
		return nil
	})
	t.Cleanup(func() { explainers.Delete(t.Name()) })
}

// explainFirst runs the test's explain check, if it has one, on each case.
func explainFirst(t *testing.T, step string, rs []reach) {
	t.Helper()
	f, ok := explainers.Load(t.Name())
	if !ok {
		return
	}
	for _, r := range rs {
		if err := f.(func(reach) error)(r); err != nil {
			t.Errorf("%s: %v", step, err)
		}
	}
}

// TestMonitorPolicyDenied: a connection NetworkPolicy denies between two
// real pods shows in `ternctl monitor` with both pods' names, the port,
// the direction and the policy isolating the destination; an allowed one
// does not (drops and denials only, by default).
func TestMonitorPolicyDenied(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newPolicyWorld(t, "ebpf")
	n := w.node
	web := addK8sPod(t, n, w.conf, "prod", "web")
	client := addK8sPod(t, n, w.conf, "dev", "client")
	w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster))
	w.mustTernctl("apply", "-f", w.write("deny.yaml", denyAllIngress))
	expect(t, "denied and allowed", tcp(client, web, 8080, false), tcp(web, client, 80, true))

	// The ring buffer keeps what nobody has read yet: the monitor started
	// now sees the denial that just happened.
	out := w.mustTernctl("-o", "json", "monitor", "--pod", "prod/web", "--duration", "2s")
	var found []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("monitor line %q: %v", sc.Text(), err)
		}
		found = append(found, ev)
	}
	var denial map[string]any
	for _, ev := range found {
		if ev["kind"] == "policy" && ev["verdict"] == "deny" {
			denial = ev
		}
		if ev["kind"] == "policy" && ev["verdict"] == "allow" {
			t.Errorf("allowed flow reported by default: %v", ev)
		}
	}
	if denial == nil {
		t.Fatalf("no policy denial in the monitor output:\n%s", out)
	}
	want := map[string]any{
		"srcPod": "dev/client", "dstPod": "prod/web", "src": client.IP, "dst": web.IP, "dstPort": 8080.0,
		"proto": "TCP", "direction": "ingress", "pod": "prod/web", "reason": "drop_policy_ingress",
	}
	for k, v := range want {
		if denial[k] != v {
			t.Errorf("monitor denial %s = %v, want %v (event %v)", k, denial[k], v, denial)
		}
	}
	if pols, _ := denial["policies"].([]any); len(pols) != 1 || pols[0] != "prod/deny-all" {
		t.Errorf("monitor denial names policies %v, want [prod/deny-all]", denial["policies"])
	}

	// The table form names the same.
	w.mustTernctl("apply", "-f", w.write("deny2.yaml", denyAllIngress)) // unchanged: no new state
	expect(t, "denied again", tcp(client, web, 80, false))
	line := w.mustTernctl("monitor", "--pod", "dev/client", "--count", "1", "--duration", "2s")
	t.Logf("ternctl monitor --pod dev/client:\n%s", line)
	for _, s := range []string{"policy", "drop_policy_ingress", "(dev/client)", "(prod/web)", ":80", "ingress of prod/web denied", "prod/deny-all"} {
		if !strings.Contains(line, s) {
			t.Errorf("monitor line lacks %q:\n%s", s, line)
		}
	}
	t.Logf("ternctl explain --from dev/client --to prod/web --port 8080:\n%s", w.mustTernctl("explain", "--from", "dev/client", "--to", "prod/web", "--port", "8080"))

	// A real spoofed packet: the client sends from an address that is not
	// its own (added to its eth0), and the drop names it and the veth.
	spoofed := "10.77.30.200"
	err := client.NS.Do(func(ns.NetNS) error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(spoofed), Mask: net.CIDRMask(32, 32)}}); err != nil {
			return err
		}
		c, err := net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(spoofed)}, &net.UDPAddr{IP: net.ParseIP(web.IP), Port: 53})
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("spoofed"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	out = w.mustTernctl("-o", "json", "monitor", "--type", "drop", "--duration", "2s")
	var spoof map[string]any
	sc = bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev map[string]any
		if json.Unmarshal(sc.Bytes(), &ev) == nil && ev["reason"] == "drop_spoofed" {
			spoof = ev
		}
	}
	if spoof == nil || spoof["src"] != spoofed || spoof["dst"] != web.IP || spoof["dstPod"] != "prod/web" || spoof["dstPort"] != 53.0 ||
		spoof["interface"] != client.hostVeth(t, w) {
		t.Errorf("no drop_spoofed event from %s to prod/web:53 on dev/client's veth %s in:\n%s", spoofed, client.hostVeth(t, w), out)
	}
}

// hostVeth returns the pod's host-side veth, as ternctl get endpoints
// shows it.
func (p *k8sPod) hostVeth(t *testing.T, w *policyWorld) string {
	t.Helper()
	var eps []struct {
		IP       string `json:"ip"`
		HostVeth string `json:"hostVeth"`
	}
	if err := json.Unmarshal([]byte(w.mustTernctl("-o", "json", "get", "endpoints")), &eps); err != nil {
		t.Fatal(err)
	}
	for _, e := range eps {
		if e.IP == p.IP {
			return e.HostVeth
		}
	}
	t.Fatalf("no endpoint %s", p.IP)
	return ""
}

// TestMonitorLostCounts: events over the rate limit are not sent, and the
// monitor says how many it missed.
func TestMonitorLostCounts(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newPolicyWorld(t, "ebpf")
	n := w.node
	web := addK8sPod(t, n, w.conf, "prod", "web")
	client := addK8sPod(t, n, w.conf, "dev", "client")
	w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster))
	w.mustTernctl("apply", "-f", w.write("deny.yaml", denyAllIngress))

	// One event per second per CPU, no burst beyond one.
	cfg, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_event_config"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cfg.Close()
	if err := cfg.Put(uint32(0), [4]uint32{0, 1, 1, 0}); err != nil { // flags, rate, burst, pad
		t.Fatal(err)
	}

	// Denied datagrams for as long as the monitor runs.
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			if ok, err := udp(client, web, 53, false).connects(); err != nil || ok {
				t.Errorf("denied probe: connected %v, %v", ok, err)
				return
			}
		}
	})
	out, err := w.ternctl("-o", "json", "monitor", "--duration", "4s")
	close(done)
	wg.Wait()
	if err != nil {
		t.Fatalf("monitor: %v\n%s", err, out)
	}
	var suppressed float64
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("monitor line %q: %v", sc.Text(), err)
		}
		if ev["kind"] == "lost" {
			s, _ := ev["suppressed"].(float64)
			suppressed += s
		}
	}
	if suppressed == 0 {
		t.Errorf("no suppressed events reported at 1 event/s under a flood of denials:\n%s", out)
	}
	lines, _ := w.ternctl("monitor", "--duration", "1500ms")
	t.Logf("table form:\n%s", lines)
}

// TestMonitorDropReasons sends, from a real pod, a frame for each drop
// reason a pod can provoke (through a packet socket on its eth0, so the
// pod's stack does not stand in the way), and finds each drop in `ternctl
// monitor`, on the pod's veth.
func TestMonitorDropReasons(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newPolicyWorld(t, "ebpf")
	n := w.node
	web := addK8sPod(t, n, w.conf, "prod", "web")
	client := addK8sPod(t, n, w.conf, "dev", "client")
	veth := client.hostVeth(t, w)
	var gwMAC net.HardwareAddr
	err := n.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(veth)
		if err == nil {
			gwMAC = l.Attrs().HardwareAddr
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	cip, wip := net.ParseIP(client.IP).To4(), net.ParseIP(web.IP).To4()
	ipv4 := func(ihl byte, src, dst net.IP) []byte {
		h := []byte{0x40 | ihl, 0, 0, 28, 0, 1, 0x40, 0, 64, 17, 0, 0}
		h = append(append(h, src...), dst...)
		return append(h, 0x30, 0x39, 0, 53, 0, 8, 0, 0) // UDP 12345 -> 53
	}
	arp := func(sha net.HardwareAddr, spa, tpa net.IP) []byte {
		b := []byte{0, 1, 8, 0, 6, 4, 0, 1}
		b = append(append(b, sha...), spa...)
		return append(append(b, make([]byte, 6)...), tpa...)
	}
	err = client.NS.Do(func(ns.NetNS) error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		mac := eth0.Attrs().HardwareAddr
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		frames := map[string][]byte{
			"drop_spoofed":     append(eth(gwMAC, mac, 0x0800), ipv4(5, net.IPv4(10, 77, 30, 201).To4(), wip)...),
			"drop_loopback":    append(eth(gwMAC, mac, 0x0800), ipv4(5, cip, net.IPv4(127, 0, 0, 1).To4())...),
			"drop_truncated":   append(eth(gwMAC, mac, 0x0800), ipv4(4, cip, wip)...),
			"drop_non_ipv4":    append(eth(gwMAC, mac, 0x86dd), make([]byte, 48)...),
			"drop_arp_spoofed": append(eth(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac, 0x0806), arp(mac, wip, cip)...),
		}
		for reason, f := range frames {
			sa := &unix.SockaddrLinklayer{Ifindex: eth0.Attrs().Index, Halen: 6}
			copy(sa.Addr[:], f[:6])
			if err := unix.Sendto(fd, f, 0, sa); err != nil {
				return fmt.Errorf("send %s frame: %w", reason, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	out := w.mustTernctl("-o", "json", "monitor", "--type", "drop", "--duration", "2s")
	seen := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("monitor line %q: %v", sc.Text(), err)
		}
		if ev["interface"] == veth {
			seen[ev["reason"].(string)] = true
		}
	}
	for _, r := range []string{"drop_spoofed", "drop_loopback", "drop_truncated", "drop_non_ipv4", "drop_arp_spoofed"} {
		if !seen[r] {
			t.Errorf("no %s event on %s in:\n%s", r, veth, out)
		}
	}
}

func eth(dst, src net.HardwareAddr, etherType uint16) []byte {
	b := append(append([]byte{}, dst...), src...)
	return append(b, byte(etherType>>8), byte(etherType))
}
