#!/usr/bin/env python3
"""Feeds the cluster's Namespaces, Pods and NetworkPolicies to Tern's policy
store on the harness's node, as the node agent (ternd, deploy/) will:

    policy-sync.py KUBECTL KUBECONFIG TERNCTL CNI_CONF [INTERVAL]

Interim stand-in until deploy/ lands: every INTERVAL seconds (default 1) it
lists the three kinds with kubectl; when what policy depends on changed
(labels, named ports, pod IPs, policies), it removes with `ternctl delete`
the objects gone since the last round and applies the current ones with
`ternctl apply` (both read kubectl's lists on stdin). NetworkPolicy specs of
the e2e suite retry their probes for about a minute, so a second of delay is
within what they tolerate; the agent brings it to the watch latency.
"""
import json
import subprocess
import sys
import time


def key(o):
    m = o["metadata"]
    return (o["kind"], m.get("namespace", ""), m["name"])


def relevant(o):
    """What policy is computed from: labels, named ports, pod IPs, spec."""
    m = o["metadata"]
    if o["kind"] == "Pod":
        st = o.get("status", {})
        ports = [c.get("ports", []) for c in o["spec"].get("containers", [])]
        return [m.get("labels"), ports, st.get("podIP"), st.get("podIPs"), st.get("phase"),
                o["spec"].get("hostNetwork")]
    if o["kind"] == "Namespace":
        return [m.get("labels"), o.get("status", {}).get("phase")]
    return [m.get("labels"), o.get("spec")]


def run(cmd, stdin=None):
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        print(f"policy-sync: {' '.join(cmd[:3])}…: {p.stderr.strip()}", file=sys.stderr, flush=True)
    return p


def main():
    kubectl, kubeconfig, ternctl, conf = sys.argv[1:5]
    interval = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    prev, prev_view = {}, None
    while True:
        p = run([kubectl, "--kubeconfig", kubeconfig, "--request-timeout=20s",
                 "get", "namespaces,pods,networkpolicies", "-A", "-o", "json"])
        if p.returncode == 0:
            items = json.loads(p.stdout)["items"]
            for o in items:
                o["metadata"].pop("managedFields", None)
            cur = {key(o): o for o in items}
            view = {k: relevant(o) for k, o in cur.items()}
            if view != prev_view:
                gone = [prev[k] for k in prev if k not in cur]
                ok = True
                if gone:
                    ok = run([ternctl, "--cni-conf", conf, "delete", "-f", "-"],
                             json.dumps({"apiVersion": "v1", "kind": "List", "items": gone})).returncode == 0
                if ok:
                    ok = run([ternctl, "--cni-conf", conf, "apply", "-f", "-"],
                             json.dumps({"apiVersion": "v1", "kind": "List", "items": items})).returncode == 0
                if ok:
                    print(f"policy-sync: applied {len(items)} objects, removed {len(gone)}", flush=True)
                    prev, prev_view = cur, view
        time.sleep(interval)


if __name__ == "__main__":
    main()
