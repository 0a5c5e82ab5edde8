package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	ternbpf "github.com/ternlabs/tern/bpf"
)

const (
	ternModule    = "github.com/ternlabs/tern"
	pluginsModule = "github.com/containernetworking/plugins"
	// defaultPluginsVersion is used when the module's go.mod cannot be
	// asked (no source tree).
	defaultPluginsVersion = "v1.9.1"
	buildTimeout          = 5 * time.Minute
)

var referencePlugins = []string{
	pluginsModule + "/plugins/main/bridge",
	pluginsModule + "/plugins/ipam/host-local",
}

// findSourceDir returns the root of the Tern module: the nearest directory
// at or above the working directory whose go.mod declares it, or "".
func findSourceDir() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		if modulePath(filepath.Join(dir, "go.mod")) == ternModule {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

func modulePath(gomod string) string {
	f, err := os.Open(gomod)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.Trim(strings.TrimSpace(m), `"`)
		}
	}
	return ""
}

// goTool is the go command: from PATH, else the toolchain that built this
// binary.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// pluginsVersion is the containernetworking/plugins version the Tern
// module requires.
func pluginsVersion(ctx context.Context, srcDir string) string {
	if srcDir == "" {
		return defaultPluginsVersion
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), "list", "-m", "-f", "{{.Version}}", pluginsModule)
	cmd.Dir = srcDir
	out, err := cmd.Output()
	if v := strings.TrimSpace(string(out)); err == nil && strings.HasPrefix(v, "v") {
		return v
	}
	return defaultPluginsVersion
}

// goRun runs the go command in dir and returns an error carrying the end
// of its output.
func goRun(ctx context.Context, dir string, env []string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, lastLines(string(out), 8))
	}
	return nil
}

// buildPlugins puts the CNI plugins the selected paths need into r.binDir
// and returns, per path, why it is unavailable.
func (r *runner) buildPlugins(ctx context.Context, version string) map[string]string {
	unavailable := make(map[string]string)
	needRef := r.selected(PathReference)
	ternPaths := append([]string{PathEBPF, PathIptables, PathEBPFNative, PathEBPFVXLAN, PathIptablesNative, PathIptablesVXLAN, PathNodePortTC, PathNodePortXDP}, ServicePaths...)
	needTern := slices.ContainsFunc(ternPaths, r.selected)
	markTern := func(reason string) {
		for _, p := range ternPaths {
			if r.selected(p) {
				unavailable[p] = reason
			}
		}
	}

	if r.cfg.PluginDir != "" {
		r.binDir = r.cfg.PluginDir
		if needRef {
			for _, b := range []string{"bridge", "host-local"} {
				if _, err := os.Stat(filepath.Join(r.binDir, b)); err != nil {
					unavailable[PathReference] = fmt.Sprintf("plugin %s not in --plugin-dir %s", b, r.binDir)
				}
			}
		}
		if needTern {
			if _, err := os.Stat(filepath.Join(r.binDir, "tern")); err != nil {
				markTern("plugin tern not in --plugin-dir " + r.binDir)
			} else if why := objectsMismatch(ctx, filepath.Join(r.binDir, "tern")); why != "" {
				markTern(why)
			}
			if r.needTernctl() {
				if _, err := os.Stat(filepath.Join(r.binDir, "ternctl")); err != nil {
					r.noTernctl = "ternctl (which applies NetworkPolicy) not in --plugin-dir " + r.binDir
				} else {
					r.ternctl = filepath.Join(r.binDir, "ternctl")
				}
			}
		}
		return unavailable
	}

	r.binDir = filepath.Join(r.tmp, "bin")
	if err := os.MkdirAll(r.binDir, 0o755); err != nil {
		for _, p := range r.cfg.Paths {
			unavailable[p] = err.Error()
		}
		return unavailable
	}
	if needRef {
		r.logf("building reference plugins bridge and host-local %s", version)
		if err := r.buildReference(ctx, version); err != nil {
			unavailable[PathReference] = "cannot build the reference plugins: " + err.Error()
		}
	}
	if needTern {
		if r.cfg.SourceDir != "" {
			r.logf("building tern from %s", filepath.Join(r.cfg.SourceDir, "cmd", "tern"))
		}
		if err := r.buildTern(ctx); err != nil {
			markTern("cmd/tern does not build: " + err.Error())
		} else if why := objectsMismatch(ctx, filepath.Join(r.binDir, "tern")); why != "" {
			markTern(why)
		} else if r.needTernctl() {
			if err := goRun(ctx, r.cfg.SourceDir, nil, "build", "-o", r.binDir+"/", "./cmd/ternctl"); err != nil {
				r.noTernctl = "cmd/ternctl (which applies NetworkPolicy) does not build: " + err.Error()
			} else {
				r.ternctl = filepath.Join(r.binDir, "ternctl")
			}
		}
	}
	return unavailable
}

