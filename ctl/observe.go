package ctl

import (
	"io"

	"github.com/ternlabs/tern/cni"
)

// observe runs monitor and explain: the verbs that show what the datapath
// does with packets.
func observe(confPath string, rest []string, output string, stdout, stderr io.Writer) error {
	path := confPath
	if path == "" {
		p, err := cni.FindConfFile(cni.DefaultConfDir)
		if err != nil {
			return err
		}
		path = p
	}
	conf, err := cni.LoadConfFile(path)
	if err != nil {
		return err
	}
	if rest[0] == "monitor" {
		return monitor(conf, rest[1:], output, stdout, stderr)
	}
	return explain(conf, rest[1:], output, stdout, stderr)
}
