// Package manifest decodes Pod, Namespace and NetworkPolicy manifests
// strictly into k8s.io/api types, validates them the way the API server
// would, and keeps them in State, the cluster state policy is computed from.
package manifest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
)

// Object is one of *corev1.Pod, *corev1.Namespace,
// *networkingv1.NetworkPolicy, *corev1.Service and
// *discoveryv1.EndpointSlice.
type Object interface {
	metav1.Object
	runtime.Object
}

// Kinds this package accepts, as apiVersion and kind.
const (
	APIVersionCore       = "v1"
	APIVersionNetworking = "networking.k8s.io/v1"
	KindPod              = "Pod"
	KindNamespace        = "Namespace"
	KindNetworkPolicy    = "NetworkPolicy"
	APIVersionDiscovery  = "discovery.k8s.io/v1"
	KindService          = "Service"
	KindEndpointSlice    = "EndpointSlice"
)

// DecodeError is returned by Decode. Doc is the 0-based index of the
// document in the stream (empty documents count).
type DecodeError struct {
	Doc int
	Err error
}

func (e *DecodeError) Error() string { return fmt.Sprintf("document %d: %v", e.Doc, e.Err) }
func (e *DecodeError) Unwrap() error { return e.Err }

// ObjectError names the object an error is about: "NetworkPolicy
// default/allow-web: spec.ingress[0].ports[1].endPort: ...".
type ObjectError struct {
	Kind      string
	Namespace string // not shown for a Namespace
	Name      string
	Err       error
}

func (e *ObjectError) Error() string {
	id := e.Name
	if e.Namespace != "" && e.Kind != KindNamespace {
		id = e.Namespace + "/" + e.Name
	}
	if id == "" {
		id = "(no name)"
	}
	return fmt.Sprintf("%s %s: %v", e.Kind, id, e.Err)
}

func (e *ObjectError) Unwrap() error { return e.Err }

// Decode reads a stream of manifests: YAML documents separated by "---"
// lines, or a sequence of JSON objects. Every document must be a v1 Pod, a
// v1 Namespace, a networking.k8s.io/v1 NetworkPolicy, a v1 Service or a
// discovery.k8s.io/v1 EndpointSlice, or a list of them
// (a v1 List as `kubectl get -o yaml` prints, or a typed list such as
// NetworkPolicyList) whose items obey the same rules; unknown fields
// (exact case), duplicate fields and invalid objects are rejected. Empty
// documents are skipped. Namespaced objects without a namespace get
// "default". On error no object is returned; the error is a *DecodeError.
func Decode(r io.Reader) ([]Object, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("read manifests: %w", err)
	}
	var docs [][]byte
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	var syntax *json.SyntaxError
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		docs, err = splitJSON(trimmed)
		if errors.As(err, &syntax) && len(docs) == 0 {
			// Not JSON: a YAML document in flow style, "{kind: Pod, ...}".
			docs, err = splitYAML(data)
		}
	} else {
		docs, err = splitYAML(data)
	}
	if err != nil {
		return nil, &DecodeError{Doc: len(docs), Err: err}
	}
	var objs []Object
	for i, doc := range docs {
		got, err := decodeDocument(doc)
		if err != nil {
			return nil, &DecodeError{Doc: i, Err: err}
		}
		objs = append(objs, got...)
	}
	return objs, nil
}

// splitJSON splits a sequence of JSON values and checks each for duplicate
// keys. The returned documents are JSON.
func splitJSON(data []byte) ([][]byte, error) {
	var docs [][]byte
	dec := json.NewDecoder(bytes.NewReader(data))
	for {
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if err == io.EOF {
			return docs, nil
		}
		if err != nil {
			return docs, fmt.Errorf("invalid JSON: %w", err)
		}
		if err := checkJSONDuplicates(raw); err != nil {
			return docs, err
		}
		docs = append(docs, raw)
	}
}

