#!/usr/bin/env bash
# Tern demo: one simulated node, three pods, wired by the tern CNI plugin the
# way a container runtime does it (cnitool = libcni), on the eBPF datapath.
#
# Run as root from the repository root after `make build`:
#
#   ./examples/demo.sh
#
# It shows each pod's address, the tcx program on a host-side veth, ping and
# a 3-second iperf3 between pods, and the datapath's metrics proving the
# packets were delivered by bpf_redirect_peer (ternctl get counters); then it DELs every pod and
# removes everything it made (also on failure or Ctrl-C). Running it twice
# in a row works: each run starts by clearing what a killed run left.
#
# Needs: ip (iproute2), bpftool, ping, iperf3, cnitool
#   (go install github.com/containernetworking/cni/cnitool@v1.3.1).
set -euo pipefail

NODE=tern-demo-node
PODS=(tern-demo-pod1 tern-demo-pod2 tern-demo-pod3)
NETWORK=tern-demo
SUBNET=10.99.0.0/24
DEMO_DIR=/run/tern-demo
STATE_DIR=$DEMO_DIR/state
# Not under /sys/fs/bpf: `ip netns exec` mounts a fresh /sys, so pins there
# would not be where the plugin looks. /run is left alone.
BPF_DIR=$DEMO_DIR/bpf
CONF_DIR=$DEMO_DIR/net.d
# libcni's result cache (cnitool has no flag to move it).
CNI_CACHE=/var/lib/cni

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CNI_BIN=$ROOT/bin

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

find_cnitool() {
	local c
	for c in "$(command -v cnitool || true)" "${GOBIN:-}/cnitool" "$HOME/go/bin/cnitool" /root/go/bin/cnitool; do
		if [[ -n $c && -x $c && ! -d $c ]]; then
			echo "$c"
			return 0
		fi
	done
	return 1
}

# cni CMD POD: run cnitool like a runtime would, from the node's netns.
cni() {
	local cmd=$1 pod=$2
	ip netns exec "$NODE" env \
		CNI_PATH="$CNI_BIN" \
		NETCONFPATH="$CONF_DIR" \
		CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$pod" \
		"$CNITOOL" "$cmd" "$NETWORK" "/var/run/netns/$pod"
}

netns_exists() { [[ -e /var/run/netns/$1 ]]; }

IPERF_PID=

# cleanup undoes everything, whatever state a run stopped in. Every step
# tolerates what is already gone.
cleanup() {
	set +e
	if [[ -n $IPERF_PID ]]; then
		kill "$IPERF_PID" 2>/dev/null
		wait "$IPERF_PID" 2>/dev/null
		IPERF_PID=
	fi
	# DEL needs the node netns (the host veths and pins live there) and the
	# config; it does not need the pod netns.
	if netns_exists "$NODE" && [[ -f $CONF_DIR/10-tern-demo.conflist && -n ${CNITOOL:-} ]]; then
		for pod in "${PODS[@]}"; do
			cni del "$pod" >/dev/null 2>&1 || echo "demo: cleanup: DEL $pod failed" >&2
		done
	fi
	for ns in "${PODS[@]}" "$NODE"; do
		if netns_exists "$ns"; then
			ip netns del "$ns" || echo "demo: cleanup: cannot delete netns $ns" >&2
		fi
	done
	if mountpoint -q "$BPF_DIR" 2>/dev/null; then
		umount "$BPF_DIR" || echo "demo: cleanup: cannot unmount $BPF_DIR" >&2
	fi
	rm -rf "$DEMO_DIR"
	# Results libcni cached for this network (DEL removes them; a failed
	# run may not have got that far). Empty cache directories hold no
	# state; libcni recreates them.
	rm -f "$CNI_CACHE"/results/"$NETWORK"-* 2>/dev/null
	rmdir "$CNI_CACHE/results" "$CNI_CACHE" 2>/dev/null
	return 0
}

[[ $(id -u) == 0 ]] || die "run as root (it creates network namespaces and loads BPF programs)"
[[ -x $CNI_BIN/tern && -x $CNI_BIN/ternctl ]] || die "$CNI_BIN/tern or ternctl is missing: run 'make build' first"
CNITOOL=$(find_cnitool) || die "cnitool not found: go install github.com/containernetworking/cni/cnitool@v1.3.1"
for tool in ip bpftool ping iperf3 mountpoint; do
	command -v "$tool" >/dev/null || die "$tool not found (see scripts/quickstart.sh)"
done

# A previous run that was killed (SIGKILL, reboot of the shell...) may have
# left state: clear it first, then make sure this run clears its own.
cleanup
trap cleanup EXIT
trap 'exit 130' INT TERM

step "node netns $NODE and pod netns ${PODS[*]}"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
for pod in "${PODS[@]}"; do
	ip netns add "$pod"
	ip -n "$pod" link set lo up
done
ip netns list | grep tern-demo

step "bpffs for the node's pins on $BPF_DIR, config in $CONF_DIR"
mkdir -p "$STATE_DIR" "$BPF_DIR" "$CONF_DIR"
mount -t bpf bpf "$BPF_DIR"
cat >"$CONF_DIR/10-tern-demo.conflist" <<EOF
{
  "cniVersion": "1.1.0",
  "name": "$NETWORK",
  "plugins": [
    {
      "type": "tern",
      "datapath": "ebpf",
      "mtu": 1500,
      "clusterCIDR": "10.99.0.0/16",
      "stateDir": "$STATE_DIR",
      "bpffsDir": "$BPF_DIR",
      "ipam": {
        "type": "tern-ipam",
        "subnet": "$SUBNET"
      }
    }
  ]
}
EOF
cat "$CONF_DIR/10-tern-demo.conflist"

