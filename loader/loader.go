package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// Pin layout under the node's bpffs directory:
//
//	maps/<map name>             every map, pinned by name (survives reloads)
//	progs/<version>/<program>   the programs of one object version
//	links/<ifname>@<hook>       TCX links, which keep programs attached
const (
	mapsDir  = "maps"
	progsDir = "progs"
	linksDir = "links"
)

// Loader loads one node's BPF objects. Its zero value is not usable: set
// BPFFSDir and StateDir (or use New).
type Loader struct {
	BPFFSDir string // where maps, programs and links are pinned
	StateDir string // node state on a normal filesystem: lock, legacy attachments

	// Specs and Version select the objects to load; New sets them to the
	// embedded objects. Their programs have distinct names; maps of the
	// same name are one map, pinned by name and shared. Version covers
	// every object: a new version of any of them loads and swaps all.
	Specs   func() ([]*ebpf.CollectionSpec, error)
	Version string
	// Spec, when set, replaces Specs with a single object (tests use it
	// to simulate an upgrade).
	Spec func() (*ebpf.CollectionSpec, error)

	// freshClsact holds the devices on which PrepareClsact created the
	// clsact qdisc in this process (see there).
	freshClsact map[clsactDevice]bool
}

// New returns a loader for the embedded object.
func New(bpffsDir, stateDir string) *Loader {
	return &Loader{
		BPFFSDir: bpffsDir,
		StateDir: stateDir,
		Specs:    ternbpf.LoadSpecs,
		Version:  versionName(ternbpf.ObjectVersion()),
	}
}

// specs returns the specs of every object to load.
func (l *Loader) specs() ([]*ebpf.CollectionSpec, error) {
	if l.Spec != nil {
		spec, err := l.Spec()
		if err != nil {
			return nil, err
		}
		return []*ebpf.CollectionSpec{spec}, nil
	}
	if l.Specs == nil {
		return nil, errors.New("loader has no object specs")
	}
	return l.Specs()
}

// Objects are handles to the node's loaded maps and programs. Close them;
// the pins keep the kernel objects alive.
type Objects struct {
	Version  string
	Maps     map[string]*ebpf.Map
	Programs map[string]*ebpf.Program
	// Created names the pinned maps this load had to create because no pin
	// existed: new and empty. With endpoints already wired, it means the
	// node lost its pins (bpffs unmounted or remounted, pins removed) and
	// the maps' contents must be restored (see datapath/ebpf's Restore).
	Created map[string]bool
}

// Close releases the handles (not the pinned objects).
func (o *Objects) Close() {
	for _, m := range o.Maps {
		m.Close()
	}
	for _, p := range o.Programs {
		p.Close()
	}
}

// Map returns a map by name or an error naming it.
func (o *Objects) Map(name string) (*ebpf.Map, error) {
	m, ok := o.Maps[name]
	if !ok {
		return nil, fmt.Errorf("map %s not loaded", name)
	}
	return m, nil
}

// Program returns a program by name or an error naming it.
func (o *Objects) Program(name string) (*ebpf.Program, error) {
	p, ok := o.Programs[name]
	if !ok {
		return nil, fmt.Errorf("program %s not loaded", name)
	}
	return p, nil
}

func (l *Loader) lockPath() string { return filepath.Join(l.StateDir, "bpf.lock") }

// Load returns the node's objects, loading and pinning them first when this
// version is not pinned yet. When an older version is pinned, its
// attachments are switched to the new programs atomically (TCX link update,
// or cls_bpf filter replace), and its programs are unpinned. Maps are pinned
// by name and reused, so endpoints survive. Safe for concurrent processes.
func (l *Loader) Load() (*Objects, error) {
	lock, err := Lock(l.lockPath())
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	return l.loadLocked()
}

// Held runs fn with the node's loader lock held; attach and detach use it so
// that an upgrade never misses a link pinned at the same moment.
func (l *Loader) Held(fn func() error) error {
	lock, err := Lock(l.lockPath())
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return fn()
}

