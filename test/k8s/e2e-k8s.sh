#!/usr/bin/env bash
# `make e2e-k8s`: the upstream Kubernetes e2e suite (e2e.test, v1.37.2)
# against a real single-node cluster with Tern as its CNI plugin
# (test/k8s/node.sh), once per datapath.
#
#   test/k8s/e2e-k8s.sh [SUITE...]      default: cri rollout netpol conformance
#
# Environment:
#   TERN_E2E_DATAPATHS   configurations to run, in order (default
#                        "iptables ebpf ebpf-svc"): iptables and ebpf are
#                        those datapaths beside kube-proxy; ebpf-svc is the
#                        eBPF datapath with services "ebpf" and no
#                        kube-proxy
#   TERN_K8S_ARTIFACTS   logs, JUnit reports, summary.md (default /tmp/tern-k8s-artifacts)
#   TERN_E2E_TIMEOUT     ginkgo timeout per suite (default 90m)
#
# Suites (focus / skip regular expressions on the spec names):
#   smoke        the CI subset: a few NetworkPolicy, pod-to-pod, node-to-pod
#                and ClusterIP specs (minutes, not tens of minutes)
#   netpol       every `[sig-network] Netpol` spec but SCTP (this kernel has
#                no SCTP sockets)
#   conformance  `[sig-network]` Services, Networking, HostPort and Proxy specs
#                tagged [Conformance] that run on one node with agnhost and
#                kube-proxy (the skipped ones and why: README, Real-node e2e)
#   cri          not e2e.test: test/k8s/cri-checks.sh (CNI_ARGS, hostPort
#                through runtimeConfig, a sandbox killed hard)
#   rollout      not e2e.test: test/k8s/rollout.sh (a rolling update of the
#                DaemonSet to a new image tag under a probe matrix)
#
# Exit status: 0 when every spec of every suite passed on every datapath.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NODE_SH=$ROOT/test/k8s/node.sh
ARTIFACTS=${TERN_K8S_ARTIFACTS:-/tmp/tern-k8s-artifacts}
DATAPATHS=${TERN_E2E_DATAPATHS:-iptables ebpf ebpf-svc}
GINKGO_TIMEOUT=${TERN_E2E_TIMEOUT:-90m}
SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || SUITES=(cri rollout netpol conformance)
export TERN_K8S_ARTIFACTS=$ARTIFACTS

log() { echo "[$(date -u +%H:%M:%S)] e2e-k8s: $*" >&2; }

# Specs skipped everywhere, with the reason (README, Real-node e2e).
SKIP_ALWAYS=(
  'SCTPConnectivity'                 # no SCTP sockets in this kernel
)
skip_re() { local IFS='|'; echo "${SKIP_ALWAYS[*]}"; }

focus_of() {
  case $1 in
    smoke) echo "\[sig-network\] (Netpol NetworkPolicy between server and client should (support a 'default-deny-ingress' policy|support allow-all policy|enforce policy based on Ports|allow ingress access on one named port|allow egress access on one named port)|Networking Granular Checks: Pods should function for (intra|node)-pod communication: (http|udp)|Services should serve endpoints on same port and different protocols|Services should serve a basic endpoint from pods)" ;;
    netpol) echo '\[sig-network\] Netpol' ;;
    conformance) echo '\[sig-network\] (Services|Networking|HostPort|Proxy) .*\[Conformance\]' ;;
    cri | rollout) echo - ;;
    *) return 1 ;;
  esac
}

for s in "${SUITES[@]}"; do
  focus_of "$s" >/dev/null || { echo "unknown suite $s (smoke, netpol, conformance, cri, rollout)" >&2; exit 2; }
done

mkdir -p "$ARTIFACTS"
BIN_DIR=$("$ROOT/test/k8s/build.sh" | tail -n1)

cleanup() { "$NODE_SH" down || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

summary=$ARTIFACTS/summary.md
: > "$summary.rows"
status=0
for dp in $DATAPATHS; do
  t0=$SECONDS
  case $dp in
    iptables | ebpf) services=kube-proxy datapath=$dp ;;
    ebpf-svc) services=ebpf datapath=ebpf ;;
    *) echo "unknown configuration $dp (iptables, ebpf, ebpf-svc)" >&2; exit 2 ;;
  esac
  TERN_DATAPATH=$datapath TERN_SERVICES=$services "$NODE_SH" up
  log "$dp: cluster up in $((SECONDS - t0)) s"
  for s in "${SUITES[@]}"; do
    out=$ARTIFACTS/$dp-$s
    rm -rf "$out"; mkdir -p "$out"
    log "$dp: suite $s"
    t1=$SECONDS
    set +e
    if [ "$s" = cri ] || [ "$s" = rollout ]; then
      script=cri-checks.sh
      [ "$s" = rollout ] && script=rollout.sh
      timeout -k 10 600 "$ROOT/test/k8s/$script" > "$out/checks.log" 2>&1
      rc=$?
      sed -n "s/^\(pass\|FAIL\) \(.*\)/| $dp | $s | \1 | - | \2 |/p" "$out/checks.log" >> "$summary.rows"
      set -e
      [ $rc -eq 0 ] || status=1
      log "$dp: suite $s done in $((SECONDS - t1))s (rc $rc)"
      echo "$dp $s $((SECONDS - t1))s rc=$rc" >> "$ARTIFACTS/timings"
      continue
    fi
    timeout -k 60 "$(( ${GINKGO_TIMEOUT%m} + 5 ))m" "$BIN_DIR/e2e.test" \
      --provider=local --kubeconfig=/var/lib/tern-k8s/admin.kubeconfig --kubectl-path="$BIN_DIR/kubectl" \
      --ginkgo.focus="$(focus_of "$s")" --ginkgo.skip="$(skip_re)" \
      --ginkgo.timeout="$GINKGO_TIMEOUT" --ginkgo.no-color --ginkgo.v \
      --report-dir="$out" --disable-log-dump \
      > "$out/e2e.log" 2>&1
    rc=$?
    set -e
    secs=$((SECONDS - t1))
    [ $rc -eq 0 ] || status=1
    # One row per spec from the JUnit report: datapath, suite, result, seconds, name.
    python3 - "$out" "$dp" "$s" >> "$summary.rows" <<'EOF' || true
import glob, sys, xml.etree.ElementTree as ET
out, dp, suite = sys.argv[1:4]
for f in glob.glob(out + "/junit*.xml"):
    for tc in ET.parse(f).getroot().iter("testcase"):
        if tc.get("status") in ("skipped",) or tc.find("skipped") is not None:
            continue
        name = tc.get("name", "")
        if not name.startswith("[It] "):
            continue  # suite set-up and reporting nodes
        name = name[5:]
        res = "FAIL" if (tc.find("failure") is not None or tc.find("error") is not None) else "pass"
        print(f"| {dp} | {suite} | {res} | {float(tc.get('time', 0)):.0f} | {name} |")
EOF
    log "$dp: suite $s done in ${secs}s (rc $rc): $(grep -c "^| $dp | $s | pass" "$summary.rows" || true) passed, $(grep -c "^| $dp | $s | FAIL" "$summary.rows" || true) failed"
    echo "$dp $s ${secs}s rc=$rc" >> "$ARTIFACTS/timings"
  done
  t2=$SECONDS
  "$NODE_SH" down
  log "$dp: teardown in $((SECONDS - t2)) s"
done
{
  echo "| datapath | suite | result | seconds | spec |"
  echo "|---|---|---|---|---|"
  cat "$summary.rows"
} > "$summary"
rm -f "$summary.rows"
cat "$summary"
exit $status
