package ctl

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

const nsYAML = `apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
`

const podsJSON = `{"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "prod", "name": "db", "labels": {"app": "db"}}, "spec": {"containers": [{"name": "c"}]}}`

const denyYAML = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: deny}
spec:
  podSelector: {matchLabels: {app: db}}
`

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestReadManifests(t *testing.T) {
	dir := writeFiles(t, map[string]string{"b.yaml": denyYAML, "a.json": podsJSON, "0.yml": nsYAML, "notes.txt": "not a manifest"})
	objs, err := readManifests([]string{dir})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range objs {
		got = append(got, objectName(o))
	}
	if want := "Namespace prod,Pod prod/db,NetworkPolicy prod/deny"; strings.Join(got, ",") != want {
		t.Errorf("objects in order: %v, want %s", got, want)
	}

	bad := writeFiles(t, map[string]string{"p.yaml": strings.Replace(denyYAML, "{matchLabels: {app: db}}", "{matchExpressions: [{key: app, operator: Maybe}]}", 1)})
	_, err = readManifests([]string{filepath.Join(dir, "0.yml"), bad})
	if err == nil || !strings.Contains(err.Error(), "p.yaml") || !strings.Contains(err.Error(), "NetworkPolicy prod/deny") {
		t.Errorf("invalid object: %v (want the file and the object named)", err)
	}
	if _, err := readManifests([]string{filepath.Join(dir, "missing.yaml")}); err == nil {
		t.Error("missing file accepted")
	}
	if _, err := readManifests([]string{t.TempDir()}); err == nil {
		t.Error("empty directory accepted")
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{{"apply"}, {"apply", "-f"}, {"delete", "x"}, {"get"}, {"frobnicate"}, {}} {
		var out, errb bytes.Buffer
		if err := Run(append([]string{"--cni-conf", "/nonexistent"}, args...), &out, &errb); err == nil {
			t.Errorf("ternctl %v: no error", args)
		}
	}
}

// TestApplyDelete drives apply, get policies and delete on an iptables
// network without pods, inside a fresh network namespace: state changes,
// output lines, strict errors that change nothing.
func TestApplyDelete(t *testing.T) {
	testutil.RequirePrivileged(t)
	node := testutil.NewNetNS(t, "ctl")
	stateDir := t.TempDir()
	conf := filepath.Join(t.TempDir(), "10-tern.conflist")
	network := testutil.UniqueName("ctl")
	b, _ := json.Marshal(map[string]any{
		"cniVersion": "1.1.0", "name": network,
		"plugins": []any{map[string]any{
			"type": "tern", "datapath": "iptables", "stateDir": stateDir, "bridge": testutil.UniqueName("tc"),
			"ipam": map[string]any{"type": "tern-ipam", "subnet": "10.78.1.0/24"},
		}},
	})
	if err := os.WriteFile(conf, b, 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		var out, errb bytes.Buffer
		err := node.Do(func(ns.NetNS) error { return Run(append([]string{"--cni-conf", conf}, args...), &out, &errb) })
		if err != nil {
			err = fmt.Errorf("%w: %s", err, errb.String())
		}
		return out.String(), err
	}
	dir := writeFiles(t, map[string]string{"0.yaml": nsYAML, "1.json": podsJSON, "2.yaml": denyYAML})

	out, err := run("apply", "-f", dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := "Namespace prod created\nPod prod/db created\nNetworkPolicy prod/deny created\n"; out != want {
		t.Errorf("apply output:\n%s\nwant:\n%s", out, want)
	}
	if out, _ = run("apply", "-f", filepath.Join(dir, "2.yaml")); out != "NetworkPolicy prod/deny unchanged\n" {
		t.Errorf("second apply: %q", out)
	}
	changed := writeFiles(t, map[string]string{"p.yaml": strings.Replace(denyYAML, "app: db", "app: web", 1)})
	if out, _ = run("apply", "-f", changed); out != "NetworkPolicy prod/deny configured\n" {
		t.Errorf("changed apply: %q", out)
	}

	stateFile := filepath.Join(stateDir, "policy", "state.json")
	before, err := os.ReadFile(stateFile)
	if err != nil {
		t.Fatal(err)
	}
	bad := writeFiles(t, map[string]string{"ok.yaml": strings.Replace(denyYAML, "name: deny", "name: other", 1), "zz.yaml": "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}\n"})
	if _, err := run("apply", "-f", bad); err == nil || !strings.Contains(err.Error(), "Pod default/x") {
		t.Errorf("invalid manifest: %v", err)
	}
	if after, _ := os.ReadFile(stateFile); !bytes.Equal(before, after) {
		t.Error("a failed apply changed the state")
	}

	out, err = run("-o", "json", "get", "policies")
	if err != nil {
		t.Fatal(err)
	}
	var infos []struct {
		Namespace, Name string
		PolicyTypes     []string
	}
	if err := json.Unmarshal([]byte(out), &infos); err != nil || len(infos) != 1 || infos[0].Name != "deny" || strings.Join(infos[0].PolicyTypes, ",") != "Ingress" {
		t.Errorf("get policies: %s (%v)", out, err)
	}
	if out, err = run("get", "policies"); err != nil || !strings.Contains(out, "prod       deny") {
		t.Errorf("get policies table:\n%s (%v)", out, err)
	}

	if out, _ = run("delete", "-f", filepath.Join(dir, "2.yaml")); out != "NetworkPolicy prod/deny deleted\n" {
		t.Errorf("delete: %q", out)
	}
	if out, _ = run("delete", "-f", filepath.Join(dir, "2.yaml")); out != "NetworkPolicy prod/deny not found\n" {
		t.Errorf("second delete: %q", out)
	}
	if out, _ := run("get", "policies"); strings.Count(out, "\n") != 1 {
		t.Errorf("policies left:\n%s", out)
	}
	// Without pods nothing was enforced: no chains, no sets.
	var save string
	node.Do(func(ns.NetNS) error {
		b, _ := execOut("iptables-save")
		save = b
		return nil
	})
	if strings.Contains(save, "TERN") {
		t.Errorf("iptables rules without pods:\n%s", save)
	}
}

// execOut runs a command from the calling thread (inside ns.Do: in that
// namespace) and returns its output.
func execOut(name string, args ...string) (string, error) {
	b, err := exec.Command(name, args...).CombinedOutput()
	return string(b), err
}
