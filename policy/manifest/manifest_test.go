package manifest_test

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ternlabs/tern/policy/manifest"
)

func testdata(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", dir, "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata in %s: %v", dir, err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

func TestDecodeValid(t *testing.T) {
	want := map[string]int{"cluster.yaml": 4, "selectors.yaml": 3, "list.json": 3, "flow.yaml": 1, "kubectl-list.yaml": 3, "typed-list.json": 2, "services.yaml": 2}
	for name, data := range testdata(t, "valid") {
		t.Run(name, func(t *testing.T) {
			objs, err := manifest.Decode(bytes.NewReader(data))
			if err != nil {
				t.Fatal(err)
			}
			if len(objs) != want[name] {
				t.Errorf("%d objects, want %d", len(objs), want[name])
			}
			for _, o := range objs {
				if manifest.KindOf(o) != manifest.KindNamespace && o.GetNamespace() == "" {
					t.Errorf("%s %s: namespace not defaulted", manifest.KindOf(o), o.GetName())
				}
			}
			if _, err := manifest.NewState().Apply(objs); err != nil {
				t.Errorf("decoded objects do not apply: %v", err)
			}
		})
	}
}

func TestDecodeClusterExample(t *testing.T) {
	objs, err := manifest.Decode(bytes.NewReader(testdata(t, "valid")["cluster.yaml"]))
	if err != nil {
		t.Fatal(err)
	}
	pod := objs[1].(*corev1.Pod)
	if pod.Namespace != "default" || pod.Spec.Containers[0].Ports[0].ContainerPort != 5432 || pod.Status.PodIP != "10.244.1.5" {
		t.Errorf("pod decoded wrong: %+v", pod)
	}
	np := objs[3].(*networkingv1.NetworkPolicy)
	if got := *np.Spec.Egress[0].Ports[0].EndPort; got != 32768 {
		t.Errorf("endPort = %d", got)
	}
	if got := np.Spec.Ingress[0].From[0].IPBlock.Except[0]; got != "172.17.1.0/24" {
		t.Errorf("except = %q", got)
	}
}

// TestDecodeLists checks what the items of kubectl's v1 List and of a typed
// list decode to: kinds filled in, server-set fields accepted and ignored.
func TestDecodeLists(t *testing.T) {
	objs, err := manifest.Decode(bytes.NewReader(testdata(t, "valid")["kubectl-list.yaml"]))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range objs {
		got = append(got, manifest.KindOf(o)+" "+o.GetNamespace()+"/"+o.GetName())
	}
	if want := "Namespace /shop,Pod shop/web-7d4b9c6f5d-x2kqp,NetworkPolicy shop/web-allow-http"; strings.Join(got, ",") != want {
		t.Errorf("objects %v, want %s", got, want)
	}
	if p := objs[1].(*corev1.Pod); p.Labels["app"] != "web" || p.Spec.Containers[0].Ports[0].Name != "http" {
		t.Errorf("pod decoded wrong: %+v", p)
	}
	if np := objs[2].(*networkingv1.NetworkPolicy); np.Spec.Ingress[0].Ports[0].Port.StrVal != "http" || len(np.ManagedFields) != 1 {
		t.Errorf("policy decoded wrong: %+v", np)
	}

	objs, err = manifest.Decode(bytes.NewReader(testdata(t, "valid")["typed-list.json"]))
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 2 || manifest.KindOf(objs[0]) != manifest.KindNetworkPolicy || objs[0].GetName() != "deny-all" || objs[1].GetName() != "dns" {
		t.Errorf("typed list: %v", objs)
	}
	if _, err := manifest.Decode(strings.NewReader("apiVersion: v1\nkind: List\nitems: []\nmetadata: {}\n")); err != nil {
		t.Errorf("empty list: %v", err)
	}
}

// expectedError reads the "# error: ..." first line of an invalid example.
func expectedError(t *testing.T, name string, data []byte) string {
	jsonErrors := map[string]string{
		"json-duplicate.json": "document 0: metadata.name: duplicate field",
		"json-case.json":      "document 1: Namespace b: Spec: unknown field",
	}
	if e, ok := jsonErrors[name]; ok {
		return e
	}
	line, _, _ := bufio.NewReader(bytes.NewReader(data)).ReadLine()
	e, ok := strings.CutPrefix(string(line), "# error: ")
	if !ok {
		t.Fatalf("%s: first line is not # error: ...", name)
	}
	return e
}

func TestDecodeInvalid(t *testing.T) {
	for name, data := range testdata(t, "invalid") {
		t.Run(name, func(t *testing.T) {
			want := expectedError(t, name, data)
			objs, err := manifest.Decode(bytes.NewReader(data))
			if err == nil {
				t.Fatalf("accepted: %d objects", len(objs))
			}
			if objs != nil {
				t.Errorf("objects returned with an error")
			}
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q\ndoes not contain %q", err, want)
			}
			var de *manifest.DecodeError
			if !errors.As(err, &de) {
				t.Errorf("not a *DecodeError: %T", err)
			}
		})
	}
}

func TestObjectErrorNamesObject(t *testing.T) {
	_, err := manifest.Decode(bytes.NewReader(testdata(t, "invalid")["endport-lt-port.yaml"]))
	var oe *manifest.ObjectError
	if !errors.As(err, &oe) || oe.Kind != "NetworkPolicy" || oe.Namespace != "default" || oe.Name != "allow-web" {
		t.Fatalf("got %#v", err)
	}
	var fe manifest.FieldErrors
	if !errors.As(err, &fe) || len(fe) != 1 || !strings.HasPrefix(fe[0], "spec.ingress[0].ports[1].endPort: ") {
		t.Errorf("field errors %q", fe)
	}
}