func (l *Loader) loadLocked() (*Objects, error) {
	if err := EnsureBPFFS(l.BPFFSDir); err != nil {
		return nil, err
	}
	if err := l.refuseDowngrade(); err != nil {
		return nil, err
	}
	progDir := filepath.Join(l.BPFFSDir, progsDir, l.Version)
	_, statErr := os.Stat(progDir)
	// This version is pinned and its names are on record: open the pins
	// without parsing the objects, the bulk of a CNI command's CPU time
	// (docs/cni-add-profile.md). Anything amiss falls through to the specs.
	if names, ok := l.readNames(); statErr == nil && ok {
		if objs, err := l.openPinned(names, progDir); err == nil {
			if err := l.finishUpgrade(objs); err != nil {
				objs.Close()
				return nil, err
			}
			return objs, nil
		}
	}
	specs, err := l.specs()
	if err != nil {
		return nil, fmt.Errorf("load object spec: %w", err)
	}
	names := namesOf(l.Version, specs)
	if statErr == nil {
		objs, err := l.openPinned(names, progDir)
		if err == nil {
			l.writeNames(names)
			// Older versions still pinned: a previous load of this version
			// published its programs but did not finish the upgrade.
			if err := l.finishUpgrade(objs); err != nil {
				objs.Close()
				return nil, err
			}
			return objs, nil
		}
		// A half-pinned version (crash during a previous load): start over.
		if err := os.RemoveAll(progDir); err != nil {
			return nil, fmt.Errorf("remove incomplete pins %s: %w", progDir, err)
		}
	}
	objs, err := l.loadNew(specs, progDir)
	if err == nil {
		l.writeNames(names)
	}
	return objs, err
}

func (l *Loader) openPinned(names *objectNames, progDir string) (*Objects, error) {
	objs := &Objects{Version: l.Version, Maps: map[string]*ebpf.Map{}, Programs: map[string]*ebpf.Program{}}
	for _, name := range names.Maps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(l.BPFFSDir, mapsDir, name), nil)
		if err != nil {
			objs.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		objs.Maps[name] = m
	}
	for _, name := range names.Programs {
		p, err := loadPinnedProgram(filepath.Join(progDir, name))
		if err != nil {
			objs.Close()
			return nil, fmt.Errorf("open pinned program %s: %w", name, err)
		}
		objs.Programs[name] = p
	}
	return objs, nil
}

// loadObjects loads every object, in order, with pinned maps under
// mapPins: the first object creates and pins them, later ones reuse the
// pins, so all programs share one set of maps. Unpinned maps (.rodata)
// belong to their object's programs only and are not returned.
func loadObjects(specs []*ebpf.CollectionSpec, mapPins string, version string) (*Objects, error) {
	seen := map[string]bool{}
	for _, spec := range specs {
		for name := range spec.Programs {
			if seen[name] {
				return nil, fmt.Errorf("load BPF object: program %s is defined by two objects", name)
			}
			seen[name] = true
		}
	}
	objs := &Objects{Version: version, Maps: map[string]*ebpf.Map{}, Programs: map[string]*ebpf.Program{}, Created: map[string]bool{}}
	for _, spec := range specs {
		for name, ms := range spec.Maps {
			if ms.Pinning != ebpf.PinByName {
				continue
			}
			if _, err := os.Stat(filepath.Join(mapPins, name)); errors.Is(err, os.ErrNotExist) {
				objs.Created[name] = true
			}
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
			Maps: ebpf.MapOptions{PinPath: mapPins},
		})
		if err != nil {
			objs.Close()
			var verr *ebpf.VerifierError
			if errors.As(err, &verr) {
				return nil, fmt.Errorf("load BPF object: %+v", verr)
			}
			if errors.Is(err, ebpf.ErrMapIncompatible) {
				// migrateMaps ran first: a map changed under it.
				return nil, fmt.Errorf("load BPF object: pinned maps under %s changed during the load: %w", mapPins, err)
			}
			return nil, fmt.Errorf("load BPF object: %w", err)
		}
		for name, m := range coll.Maps {
			if _, dup := objs.Maps[name]; dup || spec.Maps[name].Pinning != ebpf.PinByName {
				m.Close() // the same pinned map, already held; or internal
				continue
			}
			objs.Maps[name] = m
		}
		for name, p := range coll.Programs {
			objs.Programs[name] = p
		}
	}
	return objs, nil
}

