package manifest

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Limits of spec.sessionAffinityConfig.clientIP.timeoutSeconds: the API
// server's maximum (one day) and the default it fills in (three hours).
const (
	MaxAffinityTimeout     = 86400
	DefaultAffinityTimeout = 10800
)

// validateService checks the fields the Service load balancer reads, the
// way the API server's validation does (pkg/apis/core/validation
// ValidateService), for what the API server would refuse to store.
func validateService(errs *FieldErrors, svc *corev1.Service) {
	spec := &svc.Spec
	switch spec.Type {
	case "", corev1.ServiceTypeClusterIP, corev1.ServiceTypeNodePort, corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeExternalName:
	default:
		errs.add("spec.type", "unsupported value %q (want ClusterIP, NodePort, LoadBalancer or ExternalName)", spec.Type)
	}
	headless := spec.ClusterIP == corev1.ClusterIPNone
	if spec.Type != corev1.ServiceTypeExternalName && !headless && len(spec.Ports) == 0 {
		errs.add("spec.ports", "required")
	}
	if headless && (spec.Type == corev1.ServiceTypeNodePort || spec.Type == corev1.ServiceTypeLoadBalancer) {
		errs.add("spec.clusterIP", "may not be None for type %s", spec.Type)
	}
	validServiceIP := func(path, s string) {
		if s == "" || s == corev1.ClusterIPNone {
			return
		}
		if _, err := netip.ParseAddr(s); err != nil {
			errs.add(path, "invalid IP address %q", s)
		}
	}
	validServiceIP("spec.clusterIP", spec.ClusterIP)
	for i, ip := range spec.ClusterIPs {
		validServiceIP(fmt.Sprintf("spec.clusterIPs[%d]", i), ip)
	}
	if spec.ClusterIP != "" && len(spec.ClusterIPs) > 0 && spec.ClusterIPs[0] != spec.ClusterIP {
		errs.add("spec.clusterIPs[0]", "must match spec.clusterIP %q", spec.ClusterIP)
	}
	for i, ip := range spec.ExternalIPs {
		p := fmt.Sprintf("spec.externalIPs[%d]", i)
		if ip == "" || ip == corev1.ClusterIPNone {
			errs.add(p, "invalid IP address %q", ip)
		} else {
			validServiceIP(p, ip)
		}
	}
	for i, ing := range svc.Status.LoadBalancer.Ingress {
		if ing.IP != "" {
			p := fmt.Sprintf("status.loadBalancer.ingress[%d].ip", i)
			if _, err := netip.ParseAddr(ing.IP); err != nil {
				errs.add(p, "invalid IP address %q", ing.IP)
			}
		}
	}
	nodePorts := spec.Type == corev1.ServiceTypeNodePort || spec.Type == corev1.ServiceTypeLoadBalancer
	names := map[string]bool{}
	type portProto struct {
		port  int32
		proto corev1.Protocol
	}
	seen := map[portProto]bool{}
	seenNode := map[portProto]bool{}
	for i, p := range spec.Ports {
		pp := fmt.Sprintf("spec.ports[%d]", i)
		if len(spec.Ports) > 1 && p.Name == "" {
			errs.add(pp+".name", "required when there is more than one port")
		}
		if p.Name != "" {
			errs.addAll(pp+".name", validation.IsDNS1123Label(p.Name))
			if names[p.Name] {
				errs.add(pp+".name", "duplicate port name %q", p.Name)
			}
			names[p.Name] = true
		}
		errs.addAll(pp+".port", validation.IsValidPortNum(int(p.Port)))
		validateProtocol(errs, pp+".protocol", p.Protocol)
		proto := p.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		if seen[portProto{p.Port, proto}] {
			errs.add(pp, "duplicate port %d/%s", p.Port, proto)
		}
		seen[portProto{p.Port, proto}] = true
		switch p.TargetPort.Type {
		case intstr.Int:
			if p.TargetPort.IntVal != 0 {
				errs.addAll(pp+".targetPort", validation.IsValidPortNum(int(p.TargetPort.IntVal)))
			}
		case intstr.String:
			if p.TargetPort.StrVal != "" {
				errs.addAll(pp+".targetPort", validation.IsValidPortName(p.TargetPort.StrVal))
			}
		}
		if p.NodePort != 0 {
			if !nodePorts {
				errs.add(pp+".nodePort", "may not be used when type is %q", svcType(spec.Type))
			}
			errs.addAll(pp+".nodePort", validation.IsValidPortNum(int(p.NodePort)))
			if seenNode[portProto{p.NodePort, proto}] {
				errs.add(pp+".nodePort", "duplicate nodePort %d/%s", p.NodePort, proto)
			}
			seenNode[portProto{p.NodePort, proto}] = true
		}
	}
	switch spec.SessionAffinity {
	case "", corev1.ServiceAffinityNone:
		if spec.SessionAffinityConfig != nil {
			errs.add("spec.sessionAffinityConfig", "must not be set when sessionAffinity is %q", corev1.ServiceAffinityNone)
		}
	case corev1.ServiceAffinityClientIP:
		if c := spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			if t := *c.ClientIP.TimeoutSeconds; t <= 0 || t > MaxAffinityTimeout {
				errs.add("spec.sessionAffinityConfig.clientIP.timeoutSeconds", "must be in 1..%d, got %d", MaxAffinityTimeout, t)
			}
		}
	default:
		errs.add("spec.sessionAffinity", "unsupported value %q (want None or ClientIP)", spec.SessionAffinity)
	}
	switch spec.ExternalTrafficPolicy {
	case "", corev1.ServiceExternalTrafficPolicyCluster:
	case corev1.ServiceExternalTrafficPolicyLocal:
		if !nodePorts && len(spec.ExternalIPs) == 0 {
			errs.add("spec.externalTrafficPolicy", "may only be set for externally-accessible services")
		}
	default:
		errs.add("spec.externalTrafficPolicy", "unsupported value %q (want Cluster or Local)", spec.ExternalTrafficPolicy)
	}
	if p := spec.InternalTrafficPolicy; p != nil {
		switch *p {
		case corev1.ServiceInternalTrafficPolicyCluster, corev1.ServiceInternalTrafficPolicyLocal:
		default:
			errs.add("spec.internalTrafficPolicy", "unsupported value %q (want Cluster or Local)", *p)
		}
	}
}

