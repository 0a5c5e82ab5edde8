package manifest

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// FieldErrors lists what is wrong with an object, each prefixed with the
// path of the field ("spec.ingress[0].ports[1].endPort: ...").
type FieldErrors []string

func (e FieldErrors) Error() string { return strings.Join(e, "; ") }

func (e *FieldErrors) add(path, format string, args ...any) {
	*e = append(*e, path+": "+fmt.Sprintf(format, args...))
}

func (e *FieldErrors) addAll(path string, msgs []string) {
	for _, m := range msgs {
		e.add(path, "%s", m)
	}
}

// KindOf returns the kind of a supported object, or "" for anything else.
func KindOf(obj Object) string {
	switch obj.(type) {
	case *corev1.Pod:
		return KindPod
	case *corev1.Namespace:
		return KindNamespace
	case *networkingv1.NetworkPolicy:
		return KindNetworkPolicy
	case *corev1.Service:
		return KindService
	case *discoveryv1.EndpointSlice:
		return KindEndpointSlice
	}
	return ""
}

// Validate checks an object the way the API server validates the fields
// policy depends on: names, labels, container ports, selectors, peers,
// ipBlocks and ports. Namespaced objects must have their namespace set (Decode
// and State.Apply default it). The error is an *ObjectError wrapping
// FieldErrors.
func Validate(obj Object) error {
	var errs FieldErrors
	kind := KindOf(obj)
	switch o := obj.(type) {
	case *corev1.Pod:
		if o == nil {
			return errors.New("nil Pod")
		}
		validateMeta(&errs, &o.ObjectMeta, true, validation.IsDNS1123Subdomain)
		validatePodSpec(&errs, &o.Spec)
	case *corev1.Namespace:
		if o == nil {
			return errors.New("nil Namespace")
		}
		validateMeta(&errs, &o.ObjectMeta, false, validation.IsDNS1123Label)
	case *networkingv1.NetworkPolicy:
		if o == nil {
			return errors.New("nil NetworkPolicy")
		}
		validateMeta(&errs, &o.ObjectMeta, true, validation.IsDNS1123Subdomain)
		validatePolicySpec(&errs, &o.Spec)
	case *corev1.Service:
		if o == nil {
			return errors.New("nil Service")
		}
		validateMeta(&errs, &o.ObjectMeta, true, validation.IsDNS1035Label)
		validateService(&errs, o)
	case *discoveryv1.EndpointSlice:
		if o == nil {
			return errors.New("nil EndpointSlice")
		}
		validateMeta(&errs, &o.ObjectMeta, true, validation.IsDNS1123Subdomain)
		validateEndpointSlice(&errs, o)
	default:
		return fmt.Errorf("unsupported object type %T", obj)
	}
	if len(errs) > 0 {
		return &ObjectError{Kind: kind, Namespace: obj.GetNamespace(), Name: obj.GetName(), Err: errs}
	}
	return nil
}

func validateMeta(errs *FieldErrors, m *metav1.ObjectMeta, namespaced bool, nameCheck func(string) []string) {
	if m.Name == "" {
		errs.add("metadata.name", "required")
	} else {
		errs.addAll("metadata.name", nameCheck(m.Name))
	}
	if namespaced {
		if m.Namespace == "" {
			errs.add("metadata.namespace", "required")
		} else {
			errs.addAll("metadata.namespace", validation.IsDNS1123Label(m.Namespace))
		}
	} else if m.Namespace != "" {
		errs.add("metadata.namespace", "must be empty for a cluster-scoped object")
	}
	validateLabels(errs, "metadata.labels", m.Labels)
}

func validateLabels(errs *FieldErrors, path string, l map[string]string) {
	for _, k := range sortedKeys(l) {
		errs.addAll(fmt.Sprintf("%s[%s]", path, k), validation.IsQualifiedName(k))
		errs.addAll(fmt.Sprintf("%s[%s]", path, k), validation.IsValidLabelValue(l[k]))
	}
}

func validatePodSpec(errs *FieldErrors, spec *corev1.PodSpec) {
	if len(spec.Containers) == 0 {
		errs.add("spec.containers", "required")
	}
	names := map[string]bool{}
	check := func(path string, cs []corev1.Container) {
		for i := range cs {
			c := &cs[i]
			cp := fmt.Sprintf("%s[%d]", path, i)
			if c.Name == "" {
				errs.add(cp+".name", "required")
			} else {
				errs.addAll(cp+".name", validation.IsDNS1123Label(c.Name))
				if names[c.Name] {
					errs.add(cp+".name", "duplicate container name %q", c.Name)
				}
				names[c.Name] = true
			}
			portNames := map[string]bool{}
			for j, p := range c.Ports {
				pp := fmt.Sprintf("%s.ports[%d]", cp, j)
				if p.Name != "" {
					errs.addAll(pp+".name", validation.IsValidPortName(p.Name))
					if portNames[p.Name] {
						errs.add(pp+".name", "duplicate port name %q", p.Name)
					}
					portNames[p.Name] = true
				}
				errs.addAll(pp+".containerPort", validation.IsValidPortNum(int(p.ContainerPort)))
				if p.HostPort != 0 {
					errs.addAll(pp+".hostPort", validation.IsValidPortNum(int(p.HostPort)))
				}
				validateProtocol(errs, pp+".protocol", p.Protocol)
			}
		}
	}
	check("spec.containers", spec.Containers)
	check("spec.initContainers", spec.InitContainers)
}

