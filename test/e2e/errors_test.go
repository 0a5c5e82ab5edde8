package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/internal/testutil"
)

// specVersions are the CNI spec versions tern claims in VERSION.
var specVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// conflistAt is conflist with the given cniVersion instead of 1.1.0.
func conflistAt(t testing.TB, n *testutil.Node, name, cniVersion string, c netConf) []byte {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(conflist(t, n, name, c), &m); err != nil {
		t.Fatal(err)
	}
	m["cniVersion"] = cniVersion
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pluginStdin is the configuration a runtime pipes to the plugin for the
// first plugin of a conflist: the plugin object with name and cniVersion
// injected. edit, when set, changes it before it is encoded (a nil value
// deletes a key).
func pluginStdin(t testing.TB, list []byte, edit map[string]any) []byte {
	t.Helper()
	var l struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(list, &l); err != nil {
		t.Fatal(err)
	}
	p := l.Plugins[0]
	p["name"] = l.Name
	p["cniVersion"] = l.CNIVersion
	for k, v := range edit {
		if v == nil {
			delete(p, k)
		} else {
			p[k] = v
		}
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pluginRun is the outcome of one direct execution of the plugin.
type pluginRun struct {
	stdout, stderr string
	exit           int
}

// cniErrorOutput is the "error" result structure of the CNI spec.
type cniErrorOutput struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details"`
}

// runtimeEnv is the environment a runtime gives the plugin for cmd.
func runtimeEnv(n *testutil.Node, cmd, containerID, netns string) map[string]string {
	return map[string]string{
		"CNI_COMMAND":     cmd,
		"CNI_CONTAINERID": containerID,
		"CNI_NETNS":       netns,
		"CNI_IFNAME":      "eth0",
		"CNI_PATH":        n.CNIPath,
	}
}

// execTern runs the tern binary as a runtime does: env (an empty value
// leaves the variable out), stdin, and the process inside the node netns.
func execTern(t *testing.T, n *testutil.Node, env map[string]string, stdin []byte) pluginRun {
	t.Helper()
	bin := filepath.Join(testutil.BuildPlugins(t), "tern")
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		if v != "" {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := n.NS.Do(func(ns.NetNS) error { return cmd.Run() })
	r := pluginRun{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.exit = ee.ExitCode()
	default:
		t.Fatalf("run %s: %v", bin, err)
	}
	return r
}

// wantCNIError asserts a failed run: non-zero exit and, on stdout, exactly
// one CNI error object with code and a message (msg and details) holding
// every string of contains.
func wantCNIError(t *testing.T, r pluginRun, code uint, contains ...string) cniErrorOutput {
	t.Helper()
	if r.exit == 0 {
		t.Errorf("exit status 0, want non-zero (stdout %q, stderr %q)", r.stdout, r.stderr)
	}
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.DisallowUnknownFields()
	var e cniErrorOutput
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("stdout is not a CNI error object: %v\nstdout: %s\nstderr: %s", err, r.stdout, r.stderr)
	}
	if dec.More() {
		t.Errorf("stdout holds more than one JSON value: %s", r.stdout)
	}
	if e.Code != code {
		t.Errorf("code %d, want %d (msg %q, details %q)", e.Code, code, e.Msg, e.Details)
	}
	if e.Msg == "" {
		t.Errorf("error without msg: %s", r.stdout)
	}
	full := e.Msg + "; " + e.Details
	for _, s := range contains {
		if !strings.Contains(full, s) {
			t.Errorf("error %q does not mention %q", full, s)
		}
	}
	return e
}

// attachmentRecords lists tern's attachment records of a network.
func attachmentRecords(t *testing.T, n *testutil.Node, network string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(n.StateDir, "attachments", network))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// wantNothingLeft asserts the node holds no veth, IPAM record or attachment
// record of network beyond the wanted counts.
func wantNothingLeft(t *testing.T, n *testutil.Node, network string, veths, ips int) {
	t.Helper()
	if v := hostVeths(t, n); len(v) != veths {
		t.Errorf("node has veths %v, want %d", v, veths)
	}
	if r := ipamRecords(t, n, network); len(r) != ips {
		t.Errorf("IPAM records %v, want %d", r, ips)
	}
	if r := attachmentRecords(t, n, network); len(r) != ips {
		t.Errorf("attachment records %v, want %d", r, ips)
	}
}

// cniCode returns the CNI error code inside err, or 0.
func cniCode(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

// TestPluginErrors runs the binary directly, as a runtime does, with broken
// configs and environments, and checks the error object it prints, its
// exit status, and that it left nothing behind.
func TestPluginErrors(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	network := testutil.UniqueName("net")
	list := conflist(t, n, network, netConf{Datapath: "ebpf", Subnet: "10.77.30.0/24"})
	good := pluginStdin(t, list, nil)
	p := n.Pod(t, "perr")
	id := "c-" + p.Name

	tests := []struct {
		name     string
		env      map[string]string // changes to the ADD environment
		stdin    []byte
		code     uint
		contains []string
	}{
		{name: "invalid JSON", stdin: []byte(`{"cniVersion":"1.1.0","name":`), code: types.ErrDecodingFailure},
		{name: "not an object", stdin: []byte(`[1,2]`), code: types.ErrDecodingFailure},
		{name: "missing name", stdin: pluginStdin(t, list, map[string]any{"name": nil}), code: types.ErrInvalidNetworkConfig, contains: []string{"name"}},
		{name: "bad datapath", stdin: pluginStdin(t, list, map[string]any{"datapath": "xdp"}), code: types.ErrInvalidNetworkConfig, contains: []string{"datapath", "xdp"}},
		{name: "bad mtu", stdin: pluginStdin(t, list, map[string]any{"mtu": 10}), code: types.ErrInvalidNetworkConfig, contains: []string{"mtu"}},
		{name: "relative stateDir", stdin: pluginStdin(t, list, map[string]any{"stateDir": "state"}), code: types.ErrInvalidNetworkConfig, contains: []string{"stateDir"}},
		{name: "missing ipam.type", stdin: pluginStdin(t, list, map[string]any{"ipam": map[string]any{"subnet": "10.77.30.0/24"}}), code: types.ErrInvalidNetworkConfig, contains: []string{"ipam.type"}},
		{name: "bad ipam.subnet", stdin: pluginStdin(t, list, map[string]any{"ipam": map[string]any{"type": "tern-ipam", "subnet": "10.77.30.0/33"}}), code: types.ErrInvalidNetworkConfig, contains: []string{"ipam.subnet"}},
		{name: "ipam.subnet with host bits", stdin: pluginStdin(t, list, map[string]any{"ipam": map[string]any{"type": "tern-ipam", "subnet": "10.77.30.7/24"}}), code: types.ErrInvalidNetworkConfig, contains: []string{"ipam.subnet"}},
		{name: "unsupported cniVersion", stdin: pluginStdin(t, list, map[string]any{"cniVersion": "9.9.9"}), code: types.ErrIncompatibleCNIVersion},
		{name: "missing CNI_CONTAINERID", env: map[string]string{"CNI_CONTAINERID": ""}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_CONTAINERID"}},
		{name: "missing CNI_NETNS", env: map[string]string{"CNI_NETNS": ""}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_NETNS"}},
		{name: "missing CNI_IFNAME", env: map[string]string{"CNI_IFNAME": ""}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_IFNAME"}},
		{name: "missing CNI_PATH", env: map[string]string{"CNI_PATH": ""}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_PATH"}},
		{name: "missing CNI_CONTAINERID and CNI_NETNS", env: map[string]string{"CNI_CONTAINERID": "", "CNI_NETNS": ""}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_CONTAINERID", "CNI_NETNS"}},
		{name: "invalid CNI_CONTAINERID", env: map[string]string{"CNI_CONTAINERID": "bad/id"}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"containerID"}},
		{name: "invalid CNI_IFNAME", env: map[string]string{"CNI_IFNAME": "eth/0"}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"interface name"}},
		{name: "invalid CNI_ARGS", env: map[string]string{"CNI_ARGS": "K8S_POD_NAME"}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_ARGS"}},
		{name: "unknown CNI_ARGS key", env: map[string]string{"CNI_ARGS": "FOO=bar"}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_ARGS", "FOO"}},
		{name: "unknown CNI_COMMAND", env: map[string]string{"CNI_COMMAND": "FROB"}, stdin: good, code: types.ErrInvalidEnvironmentVariables, contains: []string{"CNI_COMMAND", "FROB"}},
		{name: "CHECK before 0.4.0", env: map[string]string{"CNI_COMMAND": "CHECK"}, stdin: pluginStdin(t, list, map[string]any{"cniVersion": "0.3.1"}), code: types.ErrIncompatibleCNIVersion, contains: []string{"CHECK"}},
		{name: "STATUS before 1.1.0", env: map[string]string{"CNI_COMMAND": "STATUS"}, stdin: pluginStdin(t, list, map[string]any{"cniVersion": "1.0.0"}), code: types.ErrIncompatibleCNIVersion, contains: []string{"STATUS"}},
		{name: "GC before 1.1.0", env: map[string]string{"CNI_COMMAND": "GC"}, stdin: pluginStdin(t, list, map[string]any{"cniVersion": "1.0.0"}), code: types.ErrIncompatibleCNIVersion, contains: []string{"GC"}},
		{name: "nonexistent netns", env: map[string]string{"CNI_NETNS": "/var/run/netns/tern-no-such-netns"}, stdin: good, code: types.ErrInvalidNetNS, contains: []string{"/var/run/netns/tern-no-such-netns"}},
		{name: "netns path not a namespace", env: map[string]string{"CNI_NETNS": "/proc/self/status"}, stdin: good, code: types.ErrInvalidNetNS, contains: []string{"/proc/self/status"}},
		{name: "netns path not a network namespace", env: map[string]string{"CNI_NETNS": "/proc/self/ns/uts"}, stdin: good, code: types.ErrInvalidNetNS, contains: []string{"/proc/self/ns/uts"}},
		{name: "netns path a regular file", env: map[string]string{"CNI_NETNS": "/etc/hostname"}, stdin: good, code: types.ErrInvalidNetNS, contains: []string{"/etc/hostname"}},
	}
	var missingVersion []string
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := runtimeEnv(n, "ADD", id, p.Path)
			for k, v := range tt.env {
				env[k] = v
			}
			r := execTern(t, n, env, tt.stdin)
			e := wantCNIError(t, r, tt.code, tt.contains...)
			// The spec's error structure has a cniVersion key; skel's
			// types.Error prints none. When one is printed it must be a
			// version tern speaks.
			if e.CNIVersion == "" {
				missingVersion = append(missingVersion, tt.name)
			} else if !slices.Contains(specVersions, e.CNIVersion) {
				t.Errorf("error cniVersion %q is not a supported version", e.CNIVersion)
			}
			wantNothingLeft(t, n, network, 0, 0)
			// Every case fails before IPAM: the state dir stays empty.
			if left, err := os.ReadDir(n.StateDir); err != nil || len(left) != 0 {
				t.Errorf("state dir after the failed ADD: %v, %v", left, err)
			}
		})
	}
	if len(missingVersion) > 0 {
		t.Logf("error objects without cniVersion (skel's types.Error has no such field): %d of %d", len(missingVersion), len(tests))
	}
	if out, err := testutil.ExecIn(p.NS, "ip", "-o", "link", "show"); err != nil {
		t.Error(err)
	} else if strings.Contains(out, "eth0") {
		t.Errorf("failed ADDs left eth0 in the pod:\n%s", out)
	}
}

// TestPluginNoCommand: without CNI_COMMAND skel treats the call as a person
// asking what the binary is: the about text and the supported versions on
// stderr, nothing on stdout, exit status 0.
func TestPluginNoCommand(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	env := runtimeEnv(n, "", "c-nocmd", "/var/run/netns/none")
	r := execTern(t, n, env, []byte(`{"cniVersion":"1.1.0","name":"x","type":"tern"}`))
	if r.exit != 0 || r.stdout != "" {
		t.Errorf("no CNI_COMMAND: exit %d, stdout %q; want 0 and nothing", r.exit, r.stdout)
	}
	if !strings.Contains(r.stderr, "tern") || !strings.Contains(r.stderr, "1.1.0") {
		t.Errorf("no CNI_COMMAND: stderr %q lacks the about text and versions", r.stderr)
	}
}

// TestPluginVersion checks VERSION lists exactly the versions tern handles.
func TestPluginVersion(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	env := map[string]string{"CNI_COMMAND": "VERSION"}
	r := execTern(t, n, env, []byte(`{"cniVersion":"1.1.0"}`))
	if r.exit != 0 {
		t.Fatalf("VERSION: exit %d, stdout %s, stderr %s", r.exit, r.stdout, r.stderr)
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("VERSION output %q: %v", r.stdout, err)
	}
	if v.CNIVersion != "1.1.0" {
		t.Errorf("VERSION cniVersion %q, want 1.1.0", v.CNIVersion)
	}
	got := slices.Clone(v.SupportedVersions)
	slices.Sort(got)
	if !slices.Equal(got, specVersions) {
		t.Errorf("supportedVersions %v, want exactly %v", v.SupportedVersions, specVersions)
	}
}

// TestDelWithoutNetns: DEL does not need CNI_NETNS and succeeds for an
// attachment that never existed.
func TestDelWithoutNetns(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	network := testutil.UniqueName("net")
	stdin := pluginStdin(t, conflist(t, n, network, netConf{Datapath: "ebpf", Subnet: "10.77.31.0/24"}), nil)
	r := execTern(t, n, runtimeEnv(n, "DEL", "c-never-added", ""), stdin)
	if r.exit != 0 || strings.TrimSpace(r.stdout) != "" {
		t.Errorf("DEL: exit %d, stdout %q, stderr %q; want 0 and no output", r.exit, r.stdout, r.stderr)
	}
	wantNothingLeft(t, n, network, 0, 0)
}

// TestSpecVersions runs ADD, CHECK (from 0.4.0) and DEL through libcni
// with a conflist of every spec version tern supports, and checks the
// result is in that version and carries the pod's address.
func TestSpecVersions(t *testing.T) {
	for _, dp := range datapaths {
		for i, v := range specVersions {
			t.Run(dp+"/"+v, func(t *testing.T) {
				testutil.RequirePrivileged(t)
				t.Parallel()
				n := testutil.NewNode(t)
				network := testutil.UniqueName("net")
				subnet := fmt.Sprintf("10.77.%d.0/24", 40+i)
				conf := conflistAt(t, n, network, v, netConf{Datapath: dp, Subnet: subnet})
				p := n.Pod(t, "pver")
				id := "c-" + p.Name
				t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })

				res, err := n.Add(t.Context(), conf, id, p.Path, "eth0", k8sArgs)
				if err != nil {
					t.Fatalf("ADD: %v", err)
				}
				if res.Version() != v {
					t.Errorf("result version %q, want %q", res.Version(), v)
				}
				raw, err := json.Marshal(res)
				if err != nil {
					t.Fatal(err)
				}
				var printed struct {
					CNIVersion string           `json:"cniVersion"`
					IPs        []map[string]any `json:"ips"`
				}
				if err := json.Unmarshal(raw, &printed); err != nil {
					t.Fatal(err)
				}
				if printed.CNIVersion != v {
					t.Errorf("result cniVersion %q, want %q: %s", printed.CNIVersion, v, raw)
				}
				// 0.3.x and 0.4.0 results carry "version": "4" per IP.
				if v < "1.0.0" {
					for _, ip := range printed.IPs {
						if ip["version"] != "4" {
							t.Errorf("%s result IP without version 4: %s", v, raw)
						}
					}
				}
				r, err := types100.NewResultFromResult(res)
				if err != nil {
					t.Fatalf("convert %s result: %v", v, err)
				}
				if len(r.IPs) != 1 {
					t.Fatalf("want 1 IP, got %s", raw)
				}
				// The address as configured on eth0: /32 in eBPF mode (all
				// traffic goes via the gateway), the pool's prefix on the
				// iptables bridge.
				ip := r.IPs[0]
				_, pool, _ := net.ParseCIDR(subnet)
				wantMask := pool.Mask
				if dp == "ebpf" {
					wantMask = net.CIDRMask(32, 32)
				}
				if !pool.Contains(ip.Address.IP) || ip.Address.Mask.String() != wantMask.String() {
					t.Errorf("IP %s: want an address of %s with mask %s", ip.Address.String(), subnet, wantMask)
				}
				if ip.Interface == nil || *ip.Interface >= len(r.Interfaces) ||
					r.Interfaces[*ip.Interface].Name != "eth0" || r.Interfaces[*ip.Interface].Sandbox != p.Path {
					t.Errorf("IP does not point at eth0 in %s: %s", p.Path, raw)
				}
				if got := ipamRecords(t, n, network); len(got) != 1 || got[0] != ip.Address.IP.String() {
					t.Errorf("IPAM records %v, want [%s]", got, ip.Address.IP)
				}

				if v >= "0.4.0" {
					if err := n.Check(t.Context(), conf, id, p.Path, "eth0", k8sArgs); err != nil {
						t.Errorf("CHECK: %v", err)
					}
				}
				if err := n.Del(t.Context(), conf, id, p.Path, "eth0", k8sArgs); err != nil {
					t.Fatalf("DEL: %v", err)
				}
				wantNothingLeft(t, n, network, 0, 0)
			})
		}
	}
}

// TestAddIfnameExists: ADD into a pod that already has the interface fails
// clearly, undoes its IP and host veth, and leaves the pod's own eth0 be.
func TestAddIfnameExists(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.32.0/24"})
			p := n.Pod(t, "pdup")
			id := "c-" + p.Name
			t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })

			var ownIndex int
			err := p.NS.Do(func(ns.NetNS) error {
				if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0peer"}); err != nil {
					return err
				}
				lk, err := netlink.LinkByName("eth0")
				if err != nil {
					return err
				}
				ownIndex = lk.Attrs().Index
				return nil
			})
			if err != nil {
				t.Fatalf("create eth0 in the pod: %v", err)
			}

			_, err = n.Add(t.Context(), conf, id, p.Path, "eth0", k8sArgs)
			if err == nil {
				t.Fatal("ADD into a pod that has eth0 succeeded")
			}
			if msg := err.Error(); !strings.Contains(msg, "eth0") || !strings.Contains(msg, "already exists") {
				t.Errorf("ADD error %q does not say eth0 already exists", msg)
			}
			t.Logf("ADD error (code %d): %v", cniCode(err), err)
			wantNothingLeft(t, n, network, 0, 0)
			if dp == "ebpf" {
				if keys := endpointKeys(t, n); len(keys) != 0 {
					t.Errorf("endpoints map holds %v after the failed ADD", keys)
				}
			}

			// The runtime's DEL after the failed ADD succeeds and does not
			// touch the interface tern did not create.
			if err := n.Del(t.Context(), conf, id, p.Path, "eth0", k8sArgs); err != nil {
				t.Errorf("DEL after failed ADD: %v", err)
			}
			err = p.NS.Do(func(ns.NetNS) error {
				lk, err := netlink.LinkByName("eth0")
				if err != nil {
					return err
				}
				if lk.Attrs().Index != ownIndex {
					return fmt.Errorf("eth0 was replaced (ifindex %d, was %d)", lk.Attrs().Index, ownIndex)
				}
				return nil
			})
			if err != nil {
				t.Errorf("pod's own eth0: %v", err)
			}
		})
	}
}