func svcType(t corev1.ServiceType) corev1.ServiceType {
	if t == "" {
		return corev1.ServiceTypeClusterIP
	}
	return t
}

// validateEndpointSlice checks an EndpointSlice as the API server does
// (pkg/apis/discovery/validation) for the fields the load balancer reads.
func validateEndpointSlice(errs *FieldErrors, es *discoveryv1.EndpointSlice) {
	switch es.AddressType {
	case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6, discoveryv1.AddressTypeFQDN:
	case "":
		errs.add("addressType", "required")
	default:
		errs.add("addressType", "unsupported value %q (want IPv4, IPv6 or FQDN)", es.AddressType)
	}
	for i, ep := range es.Endpoints {
		p := fmt.Sprintf("endpoints[%d]", i)
		if len(ep.Addresses) == 0 || len(ep.Addresses) > 100 {
			errs.add(p+".addresses", "must have 1 to 100 addresses, got %d", len(ep.Addresses))
		}
		for j, a := range ep.Addresses {
			ap := fmt.Sprintf("%s.addresses[%d]", p, j)
			switch es.AddressType {
			case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6:
				ip, err := netip.ParseAddr(a)
				if err != nil || ip.Is4() != (es.AddressType == discoveryv1.AddressTypeIPv4) || ip.Zone() != "" {
					errs.add(ap, "must be a valid %s address, got %q", es.AddressType, a)
				}
			case discoveryv1.AddressTypeFQDN:
				errs.addAll(ap, validation.IsDNS1123Subdomain(a))
			}
		}
		if ep.NodeName != nil {
			errs.addAll(p+".nodeName", validation.IsDNS1123Subdomain(*ep.NodeName))
		}
	}
	names := map[string]bool{}
	for i, port := range es.Ports {
		p := fmt.Sprintf("ports[%d]", i)
		if port.Name != nil && *port.Name != "" {
			errs.addAll(p+".name", validation.IsDNS1123Label(*port.Name))
		}
		name := ""
		if port.Name != nil {
			name = *port.Name
		}
		if names[name] {
			errs.add(p+".name", "duplicate port name %q", name)
		}
		names[name] = true
		if port.Port != nil {
			errs.addAll(p+".port", validation.IsValidPortNum(int(*port.Port)))
		}
		if port.Protocol != nil {
			validateProtocol(errs, p+".protocol", *port.Protocol)
		}
	}
}
