package loader

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// Attachments lists the interfaces hook is attached to, by TCX link pin or
// by legacy record, sorted. Stale legacy records (interface gone) are
// dropped on the way, as legacyAttachments does.
func (l *Loader) Attachments(hook Hook) ([]string, error) {
	seen := map[string]bool{}
	pins, err := os.ReadDir(filepath.Join(l.BPFFSDir, linksDir))
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("list link pins: %w", err)
	}
	for _, pin := range pins {
		if ifname, h, err := parseAttachmentName(pin.Name()); err == nil && h == hook {
			seen[ifname] = true
		}
	}
	var legacy []legacyAttachment
	err = l.Held(func() error {
		var err error
		legacy, err = l.legacyAttachments()
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, a := range legacy {
		if a.Hook == hook {
			seen[a.Ifname] = true
		}
	}
	out := make([]string, 0, len(seen))
	for ifname := range seen {
		out = append(out, ifname)
	}
	sort.Strings(out)
	return out, nil
}
