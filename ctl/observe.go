package ctl

import (
	"io"

	"github.com/ternlabs/tern/cni"
)

// observe runs monitor and explain: the verbs that show what the datapath
// does with packets.
func observe(confPath string, rest []string, output string, stdout, stderr io.Writer) error {
	conf, err := loadConf(confPath)
	if err != nil {
		return err
	}
	if rest[0] == "monitor" {
		return monitor(conf, rest[1:], output, stdout, stderr)
	}
	return explain(conf, rest[1:], output, stdout, stderr)
}

// loadConf loads the network configuration of --cni-conf, or without it
// the first conflist with a tern plugin in the default CNI conf dir.
func loadConf(confPath string) (*cni.NetConf, error) {
	if confPath == "" {
		p, err := cni.FindConfFile(cni.DefaultConfDir)
		if err != nil {
			return nil, err
		}
		confPath = p
	}
	return cni.LoadConfFile(confPath)
}
