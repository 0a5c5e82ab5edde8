package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
)

// LabelMetadataName is the label the API server puts on every namespace,
// with the namespace's name as value.
const LabelMetadataName = "kubernetes.io/metadata.name"

// State is the cluster state policy is computed from. A State is never
// modified after it is returned: Apply and Delete return a new State that
// shares unchanged objects with the old one. Callers must treat the maps and
// the objects as read-only. A nil *State is an empty state.
type State struct {
	Namespaces map[string]*corev1.Namespace
	Pods       map[types.NamespacedName]*corev1.Pod
	Policies   map[types.NamespacedName]*networkingv1.NetworkPolicy
	// Services and EndpointSlices feed Tern's own Service load balancer
	// (package services); policy does not read them.
	Services       map[types.NamespacedName]*corev1.Service
	EndpointSlices map[types.NamespacedName]*discoveryv1.EndpointSlice
}

// NewState returns an empty state.
func NewState() *State {
	return &State{
		Namespaces: map[string]*corev1.Namespace{},
		Pods:       map[types.NamespacedName]*corev1.Pod{},
		Policies:   map[types.NamespacedName]*networkingv1.NetworkPolicy{},

		Services:       map[types.NamespacedName]*corev1.Service{},
		EndpointSlices: map[types.NamespacedName]*discoveryv1.EndpointSlice{},
	}
}

func (s *State) clone() *State {
	n := NewState()
	if s == nil {
		return n
	}
	for k, v := range s.Namespaces {
		n.Namespaces[k] = v
	}
	for k, v := range s.Pods {
		n.Pods[k] = v
	}
	for k, v := range s.Policies {
		n.Policies[k] = v
	}
	for k, v := range s.Services {
		n.Services[k] = v
	}
	for k, v := range s.EndpointSlices {
		n.EndpointSlices[k] = v
	}
	return n
}

// Apply returns a new State with the objects added or replaced (keyed by
// kind, namespace and name; a later object in objs wins over an earlier
// one). The objects are copied, their apiVersion and kind set and their
// namespace defaulted to "default", then validated. On error the receiver is
// the current state still and nothing is returned.
func (s *State) Apply(objs []Object) (*State, error) {
	copies := make([]Object, len(objs))
	for i, obj := range objs {
		c, err := normalize(obj)
		if err != nil {
			return nil, fmt.Errorf("object %d: %w", i, err)
		}
		if err := Validate(c); err != nil {
			return nil, fmt.Errorf("object %d: %w", i, err)
		}
		copies[i] = c
	}
	n := s.clone()
	for _, obj := range copies {
		switch o := obj.(type) {
		case *corev1.Pod:
			n.Pods[key(o)] = o
		case *corev1.Namespace:
			n.Namespaces[o.Name] = o
		case *networkingv1.NetworkPolicy:
			n.Policies[key(o)] = o
		case *corev1.Service:
			n.Services[key(o)] = o
		case *discoveryv1.EndpointSlice:
			n.EndpointSlices[key(o)] = o
		}
	}
	return n, nil
}

// Delete returns a new State without the objects (only kind, namespace and
// name of each are used; a namespaced object without a namespace is in
// "default"). Deleting an object that is not there is not an error. Deleting
// a Namespace does not delete the pods and policies in it: their deletion
// comes as events of their own.
func (s *State) Delete(objs []Object) (*State, error) {
	for i, obj := range objs {
		if isNil(obj) || KindOf(obj) == "" {
			return nil, fmt.Errorf("object %d: unsupported object type %T", i, obj)
		}
	}
	n := s.clone()
	for _, obj := range objs {
		ns := obj.GetNamespace()
		if ns == "" {
			ns = metav1.NamespaceDefault
		}
		k := types.NamespacedName{Namespace: ns, Name: obj.GetName()}
		switch obj.(type) {
		case *corev1.Pod:
			delete(n.Pods, k)
		case *corev1.Namespace:
			delete(n.Namespaces, obj.GetName())
		case *networkingv1.NetworkPolicy:
			delete(n.Policies, k)
		case *corev1.Service:
			delete(n.Services, k)
		case *discoveryv1.EndpointSlice:
			delete(n.EndpointSlices, k)
		}
	}
	return n, nil
}

