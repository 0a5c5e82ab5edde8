package reference_test

import (
	"net"
	"strings"
	"testing"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/reference"
)

// The cluster every row runs in. Namespace "other" has no Namespace object;
// the endpoint other/ghost has no Pod object; prod/far lives on another
// node.
const cluster = `
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod, team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: web, labels: {app: web, tier: fe}}
spec:
  containers:
  - name: main
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: db, labels: {app: db}}
spec:
  containers:
  - name: main
    ports:
    - {name: diam, containerPort: 3868, protocol: SCTP}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: api, labels: {app: api, tier: be}}
spec:
  containers: [{name: main}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: dev, name: web, labels: {app: web}}
spec:
  containers:
  - name: main
    ports: [{name: http, containerPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: dev, name: client, labels: {app: client}}
spec:
  containers: [{name: main}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: far, labels: {app: web}}
spec:
  containers:
  - name: main
    ports: [{name: http, containerPort: 8080}]
`

var endpoints = map[string]policy.Endpoint{
	"10.244.1.10": {Namespace: "prod", Name: "web", Local: true},
	"10.244.1.11": {Namespace: "prod", Name: "db", Local: true},
	"10.244.1.12": {Namespace: "prod", Name: "api", Local: true},
	"10.244.1.20": {Namespace: "dev", Name: "web", Local: true},
	"10.244.1.21": {Namespace: "dev", Name: "client", Local: true},
	"10.244.1.30": {Namespace: "other", Name: "ghost", Local: true},
	"10.244.2.5":  {Namespace: "prod", Name: "far", Local: false},
}

var names = map[string]string{
	"prod/web":    "10.244.1.10",
	"prod/db":     "10.244.1.11",
	"prod/api":    "10.244.1.12",
	"dev/web":     "10.244.1.20",
	"dev/client":  "10.244.1.21",
	"other/ghost": "10.244.1.30",
	"prod/far":    "10.244.2.5",
	"host":        "10.244.1.1", // the node: gateway address
	"node":        "172.18.0.2", // the node: its own address
	"ext":         "192.0.2.10",
	"ext2":        "198.51.100.1",
}

const (
	tcp  = policy.ProtoTCP
	udp  = policy.ProtoUDP
	sctp = policy.ProtoSCTP
	icmp = 1
)

