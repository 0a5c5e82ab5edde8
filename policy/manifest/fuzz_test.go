package manifest_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/ternlabs/tern/policy/manifest"
)

// FuzzDecode: Decode never panics, and whatever it accepts is valid state
// that survives a JSON round trip unchanged. The seed corpus is every
// example under testdata/valid and testdata/invalid.
func FuzzDecode(f *testing.F) {
	for _, dir := range []string{"valid", "invalid"} {
		files, _ := filepath.Glob(filepath.Join("testdata", dir, "*"))
		for _, file := range files {
			b, err := os.ReadFile(file)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(b)
		}
	}
	f.Add([]byte("---\n---\n"))
	f.Add([]byte(`{"kind":"Pod"}[1]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := manifest.Decode(bytes.NewReader(data))
		if err != nil {
			if objs != nil {
				t.Fatalf("objects with an error")
			}
			return
		}
		for _, o := range objs {
			if err := manifest.Validate(o); err != nil {
				t.Fatalf("decoded an invalid object: %v", err)
			}
		}
		s, err := manifest.NewState().Apply(objs)
		if err != nil {
			t.Fatalf("decoded objects do not apply: %v", err)
		}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var back manifest.State
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("state does not load back: %v\n%s", err, b)
		}
		b2, err := json.Marshal(&back)
		if err != nil {
			t.Fatalf("marshal again: %v", err)
		}
		if !bytes.Equal(b, b2) {
			t.Fatalf("round trip differs:\n%s\n%s", b, b2)
		}
	})
}