// buildReference builds bridge and host-local: from the Tern module (so
// the versions are exactly go.mod's) when its go.sum allows, else with
// "go install …@version", which uses the plugins' own go.mod.
func (r *runner) buildReference(ctx context.Context, version string) error {
	var errs []error
	if r.cfg.SourceDir != "" {
		args := append([]string{"build", "-o", r.binDir + "/"}, referencePlugins...)
		err := goRun(ctx, r.cfg.SourceDir, staticBuild, args...)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	args := []string{"install"}
	for _, p := range referencePlugins {
		args = append(args, p+"@"+version)
	}
	if err := goRun(ctx, r.tmp, append([]string{"GOBIN=" + r.binDir, "GOWORK=off"}, staticBuild...), args...); err != nil {
		return errors.Join(append(errs, err)...)
	}
	return nil
}

// buildTern builds cmd/tern, and cmd/tern-ipam when it exists (the
// "tern-ipam" IPAM type may be built into tern or be its own binary).
func (r *runner) buildTern(ctx context.Context) error {
	if r.cfg.SourceDir == "" {
		return fmt.Errorf("no %s source tree at or above the working directory (use --src)", ternModule)
	}
	pkgs := []string{"./cmd/tern"}
	if hasGoFiles(filepath.Join(r.cfg.SourceDir, "cmd", "tern-ipam")) {
		pkgs = append(pkgs, "./cmd/tern-ipam")
	}
	return goRun(ctx, r.cfg.SourceDir, staticBuild, append([]string{"build", "-o", r.binDir + "/"}, pkgs...)...)
}

// objectsMismatch says why the tern plugin at path cannot be measured by
// this ternbench, or "" when it can: it must carry the BPF objects
// ternbench was built with. A node's loader swaps all of its attachments to
// the objects of whichever binary loads last (a different version counts as
// an upgrade), and ternbench loads its own on the multi-node paths (the
// routing table): with another plugin build, the paths would silently run
// ternbench's programs, not the plugin's.
func objectsMismatch(ctx context.Context, path string) string {
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = []string{} // no CNI_COMMAND: the plugin says what it is
	out, _ := cmd.CombinedOutput()
	v, ok := ternbpf.ObjectsOf(string(out))
	switch {
	case !ok:
		return fmt.Sprintf("plugin %s does not name its BPF objects (%q): build it and ternbench from one tree (make build)", path, lastLines(string(out), 2))
	case v != ternbpf.ObjectVersion():
		return fmt.Sprintf("plugin %s carries BPF objects %s, this ternbench %s: the nodes would run ternbench's programs; build both from one tree (make build) and run that tree's bin/ternbench", path, v, ternbpf.ObjectVersion())
	}
	return ""
}

// staticBuild builds the CNI plugins, Tern's and the reference ones, as
// they are released and installed (upstream's release binaries, Tern's
// image): without cgo, so every exec skips the dynamic loader and glibc's
// start-up (~0.7-1 ms per exec on the test machine, for each plugin).
var staticBuild = []string{"CGO_ENABLED=0"}

// needTernctl reports whether a selected workload applies NetworkPolicy
// or Services.
func (r *runner) needTernctl() bool {
	// The NodePort paths apply their Service with it.
	return slices.Contains(r.cfg.Workloads, policySweepName) || slices.Contains(r.cfg.Workloads, servicesName) ||
		slices.ContainsFunc(NodePortPaths, r.selected)
}

func hasGoFiles(dir string) bool {
	m, _ := filepath.Glob(filepath.Join(dir, "*.go"))
	return len(m) > 0
}