step "CNI ADD for each pod (cnitool add $NETWORK /var/run/netns/<pod>, run in $NODE)"
declare -A IP HOSTVETH
for pod in "${PODS[@]}"; do
	result=$(cni add "$pod")
	if [[ $pod == "${PODS[0]}" ]]; then
		echo "result for $pod:"
		echo "$result"
	fi
	IP[$pod]=$(ip -n "$pod" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')
	HOSTVETH[$pod]=$(grep -o '"name": *"tern[0-9a-f]*"' <<<"$result" | head -n1 | sed 's/.*"\(tern[0-9a-f]*\)"/\1/')
	[[ -n ${IP[$pod]} && -n ${HOSTVETH[$pod]} ]] || die "ADD $pod: no address or host veth in the result"
done

step "pod addresses"
for pod in "${PODS[@]}"; do
	printf '%-16s %-12s eth0 <-> %s (node side)\n' "$pod" "${IP[$pod]}" "${HOSTVETH[$pod]}"
	ip -n "$pod" -br addr show dev eth0
	ip -n "$pod" route show | sed 's/^/    route: /'
done

pod1=${PODS[0]} pod2=${PODS[1]} pod3=${PODS[2]}
veth=${HOSTVETH[$pod1]}
step "tcx program on $veth (host side of $pod1): bpftool net show dev $veth"
net_show=$(ip netns exec "$NODE" bpftool net show dev "$veth")
echo "$net_show"
if ! grep -q tcx <<<"$net_show"; then
	# bpftool before 7.3 does not list tcx attachments in `net show`; the
	# pinned bpf_link that keeps the program attached shows it.
	echo "($(bpftool version | head -n1) predates tcx in 'net show'; the tcx link, pinned by tern, and its program:)"
	link_pin="$BPF_DIR/links/$veth@ingress"
	bpftool link show pinned "$link_pin"
	prog_id=$(bpftool link show pinned "$link_pin" | grep -o 'prog [0-9]*' | awk '{print $2}')
	bpftool prog show id "$prog_id" | head -n1
fi
echo "pinned under $BPF_DIR:"
(cd "$BPF_DIR" && find . -mindepth 2 | sort | sed 's/^\.\//    /')

step "ping $pod1 -> $pod2 and $pod1 -> $pod3"
ip netns exec "$pod1" ping -n -c 3 -i 0.2 -W 1 "${IP[$pod2]}"
ip netns exec "$pod1" ping -n -c 3 -i 0.2 -W 1 "${IP[$pod3]}"

step "iperf3 for 3 s: $pod1 -> $pod2 (${IP[$pod2]})"
ip netns exec "$pod2" iperf3 -s -1 -B "${IP[$pod2]}" >/dev/null 2>&1 &
IPERF_PID=$!
for _ in $(seq 50); do
	ip netns exec "$pod2" ss -Hltn "sport = :5201" | grep -q . && break
	sleep 0.1
done
ip netns exec "$pod1" iperf3 -c "${IP[$pod2]}" -t 3 -f g | sed -n '/^- - -/,$p' | grep -E 'ID|sender|receiver'
wait "$IPERF_PID" || true
IPERF_PID=

step "datapath counters: ternctl get counters (summed over CPUs, zero rows hidden)"
ternctl() { ip netns exec "$NODE" "$CNI_BIN/ternctl" --cni-conf "$CONF_DIR/10-tern-demo.conflist" "$@"; }
ternctl get counters
redirected=$(ternctl get counters | awk '$1 == "redirect_peer" { print $2 }')
if [[ -n $redirected && $redirected -gt 0 ]]; then
	echo "=> $redirected packets went pod to pod by bpf_redirect_peer, straight into the peer pod's eth0."
else
	die "no packet counted as redirect_peer"
fi
echo
echo "ternctl get counters --watch --interval 1s --count 2, while $pod1 pings $pod3:"
ip netns exec "$pod1" ping -n -q -c 12 -i 0.2 "${IP[$pod3]}" >/dev/null &
PING_PID=$!
ternctl get counters --watch --interval 1s --count 2
wait "$PING_PID" || true

step "CNI DEL for each pod"
for pod in "${PODS[@]}"; do
	cni del "$pod"
	echo "DEL $pod: ok"
done
echo "veths left in $NODE: $(ip -n "$NODE" -o link show type veth | wc -l)"
echo "endpoints left in the map: $(bpftool map dump pinned "$BPF_DIR/maps/tern_endpoints" | grep -c '^key' || true)"
echo "IPs left in the IPAM store: $(find "$STATE_DIR/ipam/$NETWORK" -maxdepth 1 -name '10.*' | wc -l)"

step "cleanup: namespaces, bpffs and $DEMO_DIR"
cleanup
trap - EXIT
ip netns list | grep tern-demo || echo "no tern-demo netns left"
if mount | grep -q tern-demo; then
	die "a tern-demo mount is left"
fi
echo "no tern-demo mount left"
[[ ! -e $DEMO_DIR ]] || die "$DEMO_DIR is left"
echo "$DEMO_DIR removed"
