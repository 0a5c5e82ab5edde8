#!/usr/bin/env bash
# Tern quickstart for a fresh Debian (12 "bookworm" or later) machine:
# installs the build and demo dependencies, builds the plugin and runs
# examples/demo.sh (three pods on one simulated node, eBPF datapath).
#
#   ./scripts/quickstart.sh            # as root, or as a user with sudo
#
# Environment:
#   SKIP_APT=1   do not run apt-get (the packages are already there)
#   SKIP_DEMO=1  stop after the build
#
# Go is not installed from apt: Debian 12's golang-go (1.19) is too old.
# Any Go >= 1.21 works: it fetches the toolchain go.mod asks for on its own
# (unless GOTOOLCHAIN=local). Get one from https://go.dev/dl/ if needed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CNITOOL_VERSION=v1.3.1
PACKAGES=(
	clang-19 llvm-19 libbpf-dev linux-libc-dev # BPF objects (make generate)
	bpftool iptables ipset iproute2            # datapaths and inspection
	iputils-ping iperf3 sockperf tcpdump       # traffic tests, demo, benchmarks
	make git
)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "quickstart: $*" >&2; exit 1; }

if [[ $(id -u) == 0 ]]; then
	SUDO=()
elif command -v sudo >/dev/null; then
	SUDO=(sudo)
else
	die "run as root or install sudo: apt-get, the plugin and the demo need root"
fi

if [[ ${SKIP_APT:-} != 1 ]]; then
	command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian (set SKIP_APT=1 to skip)"
	say "apt-get install ${PACKAGES[*]}"
	"${SUDO[@]}" apt-get update
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
fi

# Go: PATH first, then the usual install places.
for d in /usr/local/go/bin "$HOME/go/bin" "$HOME/.local/go/bin"; do
	if [[ -d $d && :$PATH: != *:$d:* ]]; then
		PATH=$PATH:$d
	fi
done
export PATH
command -v go >/dev/null || die "Go not found: install Go >= 1.21 from https://go.dev/dl/ (Debian's golang-go is too old)"
gover=$(go env GOVERSION) # e.g. go1.26.8
IFS=. read -r major minor _ <<<"${gover#go}"
if ((major < 1 || (major == 1 && minor < 21))); then
	die "$gover is too old: install Go >= 1.21 from https://go.dev/dl/"
fi
say "using $(command -v go) ($gover)"

say "go install github.com/containernetworking/cni/cnitool@$CNITOOL_VERSION"
if [[ -w /usr/local/bin ]]; then
	gobin=/usr/local/bin
else
	gobin=$(go env GOPATH)/bin
fi
GOBIN=$gobin go install "github.com/containernetworking/cni/cnitool@$CNITOOL_VERSION"
echo "installed $gobin/cnitool"
if [[ :$PATH: != *:$gobin:* ]]; then
	PATH=$PATH:$gobin
	echo "add it to PATH: export PATH=\$PATH:$gobin"
fi

say "make build"
make build

if [[ ${SKIP_DEMO:-} == 1 ]]; then
	say "built bin/tern; run the demo (as root) with: ./examples/demo.sh"
	exit 0
fi
say "examples/demo.sh"
"${SUDO[@]}" env PATH="$PATH" ./examples/demo.sh
