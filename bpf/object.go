package bpf

import (
	"fmt"
	"strings"

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

// AboutObjects is how the binaries that embed the objects name them when
// asked what they are ("BPF objects <version>"); ObjectsOf reads it back.
func AboutObjects() string { return aboutObjectsPrefix + objectVersion }

const aboutObjectsPrefix = "BPF objects "

// ObjectsOf finds the object version in a text AboutObjects wrote, and
// reports whether there was one.
func ObjectsOf(text string) (string, bool) {
	_, rest, ok := strings.Cut(text, aboutObjectsPrefix)
	if !ok {
		return "", false
	}
	v, _, _ := strings.Cut(rest, "\n")
	v = strings.TrimSpace(v)
	return v, v != ""
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