// np writes a NetworkPolicy manifest: the body is the YAML of spec.
func np(ns, name, spec string) string {
	var b strings.Builder
	b.WriteString("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: " + ns + ", name: " + name + "}\nspec:\n")
	for _, l := range strings.Split(strings.Trim(spec, "\n"), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

type row struct {
	name     string
	policies string
	src, dst string // keys of names
	proto    uint8
	port     uint16
	want     bool
}

var rows = []row{
	// Without policies everything passes.
	{"no policy", "", "prod/web", "prod/db", tcp, 5432, true},

	// Isolation and policyTypes.
	// A policy with no rules and no policyTypes isolates ingress (Ingress is always a default type).
	{"ingress isolated by default type", np("prod", "p", "podSelector: {}"), "prod/web", "prod/db", tcp, 1, false},
	// ingress: [] allows nothing.
	{"empty ingress list allows none", np("prod", "p", "podSelector: {}\ningress: []"), "prod/web", "prod/db", tcp, 1, false},
	// ingress: [{}] allows everything: a rule with absent from and ports.
	{"ingress [{}] allows all", np("prod", "p", "podSelector: {}\ningress: [{}]"), "ext", "prod/db", udp, 9, true},
	// A pod the podSelector does not select is not isolated.
	{"unselected pod not isolated", np("prod", "p", "podSelector: {matchLabels: {app: web}}"), "prod/web", "prod/db", tcp, 1, true},
	// A policy of another namespace never selects this namespace's pods.
	{"policy of other namespace", np("dev", "p", "podSelector: {}"), "dev/client", "prod/db", tcp, 1, true},
	// Ingress-only policy: egress of the selected pod stays open.
	{"ingress policy leaves egress open", np("prod", "p", "podSelector: {}"), "prod/web", "ext", tcp, 443, true},
	// policyTypes [Egress] with no egress rules: egress isolated, allows none.
	{"egress isolated, none allowed", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]"), "prod/web", "ext", tcp, 443, false},
	// ... while ingress of the same pods stays open.
	{"egress-only policy leaves ingress open", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]"), "dev/client", "prod/web", tcp, 8080, true},
	// Egress defaults on when egress rules are present.
	{"egress type defaulted from rules", np("prod", "p", "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 198.51.100.0/24}}]}]"), "prod/web", "ext", tcp, 443, false},
	{"egress type defaulted from rules, allowed peer", np("prod", "p", "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 198.51.100.0/24}}]}]"), "prod/web", "ext2", tcp, 443, true},
	// Explicit policyTypes [Ingress]: egress rules are ignored, egress not isolated.
	{"egress rules ignored without Egress type", np("prod", "p", "podSelector: {}\npolicyTypes: [Ingress]\ningress: [{}]\negress: []"), "prod/web", "ext", tcp, 443, true},
	// Allowed traffic is the union of the rules of all selecting policies.
	{"union of policies (first)", np("prod", "a", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}]}]") + np("prod", "b", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 198.51.100.0/24}}]}]"), "ext", "prod/db", tcp, 1, true},
	{"union of policies (second)", np("prod", "a", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}]}]") + np("prod", "b", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 198.51.100.0/24}}]}]"), "ext2", "prod/db", tcp, 1, true},
	// Egress and ingress must both allow: egress open, ingress closed.
	{"both directions must allow", np("prod", "e", "podSelector: {matchLabels: {app: web}}\npolicyTypes: [Egress]\negress: [{}]") + np("prod", "i", "podSelector: {matchLabels: {app: db}}"), "prod/web", "prod/db", tcp, 1, false},

	// Peers.
	// podSelector alone: pods of the policy's namespace only.
	{"podSelector alone, same namespace", np("prod", "p", "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]"), "prod/web", "prod/db", tcp, 1, true},
	{"podSelector alone, other namespace", np("prod", "p", "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]"), "dev/web", "prod/db", tcp, 1, false},
	// namespaceSelector alone: every pod of the matching namespaces.
	{"namespaceSelector alone", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}]}]"), "dev/client", "prod/db", tcp, 1, true},
	{"namespaceSelector alone, not matching", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}]}]"), "prod/web", "prod/db", tcp, 1, false},
	// Both in one peer: pods matching podSelector in namespaces matching namespaceSelector (AND).
	{"pod and namespace selector AND, match", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: web}}}]}]"), "dev/web", "prod/db", tcp, 1, true},
	{"pod and namespace selector AND, wrong pod", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: web}}}]}]"), "dev/client", "prod/db", tcp, 1, false},
	{"pod and namespace selector AND, wrong namespace", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: web}}}]}]"), "prod/web", "prod/db", tcp, 1, false},
	// The same selectors as two peers are an OR.
	{"two peers OR", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}, {podSelector: {matchLabels: {app: web}}}]}]"), "dev/client", "prod/db", tcp, 1, true},
	// An empty namespaceSelector selects all namespaces, even one without a Namespace object.
	{"empty namespaceSelector is every namespace", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {}}]}]"), "other/ghost", "prod/db", tcp, 1, true},
	// Selectors never match addresses that are not pods.
	{"empty namespaceSelector is not the world", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {}}]}]"), "ext", "prod/db", tcp, 1, false},
	// Namespaces carry kubernetes.io/metadata.name; one without an object has only that label.
	{"metadata.name label", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}}]}]"), "other/ghost", "prod/db", tcp, 1, true},
	{"namespace without object has no other label", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchExpressions: [{key: env, operator: Exists}]}}]}]"), "other/ghost", "prod/db", tcp, 1, false},
	// A pod without a Pod object has no labels: podSelector {} in its namespace matches it, a label does not.
	{"pod without object, empty podSelector", np("other", "p", "podSelector: {}\ningress: [{from: [{podSelector: {}}]}]"), "other/ghost", "other/ghost", tcp, 1, true},
	{"pod without object has no labels", np("prod", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]}]"), "other/ghost", "prod/db", tcp, 1, false},
	// matchExpressions operators.
	{"matchExpressions In", np("prod", "p", "podSelector: {matchExpressions: [{key: app, operator: In, values: [db, api]}]}"), "prod/web", "prod/db", tcp, 1, false},
	{"matchExpressions In, not selected", np("prod", "p", "podSelector: {matchExpressions: [{key: app, operator: In, values: [db, api]}]}"), "prod/db", "prod/web", tcp, 8080, true},
	{"matchExpressions NotIn", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}]}]"), "prod/api", "prod/db", tcp, 1, true},
	{"matchExpressions NotIn, excluded", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}]}]"), "prod/web", "prod/db", tcp, 1, false},
	{"matchExpressions Exists", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}]}]"), "prod/api", "prod/db", tcp, 1, true},
	{"matchExpressions Exists, missing key", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchExpressions: [{key: tier, operator: Exists}]}}]}]"), "prod/db", "prod/web", tcp, 1, false},
	{"matchExpressions DoesNotExist", np("prod", "p", "podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}"), "prod/web", "prod/db", tcp, 1, false},
	{"matchExpressions DoesNotExist, key present", np("prod", "p", "podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}"), "prod/db", "prod/api", tcp, 1, true},
	// matchLabels and matchExpressions together are ANDed.
	{"matchLabels AND matchExpressions", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [be]}]}}]}]"), "prod/web", "prod/db", tcp, 1, false},

	// ipBlock.
	{"ipBlock allows external", np("prod", "p", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24}}]}]"), "ext", "prod/db", tcp, 1, true},
	// except narrows the block: an address in it is not allowed by this peer.
	{"ipBlock except", np("prod", "p", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.8/29]}}]}]"), "ext", "prod/db", tcp, 1, false},
	// except is not a deny: another peer still allows the address.
	{"except is not a deny", np("prod", "p", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.8/29]}}, {ipBlock: {cidr: 192.0.2.10/32}}]}]"), "ext", "prod/db", tcp, 1, true},
	// ... nor does it narrow another policy.
	{"except does not narrow another policy", np("prod", "a", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.8/29]}}]}]") + np("prod", "b", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}}]}]"), "ext", "prod/db", tcp, 1, true},
	// ipBlock matches pod IPs too (our choice).
	{"ipBlock matches pod IPs", np("prod", "p", "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{ipBlock: {cidr: 10.244.1.16/28}}]}]"), "dev/web", "prod/db", tcp, 1, true},
	{"ipBlock except on a pod IP", np("prod", "p", "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{ipBlock: {cidr: 10.244.1.0/24, except: [10.244.1.20/32]}}]}]"), "dev/web", "prod/db", tcp, 1, false},
	// An IPv6 block never matches IPv4.
	{"IPv6 ipBlock", np("prod", "p", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: '::/0'}}]}]"), "ext", "prod/db", tcp, 1, false},

	// Ports and protocols.
	{"port number", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 5432}]}]"), "prod/web", "prod/db", tcp, 5432, true},
	{"other port", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 5432}]}]"), "prod/web", "prod/db", tcp, 5433, false},
	// The protocol defaults to TCP.
	{"protocol defaults to TCP", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 5432}]}]"), "prod/web", "prod/db", udp, 5432, false},
	{"UDP", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: UDP, port: 53}]}]"), "prod/web", "prod/db", udp, 53, true},
	{"SCTP", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: SCTP, port: 3868}]}]"), "prod/web", "prod/db", sctp, 3868, true},
	// A protocol without a port: every port of that protocol.
	{"protocol without port", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: UDP}]}]"), "prod/web", "prod/db", udp, 40000, true},
	// endPort: an inclusive range.
	{"endPort low edge", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 1000, endPort: 1100}]}]"), "prod/web", "prod/db", tcp, 1000, true},
	{"endPort high edge", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 1000, endPort: 1100}]}]"), "prod/web", "prod/db", tcp, 1100, true},
	{"endPort past the range", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 1000, endPort: 1100}]}]"), "prod/web", "prod/db", tcp, 1101, false},
	{"endPort before the range", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: 1000, endPort: 1100}]}]"), "prod/web", "prod/db", tcp, 999, false},
	// Empty ports: every port and protocol, ICMP included.
	{"empty ports allow every protocol", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {}}]}]"), "prod/web", "prod/db", icmp, 0, true},
	// With ports, protocols without ports are not allowed.
	{"ports exclude ICMP", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: TCP}]}]"), "prod/web", "prod/db", icmp, 0, false},
	// Peers and ports of different rules do not combine.
	{"rules do not mix", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 1}]}, {from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 2}]}]"), "prod/web", "prod/db", tcp, 2, false},

	// Named ports.
	// Ingress: resolved on the destination (selected) pod: prod/web's http is 8080.
	{"named port ingress", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: http}]}]"), "dev/client", "prod/web", tcp, 8080, true},
	{"named port ingress, other number", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: http}]}]"), "dev/client", "prod/web", tcp, 80, false},
	// The destination has no port of that name.
	{"named port missing on destination", np("prod", "p", "podSelector: {}\ningress: [{ports: [{port: http}]}]"), "dev/client", "prod/api", tcp, 8080, false},
	// The named port's protocol must match the rule's.
	{"named port protocol mismatch", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: UDP, port: http}]}]"), "dev/client", "prod/web", udp, 8080, false},
	{"named port UDP", np("prod", "p", "podSelector: {}\ningress: [{ports: [{protocol: UDP, port: dns}]}]"), "dev/client", "prod/web", udp, 53, true},
	// Egress: resolved on the destination, the remote pod: dev/web's http is 80, prod/web's is 8080.
	{"named port egress", np("dev", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}]}]"), "dev/client", "dev/web", tcp, 80, true},
	{"named port egress, number of another pod", np("dev", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}]}]"), "dev/client", "prod/web", tcp, 80, false},
	{"named port egress to a remote-node pod", np("dev", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}]}]"), "dev/client", "prod/far", tcp, 8080, true},
	// A named port never matches a destination that is not a pod.
	{"named port egress to non-pod", np("dev", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}]}]"), "dev/client", "ext", tcp, 80, false},
	// A pod without a Pod object has no named ports.
	{"named port on pod without object", np("dev", "p", "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\negress: [{ports: [{port: http}]}]"), "dev/client", "other/ghost", tcp, 80, false},

	// Host, nodes, self.
	// The node's own addresses always reach local pods.
	{"host to pod always allowed", np("prod", "p", "podSelector: {}\ningress: []"), "host", "prod/db", tcp, 1, true},
	{"node IP to pod always allowed", np("prod", "p", "podSelector: {}"), "node", "prod/db", udp, 1, true},
	// A pod's traffic to its node is always allowed too, egress isolation or not.
	{"pod to node IP always allowed", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]"), "prod/web", "node", tcp, 10250, true},
	{"pod to gateway always allowed", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]\negress: []"), "prod/web", "host", udp, 53, true},
	{"pod to host, ipBlock excluding it", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]\negress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [172.18.0.0/16]}}], ports: [{port: 1}]}]"), "prod/web", "node", sctp, 9, true},
	{"pod to host by ipBlock", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]\negress: [{to: [{ipBlock: {cidr: 172.18.0.0/16}}]}]"), "prod/web", "node", tcp, 10250, true},
	// Only the node's own addresses: a neighbour of the node is not a host.
	{"pod to non-host neighbour is egress", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]"), "prod/web", "ext", tcp, 10250, false},
	// Policy of a pod on another node is enforced there, not here.
	{"remote-node destination not enforced here", np("prod", "p", "podSelector: {}"), "dev/client", "prod/far", tcp, 8080, true},
	{"remote-node source egress not enforced here", np("prod", "p", "podSelector: {}\npolicyTypes: [Egress]"), "prod/far", "dev/client", tcp, 1, true},
	// Pods on other nodes still are pods for selectors.
	{"remote-node pod matches selectors", np("dev", "p", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}]}]"), "prod/far", "dev/client", tcp, 1, true},
	// A pod cannot block access to itself (Kubernetes; the upstream netpol
	// e2e allows it in every case): traffic to itself, also through its
	// own Service, passes whatever its policy.
	{"self under deny-all ingress", np("prod", "p", "podSelector: {}"), "prod/web", "prod/web", tcp, 8080, true},
	{"self under deny-all both ways", np("prod", "p", "podSelector: {}\npolicyTypes: [Ingress, Egress]"), "prod/web", "prod/web", udp, 53, true},
	{"self allowed by selector", np("prod", "p", "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]"), "prod/web", "prod/web", tcp, 8080, true},
	// Traffic between two non-endpoints is none of our business.
	{"external to external", np("prod", "p", "podSelector: {}"), "ext", "ext2", tcp, 1, true},
}

func TestAllowed(t *testing.T) {
	topo := &policy.Topology{Endpoints: endpoints, Hosts: []net.IP{net.ParseIP(names["host"]), net.ParseIP(names["node"])}}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			objs, err := manifest.Decode(strings.NewReader(cluster + r.policies))
			if err != nil {
				t.Fatal(err)
			}
			st, err := manifest.NewState().Apply(objs)
			if err != nil {
				t.Fatal(err)
			}
			src, dst := names[r.src], names[r.dst]
			if src == "" || dst == "" {
				t.Fatalf("unknown name in %q -> %q", r.src, r.dst)
			}
			pkt := policy.Packet{SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst), Proto: r.proto, DstPort: r.port}
			d := reference.Decide(st, topo, pkt)
			if d.Allowed != r.want {
				t.Errorf("reference: %s -> %s: got %v, want %v (%s)", r.src, r.dst, d.Allowed, r.want, d.Reason)
			}
			// The compiled form must agree on every row too.
			rs, err := compile.Compile(st, topo, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := compile.Simulate(rs, pkt); got != r.want {
				t.Errorf("compiled: %s -> %s: got %v, want %v", r.src, r.dst, got, r.want)
			}
		})
	}
}