func TestDecodeEmpty(t *testing.T) {
	for _, in := range []string{"", "\n", "---\n", "# nothing\n---\n---\n", "null\n"} {
		objs, err := manifest.Decode(strings.NewReader(in))
		if err != nil || len(objs) != 0 {
			t.Errorf("%q: %v, %d objects", in, err, len(objs))
		}
	}
}

func TestDocumentIndex(t *testing.T) {
	in := "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n# comment only\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: B}\n"
	_, err := manifest.Decode(strings.NewReader(in))
	var de *manifest.DecodeError
	if !errors.As(err, &de) || de.Doc != 2 {
		t.Fatalf("got %v, want an error in document 2", err)
	}
}

func ns(name string, l map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}
}

func pod(namespace, name string, l map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: l},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}},
	}
}

func TestStateApplyDelete(t *testing.T) {
	s0 := manifest.NewState()
	p := pod("", "web", map[string]string{"app": "web"})
	s1, err := s0.Apply([]manifest.Object{ns("prod", map[string]string{"env": "prod"}), p})
	if err != nil {
		t.Fatal(err)
	}
	if len(s0.Pods) != 0 || len(s0.Namespaces) != 0 {
		t.Errorf("Apply modified the old state")
	}
	got := s1.Pods[types.NamespacedName{Namespace: "default", Name: "web"}]
	if got == nil || got == p || got.Kind != "Pod" || got.APIVersion != "v1" {
		t.Fatalf("pod not stored as a normalized copy: %#v", got)
	}
	if p.Namespace != "" {
		t.Errorf("Apply modified the caller's object")
	}

	// A bad object: nothing changes.
	bad := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "x"}}
	bad.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{}}}}
	s2, err := s1.Apply([]manifest.Object{pod("default", "other", nil), bad})
	if err == nil || s2 != nil || !strings.Contains(err.Error(), "object 1: NetworkPolicy default/x") {
		t.Fatalf("got %v, %v", s2, err)
	}
	if len(s1.Pods) != 1 {
		t.Errorf("failed Apply modified the state")
	}

	// Replace, then delete (missing objects are fine).
	s3, err := s1.Apply([]manifest.Object{pod("default", "web", map[string]string{"app": "v2"})})
	if err != nil {
		t.Fatal(err)
	}
	if s3.Pods[types.NamespacedName{Namespace: "default", Name: "web"}].Labels["app"] != "v2" {
		t.Errorf("pod not replaced")
	}
	s4, err := s3.Delete([]manifest.Object{pod("", "web", nil), pod("x", "missing", nil), ns("prod", nil)})
	if err != nil {
		t.Fatal(err)
	}
	if len(s4.Pods) != 0 || len(s4.Namespaces) != 0 || len(s3.Pods) != 1 {
		t.Errorf("delete: %d pods %d namespaces, old %d pods", len(s4.Pods), len(s4.Namespaces), len(s3.Pods))
	}
	if _, err := s3.Delete([]manifest.Object{(*corev1.Pod)(nil)}); err == nil {
		t.Errorf("nil object deleted")
	}
}

func TestNamespaceLabels(t *testing.T) {
	s, err := manifest.NewState().Apply([]manifest.Object{ns("prod", map[string]string{"env": "prod", manifest.LabelMetadataName: "spoofed"})})
	if err != nil {
		t.Fatal(err)
	}
	if l := s.NamespaceLabels("prod"); l["env"] != "prod" || l[manifest.LabelMetadataName] != "prod" {
		t.Errorf("prod labels %v", l)
	}
	if l := s.NamespaceLabels("ghost"); len(l) != 1 || l[manifest.LabelMetadataName] != "ghost" {
		t.Errorf("ghost labels %v", l)
	}
}

func TestSaveLoad(t *testing.T) {
	var objs []manifest.Object
	for _, data := range testdata(t, "valid") {
		o, err := manifest.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o...)
	}
	s, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "state.json")
	if err := s.Save(path); err != nil {
		t.Fatal(err)
	}
	loaded, err := manifest.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := loaded.MarshalJSON()
	b, _ := s.MarshalJSON()
	if !bytes.Equal(a, b) {
		t.Errorf("round trip differs:\n%s\n%s", a, b)
	}
	if len(loaded.Pods) != len(s.Pods) || len(loaded.Policies) != len(s.Policies) || len(loaded.Namespaces) != len(s.Namespaces) {
		t.Errorf("loaded %d/%d/%d objects", len(loaded.Namespaces), len(loaded.Pods), len(loaded.Policies))
	}
	if len(loaded.Services) != 1 || len(loaded.EndpointSlices) != 1 {
		t.Errorf("loaded %d Services, %d EndpointSlices; want 1, 1", len(loaded.Services), len(loaded.EndpointSlices))
	}
	// Saving again replaces the file and leaves no temporary behind.
	if err := loaded.Save(path); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d files", len(entries))
	}

	// A state file with an invalid or duplicated object is refused.
	for _, bad := range []string{
		`{"namespaces":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"A"}}],"pods":[],"networkPolicies":[]}`,
		`{"namespaces":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},"spec":{"containers":[{"name":"c"}]}}],"pods":[],"networkPolicies":[]}`,
		`{"namespaces":[{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}},{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}}]}`,
		`{"namespaces":[],"extra":1}`,
		`{"namespaces":[],"pods":[],"networkPolicies":[],"services":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},"spec":{"containers":[{"name":"c"}]}}]}`,
	} {
		if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := manifest.Load(path); err == nil {
			t.Errorf("loaded %s", bad)
		}
	}
	if _, err := manifest.Load(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Errorf("loaded a missing file")
	}
}
