package datapath

import "github.com/ternlabs/tern/services"

// ServiceBalancer is a datapath that load-balances Kubernetes Services
// itself (network config services: "ebpf").
type ServiceBalancer interface {
	// ApplyServices moves the datapath's Service tables from prev (nil:
	// none applied yet) to next by difference: frontends and backends
	// that stay are not touched, so established flows to surviving
	// backends are never disturbed. On error the datapath must keep
	// balancing as prev says.
	ApplyServices(prev, next *services.Table) error
}
