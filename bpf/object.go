package bpf

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/cilium/ebpf"
)

// ObjectVersion identifies the embedded objects, all of them: the loader
// pins programs under a directory named after it, so a node notices a new
// build of any object and swaps every program in place.
func ObjectVersion() string {
	h := sha256.New()
	for _, b := range [][]byte{_TernBytes, _TernUplinkBytes, _TernTunnelBytes, _TernSockBytes, _TernXDPBytes} {
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)[:6])
}

// LoadSpecs returns the specs of every embedded object, in load order. The
// objects define the same maps, pinned by name, so loaded together under
// one pin path they share them.
func LoadSpecs() ([]*ebpf.CollectionSpec, error) {
	var specs []*ebpf.CollectionSpec
	for _, load := range []func() (*ebpf.CollectionSpec, error){LoadTern, LoadTernUplink, LoadTernTunnel, LoadTernSock, LoadTernXDP} {
		spec, err := load()
		if err != nil {
			return nil, fmt.Errorf("load object spec: %w", err)
		}
		specs = append(specs, spec)
	}
	return specs, nil
}