// NamespaceLabels returns the labels of a namespace as selectors see them:
// the Namespace object's labels plus kubernetes.io/metadata.name=<name>
// (which the API server enforces). A namespace without an object has only
// that label.
func (s *State) NamespaceLabels(name string) labels.Set {
	set := labels.Set{}
	if s != nil {
		if ns := s.Namespaces[name]; ns != nil {
			for k, v := range ns.Labels {
				set[k] = v
			}
		}
	}
	set[LabelMetadataName] = name
	return set
}

// Objects returns every object of the state: namespaces, then pods, then
// policies, then services, then endpoint slices, each sorted by namespace
// and name.
func (s *State) Objects() []Object {
	if s == nil {
		return nil
	}
	var out []Object
	for _, k := range slices.Sorted(maps.Keys(s.Namespaces)) {
		out = append(out, s.Namespaces[k])
	}
	for _, k := range sortedNames(s.Pods) {
		out = append(out, s.Pods[k])
	}
	for _, k := range sortedNames(s.Policies) {
		out = append(out, s.Policies[k])
	}
	for _, k := range sortedNames(s.Services) {
		out = append(out, s.Services[k])
	}
	for _, k := range sortedNames(s.EndpointSlices) {
		out = append(out, s.EndpointSlices[k])
	}
	return out
}

// stateJSON is the on-disk form of a State.
type stateJSON struct {
	Namespaces      []json.RawMessage `json:"namespaces"`
	Pods            []json.RawMessage `json:"pods"`
	NetworkPolicies []json.RawMessage `json:"networkPolicies"`
	// Left out when empty, so a state without Services reads the same as
	// before they existed.
	Services       []json.RawMessage `json:"services,omitempty"`
	EndpointSlices []json.RawMessage `json:"endpointSlices,omitempty"`
}

// MarshalJSON encodes the state as {"namespaces": [...], "pods": [...],
// "networkPolicies": [...]}, each list sorted by namespace and name, each
// item a full object with apiVersion and kind.
func (s *State) MarshalJSON() ([]byte, error) {
	out := stateJSON{Namespaces: []json.RawMessage{}, Pods: []json.RawMessage{}, NetworkPolicies: []json.RawMessage{}}
	for _, obj := range s.Objects() {
		c, err := normalize(obj)
		if err != nil {
			return nil, err
		}
		b, err := json.Marshal(c)
		if err != nil {
			return nil, err
		}
		switch obj.(type) {
		case *corev1.Namespace:
			out.Namespaces = append(out.Namespaces, b)
		case *corev1.Pod:
			out.Pods = append(out.Pods, b)
		case *networkingv1.NetworkPolicy:
			out.NetworkPolicies = append(out.NetworkPolicies, b)
		case *corev1.Service:
			out.Services = append(out.Services, b)
		case *discoveryv1.EndpointSlice:
			out.EndpointSlices = append(out.EndpointSlices, b)
		}
	}
	return json.Marshal(out)
}

