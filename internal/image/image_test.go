package image

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// TestImageRoundTrip writes an image tarball and reads it back as a
// runtime would: the tag, the entrypoint, and each binary, executable,
// under /usr/local/bin; the same input gives the same digest.
func TestImageRoundTrip(t *testing.T) {
	dir := t.TempDir()
	var bins []string
	for _, b := range []string{"ternd", "tern", "ternctl"} {
		p := filepath.Join(dir, b)
		if err := os.WriteFile(p, []byte("binary "+b), 0o755); err != nil {
			t.Fatal(err)
		}
		bins = append(bins, p)
	}
	img, err := Build(bins)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "image.tar")
	const tag = "example.test/tern:v1"
	if err := Write(out, tag, img); err != nil {
		t.Fatal(err)
	}
	ref, _ := name.NewTag(tag)
	back, err := tarball.ImageFromPath(out, &ref)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := back.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != "/usr/local/bin/ternd" || cf.OS != "linux" {
		t.Fatalf("config: %+v", cf.Config)
	}
	files := map[string]string{}
	rc := mutate.Extract(back)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if h.Mode&0o111 == 0 {
				t.Errorf("%s is not executable", h.Name)
			}
			b, _ := io.ReadAll(tr)
			files[h.Name] = string(b)
		}
	}
	for _, b := range []string{"ternd", "tern", "ternctl"} {
		if files["usr/local/bin/"+b] != "binary "+b {
			t.Errorf("image lacks /usr/local/bin/%s: %v", b, files)
		}
	}
	again, _ := Build(bins)
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("same binaries, different digests: %s, %s", d1, d2)
	}
}
