package testutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Packages of the CNI binaries BuildPlugins provides, by binary name.
const (
	ternPkg      = "github.com/ternlabs/tern/cmd/tern"
	hostLocalPkg = "github.com/containernetworking/plugins/plugins/ipam/host-local"
)

// buildTimeout bounds one `go build`; a cold build cache needs a while.
const buildTimeout = 5 * time.Minute

var plugins = []struct{ name, pkg string }{
	{"tern", ternPkg},
	{"host-local", hostLocalPkg},
	// Reference meta plugins that follow tern in chained conflists.
	{"portmap", metaPkg + "portmap"},
	{"bandwidth", metaPkg + "bandwidth"},
	{"tuning", metaPkg + "tuning"},
	{"sbr", metaPkg + "sbr"},
	// Interface plugins tern follows in chained mode.
	{"ptp", "github.com/containernetworking/plugins/plugins/main/ptp"},
	{"bridge", "github.com/containernetworking/plugins/plugins/main/bridge"},
}

// metaPkg is the package path prefix of the reference meta plugins.
const metaPkg = "github.com/containernetworking/plugins/plugins/meta/"

// BuildPlugins returns a directory holding the `tern` CNI binary, the
// reference `host-local` IPAM plugin, the reference meta plugins the
// chain tests put after tern (portmap, bandwidth, tuning, sbr) and the
// interface plugins chained mode follows (ptp, bridge), for use as
// CNI_PATH.
//
// When TERN_CNI_PATH is set (the Makefile builds into bin/ and sets it), that
// directory is returned; a relative path is taken from the module root. It
// must hold every one of them. Otherwise they are built once per test process
// into $TMPDIR/tern-test-bins-<pid>.
func BuildPlugins(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("TERN_CNI_PATH"); dir != "" {
		if !filepath.IsAbs(dir) {
			root, err := moduleRoot()
			if err != nil {
				t.Fatalf("TERN_CNI_PATH=%s is relative: %v", dir, err)
			}
			dir = filepath.Join(root, dir)
		}
		for _, p := range plugins {
			if err := checkExecutable(filepath.Join(dir, p.name)); err != nil {
				t.Fatalf("TERN_CNI_PATH=%s: %v (build it or unset TERN_CNI_PATH to let the test build it)", dir, err)
			}
		}
		return dir
	}
	for _, p := range plugins {
		if _, err := buildBinary(p.name, p.pkg); err != nil {
			t.Fatal(err)
		}
	}
	return binDir()
}

func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

const binDirPrefix = "tern-test-bins-"

func binDir() string {
	return filepath.Join(os.TempDir(), fmt.Sprintf("%s%d", binDirPrefix, os.Getpid()))
}

// removeStaleBinDirs deletes the binary directories of test processes that
// have exited, so repeated runs do not pile them up.
func removeStaleBinDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), binDirPrefix+"*"))
	for _, dir := range dirs {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(dir), binDirPrefix))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			os.RemoveAll(dir)
		}
	}
}

var staleOnce sync.Once

type buildResult struct {
	once sync.Once
	path string
	err  error
}

var builds sync.Map // binary name -> *buildResult

// buildBinary runs `go build -o binDir()/name pkg` from the module root once
// per process and returns the binary's path; later calls return the first
// result, error included.
func buildBinary(name, pkg string) (string, error) {
	v, _ := builds.LoadOrStore(name, &buildResult{})
	r := v.(*buildResult)
	r.once.Do(func() {
		staleOnce.Do(removeStaleBinDirs)
		r.path, r.err = goBuild(filepath.Join(binDir(), name), pkg)
	})
	return r.path, r.err
}

func goBuild(out, pkg string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	gobin, err := goTool()
	if err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("build %s: %w", pkg, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-o", out, pkg)
	cmd.Dir = root
	// Static binaries: the plugin runs however the host libc looks.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	var output bytes.Buffer
	cmd.Stdout = &output
	cmd.Stderr = &output
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build %s (go build -o %s %s in %s): %w\n%s",
			filepath.Base(out), out, pkg, root, err, strings.TrimSpace(output.String()))
	}
	return out, nil
}

// goTool finds the go command: PATH first, then $GOROOT/bin.
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if root := os.Getenv("GOROOT"); root != "" {
		p := filepath.Join(root, "bin", "go")
		if err := checkExecutable(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("go command not found in PATH or $GOROOT/bin")
}

// moduleRoot walks up from the working directory (the package directory
// under `go test`) to the directory holding go.mod.
func moduleRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	for dir := wd; ; {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("find module root: no go.mod above %s", wd)
		}
		dir = parent
	}
}