// splitYAML splits a YAML stream on "---" lines (which may be followed by a
// comment) and converts each document to JSON, rejecting duplicate keys.
func splitYAML(data []byte) ([][]byte, error) {
	var raw [][]byte
	var cur bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "---"); ok {
			rest = strings.TrimSpace(rest)
			if rest != "" && !strings.HasPrefix(rest, "#") {
				return append(raw, nil), fmt.Errorf("invalid document separator %q", line)
			}
			raw = append(raw, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	raw = append(raw, cur.Bytes())
	// A leading "---" opens the first document rather than closing an empty
	// one; keep the count so document indexes match what a reader counts.
	if len(raw) > 1 && len(bytes.TrimSpace(raw[0])) == 0 && bytes.HasPrefix(bytes.TrimLeft(data, " \t\r\n"), []byte("---")) {
		raw = raw[1:]
	}
	docs := make([][]byte, 0, len(raw))
	for _, r := range raw {
		j, err := yaml.YAMLToJSONStrict(r)
		if err != nil {
			return docs, fmt.Errorf("invalid YAML: %w", err)
		}
		docs = append(docs, j)
	}
	return docs, nil
}

// decodeDocument decodes one JSON document: an object, or a list of them.
// It returns no objects for an empty document.
func decodeDocument(doc []byte) ([]Object, error) {
	d := bytes.TrimSpace(doc)
	if len(d) == 0 || bytes.Equal(d, []byte("null")) {
		return nil, nil
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if json.Unmarshal(d, &head) == nil && isListKind(head.APIVersion, head.Kind) {
		return decodeList(d, head.APIVersion, head.Kind)
	}
	obj, err := decodeObject(d, "")
	if err != nil {
		return nil, err
	}
	return []Object{obj}, nil
}

// listKinds are the item kinds of the typed lists the API server returns
// (GET /api/v1/pods); "List" is what kubectl prints for `get -o yaml|json`.
var listKinds = map[string]string{
	APIVersionCore + "/PodList":                 KindPod,
	APIVersionCore + "/NamespaceList":           KindNamespace,
	APIVersionNetworking + "/NetworkPolicyList": KindNetworkPolicy,
	APIVersionCore + "/ServiceList":             KindService,
	APIVersionDiscovery + "/EndpointSliceList":  KindEndpointSlice,
	APIVersionCore + "/" + KindList:             "",
}

// KindList is the generic list kubectl prints (apiVersion v1).
const KindList = "List"

func isListKind(apiVersion, kind string) bool {
	_, ok := listKinds[apiVersion+"/"+kind]
	return ok
}

// decodeList decodes a v1 List (items of any supported kind, each with its
// apiVersion and kind, as kubectl prints them) or a typed list such as
// networking.k8s.io/v1 NetworkPolicyList (items may omit apiVersion and
// kind, as the API server sends them). The list itself is checked as
// strictly as an object: only apiVersion, kind, metadata (list metadata)
// and items. Every item is decoded and validated like a single document;
// an error names the item. Lists do not nest.
func decodeList(data []byte, apiVersion, kind string) ([]Object, error) {
	var list struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ListMeta   `json:"metadata"`
		Items      []json.RawMessage `json:"items"`
	}
	var generic any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&generic); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if err := checkFields(generic, reflect.TypeOf(list), ""); err != nil {
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	typed := json.NewDecoder(bytes.NewReader(data))
	typed.DisallowUnknownFields()
	if err := typed.Decode(&list); err != nil {
		return nil, fmt.Errorf("%s: %w", kind, err)
	}
	itemKind := listKinds[apiVersion+"/"+kind]
	objs := make([]Object, 0, len(list.Items))
	for i, item := range list.Items {
		if itemKind != "" {
			var err error
			if item, err = defaultKind(item, apiVersion, itemKind); err != nil {
				return nil, fmt.Errorf("%s items[%d]: %w", kind, i, err)
			}
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if json.Unmarshal(item, &head) == nil && isListKind(head.APIVersion, head.Kind) {
			return nil, fmt.Errorf("%s items[%d]: a list inside a list", kind, i)
		}
		obj, err := decodeObject(item, itemKind)
		if err != nil {
			return nil, fmt.Errorf("%s items[%d]: %w", kind, i, err)
		}
		objs = append(objs, obj)
	}
	return objs, nil
}

// defaultKind sets apiVersion and kind of a typed list's item where the
// item leaves them out; where it has them they must be the list's.
func defaultKind(item []byte, apiVersion, kind string) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(item, &m); err != nil {
		return item, nil // decodeObject reports what is wrong with it
	}
	for field, want := range map[string]string{"apiVersion": apiVersion, "kind": kind} {
		raw, ok := m[field]
		if !ok {
			m[field], _ = json.Marshal(want)
			continue
		}
		var got string
		if json.Unmarshal(raw, &got) != nil || got != want {
			return nil, fmt.Errorf("%s %s in a list of %s %s", field, raw, apiVersion, kind)
		}
	}
	return json.Marshal(m)
}

// decodeObject decodes one JSON object strictly, defaults and validates it.
// If wantKind is not empty the object must be of that kind.
func decodeObject(data []byte, wantKind string) (Object, error) {
	var generic any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&generic); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	m, ok := generic.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("expected an object, got %s", jsonKind(generic))
	}
	apiVersion, _ := m["apiVersion"].(string)
	kind, _ := m["kind"].(string)
	ns, name := "", ""
	if meta, ok := m["metadata"].(map[string]any); ok {
		ns, _ = meta["namespace"].(string)
		name, _ = meta["name"].(string)
	}
	wrap := func(err error) error {
		return &ObjectError{Kind: kind, Namespace: ns, Name: name, Err: err}
	}

	var obj Object
	switch {
	case kind == "":
		return nil, errors.New("missing kind")
	case apiVersion == "":
		return nil, wrap(errors.New("missing apiVersion"))
	case apiVersion == APIVersionCore && kind == KindPod:
		obj = &corev1.Pod{}
	case apiVersion == APIVersionCore && kind == KindNamespace:
		obj = &corev1.Namespace{}
	case apiVersion == APIVersionNetworking && kind == KindNetworkPolicy:
		obj = &networkingv1.NetworkPolicy{}
	case apiVersion == APIVersionCore && kind == KindService:
		obj = &corev1.Service{}
	case apiVersion == APIVersionDiscovery && kind == KindEndpointSlice:
		obj = &discoveryv1.EndpointSlice{}
	default:
		return nil, wrap(fmt.Errorf("unsupported apiVersion/kind %s/%s (want v1 Pod, v1 Namespace, networking.k8s.io/v1 NetworkPolicy, v1 Service or discovery.k8s.io/v1 EndpointSlice)", apiVersion, kind))
	}
	if wantKind != "" && kind != wantKind {
		return nil, wrap(fmt.Errorf("expected kind %s", wantKind))
	}
	if kind != KindNamespace && ns == "" {
		ns = metav1.NamespaceDefault
	}
	if err := checkFields(m, reflect.TypeOf(obj), ""); err != nil {
		return nil, wrap(err)
	}
	typed := json.NewDecoder(bytes.NewReader(data))
	typed.DisallowUnknownFields()
	if err := typed.Decode(obj); err != nil {
		return nil, wrap(err)
	}
	if kind != KindNamespace && obj.GetNamespace() == "" {
		obj.SetNamespace(metav1.NamespaceDefault)
	}
	if err := Validate(obj); err != nil {
		return nil, err
	}
	return obj, nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case []any:
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	}
	return fmt.Sprintf("%T", v)
}