func (l *Loader) loadNew(specs []*ebpf.CollectionSpec, progDir string) (*Objects, error) {
	mapPins := filepath.Join(l.BPFFSDir, mapsDir)
	if err := os.MkdirAll(mapPins, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", mapPins, err)
	}
	migrated, err := migrateMaps(specs, mapPins)
	if err != nil {
		return nil, err
	}
	objs, err := loadObjects(specs, mapPins, l.Version)
	if err != nil {
		return nil, err
	}
	for name := range migrated {
		objs.Created[name] = true
	}

	// Pin into a temporary directory and rename it into place, so a version
	// directory either holds every program or does not exist.
	tmp := progDir + "_tmp" // bpffs rejects names with dots
	_ = os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		objs.Close()
		return nil, fmt.Errorf("create %s: %w", tmp, err)
	}
	for name, p := range objs.Programs {
		if err := p.Pin(filepath.Join(tmp, name)); err != nil {
			objs.Close()
			_ = os.RemoveAll(tmp)
			return nil, fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	if err := os.Rename(tmp, progDir); err != nil {
		objs.Close()
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("publish programs %s: %w", progDir, err)
	}

	if err := l.upgradeAttachments(objs); err != nil {
		objs.Close()
		return nil, err
	}
	if err := l.unpinOldVersions(); err != nil {
		objs.Close()
		return nil, err
	}
	return objs, nil
}

// finishUpgrade moves attachments to objs and unpins older versions when
// any older version is still pinned.
func (l *Loader) finishUpgrade(objs *Objects) error {
	entries, err := os.ReadDir(filepath.Join(l.BPFFSDir, progsDir))
	if err != nil {
		return fmt.Errorf("list %s: %w", progsDir, err)
	}
	for _, e := range entries {
		if e.Name() != l.Version && !strings.HasSuffix(e.Name(), "_tmp") {
			if err := l.upgradeAttachments(objs); err != nil {
				return err
			}
			return l.unpinOldVersions()
		}
	}
	return nil
}

// upgradeAttachments points every existing attachment at the new programs.
func (l *Loader) upgradeAttachments(objs *Objects) error {
	pins, err := os.ReadDir(filepath.Join(l.BPFFSDir, linksDir))
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("list link pins: %w", err)
	}
	for _, pin := range pins {
		_, hook, err := parseAttachmentName(pin.Name())
		if err != nil {
			continue // not ours
		}
		prog, err := objs.Program(hook.program())
		if err != nil {
			return err
		}
		path := filepath.Join(l.BPFFSDir, linksDir, pin.Name())
		lk, err := link.LoadPinnedLink(path, nil)
		if err != nil {
			return fmt.Errorf("open link pin %s: %w", path, err)
		}
		err = lk.Update(prog)
		lk.Close()
		if errors.Is(err, unix.ENOLINK) {
			// Its interface was deleted without a DEL (the pod's netns
			// went away): nothing to upgrade, and the pin is stale.
			if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
				return fmt.Errorf("remove stale link pin %s: %w", path, err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("update link %s to the new program: %w", path, err)
		}
	}
	legacy, err := l.legacyAttachments()
	if err != nil {
		return err
	}
	for _, a := range legacy {
		prog, err := objs.Program(a.Hook.program())
		if err != nil {
			return err
		}
		if err := replaceClsBPF(a.Ifindex, a.Hook, prog); err != nil {
			return fmt.Errorf("update %s on %s to the new program: %w", a.Hook, a.Ifname, err)
		}
	}
	return nil
}

func (l *Loader) unpinOldVersions() error {
	dir := filepath.Join(l.BPFFSDir, progsDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.Name() == l.Version || strings.HasSuffix(e.Name(), "_tmp") {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("unpin old programs %s: %w", e.Name(), err)
		}
	}
	return nil
}
