package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ternlabs/tern/datapath"
)

// record is what the plugin remembers of one attachment (container ID +
// interface), so DEL and GC can undo ADD even when the pod's netns and the
// runtime's cached result are gone.
type record struct {
	ContainerID  string         `json:"containerID"`
	IfName       string         `json:"ifName"`
	Netns        string         `json:"netns"`
	Datapath     string         `json:"datapath"`
	Chained      bool           `json:"chained,omitempty"` // the veth is another plugin's: DEL leaves it
	HostVeth     string         `json:"hostVeth"`
	HostIfindex  int            `json:"hostIfindex"`
	HostMAC      string         `json:"hostMAC"`
	PodMAC       string         `json:"podMAC"`
	IP           string         `json:"ip"` // CIDR: pod IP with the pool's prefix
	Gateway      string         `json:"gateway"`
	Routes       []*types.Route `json:"routes,omitempty"` // routes IPAM gave the pod
	PodNamespace string         `json:"podNamespace,omitempty"`
	PodName      string         `json:"podName,omitempty"`
	Shaped       bool           `json:"shaped,omitempty"` // bandwidth limits at ADD (datapath.Endpoint.Shaped)
}

// endpoint converts a record to the datapath's view. Fields that fail to
// parse stay zero: DEL must work from partial records.
func (r *record) endpoint() *datapath.Endpoint {
	ep := &datapath.Endpoint{
		ContainerID:  r.ContainerID,
		IfName:       r.IfName,
		HostVeth:     r.HostVeth,
		HostIfindex:  r.HostIfindex,
		PodNamespace: r.PodNamespace,
		PodName:      r.PodName,
		Shaped:       r.Shaped,
	}
	ep.HostMAC, _ = net.ParseMAC(r.HostMAC)
	ep.PodMAC, _ = net.ParseMAC(r.PodMAC)
	if ip, n, err := net.ParseCIDR(r.IP); err == nil {
		ep.IP = net.IPNet{IP: ip.To4(), Mask: n.Mask}
	}
	ep.Gateway = net.ParseIP(r.Gateway).To4()
	return ep
}

// hostVethName derives the host-side veth name from the attachment, so DEL
// finds it without any state. "tern" + 11 hex digits fits IFNAMSIZ.
func hostVethName(containerID, ifname string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifname))
	return "tern" + hex.EncodeToString(sum[:])[:11]
}

// records stores attachment records of one network:
// <stateDir>/attachments/<network>/<containerID>:<ifname>.json. Interface
// names cannot contain ':', so the last ':' splits the two unambiguously.
type records struct{ dir string }

func newRecords(stateDir, network string) records {
	return records{dir: filepath.Join(stateDir, "attachments", network)}
}

func (rs records) lockPath() string { return rs.dir + ".lock" }

func (rs records) path(containerID, ifname string) string {
	return filepath.Join(rs.dir, safeName(containerID)+":"+safeName(ifname)+".json")
}

// safeName keeps a path element from escaping the records directory.
func safeName(s string) string {
	return strings.NewReplacer("/", "%2F", "\x00", "%00").Replace(s)
}

func (rs records) save(r *record) error {
	if err := os.MkdirAll(rs.dir, 0o700); err != nil {
		return fmt.Errorf("create records dir: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode record: %w", err)
	}
	p := rs.path(r.ContainerID, r.IfName)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write record: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write record: %w", err)
	}
	return nil
}

// load returns the record, or nil when there is none.
func (rs records) load(containerID, ifname string) (*record, error) {
	b, err := os.ReadFile(rs.path(containerID, ifname))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read record: %w", err)
	}
	r := &record{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("decode record %s: %w", rs.path(containerID, ifname), err)
	}
	return r, nil
}

func (rs records) remove(containerID, ifname string) error {
	if err := os.Remove(rs.path(containerID, ifname)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove record: %w", err)
	}
	return nil
}

func (rs records) list() ([]*record, error) {
	entries, err := os.ReadDir(rs.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list records: %w", err)
	}
	var out []*record
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(rs.dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("read record %s: %w", e.Name(), err)
		}
		r := &record{}
		if err := json.Unmarshal(b, r); err != nil {
			return nil, fmt.Errorf("decode record %s: %w", e.Name(), err)
		}
		out = append(out, r)
	}
	return out, nil
}
