package loader

import (
	"os"
	"path/filepath"
)

// HasAttachment reports whether hook's attachment to ifname is on record:
// its TCX link pin, or its legacy (clsact) record. It says nothing about
// the kernel side (CHECK does); it is the cheap test a restore after lost
// pins needs, one stat per hook.
func (l *Loader) HasAttachment(ifname string, hook Hook) bool {
	if _, err := os.Stat(l.linkPin(ifname, hook)); err == nil {
		return true
	}
	_, err := os.Stat(filepath.Join(l.legacyDir(), attachmentName(ifname, hook)))
	return err == nil
}

// CreatedAny reports whether this load created any of the node's pinned maps
// (see Objects.Created).
func (o *Objects) CreatedAny() bool { return len(o.Created) > 0 }
