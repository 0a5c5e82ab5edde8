// Command imgtar writes a directory as a one-layer container image in the
// docker-archive format (manifest.json, config, layer tar) that
// `ctr images import` and `docker load` read, so the real-node harness gets
// its pause, agnhost and busybox images without a registry or a daemon.
//
//	imgtar -rootfs DIR -o out.tar -tag registry.k8s.io/pause:3.10.2 \
//	       [-tag …] [-entrypoint '["/pause"]'] [-cmd '["pause"]']
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

type tags []string

func (t *tags) String() string     { return strings.Join(*t, ",") }
func (t *tags) Set(v string) error { *t = append(*t, v); return nil }

func main() {
	var (
		rootfs     = flag.String("rootfs", "", "directory that becomes the image's filesystem")
		out        = flag.String("o", "", "output tarball")
		entrypoint = flag.String("entrypoint", "null", "JSON array")
		cmd        = flag.String("cmd", "null", "JSON array")
		names      tags
	)
	flag.Var(&names, "tag", "image reference (repeatable)")
	flag.Parse()
	if *rootfs == "" || *out == "" || len(names) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := write(*rootfs, *out, names, *entrypoint, *cmd); err != nil {
		fmt.Fprintln(os.Stderr, "imgtar:", err)
		os.Exit(1)
	}
}

func write(rootfs, out string, names []string, entrypoint, cmd string) error {
	var ep, cm []string
	if err := json.Unmarshal([]byte(entrypoint), &ep); err != nil {
		return fmt.Errorf("entrypoint: %w", err)
	}
	if err := json.Unmarshal([]byte(cmd), &cm); err != nil {
		return fmt.Errorf("cmd: %w", err)
	}
	var layer bytes.Buffer
	if err := tarDir(rootfs, &layer); err != nil {
		return fmt.Errorf("layer of %s: %w", rootfs, err)
	}
	diffID := digest(layer.Bytes())
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"created":      time.Unix(0, 0).UTC(),
		"config": map[string]any{
			"Entrypoint": ep,
			"Cmd":        cm,
			"Env":        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"WorkingDir": "/",
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + diffID}},
	})
	if err != nil {
		return err
	}
	configName := digest(config) + ".json"
	layerName := diffID + "/layer.tar"
	manifest, err := json.Marshal([]map[string]any{{
		"Config": configName, "RepoTags": names, "Layers": []string{layerName},
	}})
	if err != nil {
		return err
	}

	f, err := os.Create(out)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{{configName, config}, {layerName, layer.Bytes()}, {"manifest.json", manifest}} {
		if err := addFile(tw, e.name, e.data); err != nil {
			f.Close()
			return err
		}
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func addFile(tw *tar.Writer, name string, data []byte) error {
	if dir := filepath.Dir(name); dir != "." {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755}); err != nil {
			return err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data))}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

// tarDir writes root's tree in a stable order, owned by root, with the
// modes and symlinks it has (busybox applets are symlinks).
func tarDir(root string, w io.Writer) error {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(paths)
	tw := tar.NewWriter(w)
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		h.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
		h.ModTime = time.Unix(0, 0)
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
	return tw.Close()
}