// TestPoolExhaustion fills a two-address pool: STATUS turns from ready to
// code 50, the third ADD fails with code 11 naming the pool and leaks
// nothing, and after a DEL both STATUS and ADD work again.
func TestPoolExhaustion(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			// 10.77.33.0/29: gateway .1, range .2-.3.
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.33.0/29", RangeEnd: "10.77.33.3"})

			if err := n.Status(t.Context(), conf); err != nil {
				t.Fatalf("STATUS on a fresh node: %v", err)
			}

			a := addPod(t, n, conf, "pa")
			b := addPod(t, n, conf, "pb")
			if a.IP == b.IP {
				t.Fatalf("both pods got %s", a.IP)
			}
			wantNothingLeft(t, n, network, 2, 2)

			err := n.Status(t.Context(), conf)
			if code := cniCode(err); code != types.ErrPluginNotAvailable {
				t.Errorf("STATUS with the pool exhausted: code %d (%v), want %d", code, err, types.ErrPluginNotAvailable)
			}

			c := n.Pod(t, "pc")
			cid := "c-" + c.Name
			t.Cleanup(func() { _ = n.Del(context.Background(), conf, cid, c.Path, "eth0", k8sArgs) })
			_, err = n.Add(t.Context(), conf, cid, c.Path, "eth0", k8sArgs)
			if code := cniCode(err); code != types.ErrTryAgainLater {
				t.Fatalf("third ADD: code %d (%v), want %d", code, err, types.ErrTryAgainLater)
			}
			if !strings.Contains(err.Error(), "pool") {
				t.Errorf("third ADD error %q does not mention the pool", err)
			}
			wantNothingLeft(t, n, network, 2, 2)
			if out, err := testutil.ExecIn(c.NS, "ip", "-o", "link", "show"); err != nil {
				t.Error(err)
			} else if strings.Contains(out, "eth0") {
				t.Errorf("failed ADD left eth0 in the pod:\n%s", out)
			}
			if dp == "ebpf" {
				if keys := endpointKeys(t, n); len(keys) != 2 {
					t.Errorf("endpoints map %v, want the 2 pods", keys)
				}
			}
			// The runtime DELs the failed attachment; that must not free
			// another pod's address.
			if err := n.Del(t.Context(), conf, cid, c.Path, "eth0", k8sArgs); err != nil {
				t.Errorf("DEL of the failed attachment: %v", err)
			}
			wantNothingLeft(t, n, network, 2, 2)

			if err := n.Del(t.Context(), conf, a.ID, a.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("DEL %s: %v", a.Name, err)
			}
			wantNothingLeft(t, n, network, 1, 1)
			if err := n.Status(t.Context(), conf); err != nil {
				t.Errorf("STATUS after a DEL: %v", err)
			}
			d := addPod(t, n, conf, "pd")
			if d.IP != a.IP {
				t.Errorf("new pod got %s, want the freed %s", d.IP, a.IP)
			}
			wantNothingLeft(t, n, network, 2, 2)
			if err := testutil.Ping(d.NS, b.IP, 1); err != nil {
				t.Errorf("ping from the new pod: %v", err)
			}
		})
	}
}
