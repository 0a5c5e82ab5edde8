# Tern: build, generate, test, install. `make test` needs root (it creates
# network namespaces, veths, BPF programs and iptables rules).

GO        ?= go
BIN       := bin
DESTDIR   ?=
CNI_BIN   ?= /opt/cni/bin
CNI_CONF  ?= /etc/cni/net.d
PREFIX    ?= /usr/local
GOTEST_FLAGS ?= -count=1 -timeout 40m

.PHONY: all build generate test install lint bench clean demo image e2e-k8s

all: build

# The release number orders the BPF object versions on a node (an older
# plugin does not downgrade a newer one's programs): the commit count.
RELEASE   ?= $(shell git rev-list --count HEAD 2>/dev/null || echo 0)
LDFLAGS   := -X github.com/ternlabs/tern/loader.Release=$(RELEASE)

build:
	@mkdir -p $(BIN)
	# The plugin is exec'd for every CNI command: static, as in the image
	# (no dynamic loader and glibc start-up, ~0.7 ms of each exec).
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/tern ./cmd/tern
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ternctl ./cmd/ternctl
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ternd ./cmd/ternd
	$(GO) build -o $(BIN)/ternbench ./cmd/ternbench
	$(GO) build -o $(BIN)/host-local github.com/containernetworking/plugins/plugins/ipam/host-local
	# Reference plugins that may follow tern in a conflist (examples/, test/e2e chain tests).
	$(GO) build -o $(BIN)/portmap github.com/containernetworking/plugins/plugins/meta/portmap
	$(GO) build -o $(BIN)/bandwidth github.com/containernetworking/plugins/plugins/meta/bandwidth
	$(GO) build -o $(BIN)/tuning github.com/containernetworking/plugins/plugins/meta/tuning
	$(GO) build -o $(BIN)/sbr github.com/containernetworking/plugins/plugins/meta/sbr
	# Interface plugins tern can follow in chained mode.
	$(GO) build -o $(BIN)/ptp github.com/containernetworking/plugins/plugins/main/ptp
	$(GO) build -o $(BIN)/bridge github.com/containernetworking/plugins/plugins/main/bridge

# Regenerate the BPF objects and their Go bindings (committed; CI checks
# they are current).
generate:
	cd bpf && $(GO) generate ./...

# Packages whose code or tests run goroutines (concurrent ADDs, locks,
# loaders, stores): `make test` runs them with the race detector (needs cgo:
# gcc), the others without.
RACE_PKGS ?= ./ipam/... ./loader/... ./policy/store/... ./cni/... ./ctl/... ./datapath/iptables/... ./internal/testutil/... ./agent/... ./network/...

# Every test, against the real kernel. TERN_CNI_PATH points the end-to-end
# tests at the binaries just built. The control-plane tests run a real
# kube-apiserver and etcd from KUBEBUILDER_ASSETS; scripts/kube-testenv.sh
# builds (once, cached by version) or finds them when it is unset.
test: build
	assets="$${KUBEBUILDER_ASSETS:-$$(./scripts/kube-testenv.sh | tail -n1)}" && \
	KUBEBUILDER_ASSETS="$$assets" TERN_CNI_PATH=$(CURDIR)/$(BIN) $(GO) test $(GOTEST_FLAGS) $$($(GO) list ./... | grep -v -x -F "$$($(GO) list $(RACE_PKGS))") && \
	KUBEBUILDER_ASSETS="$$assets" TERN_CNI_PATH=$(CURDIR)/$(BIN) $(GO) test -race $(GOTEST_FLAGS) $(RACE_PKGS)

# The upstream Kubernetes e2e (NetworkPolicy, sig-network conformance) on a
# real single-node cluster with Tern as CNI, per datapath (root; builds the
# Kubernetes binaries once into ~/.cache/tern/k8s): see test/k8s/e2e-k8s.sh.
E2E_K8S_SUITES ?= cri rollout netpol conformance
e2e-k8s:
	test/k8s/e2e-k8s.sh $(E2E_K8S_SUITES)

install: build
	install -d $(DESTDIR)$(CNI_BIN) $(DESTDIR)$(CNI_CONF)
	install -m 0755 $(BIN)/tern $(DESTDIR)$(CNI_BIN)/tern
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN)/ternctl $(DESTDIR)$(PREFIX)/bin/ternctl
	install -m 0644 examples/10-tern.conflist $(DESTDIR)$(CNI_CONF)/10-tern.conflist

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# The container image of deploy/ (ternd, tern, ternctl; static binaries on
# an empty base) as an image tarball, without a Docker daemon:
# docker load -i bin/tern-image.tar, or ctr images import bin/tern-image.tar.
IMAGE ?= ghcr.io/ternlabs/tern:latest
image:
	@mkdir -p $(BIN)/image
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/image/ternd ./cmd/ternd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/image/tern ./cmd/tern
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/image/ternctl ./cmd/ternctl
	$(GO) run ./cmd/ternimage --out $(BIN)/tern-image.tar --tag $(IMAGE) $(BIN)/image/ternd $(BIN)/image/tern $(BIN)/image/ternctl

bench: build
	$(GO) run ./cmd/ternbench --out bench/results

demo: build
	./examples/demo.sh

clean:
	rm -rf $(BIN)
