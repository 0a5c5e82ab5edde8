package agent

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	cilium "github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
)

// metrics are ternd's Prometheus metrics, named tern_<subsystem>_<name>_<unit>.
// Labels carry reasons, resources and map names, never pod names.
type metrics struct {
	reg          *prometheus.Registry
	applySeconds prometheus.Histogram
	syncs        *prometheus.CounterVec
	endpoints    prometheus.Gauge
	resyncs      *prometheus.CounterVec
	events       *prometheus.CounterVec
	collected    prometheus.Counter
	appliedRV    *prometheus.GaugeVec
}

func newMetrics(bpffsDir string, log *slog.Logger) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tern_policy_apply_duration_seconds",
			Help:    "Time to compile the desired state and apply the difference to the datapath.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_agent_syncs_total",
			Help: "Datapath syncs by result (ok, error).",
		}, []string{"result"}),
		endpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tern_agent_endpoints",
			Help: "Pod endpoints of this node's network at the last sync.",
		}),
		resyncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_agent_informer_resyncs_total",
			Help: "Periodic informer resync notifications by resource.",
		}, []string{"resource"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_agent_informer_events_total",
			Help: "Informer add, update and delete notifications by resource.",
		}, []string{"resource"}),
		collected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tern_agent_endpoints_collected_total",
			Help: "Endpoints removed because their pod is gone (CNI DEL never came).",
		}),
		appliedRV: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tern_agent_applied_resource_version",
			Help: "Highest resourceVersion (etcd revision) of the resource's changes that the last successful sync applied to the datapath: every change of that resource up to it is in force.",
		}, []string{"resource"}),
	}
	m.reg.MustRegister(m.applySeconds, m.syncs, m.endpoints, m.resyncs, m.events, m.collected, m.appliedRV)
	if bpffsDir != "" {
		m.reg.MustRegister(&datapathCollector{dir: bpffsDir, log: log})
	}
	return m
}

// datapathCollector reads the eBPF datapath's pinned maps at scrape time:
// the per-CPU counters, summed, and the occupancy of every map.
type datapathCollector struct {
	dir string
	log *slog.Logger
}

var (
	dropPacketsDesc = prometheus.NewDesc("tern_datapath_dropped_packets_total",
		"Packets the eBPF datapath dropped, by reason.", []string{"reason"}, nil)
	dropBytesDesc = prometheus.NewDesc("tern_datapath_dropped_bytes_total",
		"Bytes the eBPF datapath dropped, by reason.", []string{"reason"}, nil)
	fwdPacketsDesc = prometheus.NewDesc("tern_datapath_forwarded_packets_total",
		"Packets the eBPF datapath forwarded or passed on, by path (redirect_peer, pass_host, snat, ...).", []string{"path"}, nil)
	fwdBytesDesc = prometheus.NewDesc("tern_datapath_forwarded_bytes_total",
		"Bytes the eBPF datapath forwarded or passed on, by path.", []string{"path"}, nil)
	mapEntriesDesc = prometheus.NewDesc("tern_datapath_map_entries",
		"Entries in a pinned BPF map (hash and LPM maps; arrays count as full).", []string{"map"}, nil)
	mapCapacityDesc = prometheus.NewDesc("tern_datapath_map_capacity_entries",
		"Maximum entries of a pinned BPF map.", []string{"map"}, nil)
)

func (c *datapathCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dropPacketsDesc, dropBytesDesc, fwdPacketsDesc, fwdBytesDesc, mapEntriesDesc, mapCapacityDesc} {
		ch <- d
	}
}

func (c *datapathCollector) Collect(ch chan<- prometheus.Metric) {
	mapsDir := filepath.Join(c.dir, "maps")
	if m, err := cilium.LoadPinnedMap(filepath.Join(mapsDir, "tern_metrics"), &cilium.LoadPinOptions{ReadOnly: true}); err == nil {
		vals, err := ebpfdp.ReadMetrics(m)
		m.Close()
		if err != nil {
			c.log.Warn("read datapath counters", "err", err)
		}
		for name, v := range vals {
			if reason, ok := strings.CutPrefix(name, "drop_"); ok {
				ch <- prometheus.MustNewConstMetric(dropPacketsDesc, prometheus.CounterValue, float64(v.Packets), reason)
				ch <- prometheus.MustNewConstMetric(dropBytesDesc, prometheus.CounterValue, float64(v.Bytes), reason)
				continue
			}
			ch <- prometheus.MustNewConstMetric(fwdPacketsDesc, prometheus.CounterValue, float64(v.Packets), name)
			ch <- prometheus.MustNewConstMetric(fwdBytesDesc, prometheus.CounterValue, float64(v.Bytes), name)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		c.log.Warn("open datapath counters", "err", err)
	}
	entries, err := os.ReadDir(mapsDir)
	if err != nil {
		return // no datapath loaded yet (no pod on the node)
	}
	for _, e := range entries {
		m, err := cilium.LoadPinnedMap(filepath.Join(mapsDir, e.Name()), &cilium.LoadPinOptions{ReadOnly: true})
		if err != nil {
			continue
		}
		n, ok := countEntries(m)
		capacity := m.MaxEntries()
		m.Close()
		ch <- prometheus.MustNewConstMetric(mapCapacityDesc, prometheus.GaugeValue, float64(capacity), e.Name())
		if ok {
			ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(n), e.Name())
		}
	}
}

// countEntries counts the keys of a hash or LPM map by walking them (at
// most MaxEntries steps); arrays are always full.
func countEntries(m *cilium.Map) (int, bool) {
	switch m.Type() {
	case cilium.Array, cilium.PerCPUArray:
		return int(m.MaxEntries()), true
	case cilium.Hash, cilium.LRUHash, cilium.PerCPUHash, cilium.LRUCPUHash, cilium.LPMTrie:
	default:
		return 0, false
	}
	var (
		n   int
		key = make([]byte, m.KeySize())
		cur any // nil: first key
	)
	for n <= int(m.MaxEntries()) {
		if err := m.NextKey(cur, &key); err != nil {
			break // ErrKeyNotExist: the end
		}
		n++
		next := append([]byte(nil), key...)
		cur = next
	}
	return n, true
}
