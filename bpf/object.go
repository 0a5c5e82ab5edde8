package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// ObjectVersion identifies the embedded objects, all of them: the loader
// pins programs under a directory named after it, so a node notices a new
// build of any object and swaps every program in place. It is computed by
// `make generate` (objversion_gen.go), not at run time: hashing the
// objects cost every exec of the CNI plugin about a millisecond of CPU.
func ObjectVersion() string {
	return objectVersion
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
