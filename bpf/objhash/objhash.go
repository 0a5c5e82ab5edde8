// Package objhash names a build of the BPF objects: shared by the
// generator of bpf.ObjectVersion and the test that checks it is current.
package objhash

import (
	"crypto/sha256"
	"encoding/hex"
)

// Files are the objects, in the order they are hashed (bpf.ObjectVersion
// covers all of them: a change to any one is a new version).
var Files = []string{"tern_bpfel.o", "ternuplink_bpfel.o", "terntunnel_bpfel.o", "ternsock_bpfel.o", "ternxdp_bpfel.o"}

// Sum returns the version name of the objects' contents, in Files order.
func Sum(objs ...[]byte) string {
	h := sha256.New()
	for _, b := range objs {
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)[:6])
}
