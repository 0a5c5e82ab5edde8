#!/usr/bin/env bash
# A rolling update of Tern's DaemonSet (a new image tag) while an
# e2e-style probe matrix runs, on the cluster of test/k8s/node.sh:
#
#   test/k8s/rollout.sh         (make e2e-k8s runs it as the suite "rollout")
#
# Two agnhost servers behind a ClusterIP Service, a NetworkPolicy that
# admits only the pods labelled role=client, a client that probes every
# server pod and the ClusterIP over TCP (HTTP) and UDP (all six at once,
# a round every 0.2 s after the slowest: UDP probes wait 1 s for more),
# a client without the label whose probes must all be refused, and the
# host probing the server pods. While they run, the DaemonSet moves from
# $TERN_IMAGE to $TERN_IMAGE_NEXT (kubectl set image, rollout status: the
# agent is stopped and a new one started, which resyncs from the API), and
# a pod is created while the agent is down. (Tags in node.sh: TERN_IMAGE,
# TERN_IMAGE_NEXT.) Passes when no allowed probe
# failed, no refused probe got through, the agent runs the new image in a
# new process, and the pod created during the update is reachable.
# Prints "pass …" / "FAIL …" lines like cri-checks.sh; exit 1 on a FAIL.
set -uo pipefail

BASE=${TERN_K8S_DIR:-/var/lib/tern-k8s}
BIN_DIR=$(cat "$BASE/bin-dir")
NS=tern-rollout
# node.sh imports Tern's image under both tags; the update moves to the
# one the DaemonSet does not run (a second run moves back).
IMAGES=(ghcr.io/ternlabs/tern:k8s-e2e-1 ghcr.io/ternlabs/tern:k8s-e2e-2)
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.66.1
# Probing rounds of the clients (about one a second): an upper bound on their
# life if the script dies without deleting the namespace.
ROUNDS=3000

k() { "$BIN_DIR/kubectl" --kubeconfig "$BASE/admin.kubeconfig" --request-timeout=60s "$@"; }
log() { echo "[$(date -u +%H:%M:%S)] rollout: $*" >&2; }
failed=0
result() { # RC WHAT DETAIL
  if [ "$1" -eq 0 ]; then echo "pass $2"; else echo "FAIL $2: $3"; failed=1; fi
}

cleanup() {
  [ -n "${host_probe:-}" ] && kill "$host_probe" 2>/dev/null
  k delete namespace "$NS" --wait=true --timeout=120s >/dev/null 2>&1
}
trap cleanup EXIT

server() { # NAME
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {app: srv}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: srv
    image: $AGNHOST
    args: ["netexec", "--http-port=8080", "--udp-port=8081"]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
EOF
}

