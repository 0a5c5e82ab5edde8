package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Release orders object versions: the plugin's release number, set at
// build time (the Makefile passes the commit count:
// -ldflags "-X github.com/ternlabs/tern/loader.Release=N"). It prefixes the
// version directory, progs/r<N>-<object hash>. A build without it (go test,
// go build) has release 0: unordered, it replaces whatever is pinned, as
// versions did before they were ordered.
var Release = "0"

// ErrDowngrade is returned by Load when the node runs programs of a newer
// release than this plugin's: an older binary must not swap them back (nor
// migrate the newer maps to its older layout).
var ErrDowngrade = errors.New("refusing to downgrade the node's BPF programs")

// ErrObjectsReplaced is returned by Attach when the objects it was given
// are no longer the node's (another plugin process upgraded them since
// they were loaded): attaching them would leave this interface on programs
// the upgrade has moved every other interface away from. Load again.
var ErrObjectsReplaced = errors.New("the node's BPF objects were replaced since they were loaded")

// versionName is the version directory of an object hash in this release.
func versionName(hash string) string {
	if r := releaseNumber(Release); r > 0 {
		return fmt.Sprintf("r%d-%s", r, hash)
	}
	return hash
}

// releaseOf is the release a version directory name carries, 0 if none.
func releaseOf(version string) int {
	rest, ok := strings.CutPrefix(version, "r")
	if !ok {
		return 0
	}
	num, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0
	}
	return releaseNumber(num)
}

func releaseNumber(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// refuseDowngrade fails when a version of a newer release than l's is
// pinned. A loader without release (0) is unordered.
func (l *Loader) refuseDowngrade() error {
	mine := releaseOf(l.Version)
	if mine == 0 {
		return nil
	}
	entries, err := os.ReadDir(filepath.Join(l.BPFFSDir, progsDir))
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		return fmt.Errorf("list %s: %w", progsDir, err)
	}
	for _, e := range entries {
		if r := releaseOf(strings.TrimSuffix(e.Name(), "_tmp")); r > mine {
			return fmt.Errorf("%w: the node runs %s (release %d), this plugin is release %d (%s): install the newer plugin", ErrDowngrade, e.Name(), r, mine, l.Version)
		}
	}
	return nil
}

// current reports whether objs are still the node's pinned version.
func (l *Loader) current(objs *Objects) error {
	if objs.Version == "" {
		return nil
	}
	if _, err := os.Stat(filepath.Join(l.BPFFSDir, progsDir, objs.Version)); os.IsNotExist(err) {
		return fmt.Errorf("%w (version %s is no longer pinned)", ErrObjectsReplaced, objs.Version)
	}
	return nil
}
