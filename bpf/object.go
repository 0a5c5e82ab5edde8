package bpf

import (
	"crypto/sha256"
	"encoding/hex"
)

// ObjectVersion identifies the embedded object file. The loader pins
// programs under a directory named after it, so a node notices a new build
// and swaps its programs in place.
func ObjectVersion() string {
	sum := sha256.Sum256(_TernBytes)
	return hex.EncodeToString(sum[:6])
}
