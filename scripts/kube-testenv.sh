#!/usr/bin/env bash
# Builds or reuses the control plane binaries the Kubernetes tests of Tern
# run against (a real kube-apiserver and etcd, started by the tests), and
# prints, as the LAST line of its output, the directory that holds
# `kube-apiserver` and `etcd`. Point KUBEBUILDER_ASSETS (or TERN_KUBE_ASSETS)
# at it:
#
#   export KUBEBUILDER_ASSETS=$(./scripts/kube-testenv.sh | tail -n1)
#
# kube-apiserver is not packaged: it is built from the Go module proxy with a
# wrapper module (require k8s.io/kubernetes, one replace per staging module
# of that version's go.mod) and cached by version under
# ${XDG_CACHE_HOME:-$HOME/.cache}/tern/k8s/<version>/. The first build takes
# about 10 minutes and 2.7 GB of memory on a 2-core machine; later runs reuse
# the binary. etcd is Debian's etcd-server (installed with apt-get when
# missing), linked into the same directory.
#
# Runs as root or as a user; never uses sudo.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
# Staging modules are versioned v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
STAGING_VERSION=v0.${K8S_VERSION#v1.}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tern/k8s/$K8S_VERSION
export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"

log() { echo "kube-testenv: $*" >&2; }

mkdir -p "$CACHE"
# One build at a time per version (parallel CI jobs, several test runs).
exec 9>"$CACHE/.lock"
flock 9

built_version() {
  "$CACHE/kube-apiserver" --version 2>/dev/null | awk '{print $2}'
}

if [ -x "$CACHE/kube-apiserver" ] && [ "$(built_version)" = "$K8S_VERSION" ]; then
  log "kube-apiserver $K8S_VERSION cached in $CACHE"
else
  log "building kube-apiserver $K8S_VERSION (about 10 minutes when the Go caches are cold)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  gomod=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { log "cannot download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
  {
    printf 'module tern.local/k8sbin\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n' "$K8S_VERSION"
    # Every `k8s.io/X => ./staging/src/k8s.io/X` of Kubernetes' own go.mod
    # becomes a replace by the published staging module.
    awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$gomod" | sort -u |
      while read -r m; do printf '\nreplace %s => %s %s\n' "$m" "$m" "$STAGING_VERSION"; done
  } > go.mod
  nrep=$(grep -c '^replace ' go.mod)
  [ "$nrep" -gt 0 ] || { log "no staging replaces found in $gomod"; exit 1; }
  printf '//go:build tools\npackage tools\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' > tools.go
  GOFLAGS=-mod=mod go mod tidy >&2
  # The version variables only change the link step: compiled packages
  # still come from the Go build cache.
  v=${K8S_VERSION#v}
  ldflags="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=${v%%.*}"
  minor=${v#*.}; ldflags="$ldflags -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" \
    -o kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver >&2
  install -m 0755 kube-apiserver "$CACHE/.kube-apiserver.tmp"
  mv -f "$CACHE/.kube-apiserver.tmp" "$CACHE/kube-apiserver"
  cd / && rm -rf "$work" && trap - EXIT
  log "built $("$CACHE/kube-apiserver" --version) ($nrep staging replaces)"
fi

if ! command -v etcd >/dev/null; then
  log "installing etcd-server"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "etcd is missing and cannot be installed here (needs root and apt-get): install etcd-server"
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >&2 ||
    { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >&2; }
  # Debian starts the packaged service: the tests run their own etcd.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl disable --now etcd >&2 || true
  fi
fi
ln -sfn "$(command -v etcd)" "$CACHE/etcd"
echo "$CACHE"
