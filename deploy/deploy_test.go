// Package deploy holds the Kubernetes manifests (kubectl apply -f deploy/);
// its test validates them against a real API server.
package deploy

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"

	"github.com/ternlabs/tern/internal/testutil"
)

func manifests(t *testing.T) []*unstructured.Unstructured {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	slices.Sort(files)
	var objs []*unstructured.Unstructured
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewYAMLOrJSONDecoder(fh, 4096)
		for {
			u := &unstructured.Unstructured{}
			err := dec.Decode(&u.Object)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if len(u.Object) > 0 {
				objs = append(objs, u)
			}
		}
		fh.Close()
	}
	return objs
}

// TestManifestsDryRun applies every manifest to a real kube-apiserver with
// server-side apply, dry-run and strict field validation: what `kubectl
// apply -f deploy/` would send is valid (schema, defaults, admission). The
// namespace is created for real first, as the namespaced objects need it.
func TestManifestsDryRun(t *testing.T) {
	cp := testutil.StartControlPlane(t)
	rc := cp.RESTConfig()
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	objs := manifests(t)
	kinds := map[string]int{}
	for _, u := range objs {
		kinds[u.GetKind()]++
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} {
		if kinds[k] != 1 {
			t.Errorf("want one %s, have %d", k, kinds[k])
		}
	}
	for _, dry := range []bool{false, true} {
		for _, u := range objs {
			if (u.GetKind() == "Namespace") == dry {
				continue // the namespace for real, then the others dry-run
			}
			gvk := u.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatalf("%s %s: %v", gvk.Kind, u.GetName(), err)
			}
			ri := dyn.Resource(m.Resource).Namespace(u.GetNamespace())
			body, err := u.MarshalJSON()
			if err != nil {
				t.Fatal(err)
			}
			opts := metav1.PatchOptions{FieldManager: "tern-test", FieldValidation: "Strict"}
			if dry {
				opts.DryRun = []string{metav1.DryRunAll}
			}
			if _, err := ri.Patch(t.Context(), u.GetName(), types.ApplyPatchType, body, opts); err != nil {
				t.Errorf("apply %s %s/%s: %v", gvk.Kind, u.GetNamespace(), u.GetName(), err)
			}
		}
	}
}

// TestClusterRoleReadOnly: the agent's role reads and never writes.
func TestClusterRoleReadOnly(t *testing.T) {
	for _, u := range manifests(t) {
		if u.GetKind() != "ClusterRole" {
			continue
		}
		rules, _, _ := unstructured.NestedSlice(u.Object, "rules")
		if len(rules) == 0 {
			t.Fatal("ClusterRole has no rules")
		}
		for _, r := range rules {
			verbs, _, _ := unstructured.NestedStringSlice(r.(map[string]any), "verbs")
			for _, v := range verbs {
				if v != "get" && v != "list" && v != "watch" {
					t.Errorf("ClusterRole grants %q", v)
				}
			}
		}
	}
}