func validateProtocol(errs *FieldErrors, path string, p corev1.Protocol) {
	switch p {
	case "", corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
	default:
		errs.add(path, "unsupported protocol %q (want TCP, UDP or SCTP)", p)
	}
}

func validatePolicySpec(errs *FieldErrors, spec *networkingv1.NetworkPolicySpec) {
	validateSelector(errs, "spec.podSelector", &spec.PodSelector)
	seen := map[networkingv1.PolicyType]bool{}
	for i, t := range spec.PolicyTypes {
		p := fmt.Sprintf("spec.policyTypes[%d]", i)
		switch t {
		case networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress:
		default:
			errs.add(p, "unsupported policy type %q (want Ingress or Egress)", t)
		}
		if seen[t] {
			errs.add(p, "duplicate policy type %q", t)
		}
		seen[t] = true
	}
	for i, r := range spec.Ingress {
		p := fmt.Sprintf("spec.ingress[%d]", i)
		validatePorts(errs, p+".ports", r.Ports)
		validatePeers(errs, p+".from", r.From)
	}
	for i, r := range spec.Egress {
		p := fmt.Sprintf("spec.egress[%d]", i)
		validatePorts(errs, p+".ports", r.Ports)
		validatePeers(errs, p+".to", r.To)
	}
}

func validateSelector(errs *FieldErrors, path string, s *metav1.LabelSelector) {
	if s == nil {
		return
	}
	if _, err := metav1.LabelSelectorAsSelector(s); err != nil {
		errs.add(path, "%v", err)
	}
}

func validatePorts(errs *FieldErrors, path string, ports []networkingv1.NetworkPolicyPort) {
	for i, p := range ports {
		pp := fmt.Sprintf("%s[%d]", path, i)
		if p.Protocol != nil {
			if *p.Protocol == "" {
				errs.add(pp+".protocol", "must not be empty")
			} else {
				validateProtocol(errs, pp+".protocol", *p.Protocol)
			}
		}
		if p.Port != nil {
			switch p.Port.Type {
			case intstr.Int:
				errs.addAll(pp+".port", validation.IsValidPortNum(int(p.Port.IntVal)))
			case intstr.String:
				errs.addAll(pp+".port", validation.IsValidPortName(p.Port.StrVal))
			default:
				errs.add(pp+".port", "invalid type")
			}
		}
		if p.EndPort != nil {
			end := *p.EndPort
			switch {
			case p.Port == nil:
				errs.add(pp+".endPort", "may not be specified when port is not specified")
			case p.Port.Type != intstr.Int:
				errs.add(pp+".endPort", "may not be specified when port is a named port (%q)", p.Port.StrVal)
			case end < p.Port.IntVal:
				errs.add(pp+".endPort", "must be greater than or equal to port (%d), got %d", p.Port.IntVal, end)
			default:
				errs.addAll(pp+".endPort", validation.IsValidPortNum(int(end)))
			}
		}
	}
}

func validatePeers(errs *FieldErrors, path string, peers []networkingv1.NetworkPolicyPeer) {
	for i, peer := range peers {
		pp := fmt.Sprintf("%s[%d]", path, i)
		selectors := peer.PodSelector != nil || peer.NamespaceSelector != nil
		switch {
		case !selectors && peer.IPBlock == nil:
			errs.add(pp, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
		case selectors && peer.IPBlock != nil:
			errs.add(pp, "may not specify both ipBlock and another peer")
		}
		validateSelector(errs, pp+".podSelector", peer.PodSelector)
		validateSelector(errs, pp+".namespaceSelector", peer.NamespaceSelector)
		if b := peer.IPBlock; b != nil {
			validateIPBlock(errs, pp+".ipBlock", b)
		}
	}
}

// ParseCIDR parses an ipBlock cidr the way policy uses it: host bits are
// allowed and cleared ("10.0.0.1/8" is 10.0.0.0/8), the address must be in
// canonical form, IPv4-mapped IPv6 prefixes stay IPv6.
func ParseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return p.Masked(), nil
}

func validateIPBlock(errs *FieldErrors, path string, b *networkingv1.IPBlock) {
	if b.CIDR == "" {
		errs.add(path+".cidr", "required")
		return
	}
	cidr, err := ParseCIDR(b.CIDR)
	if err != nil {
		errs.add(path+".cidr", "invalid CIDR %q: %v", b.CIDR, err)
		return
	}
	for i, e := range b.Except {
		ep := fmt.Sprintf("%s.except[%d]", path, i)
		ex, err := ParseCIDR(e)
		if err != nil {
			errs.add(ep, "invalid CIDR %q: %v", e, err)
			continue
		}
		if ex.Addr().Is4() != cidr.Addr().Is4() || ex.Bits() <= cidr.Bits() || !cidr.Contains(ex.Addr()) {
			errs.add(ep, "%s must be a strict subset of cidr %s", e, b.CIDR)
		}
	}
}
