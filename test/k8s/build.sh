#!/usr/bin/env bash
# Builds or reuses the Kubernetes binaries of the real-node harness and
# prints, as the LAST line of its output, the directory that holds them:
#
#   kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy
#   kubectl agnhost e2e.test   (and a link to Debian's etcd)
#   coredns                    (github.com/coredns/coredns, the cluster DNS)
#
# None is packaged: they come from the Go module proxy through one wrapper
# module (require k8s.io/kubernetes, one replace per staging module of that
# version's go.mod), built with CGO_ENABLED=0 -trimpath and the version
# ldflags (kubectl and kubelet compare versions with the API server), and
# cached by version under ${XDG_CACHE_HOME:-$HOME/.cache}/tern/k8s/<version>/
# -- the directory scripts/kube-testenv.sh (the agent's control-plane tests)
# uses for kube-apiserver and etcd: both scripts take the same lock and reuse
# what the other built. Cold Go caches: about 10 minutes and 2.7 GB for the
# binaries, 4 more minutes and 3 GB for e2e.test, on a 2-core machine.
#
# Usage: test/k8s/build.sh [binary...]   (default: all of them)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
STAGING_VERSION=v0.${K8S_VERSION#v1.}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tern/k8s/$K8S_VERSION
export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"

log() { echo "k8s-build: $*" >&2; }

declare -A PKG=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubelet]=k8s.io/kubernetes/cmd/kubelet
  [kube-proxy]=k8s.io/kubernetes/cmd/kube-proxy
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [agnhost]=k8s.io/kubernetes/test/images/agnhost
  [e2e.test]=k8s.io/kubernetes/test/e2e
  [coredns]=github.com/coredns/coredns
)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl agnhost e2e.test coredns)

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# A binary is reused when present and, for those with --version, of this
# version (a build without the ldflags reports v0.0.0-master).
cached() {
  local b=$CACHE/$1
  [ -x "$b" ] || return 1
  case $1 in
    agnhost|e2e.test) return 0 ;;
    coredns) "$b" -version 2>/dev/null | grep -q "^CoreDNS-${COREDNS_VERSION#v}$" ;;
    kubectl) "$b" version --client 2>/dev/null | grep -qx "Client Version: $K8S_VERSION" ;;
    *) [ "$("$b" --version 2>/dev/null | awk '{print $2}')" = "$K8S_VERSION" ] ;;
  esac
}

missing=()
for b in "${wanted[@]}"; do
  [ -n "${PKG[$b]:-}" ] || { log "unknown binary $b"; exit 2; }
  cached "$b" || missing+=("$b")
done

# CoreDNS is its own module (no replace directives): go install at a version.
if [[ " ${missing[*]} " == *" coredns "* ]]; then
  start=$SECONDS
  CGO_ENABLED=0 GOBIN=$CACHE/.coredns go install -trimpath "${PKG[coredns]}@$COREDNS_VERSION" >&2
  mv -f "$CACHE/.coredns/coredns" "$CACHE/coredns"
  rmdir "$CACHE/.coredns"
  log "built coredns $COREDNS_VERSION in $((SECONDS - start)) s"
  missing=("${missing[@]/coredns/}")
  read -r -a missing <<< "${missing[*]}"
fi

if [ ${#missing[@]} -gt 0 ]; then
  log "building ${missing[*]} ($K8S_VERSION; about 10 minutes, 14 with e2e.test, when the Go caches are cold)"
  # The wrapper module lives in the cache (kept: a rebuild of one binary
  # then needs no tidy).
  src=$CACHE/src
  mkdir -p "$src"
  cd "$src"
  if [ ! -f go.sum ]; then
    gomod=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    [ -f "$gomod" ] || { log "cannot download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
    {
      printf 'module tern.local/k8sbin\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n' "$K8S_VERSION"
      # Every `k8s.io/X => ./staging/src/k8s.io/X` of Kubernetes' go.mod
      # becomes a replace by the published staging module.
      awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "$gomod" | sort -u |
        while read -r m; do printf '\nreplace %s => %s %s\n' "$m" "$m" "$STAGING_VERSION"; done
    } > go.mod
    [ "$(grep -c '^replace ' go.mod)" -gt 0 ] || { log "no staging replaces in $gomod"; exit 1; }
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl agnhost; do
        printf '\t_ "%s"\n' "${PKG[$b]}"
      done
      printf ')\n'
    } > tools.go
    GOFLAGS=-mod=mod go mod tidy >&2
  fi
  # The version variables only change the link step: compiled packages come
  # from the Go build cache.
  v=${K8S_VERSION#v}
  minor=${v#*.}
  ldflags="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=${v%%.*}"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor%%.*}"
  export CGO_ENABLED=0 GOFLAGS=-mod=mod
  for b in "${missing[@]}"; do
    start=$SECONDS
    if [ "$b" = e2e.test ]; then
      go test -c -trimpath -ldflags "$ldflags" -o "$src/$b" "${PKG[$b]}" >&2
    else
      go build -trimpath -ldflags "$ldflags" -o "$src/$b" "${PKG[$b]}" >&2
    fi
    mv -f "$src/$b" "$CACHE/$b"
    log "built $b in $((SECONDS - start)) s"
  done
fi

if ! command -v etcd >/dev/null; then
  log "etcd is missing: apt-get install etcd-server"
  exit 1
fi
ln -sfn "$(command -v etcd)" "$CACHE/etcd"
echo "$CACHE"
