#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, with Tern as its CNI
# plugin: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# containerd + runc, kubelet and kube-proxy (iptables mode, or nftables with
# TERN_KUBE_PROXY_MODE=nftables).
#
#   test/k8s/node.sh up      # build/reuse binaries, start everything, wait for Ready
#   test/k8s/node.sh down    # stop everything, remove its state, restore the host
#   test/k8s/node.sh env     # print KUBECONFIG=… and the binary directory
#
# Everything lives under $TERN_K8S_DIR (default /var/lib/tern-k8s) and a
# bpffs mounted at $TERN_K8S_DIR/bpffs; logs are copied to
# $TERN_K8S_ARTIFACTS at `down`. The node gets its own address on a veth
# pair (host end tk8s0 = node IP, peer in netns tern-k8s-ext): the machine's
# uplink, routes and addresses are never used or changed, Tern's `uplink` is
# tk8s0, and the API server listens on the node IP only.
#
# Tern is installed the way users do: its image (make image) imported with
# ctr, then kubectl apply -f deploy/ (paths and ConfigMap adapted to this
# node, render_deploy); ternd writes the conflist from the node's podCIDR
# once the controller manager allocated it (the node is checked NotReady
# until then). `down` deletes the workloads, then uninstalls Tern (kubectl
# delete -f deploy/, ternd --uninstall) and fails if that left a conflist,
# an agent or the DaemonSet. TERN_DATAPATH=iptables|ebpf (default iptables)
# picks the datapath; TERN_SERVICES=kube-proxy|ebpf (default kube-proxy)
# its "services": with ebpf no kube-proxy runs.
#
# The host state that kubelet and kube-proxy change (sysctls, iptables
# chains, cgroups, /var/log/containers links) is recorded at `up` and
# restored at `down`, which is also what a failed `up` runs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${TERN_K8S_DIR:-/var/lib/tern-k8s}
ARTIFACTS=${TERN_K8S_ARTIFACTS:-/tmp/tern-k8s-artifacts}
DATAPATH=${TERN_DATAPATH:-iptables}
SERVICES=${TERN_SERVICES:-kube-proxy}
KUBE_PROXY_MODE=${TERN_KUBE_PROXY_MODE:-iptables}   # or nftables
# Every daemon dies after this long even if `down` never runs.
DAEMON_TIMEOUT=${TERN_K8S_TIMEOUT:-4h}

NODE=tern-node
NODE_IP=10.199.0.1
PEER_IP=10.199.0.2
HOST_IF=tk8s0
PEER_IF=tk8s1
EXT_NS=tern-k8s-ext
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_IP=10.96.0.10   # test/k8s/coredns.yaml
NETWORK=tern-k8s
# Tern's image (make image) as deploy/ runs it, and the tag the rolling
# update moves to; the agent's ports away from the defaults (the agent's
# own tests use those).
TERN_IMAGE=ghcr.io/ternlabs/tern:k8s-e2e-1
TERN_IMAGE_NEXT=ghcr.io/ternlabs/tern:k8s-e2e-2
TERN_METRICS_PORT=29962
TERN_HEALTH_PORT=29963
BRIDGE=ternk8s0
# Ports away from the defaults, so another control plane on the machine (the
# agent's tests) does not collide: etcd, API server, controller manager,
# scheduler, kube-proxy health and metrics. kubelet keeps 10250 (its port
# is published in the Node object, any works).
ETCD_PORT=23790
ETCD_PEER_PORT=23800
API_PORT=16443
KCM_PORT=20257
SCHED_PORT=20259
KP_HEALTH_PORT=20256
KP_METRICS_PORT=20249

PKI=$BASE/pki
LOGS=$BASE/logs
PIDS=$BASE/pids
SOCK=$BASE/containerd/containerd.sock
CNI_BIN=$BASE/cni/bin
CNI_CONF=$BASE/cni/net.d
KUBECONFIG_ADMIN=$BASE/admin.kubeconfig

export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin:/usr/sbin:/sbin"

log() { echo "[$(date -u +%H:%M:%S)] node: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Sysctls kubelet (protectKernelDefaults: false) and kube-proxy may write;
# recorded before anything starts, written back at `down`.
SYSCTLS=(
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.conf.all.route_localnet net.ipv4.ip_forward
  net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait net.netfilter.nf_conntrack_tcp_be_liberal
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
)

kbin() { echo "$BIN_DIR/$1"; }
kubectl() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=30s "$@"; }

