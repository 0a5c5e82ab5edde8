package compile_test

import (
	"encoding/json"
	"flag"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/ternlabs/tern/internal/policygen"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/reference"
)

var (
	seedFlag  = flag.Uint64("policy.seed", 0, "run the differential test for this seed only")
	seedsFlag = flag.Int("policy.seeds", 200, "number of seeds of the differential test")
	pktsFlag  = flag.Int("policy.packets", 200, "packets per seed of the differential test")
)

// TestDifferential checks compile.Simulate against reference.Allowed on
// random clusters and packets. A failure prints the seed; rerun it with
// go test ./policy/compile -run TestDifferential -policy.seed=N -v.
func TestDifferential(t *testing.T) {
	seeds := make([]uint64, 0, *seedsFlag)
	if *seedFlag != 0 {
		seeds = append(seeds, *seedFlag)
	} else {
		for s := range *seedsFlag {
			seeds = append(seeds, uint64(s)+1)
		}
	}
	var packets, allowed int
	var prev *compile.RuleSet
	for _, seed := range seeds {
		r := rand.New(rand.NewPCG(seed, 0x7e57))
		sc, err := policygen.Generate(r, policygen.DefaultSizes)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		// Compile twice: from scratch, and with the previous seed's rule
		// set as the installed one (stable numbering must not change
		// meaning).
		rs, err := compile.Compile(sc.State, sc.Topology, nil)
		if err != nil {
			t.Fatalf("seed %d: compile: %v\n%s", seed, err, sc.YAML())
		}
		rs2, err := compile.Compile(sc.State, sc.Topology, prev)
		if err != nil {
			t.Fatalf("seed %d: compile with prev: %v", seed, err)
		}
		sims := map[string]*compile.Simulator{}
		for name, x := range map[string]*compile.RuleSet{"fresh": rs, "with-prev": rs2} {
			s, err := compile.NewSimulator(x)
			if err != nil {
				t.Fatalf("seed %d: %s rule set rejected: %v", seed, name, err)
			}
			sims[name] = s
		}
		// Diff from the previous rule set, applied, gives the new one.
		if got := compile.Diff(prev, rs2); !sameTables(got.Apply(prev), rs2) {
			t.Fatalf("seed %d: Diff(prev, new).Apply(prev) != new", seed)
		}
		for _, pkt := range policygen.Packets(r, sc, *pktsFlag) {
			want := reference.Decide(sc.State, sc.Topology, pkt)
			for name, s := range sims {
				got, stats := s.Decide(pkt)
				if got != want.Allowed {
					t.Fatalf("seed %d (%s): %v: simulate says %v, reference says %v (%s)\nrule set:\n%s\nscenario:\n%s",
						seed, name, pkt, got, want.Allowed, want.Reason, dumpRuleSet(rs), sc.YAML())
				}
				if stats.Lookups > 12 {
					t.Fatalf("seed %d: %v: %d lookups", seed, pkt, stats.Lookups)
				}
			}
			packets++
			if want.Allowed {
				allowed++
			}
		}
		prev = rs2
	}
	t.Logf("%d seeds, %d packets, %d allowed, %d denied", len(seeds), packets, allowed, packets-allowed)
	if len(seeds) > 20 && (allowed < packets/10 || allowed > packets*9/10) {
		t.Errorf("generator is lopsided: %d of %d packets allowed", allowed, packets)
	}
}

// TestGeneratedManifestsRoundTrip renders generated scenarios as YAML and
// decodes them back: the decoder accepts what the API types marshal to.
func TestGeneratedManifestsRoundTrip(t *testing.T) {
	for seed := uint64(1); seed <= 50; seed++ {
		r := rand.New(rand.NewPCG(seed, 0x7e57))
		sc, err := policygen.Generate(r, policygen.DefaultSizes)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := manifest.Decode(strings.NewReader(sc.YAML()))
		if err != nil {
			t.Fatalf("seed %d: %v\n%s", seed, err, sc.YAML())
		}
		st, err := manifest.NewState().Apply(objs)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		a, _ := json.Marshal(st)
		b, _ := json.Marshal(sc.State)
		if string(a) != string(b) {
			t.Fatalf("seed %d: decoded state differs:\n%s\n%s", seed, a, b)
		}
	}
}

func sameTables(a, b *compile.RuleSet) bool {
	norm := func(rs *compile.RuleSet) *compile.RuleSet {
		out := &compile.RuleSet{Endpoints: rs.Endpoints, IPCache: rs.IPCache, Policy: rs.Policy}
		if len(out.Endpoints) == 0 {
			out.Endpoints = nil
		}
		if len(out.IPCache) == 0 {
			out.IPCache = nil
		}
		if len(out.Policy) == 0 {
			out.Policy = nil
		}
		return out
	}
	return reflect.DeepEqual(norm(a), norm(b))
}

func dumpRuleSet(rs *compile.RuleSet) string {
	b, _ := json.MarshalIndent(rs, "", " ")
	return string(b)
}
