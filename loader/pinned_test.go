package loader

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestLoadPinnedProgram: loadPinnedProgram opens the very program pinned
// at the path (same kernel ID, type and name as ebpf.LoadPinnedProgram
// gives), and a missing pin is os.ErrNotExist, as lost pins are detected.
func TestLoadPinnedProgram(t *testing.T) {
	testutil.RequirePrivileged(t)
	bpffs := testutil.MountBPFFS(t)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "tern_pin_test",
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	pin := filepath.Join(bpffs, "prog")
	if err := prog.Pin(pin); err != nil {
		t.Fatal(err)
	}
	defer prog.Unpin()

	got, err := loadPinnedProgram(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	want, err := ebpf.LoadPinnedProgram(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer want.Close()
	id := func(p *ebpf.Program) ebpf.ProgramID {
		t.Helper()
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		return id
	}
	if id(got) != id(want) || got.Type() != want.Type() {
		t.Errorf("opened program %d of type %v, the pin holds %d of type %v", id(got), got.Type(), id(want), want.Type())
	}
	if info, err := got.Info(); err != nil || info.Name != "tern_pin_test" {
		t.Errorf("opened program's name %q (%v), want tern_pin_test", info.Name, err)
	}

	if _, err := loadPinnedProgram(filepath.Join(bpffs, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing pin: %v, want os.ErrNotExist", err)
	}
}
