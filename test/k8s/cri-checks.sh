#!/usr/bin/env bash
# What kubelet and containerd's CRI hand Tern, checked on the harness's
# running cluster (test/k8s/node.sh up): the `cri` suite of e2e-k8s.sh.
#
#  1. CNI_ARGS: the endpoint of a kubelet-made pod carries its
#     K8S_POD_NAMESPACE/K8S_POD_NAME (ternctl get endpoints), with the pod IP
#     the API shows.
#  2. runtimeConfig.portMappings: a hostPort (portmap behind Tern) answers
#     on the node IP, from the host and from another pod.
#  3. A sandbox killed hard (SIGKILL to its pause process): kubelet makes a
#     new one; afterwards the pod has exactly one Tern endpoint, with the
#     pod's current IP, and no IPAM record or host veth of the old sandbox
#     is left.
#
# Prints one "pass|FAIL <check>" line per check; exit status 1 if any failed.
set -uo pipefail

BASE=${TERN_K8S_DIR:-/var/lib/tern-k8s}
BIN_DIR=$(cat "$BASE/bin-dir")
SOCK=$BASE/containerd/containerd.sock
CONF=$BASE/cni/net.d/10-tern.conflist
NS=tern-cri-checks
NODE_IP=10.199.0.1
HOST_PORT=18080
IMG=registry.k8s.io/e2e-test-images/agnhost:2.66.1

k() { "$BIN_DIR/kubectl" --kubeconfig "$BASE/admin.kubeconfig" --request-timeout=30s "$@"; }
endpoints() { "$BASE/ternctl" --cni-conf "$CONF" get endpoints -o json; }
failed=0
result() { # OK NAME [DETAIL]
  if [ "$1" = 0 ]; then echo "pass $2"; else echo "FAIL $2${3:+: $3}"; failed=1; fi
}

pod() { # NAME [HOSTPORT]
  local hp=""
  [ -n "${2:-}" ] && hp=", \"hostPort\": $2"
  k -n "$NS" apply -f - >/dev/null <<EOF
{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "$1", "labels": {"app": "$1"}},
 "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "$IMG",
   "imagePullPolicy": "Never", "args": ["netexec", "--http-port=8080"],
   "ports": [{"containerPort": 8080$hp}]}]}}
EOF
}

k create namespace "$NS" >/dev/null
trap 'k delete namespace "$NS" --wait=false >/dev/null 2>&1' EXIT
pod client
pod server "$HOST_PORT"
k -n "$NS" wait --for=condition=Ready pod/client pod/server --timeout=90s >/dev/null ||
  { echo "FAIL pods not Ready"; exit 1; }

# 1. CNI_ARGS
ip=$(k -n "$NS" get pod server -o jsonpath='{.status.podIP}')
got=$(endpoints | python3 -c 'import json,sys; print(" ".join(e["ip"] for e in json.load(sys.stdin) if e.get("pod") == sys.argv[1]))' "$NS/server")
[ "$got" = "$ip" ]
result $? "K8S_POD_NAMESPACE/K8S_POD_NAME on the endpoint of $NS/server" "ternctl shows '$got', API $ip"

# 2. hostPort from the host and from another pod (portmap's DNAT)
out=$(timeout 10 curl -s -m 5 "http://$NODE_IP:$HOST_PORT/hostname")
[ "$out" = server ]
result $? "hostPort $HOST_PORT from the host" "got '$out'"
out=$(k -n "$NS" exec client -- curl -s -m 5 "http://$NODE_IP:$HOST_PORT/hostname")
[ "$out" = server ]
result $? "hostPort $HOST_PORT from another pod" "got '$out'"

# 3. hard kill of the sandbox
sandbox=""
for id in $(timeout 10 ctr -a "$SOCK" -n k8s.io containers ls -q); do
  info=$(timeout 10 ctr -a "$SOCK" -n k8s.io containers info "$id")
  if grep -q '"io.cri-containerd.kind": "sandbox"' <<< "$info" &&
     grep -q "\"io.kubernetes.pod.name\": \"server\"" <<< "$info" &&
     grep -q "\"io.kubernetes.pod.namespace\": \"$NS\"" <<< "$info"; then
    sandbox=$id
  fi
done
pid=$(timeout 10 ctr -a "$SOCK" -n k8s.io tasks ls | awk -v id="$sandbox" '$1 == id {print $2}')
if [ -z "$pid" ]; then
  result 1 "sandbox of $NS/server found" "no running task"
else
  old_veth=$(endpoints | python3 -c 'import json,sys; print(" ".join(e["hostVeth"] for e in json.load(sys.stdin) if e.get("pod") == sys.argv[1]))' "$NS/server")
  kill -KILL "$pid"
  # kubelet notices, stops the dead sandbox (CNI DEL), makes a new one (ADD)
  ok=1
  for _ in $(seq 90); do
    sleep 1
    new=$(timeout 10 ctr -a "$SOCK" -n k8s.io tasks ls | awk '$3 == "RUNNING"' | wc -l)
    ready=$(k -n "$NS" get pod server -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
    restarts=$(k -n "$NS" get pod server -o jsonpath='{.status.containerStatuses[0].restartCount}')
    [ "$ready" = True ] && [ "${restarts:-0}" -ge 1 ] && { ok=0; break; }
  done
  result $ok "$NS/server Ready again after SIGKILL of its sandbox"
  sleep 3
  ip=$(k -n "$NS" get pod server -o jsonpath='{.status.podIP}')
  eps=$(endpoints | python3 -c 'import json,sys; print(" ".join(e["ip"]+"@"+e["hostVeth"] for e in json.load(sys.stdin) if e.get("pod") == sys.argv[1]))' "$NS/server")
  [ "${eps%@*}" = "$ip" ] && [ "$(wc -w <<< "$eps")" = 1 ]
  result $? "one endpoint for $NS/server after the new sandbox, with its IP" "endpoints '$eps', pod IP $ip"
  ! ip link show "$old_veth" >/dev/null 2>&1 || [ "${eps#*@}" = "$old_veth" ]
  result $? "host veth of the killed sandbox removed" "$old_veth still there"
  # IPAM records (one file per IP) = the pods of the network
  records=$(ls "$BASE/tern/ipam/tern-k8s" 2>/dev/null | grep -c -E '^[0-9.]+$')
  pods=$(k get pods -A -o json | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin)["items"] if p["status"].get("podIP") and not p["spec"].get("hostNetwork")))')
  [ "$records" = "$pods" ]
  result $? "IPAM records = pods with a pod IP" "$records records, $pods pods"
fi
exit $failed