# client NAME ROLE TARGETS: probes each target (http:IP:PORT or
# udp:IP:PORT) every 0.2 s once /tmp/go exists; one line per probe.
client() {
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS, labels: {role: $2}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: probe
    image: $AGNHOST
    command: ["/bin/sh", "-c"]
    args:
    - |
      while [ ! -e /tmp/go ]; do sleep 0.2; done
      i=0
      while [ \$i -lt $ROUNDS ] && [ ! -e /tmp/stop ]; do
        for t in \$(cat /tmp/targets); do
          (
            p=\${t%%:*}; hp=\${t#*:}
            if [ "\$p" = http ]; then
              r=\$(curl -s -m 2 "http://\$hp/hostname")
            else
              r=\$(echo hostname | nc -u -w 1 \${hp%:*} \${hp#*:})
            fi
            if [ -n "\$r" ]; then echo "ok \$t \$r"; else echo "no \$t \$(date +%T.%N)"; fi
          ) &
        done
        wait
        i=\$((i + 1))
        sleep 0.2
      done
      echo done
      sleep 3600
---
EOF
}

pod_ip() { k -n "$NS" get pod "$1" -o jsonpath='{.status.podIP}'; }

log "probe matrix in namespace $NS"
k create namespace "$NS" >/dev/null || exit 1
{
  cat <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-clients, namespace: $NS}
spec:
  podSelector: {matchLabels: {app: srv}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
---
apiVersion: v1
kind: Service
metadata: {name: srv, namespace: $NS}
spec:
  selector: {app: srv}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: udp, port: 81, targetPort: 8081, protocol: UDP}
---
EOF
  server srv-a
  server srv-b
  client allowed client
  client refused other
} | k apply -f - >/dev/null || exit 1
k -n "$NS" wait --for=condition=Ready pod --all --timeout=120s >/dev/null || { echo "FAIL pods not Ready"; exit 1; }
a=$(pod_ip srv-a) b=$(pod_ip srv-b)
svc=$(k -n "$NS" get service srv -o jsonpath='{.spec.clusterIP}')
targets="http:$a:8080 http:$b:8080 http:$svc:80 udp:$a:8081 udp:$b:8081 udp:$svc:81"
# The baseline first: the Service answers once kube-proxy (or ternd) has
# programmed the endpoints of the pods that just turned Ready, which takes
# a sync period; probes started before that measure the sync, not the
# update (bounded: 60 tries).
for ((i = 0; i < 60; i++)); do
  k -n "$NS" exec allowed -- sh -c "curl -s -m 1 http://$svc:80/hostname >/dev/null && [ -n \"\$(echo hostname | nc -u -w 1 $svc 81)\" ]" && break
  sleep 0.5
done
[ "$i" -lt 60 ] || { echo "FAIL ClusterIP $svc never answered the allowed client before the update"; exit 1; }
for c in allowed refused; do
  k -n "$NS" exec "$c" -- sh -c "echo '$targets' > /tmp/targets && touch /tmp/go" || exit 1
done
# the host (node → pod: not subject to the policy's pod selector)
(
  for ((i = 0; i < ROUNDS; i++)); do
    [ -e "$BASE/rollout-stop" ] && break
    for ip in "$a" "$b"; do
      if curl -s -m 2 "http://$ip:8080/hostname" >/dev/null; then echo "ok $ip"; else echo "no $ip $(date +%T.%N)"; fi
    done
    sleep 0.2
  done > "$BASE/rollout-host.log"
) &
host_probe=$!
sleep 5

old_pid=$(k -n tern-system get pods -l app.kubernetes.io/name=ternd -o jsonpath='{.items[0].metadata.uid}')
IMAGE_NEXT=${IMAGES[1]}
[ "$(k -n tern-system get daemonset ternd -o jsonpath='{.spec.template.spec.containers[0].image}')" = "$IMAGE_NEXT" ] &&
  IMAGE_NEXT=${IMAGES[0]}
log "rolling ternd to $IMAGE_NEXT"
t0=$SECONDS
k -n tern-system set image daemonset/ternd "ternd=$IMAGE_NEXT" "install-cni-plugin=$IMAGE_NEXT" >/dev/null
# a pod wired while the agent is being replaced
sleep 1
{ server srv-c; } | k apply -f - >/dev/null
k -n tern-system rollout status daemonset/ternd --timeout=180s >/dev/null
result $? "DaemonSet rolled out to $IMAGE_NEXT" "rollout status failed"
log "rolled out in $((SECONDS - t0)) s"
new=$(k -n tern-system get pods -l app.kubernetes.io/name=ternd -o jsonpath='{.items[0].metadata.uid} {.items[0].spec.containers[0].image}')
[ "${new% *}" != "$old_pid" ] && [ "${new#* }" = "$IMAGE_NEXT" ]
result $? "a new ternd pod runs $IMAGE_NEXT" "pod uid/image now: $new (before: $old_pid)"
k -n "$NS" wait --for=condition=Ready pod/srv-c --timeout=60s >/dev/null
c=$(pod_ip srv-c)
k -n "$NS" exec allowed -- curl -s -m 5 "http://$c:8080/hostname" | grep -qx srv-c
result $? "pod created during the update ($c) answers the allowed client" "no answer"
k -n "$NS" exec refused -- curl -s -m 3 "http://$c:8080/hostname" >/dev/null 2>&1
[ $? -ne 0 ]
result $? "pod created during the update refuses the other client" "it answered"
sleep 5
for c in allowed refused; do k -n "$NS" exec "$c" -- touch /tmp/stop; done
touch "$BASE/rollout-stop"
wait "$host_probe" 2>/dev/null
host_probe=
sleep 2
al=$(k -n "$NS" logs allowed) rl=$(k -n "$NS" logs refused)
ok=$(grep -c '^ok ' <<<"$al") no=$(grep -c '^no ' <<<"$al")
[ "$no" -eq 0 ] && [ "$ok" -gt 0 ]
result $? "allowed client: $ok probes (pods and ClusterIP, TCP and UDP) before, during and after the update, none failed" \
  "$no of $((ok + no)) failed: $(grep '^no ' <<<"$al" | head -5 | tr '\n' ';')"
rok=$(grep -c '^ok ' <<<"$rl") rno=$(grep -c '^no ' <<<"$rl")
[ "$rok" -eq 0 ] && [ "$rno" -gt 0 ]
result $? "refused client: $rno probes, none got through" "$rok of $((rok + rno)) got through: $(grep '^ok ' <<<"$rl" | head -3 | tr '\n' ';')"
hok=$(grep -c '^ok ' "$BASE/rollout-host.log") hno=$(grep -c '^no ' "$BASE/rollout-host.log")
[ "$hno" -eq 0 ] && [ "$hok" -gt 0 ]
result $? "host → pods: $hok probes, none failed" "$hno of $((hok + hno)) failed: $(grep '^no ' "$BASE/rollout-host.log" | head -3 | tr '\n' ';')"
rm -f "$BASE/rollout-stop" "$BASE/rollout-host.log"
exit $failed
