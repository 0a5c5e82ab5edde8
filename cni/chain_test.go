package cni

import (
	"errors"
	"testing"
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

	for _, c := range []struct {
		rc   runtimeConfig
		want bool
	}{
		{runtimeConfig{Bandwidth: &bandwidthLimits{EgressRate: 1e6, EgressBurst: 1e5}}, true},
		{runtimeConfig{Bandwidth: &bandwidthLimits{IngressRate: 1e6}}, true},
		{runtimeConfig{Bandwidth: &bandwidthLimits{}}, false},
		{runtimeConfig{}, false},
	} {
		if got := c.rc.shaped(); got != c.want {
			t.Errorf("shaped(%+v) = %v, want %v", c.rc.Bandwidth, got, c.want)
		}
	}
}

func TestParseConfigChained(t *testing.T) {
	conf, err := ParseConfig([]byte(`{"cniVersion": "1.1.0", "name": "n", "type": "tern", "mode": "chained"}`))
	if err != nil || !conf.chained() || conf.masquerade() || conf.Datapath != DatapathEBPF {
		t.Fatalf("chained without ipam: %+v, %v", conf, err)
	}
	conf, err = ParseConfig([]byte(`{"cniVersion": "1.1.0", "name": "n", "type": "tern", "mode": "chained", "ipMasq": true}`))
	if err != nil || !conf.masquerade() {
		t.Errorf("chained with ipMasq: %v", err)
	}
	conf, err = ParseConfig([]byte(`{"cniVersion": "1.1.0", "name": "n", "type": "tern", "ipam": {"type": "host-local"}}`))
	if err != nil || conf.chained() || conf.Mode != ModeStandalone || !conf.masquerade() {
		t.Errorf("standalone: %+v, %v", conf, err)
	}
	for _, bad := range []struct{ conf, field string }{
		{`{"name": "n", "mode": "chained", "ipam": {"type": "host-local"}}`, "ipam"},
		{`{"name": "n", "mode": "chained", "datapath": "iptables"}`, "mode"},
		{`{"name": "n", "mode": "Chained"}`, "mode"},
		{`{"name": "n"}`, "ipam.type"},
	} {
		_, err := ParseConfig([]byte(bad.conf))
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Field != bad.field {
			t.Errorf("%s: %v, want a config error on %s", bad.conf, err, bad.field)
		}
	}
}