# start NAME CMD...: a daemon under `timeout`, its pid in $PIDS, its output
# in $LOGS/NAME.log.
start() {
  local name=$1; shift
  timeout -k 15 "$DAEMON_TIMEOUT" "$@" > "$LOGS/$name.log" 2>&1 &
  echo $! > "$PIDS/$name"
  log "started $name (pid $!)"
}

# wait_for DESCRIPTION SECONDS CMD...: polls CMD once a second.
wait_for() {
  local what=$1 secs=$2; shift 2
  local i
  for ((i = 0; i < secs; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- binaries

binaries() {
  BIN_DIR=$("$ROOT/test/k8s/build.sh" kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl agnhost coredns | tail -n1)
  for b in containerd ctr runc etcd openssl conntrack iptables; do
    command -v "$b" >/dev/null || die "$b missing (Debian: containerd runc etcd-server openssl conntrack iptables)"
  done
}

# ------------------------------------------------------------------- PKI

pki() {
  mkdir -p "$PKI"
  cd "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj "/CN=tern-k8s-ca" -days 7 -out ca.crt 2>/dev/null
  # cert NAME SUBJECT [SAN]: a key and a CA-signed certificate.
  cert() {
    local name=$1 subj=$2 san=${3:-}
    openssl ecparam -name prime256v1 -genkey -noout -out "$name.key" 2>/dev/null
    openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
    {
      echo "basicConstraints=CA:FALSE"
      echo "keyUsage=critical,digitalSignature,keyEncipherment"
      if [ -n "$san" ]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$san"
      else echo "extendedKeyUsage=clientAuth"; fi
    } > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
      -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
  }
  cert apiserver "/CN=kube-apiserver" \
    "IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
  cert admin "/O=system:masters/CN=kubernetes-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE"
  cert kube-proxy "/CN=system:kube-proxy"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # kubelet's serving certificate (the API server does not verify it: no
  # --kubelet-certificate-authority, as in local-up-cluster).
  cert kubelet-serving "/CN=$NODE" "IP:$NODE_IP,DNS:$NODE"
  openssl ecparam -name prime256v1 -genkey -noout -out sa.key 2>/dev/null
  openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
  chmod 600 ./*.key
  cd - >/dev/null
}

kubeconfig() { # NAME CERT
  cat > "$BASE/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tern-k8s
  cluster:
    certificate-authority: $PKI/ca.crt
    server: https://$NODE_IP:$API_PORT
users:
- name: $1
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: tern-k8s
  context: {cluster: tern-k8s, user: $1}
current-context: tern-k8s
EOF
}

# --------------------------------------------------------------- network

node_network() {
  ip netns add "$EXT_NS"
  ip link add "$HOST_IF" type veth peer name "$PEER_IF" netns "$EXT_NS"
  ip addr add "$NODE_IP/24" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  ip -n "$EXT_NS" addr add "$PEER_IP/24" dev "$PEER_IF"
  ip -n "$EXT_NS" link set "$PEER_IF" up
  ip -n "$EXT_NS" link set lo up
}

# ----------------------------------------------------------------- images

# Images the specs need, built without a registry into $BIN_DIR/images:
# pause (static Go binary), CoreDNS, agnhost 2.66.1 with busybox, curl and
# netcat-openbsd (the specs run `sh -c` with curl, nc, grep in the pod), and
# busybox 1.37.0-2 and 1.36.1-1 (same rootfs, CMD sh).
images() {
  # bump the revision when the recipe changes
  local dir=$BIN_DIR/images/r4
  mkdir -p "$dir"
  if [ ! -f "$dir/pause.tar" ] || [ ! -f "$dir/agnhost.tar" ] || [ ! -f "$dir/coredns.tar" ]; then
    for b in busybox curl nc dash bash; do
      command -v "$b" >/dev/null || die "$b missing (Debian: busybox-static curl netcat-openbsd dash bash)"
    done
    busybox --list >/dev/null 2>&1 && ! ldd "$(command -v busybox)" >/dev/null 2>&1 ||
      die "busybox must be static (Debian: busybox-static)"
    local work
    work=$(mktemp -d)
    mkdir -p "$work/pause"
    (cd "$ROOT" && CGO_ENABLED=0 go build -trimpath -o "$work/pause/pause" ./test/k8s/pause)
    (cd "$ROOT" && go build -o "$work/imgtar" ./test/k8s/imgtar)
    "$work/imgtar" -rootfs "$work/pause" -o "$dir/pause.tar.tmp" -entrypoint '["/pause"]' \
      -tag registry.k8s.io/pause:3.10.2 -tag registry.k8s.io/pause:3.10
    mkdir -p "$work/coredns"
    cp "$BIN_DIR/coredns" "$work/coredns/coredns"
    "$work/imgtar" -rootfs "$work/coredns" -o "$dir/coredns.tar.tmp" -entrypoint '["/coredns"]' \
      -tag registry.k8s.io/coredns/coredns:v1.15.0
    local r=$work/agnhost
    mkdir -p "$r/bin" "$r/usr/bin" "$r/etc" "$r/tmp" "$r/uploads" "$r/root"
    chmod 1777 "$r/tmp"
    cp "$BIN_DIR/agnhost" "$r/agnhost"
    ln -s agnhost "$r/agnhost-2"
    cp "$(command -v busybox)" "$r/bin/busybox"
    local a
    for a in $(busybox --list); do
      [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"
    done
    # Real curl and OpenBSD nc (the specs use its flags) in /usr/bin, ahead
    # of busybox's applets in PATH, with their shared libraries; dash as sh
    # and bash, because busybox's ash runs its own applets (nc) before PATH.
    local tool lib
    for tool in "$(command -v curl)" "$(readlink -f "$(command -v nc)")" \
        "$(readlink -f "$(command -v dash)")" "$(readlink -f "$(command -v bash)")"; do
      cp "$tool" "$r/usr/bin/"
      for lib in $(ldd "$tool" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}'); do
        mkdir -p "$r$(dirname "$lib")"
        cp -L "$lib" "$r$lib"
      done
    done
    ln -sf "$(basename "$(readlink -f "$(command -v nc)")")" "$r/usr/bin/nc"
    ln -sf /usr/bin/dash "$r/bin/sh"
    ln -sf /usr/bin/bash "$r/bin/bash"
    mkdir -p "$r/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$r/lib64/" 2>/dev/null || true
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nuser-defined-in-image:x:1000:1000::/:/bin/sh\n' > "$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' > "$r/etc/group"
    printf 'hosts: files dns\n' > "$r/etc/nsswitch.conf"
    # agnhost porter serves its TLS ports with /localhost.crt and .key, as
    # in the upstream image (SAN 127.0.0.1 and ::1)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost" \
      -keyout "$r/localhost.key" -out "$r/localhost.crt" 2>/dev/null
    chmod 644 "$r/localhost.key"
    "$work/imgtar" -rootfs "$r" -o "$dir/agnhost.tar.tmp" -entrypoint '["/agnhost"]' -cmd '["pause"]' \
      -tag registry.k8s.io/e2e-test-images/agnhost:2.66.1
    "$work/imgtar" -rootfs "$r" -o "$dir/busybox.tar.tmp" -cmd '["sh"]' \
      -tag registry.k8s.io/e2e-test-images/busybox:1.37.0-2 -tag registry.k8s.io/e2e-test-images/busybox:1.36.1-1
    for a in pause agnhost busybox coredns; do mv -f "$dir/$a.tar.tmp" "$dir/$a.tar"; done
    rm -rf "$work"
  fi
  for a in "$dir/pause.tar" "$dir/agnhost.tar" "$dir/busybox.tar" "$dir/coredns.tar" \
      "$BASE/build/tern-image.tar" "$BASE/build/tern-image-next.tar"; do
    timeout 300 ctr -a "$SOCK" -n k8s.io images import "$a" >/dev/null
  done
  log "images: $(timeout 30 ctr -a "$SOCK" -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}

# ------------------------------------------------------------- components

# The node's reference plugins (portmap for hostPort, loopback), which a
# distribution's kubernetes-cni package would install, ternctl for the
# checks, and Tern's image (make image) under two tags: the one deploy/
# runs, and the one the rolling update (test/k8s/rollout.sh) moves to.
tern_plugins() {
  mkdir -p "$CNI_BIN" "$CNI_CONF" "$BASE/build"
  (cd "$ROOT" &&
    go build -o "$BASE/ternctl" ./cmd/ternctl &&
    go build -o "$CNI_BIN/portmap" github.com/containernetworking/plugins/plugins/meta/portmap &&
    go build -o "$CNI_BIN/loopback" github.com/containernetworking/plugins/plugins/main/loopback &&
    make -s image BIN="$BASE/build" IMAGE="$TERN_IMAGE" >/dev/null &&
    go run ./cmd/ternimage --out "$BASE/build/tern-image-next.tar" --tag "$TERN_IMAGE_NEXT" \
      "$BASE/build/image/ternd" "$BASE/build/image/tern" "$BASE/build/image/ternctl" >/dev/null)
  if [ "$DATAPATH" = iptables ]; then
    iptables_image
  fi
}

# iptables_image: the iptables datapath's agent runs iptables-restore,
# ipset and nft, which `make image` (static Go binaries only) lacks: the
# same binaries plus the host's iptables (nft backend), ipset and nft with
# their libraries and xtables extensions, under the same tags.
iptables_image() {
  local r=$BASE/build/rootfs-iptables tool lib
  rm -rf "$r"
  mkdir -p "$r/usr/local/bin" "$r/usr/sbin" "$r/usr/lib" "$r/usr/lib64" "$r/run" "$r/tmp" "$r/etc"
  # merged /usr as on the host: iptables finds its extensions under
  # /usr/lib/<triplet>/xtables whichever path ldd names the libraries by
  ln -s usr/lib "$r/lib"
  ln -s usr/lib64 "$r/lib64"
  cp "$BASE/build/image/ternd" "$BASE/build/image/tern" "$BASE/build/image/ternctl" "$r/usr/local/bin/"
  for tool in xtables-nft-multi ipset nft; do
    tool=$(readlink -f "$(command -v "$tool")") || die "$tool missing (Debian: iptables ipset nftables)"
    cp "$tool" "$r/usr/sbin/"
    for lib in $(ldd "$tool" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}'); do
      mkdir -p "$r$(dirname "$lib")"
      cp -L "$lib" "$r$lib"
    done
  done
  local x
  x=/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)/xtables
  [ -d "$x" ] || die "no xtables extensions in $x"
  mkdir -p "$r$x"
  cp -L "$x"/*.so "$r$x/"
  for lib in $(ldd "$x"/*.so 2>/dev/null | awk '/=>/ {print $3}' | sort -u); do
    [ -e "$r$lib" ] || { mkdir -p "$r$(dirname "$lib")"; cp -L "$lib" "$r$lib"; }
  done
  for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf xtables-nft-multi "$r/usr/sbin/$tool"
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$r/usr/lib64/"
  [ -f /etc/protocols ] && cp /etc/protocols "$r/etc/"
  [ -f /etc/services ] && cp /etc/services "$r/etc/"
  (cd "$ROOT" && go build -o "$BASE/build/imgtar" ./test/k8s/imgtar)
  "$BASE/build/imgtar" -rootfs "$r" -o "$BASE/build/tern-image.tar" -entrypoint '["/usr/local/bin/ternd"]' \
    -tag "$TERN_IMAGE"
  "$BASE/build/imgtar" -rootfs "$r" -o "$BASE/build/tern-image-next.tar" -entrypoint '["/usr/local/bin/ternd"]' \
    -tag "$TERN_IMAGE_NEXT"
}

# deploy/ as this node needs it, into $BASE/deploy: the image tag of
# `make image`, Tern's host paths under $BASE (state, bpffs, CNI
# directories; state and bpffs at the same path inside the container as
# outside, because the conflist ternd writes names them for the plugin,
# which runs on the host), ports away from the defaults, and the
# ConfigMap for this cluster.
render_deploy() {
  local out=$BASE/deploy f
  mkdir -p "$out"
  for f in "$ROOT"/deploy/*.yaml; do
    sed -e "s|ghcr.io/ternlabs/tern:latest|$TERN_IMAGE|" \
      -e "s|\([pP]ath: \)/sys/fs/bpf\$|\1$BASE/bpffs|" \
      -e "s|\([pP]ath: \)/var/lib/tern\$|\1$BASE/tern|" \
      -e "s|\(path: \)/etc/cni/net.d\$|\1$CNI_CONF|" \
      -e "s|\(path: \)/opt/cni/bin\$|\1$CNI_BIN|" \
      -e "s|\(Port: \)9962\$|\1$TERN_METRICS_PORT|; s|\(port: \)9962\$|\1$TERN_METRICS_PORT|" \
      -e "s|\(Port: \)9963\$|\1$TERN_HEALTH_PORT|; s|\(port: \)9963\$|\1$TERN_HEALTH_PORT|" \
      "$f" > "$out/$(basename "$f")"
  done
  grep -q "mountPath: $BASE/bpffs" "$out/03-daemonset.yaml" && grep -q "$TERN_IMAGE" "$out/03-daemonset.yaml" ||
    die "deploy/03-daemonset.yaml changed: the harness cannot place its paths"
  local api=""
  if [ "$SERVICES" = ebpf ]; then
    # No kube-proxy: the agent reaches the API server directly (it is the
    # one that programs the kubernetes Service).
    api="  KUBERNETES_SERVICE_HOST: \"$NODE_IP\"
  KUBERNETES_SERVICE_PORT: \"$API_PORT\""
  fi
  cat > "$out/02-configmap.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: tern-config
  namespace: tern-system
data:
  TERN_DATAPATH: "$DATAPATH"
  TERN_CLUSTER_CIDR: "$CLUSTER_CIDR"
  TERN_SERVICE_CIDR: "$SERVICE_CIDR"
  TERN_ROUTING: "native"
  TERN_SERVICES: "$SERVICES"
  TERN_NETWORK: "$NETWORK"
  TERN_STATE_DIR: "$BASE/tern"
  TERN_BPFFS_DIR: "$BASE/bpffs/tern"
  TERN_CNI_CONF_DIR: "/host/etc/cni/net.d"
  TERN_CNI_BIN_DIR: "/host/opt/cni/bin"
  TERN_METRICS_ADDR: "$NODE_IP:$TERN_METRICS_PORT"
  TERN_HEALTH_ADDR: "$NODE_IP:$TERN_HEALTH_PORT"
  TERN_LOG_LEVEL: "info"
  TERN_CNI_VERSION: "1.0.0"
  TERN_PORTMAP: "true"
  TERN_UPLINK: "$HOST_IF"
  TERN_BRIDGE: "$BRIDGE"
  TERN_MTU: "1500"
$api
EOF
}

node_ready() {
  [ "$("$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" get node "$NODE" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# Tern's installation as users do it: the image imported (images), then
# kubectl apply -f deploy/. ternd waits for the node's podCIDR (the
# controller manager allocates it), applies the API's state and only then
# writes the conflist: the node must stay NotReady until then.
install_tern() {
  render_deploy
  ! node_ready || die "node $NODE Ready before Tern's conflist is there"
  [ ! -e "$CNI_CONF/10-tern.conflist" ] || die "a conflist before ternd ran"
  log "Tern ($DATAPATH datapath, services: $SERVICES, kube-proxy: $(cat "$BASE/kube-proxy-mode")): kubectl apply -f deploy/"
  kubectl apply -f "$BASE/deploy/" >/dev/null
  if ! kubectl -n tern-system rollout status daemonset/ternd --timeout=90s >&2; then
    kubectl -n tern-system get pods -o wide >&2
    kubectl -n tern-system logs daemonset/ternd -c ternd --previous --tail=30 >&2 ||
      kubectl -n tern-system logs daemonset/ternd -c ternd --tail=30 >&2
    die "ternd not rolled out"
  fi
  wait_for "10-tern.conflist" 60 test -e "$CNI_CONF/10-tern.conflist"
  log "ternd wrote 10-tern.conflist: $(tr -d ' \n' < "$CNI_CONF/10-tern.conflist" | grep -o '"subnet":"[^"]*"')"
}

# ternd_pids: the agents of this node (their environment names our state
# directory).
ternd_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/local/bin/ternd ] || continue
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "TERN_STATE_DIR=$BASE/tern" && echo "${p#/proc/}"
  done
  return 0
}

# uninstall_tern: kubectl delete -f deploy/, then ternd --uninstall on the
# node. Checked: no conflist, no agent, no DaemonSet left.
uninstall_tern() {
  [ -d "$BASE/deploy" ] || return 0
  local bad="" i
  kubectl delete -f "$BASE/deploy/" --wait=false >/dev/null 2>&1
  kubectl -n tern-system delete pods --all --grace-period=5 --timeout=60s >/dev/null 2>&1
  for ((i = 0; i < 60; i++)); do
    [ -z "$(ternd_pids)" ] && break
    sleep 1
  done
  "$BASE/build/image/ternd" --uninstall --cni-conf-dir "$CNI_CONF" >> "$LOGS/uninstall.log" 2>&1 || bad+=" ternd-uninstall-failed"
  [ -e "$CNI_CONF/10-tern.conflist" ] && bad+=" conflist-left"
  [ -n "$(ternd_pids)" ] && bad+=" ternd-running"
  [ -n "$(kubectl get daemonsets -A -o name 2>/dev/null | grep ternd)" ] && bad+=" daemonset-left"
  if [ -n "$bad" ]; then
    echo "uninstall not clean:$bad" >> "$LOGS/uninstall.log"
    log "ERROR: uninstall not clean:$bad"
    UNINSTALL_FAILED=1
  else
    log "uninstalled: kubectl delete -f deploy/ and ternd --uninstall left no conflist, agent or DaemonSet"
  fi
}

etcd_start() {
  start etcd etcd --name tern-k8s --data-dir "$BASE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "tern-k8s=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
  wait_for etcd 60 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
}

apiserver_start() {
  start kube-apiserver "$(kbin kube-apiserver)" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false --v=1
  wait_for kube-apiserver 120 curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://$NODE_IP:$API_PORT/readyz"
}

controllers_start() {
  start kube-controller-manager "$(kbin kube-controller-manager)" \
    --kubeconfig "$BASE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$BASE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$BASE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --use-service-account-credentials=true --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr "$CLUSTER_CIDR" --node-cidr-mask-size 24 \
    --service-cluster-ip-range "$SERVICE_CIDR" --v=1
  start kube-scheduler "$(kbin kube-scheduler)" \
    --kubeconfig "$BASE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$BASE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$BASE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --v=1
}

containerd_start() {
  mkdir -p "$BASE/containerd"
  cat > "$BASE/containerd/config.toml" <<EOF
version = 2
root = "$BASE/containerd/root"
state = "$BASE/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$BASE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.2"
  # no CAP_SYS_RESOURCE here: clamp oom_score_adj instead of failing
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$CNI_CONF"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = "$BASE/runc"
EOF
  start containerd containerd --config "$BASE/containerd/config.toml"
  wait_for containerd 60 ctr -a "$SOCK" version
}

kubelet_start() {
  mkdir -p "$BASE/kubelet" "$BASE/pod-logs"
  cat > "$BASE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# the host has hybrid cgroup v1, which kubelet 1.37 refuses by default
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
podLogsDir: $BASE/pod-logs
healthzBindAddress: 127.0.0.1
# a shared test machine: no eviction, no image GC (the images have no registry)
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  start kubelet "$(kbin kubelet)" --config "$BASE/kubelet.yaml" --kubeconfig "$BASE/kubelet.kubeconfig" \
    --root-dir "$BASE/kubelet" --hostname-override "$NODE" --node-ip "$NODE_IP" --v=1
  wait_for "node $NODE registered" 120 kubectl get node "$NODE"
}

kube_proxy_start() {
  cat > "$BASE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $BASE/kube-proxy.kubeconfig}
mode: $KUBE_PROXY_MODE
hostnameOverride: $NODE
clusterCIDR: $CLUSTER_CIDR
healthzBindAddress: 127.0.0.1:$KP_HEALTH_PORT
metricsBindAddress: 127.0.0.1:$KP_METRICS_PORT
# NodePorts on the node IP only, not on the machine's uplink or localhost
# (no route_localnet)
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false}
# leave the host's conntrack table size and timeouts alone
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  start kube-proxy "$(kbin kube-proxy)" --config "$BASE/kube-proxy.yaml" --v=1
}

# ----------------------------------------------------------------- up/down

record_host() {
  mkdir -p "$BASE/host"
  local s
  for s in "${SYSCTLS[@]}"; do
    v=$(sysctl -n "$s" 2>/dev/null) && printf '%s\t%s\n' "$s" "$v"
  done > "$BASE/host/sysctls"
  cat /sys/module/nf_conntrack/parameters/hashsize > "$BASE/host/conntrack-hashsize" 2>/dev/null || true
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root"
  if [ -e "$BASE" ]; then
    log "$BASE exists (an earlier run): tearing it down first"
    down
  fi
  mkdir -p "$BASE" "$LOGS" "$PIDS"
  record_host
  binaries
  echo "$BIN_DIR" > "$BASE/bin-dir"
  node_network
  mkdir -p "$BASE/bpffs"
  mount -t bpf bpf "$BASE/bpffs"
  # shared, as systemd mounts /sys/fs/bpf: the DaemonSet mounts it with
  # HostToContainer propagation, which kubelet refuses on a private mount
  mount --make-shared "$BASE/bpffs"
  pki
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kubelet kubelet
  kubeconfig kube-proxy kube-proxy
  tern_plugins
  etcd_start
  apiserver_start
  controllers_start
  containerd_start
  images
  kubelet_start
  if [ "$SERVICES" = ebpf ]; then
    echo none > "$BASE/kube-proxy-mode"   # Tern's load balancer alone
  else
    echo "$KUBE_PROXY_MODE" > "$BASE/kube-proxy-mode"
    kube_proxy_start
  fi
  wait_for "podCIDR of $NODE" 120 sh -c "[ -n \"\$('$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_ADMIN' get node $NODE -o jsonpath='{.spec.podCIDR}')\" ]"
  install_tern
  wait_for "node $NODE Ready" 120 node_ready
  wait_for "default service account" 60 kubectl -n default get serviceaccount default
  kubectl apply -f "$ROOT/test/k8s/coredns.yaml" >/dev/null
  if kubectl -n kube-system wait --for=condition=Available deployment/coredns --timeout=90s >/dev/null; then
    log "cluster DNS ready on $DNS_IP"
  else
    # On a datapath whose Service path is broken CoreDNS cannot reach the
    # API server: the specs that need DNS then fail, the others still run.
    log "WARNING: CoreDNS not ready after 90 s"
  fi
  log "cluster up: KUBECONFIG=$KUBECONFIG_ADMIN"
}

# drop_chains IPTABLES ERE: deletes the rules of built-in chains that jump to
# chains matching ERE, then flushes and deletes those chains, in every table.
drop_chains() {
  local ipt=$1 re=$2 t line c
  for t in filter nat mangle raw; do
    "$ipt-save" -t "$t" 2>/dev/null | grep -E "^-A [A-Z]+ .*-j ($re)" | while read -r line; do
      eval "$ipt -w -t $t -D ${line#-A }" 2>/dev/null || true
    done
    for c in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\([^ ]*\) .*/\1/p' | grep -E "^($re)"); do
      "$ipt" -w -t "$t" -F "$c" 2>/dev/null || true
    done
    for c in $("$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\([^ ]*\) .*/\1/p' | grep -E "^($re)"); do
      "$ipt" -w -t "$t" -X "$c" 2>/dev/null || true
    done
  done
}

# workload_tasks: containerd tasks of pods other than Tern's own.
workload_tasks() {
  local keep
  keep=$(timeout 10 ctr -a "$SOCK" -n k8s.io containers ls -q 'labels."io.kubernetes.pod.namespace"==tern-system' 2>/dev/null)
  timeout 10 ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null | grep -vxF -- "$keep"
  return 0
}

stop_pid() { # NAME: TERM, then KILL after 20 s
  local f=$PIDS/$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL "$pid" 2>/dev/null || true
  # timeout's child: the daemon itself
  pkill -KILL -P "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  [ -d "$BASE" ] || { log "nothing to tear down"; return 0; }
  set +e
  BIN_DIR=$(cat "$BASE/bin-dir" 2>/dev/null)
  log "tearing down"
  # Pods first, through kubelet and the CRI, so that Tern's DEL runs for
  # each: stop what recreates them, delete them, wait for the sandboxes.
  if [ -f "$PIDS/kube-apiserver" ] && [ -f "$PIDS/kubelet" ] && [ -x "$BIN_DIR/kubectl" ]; then
    stop_pid kube-controller-manager
    # The workloads first: their CNI DEL needs Tern's conflist. A pod's
    # sandbox task ends after its DEL (containerd tears the network down
    # before it stops the sandbox).
    for ns in $(kubectl get namespaces -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
      [ "$ns" = tern-system ] && continue
      kubectl -n "$ns" delete pods --all --grace-period=0 --force --wait=false >/dev/null 2>&1
    done
    for ((i = 0; i < 60; i++)); do
      [ -z "$(workload_tasks)" ] && break
      sleep 1
    done
    # Then Tern, as a user uninstalls it (the agent's log kept first).
    mkdir -p "$LOGS/ternd"
    cp -r "$BASE"/pod-logs/tern-system_* "$LOGS/ternd/" 2>/dev/null
    uninstall_tern
    for ((i = 0; i < 30; i++)); do
      [ -z "$(timeout 10 ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  stop_pid kube-proxy
  stop_pid kubelet
  # Whatever the CRI did not stop: kill the tasks, remember their netns.
  local netns=() id
  if [ -S "$SOCK" ]; then
    for id in $(timeout 10 ctr -a "$SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ns=$(timeout 10 ctr -a "$SOCK" -n k8s.io containers info "$id" 2>/dev/null |
        grep -o '"/var/run/netns/cni-[^"]*"' | tr -d '"' | head -1)
      [ -n "$ns" ] && netns+=("$ns")
      timeout 10 ctr -a "$SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1
      timeout 10 ctr -a "$SOCK" -n k8s.io tasks rm -f "$id" >/dev/null 2>&1
    done
  fi
  stop_pid containerd
  # containerd's shims of this instance (their -address is our socket)
  for p in /proc/[0-9]*; do
    grep -qF "$SOCK" "$p/cmdline" 2>/dev/null && kill -KILL "${p#/proc/}" 2>/dev/null
  done
  stop_pid kube-scheduler
  stop_pid kube-controller-manager
  stop_pid kube-apiserver
  stop_pid etcd
  for ns in "${netns[@]}"; do
    [ -e "$ns" ] && ip netns del "$(basename "$ns")" 2>/dev/null
  done
  # kube-proxy's own cleanup, then anything KUBE-* left (kubelet's canary
  # chains too), and Tern's iptables objects of this network.
  [ -x "$BIN_DIR/kube-proxy" ] && timeout 60 "$BIN_DIR/kube-proxy" --cleanup >/dev/null 2>&1
  local h
  h=$(printf %s "$NETWORK" | sha256sum | cut -c1-8)
  for ipt in iptables ip6tables; do
    drop_chains "$ipt" "KUBE-[A-Z0-9-]*|TERN-[A-Z]+-$h|TERN-$h-[A-Za-z0-9]*"
  done
  for s in $(ipset list -n 2>/dev/null | grep -E "^TERN-C-$h-"); do ipset destroy "$s" 2>/dev/null; done
  for fam in ip ip6; do nft delete table "$fam" kube-proxy 2>/dev/null; done
  ip link del "$BRIDGE" 2>/dev/null
  ip link del "$HOST_IF" 2>/dev/null
  ip netns del "$EXT_NS" 2>/dev/null
  # Mounts under $BASE (pod volumes, overlay rootfs, shm, bpffs), deepest first.
  awk -v b="$BASE/" 'index($2, b) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  # kubelet's pod cgroups (cgroupfs driver), leaves first
  for c in /sys/fs/cgroup/*/kubepods; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  find /var/log/containers -maxdepth 1 -lname "$BASE/*" -delete 2>/dev/null
  # host sysctls
  if [ -f "$BASE/host/sysctls" ]; then
    while IFS=$'\t' read -r k v; do
      [ "$(sysctl -n "$k" 2>/dev/null)" = "$v" ] || sysctl -qw "$k=$v" >/dev/null 2>&1
    done < "$BASE/host/sysctls"
  fi
  if [ -s "$BASE/host/conntrack-hashsize" ]; then
    cat "$BASE/host/conntrack-hashsize" > /sys/module/nf_conntrack/parameters/hashsize 2>/dev/null
  fi
  mkdir -p "$ARTIFACTS"
  cp -r "$LOGS/." "$ARTIFACTS/" 2>/dev/null
  rm -rf "$BASE"
  set -e
  log "down (logs in $ARTIFACTS)"
  [ "${UNINSTALL_FAILED:-0}" = 0 ]
}

case ${1:-} in
  # TERN_K8S_KEEP=1: a failed `up` leaves the cluster for a look (then `down`)
  up) trap 'rc=$?; [ $rc -eq 0 ] || [ "${TERN_K8S_KEEP:-0}" = 1 ] || { log "up failed: tearing down"; down; }' EXIT; up; trap - EXIT ;;
  down) down ;;
  env) echo "KUBECONFIG=$KUBECONFIG_ADMIN"; echo "BIN_DIR=$(cat "$BASE/bin-dir")" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
