package cni

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

func TestRuntimeConfig(t *testing.T) {
	rc, err := parseRuntimeConfig([]byte(`{"runtimeConfig": {"mac": "c2:11:22:33:44:55", "portMappings": [], "bandwidth": {"ingressRate": 1000, "ingressBurst": 100}}}`))
	if err != nil || rc.Mac != "c2:11:22:33:44:55" || rc.Bandwidth.IngressRate != 1000 {
		t.Fatalf("%+v, %v", rc, err)
	}
	if rc, err := parseRuntimeConfig([]byte(`{"type": "tern"}`)); err != nil || rc.Mac != "" || rc.Bandwidth != nil {
		t.Errorf("no runtimeConfig: %+v, %v", rc, err)
	}
	for _, mac := range []string{"01:00:5e:00:00:01", "00:00:00:00:00:00", "zz", "c2:11:22:33:44:55:66:77"} {
		_, err := parseRuntimeConfig([]byte(`{"runtimeConfig": {"mac": "` + mac + `"}}`))
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != "runtimeConfig.mac" {
			t.Errorf("mac %q: %v, want a config error naming runtimeConfig.mac", mac, err)
		}
	}

	limited := &runtimeConfig{Bandwidth: &bandwidthLimits{EgressRate: 1e6, EgressBurst: 1e5}}
	err = limited.checkDatapath(DatapathEBPF)
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrUnsupportedField || !strings.Contains(te.Msg, "bandwidth") {
		t.Errorf("bandwidth on eBPF: %v", err)
	}
	if err := limited.checkDatapath(DatapathIPTables); err != nil {
		t.Errorf("bandwidth on iptables: %v", err)
	}
	if err := (&runtimeConfig{Bandwidth: &bandwidthLimits{}}).checkDatapath(DatapathEBPF); err != nil {
		t.Errorf("zero limits on eBPF: %v", err)
	}
}
