package bpf

import (
	"testing"

	"github.com/ternlabs/tern/bpf/objhash"
)

// TestObjectVersionCurrent: the generated ObjectVersion is the hash of the
// embedded objects. A stale one would make nodes keep running the
// previous build's programs after an upgrade (the pins of "that version"
// exist), so any object changed without `make generate` fails here.
func TestObjectVersionCurrent(t *testing.T) {
	embedded := [][]byte{_TernBytes, _TernUplinkBytes, _TernTunnelBytes, _TernSockBytes, _TernXDPBytes}
	if len(embedded) != len(objhash.Files) {
		t.Fatalf("%d embedded objects, objhash.Files names %d", len(embedded), len(objhash.Files))
	}
	if want := objhash.Sum(embedded...); ObjectVersion() != want {
		t.Fatalf("ObjectVersion() = %s, the embedded objects hash to %s: run make generate", ObjectVersion(), want)
	}
}
