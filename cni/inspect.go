package cni

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"

	"github.com/containernetworking/cni/libcni"

	"github.com/ternlabs/tern/datapath"
)

// DefaultConfDir is where runtimes look for network configurations.
const DefaultConfDir = "/etc/cni/net.d"

// LoadConfFile reads a conflist (or a single network config) and returns
// the first tern plugin's configuration in it, with the network's name.
func LoadConfFile(path string) (*NetConf, error) {
	list, err := libcni.ConfListFromFile(path)
	if err != nil {
		single, serr := libcni.ConfFromFile(path)
		if serr != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		return ParseConfig(single.Bytes)
	}
	for _, p := range list.Plugins {
		if p.Network.Type != "tern" {
			continue
		}
		// The network name lives on the list; plugins inherit it.
		var m map[string]any
		if err := json.Unmarshal(p.Bytes, &m); err != nil {
			return nil, fmt.Errorf("decode %s: %w", path, err)
		}
		m["name"] = list.Name
		m["cniVersion"] = list.CNIVersion
		b, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		return ParseConfig(b)
	}
	return nil, fmt.Errorf("%s has no plugin of type tern", path)
}

// FindConfFile returns the first conflist in dir (in lexical order, as
// runtimes pick them) whose plugins include tern.
func FindConfFile(dir string) (string, error) {
	var files []string
	for _, ext := range []string{"*.conflist", "*.conf", "*.json"} {
		m, _ := filepath.Glob(filepath.Join(dir, ext))
		files = append(files, m...)
	}
	sort.Strings(files)
	for _, f := range files {
		if _, err := LoadConfFile(f); err == nil {
			return f, nil
		}
	}
	return "", fmt.Errorf("no network configuration with a tern plugin in %s", dir)
}

// Endpoints lists the network's attachments as recorded on this node.
func (c *NetConf) Endpoints() ([]*datapath.Endpoint, error) {
	recs, err := newRecords(c.StateDir, c.Name).list()
	if err != nil {
		return nil, err
	}
	out := make([]*datapath.Endpoint, 0, len(recs))
	for _, r := range recs {
		out = append(out, r.endpoint())
	}
	return out, nil
}

// IsEBPF reports whether the network uses the eBPF datapath.
func (c *NetConf) IsEBPF() bool { return c.Datapath == DatapathEBPF }
