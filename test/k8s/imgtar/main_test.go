package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// readTar returns the regular files of a tarball by name, and its symlinks.
func readTar(t *testing.T, r io.Reader) (files map[string][]byte, links map[string]string) {
	t.Helper()
	files, links = map[string][]byte{}, map[string]string{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files, links
		}
		if err != nil {
			t.Fatal(err)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = b
		case tar.TypeSymlink:
			links[h.Name] = h.Linkname
		}
	}
}

// The archive is what `ctr images import` and `docker load` expect: a
// manifest naming the tags, a config whose diff_id is the layer's digest,
// and a layer holding the tree (files, modes, symlinks).
func TestWriteDockerArchive(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "tool"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("tool", filepath.Join(root, "bin", "alias")); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "img.tar")
	tags := []string{"registry.k8s.io/pause:3.10.2", "registry.k8s.io/pause:3.10"}
	if err := write(root, out, tags, `["/bin/tool"]`, `["x"]`); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files, _ := readTar(t, f)

	var manifest []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 || len(manifest[0].Layers) != 1 {
		t.Fatalf("manifest: %+v", manifest)
	}
	m := manifest[0]
	if len(m.RepoTags) != 2 || m.RepoTags[0] != tags[0] || m.RepoTags[1] != tags[1] {
		t.Errorf("RepoTags %v, want %v", m.RepoTags, tags)
	}
	var config struct {
		OS, Architecture string
		Config           struct{ Entrypoint, Cmd []string }
		RootFS           struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(files[m.Config], &config); err != nil {
		t.Fatalf("config %s: %v", m.Config, err)
	}
	sum := sha256.Sum256(files[m.Config])
	if m.Config != hex.EncodeToString(sum[:])+".json" {
		t.Errorf("config named %s, not by its digest", m.Config)
	}
	layer := files[m.Layers[0]]
	sum = sha256.Sum256(layer)
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("diff_ids %v, layer digest sha256:%x", config.RootFS.DiffIDs, sum)
	}
	if config.OS != "linux" || len(config.Config.Entrypoint) != 1 || config.Config.Entrypoint[0] != "/bin/tool" ||
		len(config.Config.Cmd) != 1 || config.Config.Cmd[0] != "x" {
		t.Errorf("config %+v", config)
	}

	lfiles, llinks := readTar(t, bytes.NewReader(layer))
	if string(lfiles["bin/tool"]) != "#!/bin/sh\n" {
		t.Errorf("layer bin/tool = %q", lfiles["bin/tool"])
	}
	if llinks["bin/alias"] != "tool" {
		t.Errorf("layer bin/alias -> %q, want tool", llinks["bin/alias"])
	}
}