// UnmarshalJSON decodes what MarshalJSON writes, with the strictness and
// validation of Decode. An object given twice is an error.
func (s *State) UnmarshalJSON(data []byte) error {
	var in stateJSON
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return fmt.Errorf("decode state: %w", err)
	}
	n := NewState()
	lists := []struct {
		field string
		kind  string
		items []json.RawMessage
	}{
		{"namespaces", KindNamespace, in.Namespaces},
		{"pods", KindPod, in.Pods},
		{"networkPolicies", KindNetworkPolicy, in.NetworkPolicies},
		{"services", KindService, in.Services},
		{"endpointSlices", KindEndpointSlice, in.EndpointSlices},
	}
	for _, l := range lists {
		for i, raw := range l.items {
			if err := checkJSONDuplicates(raw); err != nil {
				return fmt.Errorf("decode state: %s[%d]: %w", l.field, i, err)
			}
			obj, err := decodeObject(raw, l.kind)
			if err != nil {
				return fmt.Errorf("decode state: %s[%d]: %w", l.field, i, err)
			}
			dup := false
			switch o := obj.(type) {
			case *corev1.Namespace:
				_, dup = n.Namespaces[o.Name]
				n.Namespaces[o.Name] = o
			case *corev1.Pod:
				_, dup = n.Pods[key(o)]
				n.Pods[key(o)] = o
			case *networkingv1.NetworkPolicy:
				_, dup = n.Policies[key(o)]
				n.Policies[key(o)] = o
			case *corev1.Service:
				_, dup = n.Services[key(o)]
				n.Services[key(o)] = o
			case *discoveryv1.EndpointSlice:
				_, dup = n.EndpointSlices[key(o)]
				n.EndpointSlices[key(o)] = o
			}
			if dup {
				return fmt.Errorf("decode state: %s[%d]: %s %s given twice", l.field, i, l.kind, strings.TrimPrefix(key(obj).String(), "/"))
			}
		}
	}
	*s = *n
	return nil
}

// Save writes the state to path atomically: a temporary file in the same
// directory is written, synced and renamed over path, then the directory is
// synced.
func (s *State) Save(path string) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	data = append(data, '\n')
	return writeFileAtomic(path, data, 0o644)
}

// Load reads a state written by Save.
func Load(path string) (*State, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load state: %w", err)
	}
	s := &State{}
	if err := s.UnmarshalJSON(data); err != nil {
		return nil, fmt.Errorf("load state %s: %w", path, err)
	}
	return s, nil
}

func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("save state: sync dir: %w", err)
	}
	defer d.Close()
	if err = d.Sync(); err != nil {
		return fmt.Errorf("save state: sync dir: %w", err)
	}
	return nil
}

// normalize returns a deep copy with apiVersion and kind set and the
// namespace of a namespaced object defaulted.
func normalize(obj Object) (Object, error) {
	if isNil(obj) {
		return nil, errors.New("nil object")
	}
	switch o := obj.(type) {
	case *corev1.Pod:
		c := o.DeepCopy()
		c.APIVersion, c.Kind = APIVersionCore, KindPod
		if c.Namespace == "" {
			c.Namespace = metav1.NamespaceDefault
		}
		return c, nil
	case *corev1.Namespace:
		c := o.DeepCopy()
		c.APIVersion, c.Kind = APIVersionCore, KindNamespace
		return c, nil
	case *networkingv1.NetworkPolicy:
		c := o.DeepCopy()
		c.APIVersion, c.Kind = APIVersionNetworking, KindNetworkPolicy
		if c.Namespace == "" {
			c.Namespace = metav1.NamespaceDefault
		}
		return c, nil
	case *corev1.Service:
		c := o.DeepCopy()
		c.APIVersion, c.Kind = APIVersionCore, KindService
		if c.Namespace == "" {
			c.Namespace = metav1.NamespaceDefault
		}
		return c, nil
	case *discoveryv1.EndpointSlice:
		c := o.DeepCopy()
		c.APIVersion, c.Kind = APIVersionDiscovery, KindEndpointSlice
		if c.Namespace == "" {
			c.Namespace = metav1.NamespaceDefault
		}
		return c, nil
	}
	return nil, fmt.Errorf("unsupported object type %T", obj)
}

func isNil(obj Object) bool {
	switch o := obj.(type) {
	case nil:
		return true
	case *corev1.Pod:
		return o == nil
	case *corev1.Namespace:
		return o == nil
	case *networkingv1.NetworkPolicy:
		return o == nil
	case *corev1.Service:
		return o == nil
	case *discoveryv1.EndpointSlice:
		return o == nil
	}
	return false
}

func key(obj metav1.Object) types.NamespacedName {
	return types.NamespacedName{Namespace: obj.GetNamespace(), Name: obj.GetName()}
}

func sortedNames[V any](m map[types.NamespacedName]V) []types.NamespacedName {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b types.NamespacedName) int {
		if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return keys
}
