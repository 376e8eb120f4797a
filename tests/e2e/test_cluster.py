"""The local control plane behaves like a real cluster: real scheduler, controllers, admission and CEL."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster, KubectlError

pytestmark = pytest.mark.timeout(180)

IMAGE = "registry.invalid/kiri/e2e:1"  # never pulled: kwok plays the kubelet


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
    return items


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return str(cond["status"])
    return None


def _pod(name: str, labels: dict[str, str], tier: str = "edge") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {"kiri.dev/tier": tier},
            "containers": [{"name": "main", "image": IMAGE}],
        },
    }


def test_gpu_deployment_is_scheduled_on_cloud_nodes_only_and_gets_ready(
    cluster: Cluster, namespace: str
) -> None:
    def deployment(name: str, tolerate: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "nodeSelector": {"kiri.dev/tier": "cloud"},
            "containers": [
                {"name": "model", "image": IMAGE, "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
        }
        if tolerate:
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
            },
        }

    cluster.apply([deployment("full-model", True), deployment("no-toleration", False)], namespace=namespace)
    cluster.kubectl(
        "rollout", "status", "deployment/full-model", "-n", namespace, "--timeout=90s", timeout=100
    )

    pods = _pods(cluster, namespace, "app=full-model")
    cloud = set(cluster.cloud_nodes())
    assert len(pods) == 3
    assert {p["spec"]["nodeName"] for p in pods} <= cloud
    assert all(_condition(p, "Ready") == "True" for p in pods)

    # The GPU taint is real: without the toleration the real scheduler finds no node.
    unschedulable = cluster.wait_for(
        lambda: [
            p
            for p in _pods(cluster, namespace, "app=no-toleration")
            if any(c.get("reason") == "Unschedulable" for c in p.get("status", {}).get("conditions", []))
        ],
        timeout=60,
        message="pods without the GPU toleration reported Unschedulable",
    )
    assert all(not p["spec"].get("nodeName") for p in unschedulable)
    messages = " ".join(c.get("message", "") for p in unschedulable for c in p["status"]["conditions"])
    # At least the cloud nodes (a node held offline by a parallel run adds its not-ready taint).
    tainted = re.search(r"(\d+) node\(s\) had untolerated taint", messages)
    assert tainted and int(tainted.group(1)) >= len(cloud), messages


def test_edge_daemonset_gets_exactly_one_ready_pod_per_edge_node(cluster: Cluster, namespace: str) -> None:
    edge = cluster.edge_nodes()
    assert len(edge) >= 3
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "edge-runtime"},
            "spec": {
                "selector": {"matchLabels": {"app": "edge-runtime"}},
                "template": {
                    "metadata": {"labels": {"app": "edge-runtime"}},
                    "spec": {
                        "nodeSelector": {"kiri.dev/tier": "edge"},
                        "containers": [{"name": "runtime", "image": IMAGE}],
                    },
                },
            },
        },
        namespace=namespace,
    )

    def settled() -> list[dict[str, Any]] | None:
        # The cluster is shared: a test elsewhere may hold a node offline, and nothing runs there.
        online = {n for n in edge if cluster.node_ready(n)}
        pods = _pods(cluster, namespace, "app=edge-runtime")
        ready = {p["spec"].get("nodeName") for p in pods if _condition(p, "Ready") == "True"}
        return pods if len(pods) == len(edge) and online <= ready else None

    pods = cluster.wait_for(settled, timeout=120, message=f"DaemonSet Ready on all {len(edge)} edge nodes")
    nodes = [p["spec"]["nodeName"] for p in pods]
    assert sorted(nodes) == edge  # exactly one per edge node, none elsewhere
    ready_nodes = sorted(p["spec"]["nodeName"] for p in pods if _condition(p, "Ready") == "True")
    assert ready_nodes == sorted(n for n in edge if cluster.node_ready(n))
    assert len(ready_nodes) >= len(edge) - 1


def test_never_ready_pod_stays_unready_while_a_plain_pod_gets_ready(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        [_pod("stuck", {"kiri.dev/sim": "never-ready"}), _pod("healthy", {"app": "healthy"})],
        namespace=namespace,
    )
    cluster.kubectl(
        "wait", "pod/healthy", "-n", namespace, "--for=condition=Ready", "--timeout=60s", timeout=70
    )
    cluster.kubectl(
        "wait",
        "pod/stuck",
        "-n",
        namespace,
        "--for=jsonpath={.status.phase}=Running",
        "--timeout=60s",
        timeout=70,
    )
    # Sample for a while: it must never flip to Ready.
    for _ in range(6):
        pod = cluster.get_json("pod", "stuck", "-n", namespace)
        assert _condition(pod, "Ready") == "False"
        assert [c["ready"] for c in pod["status"]["containerStatuses"]] == [False]
        time.sleep(1)


def test_crash_pod_restarts_with_exit_code_1_and_is_never_ready(cluster: Cluster, namespace: str) -> None:
    cluster.apply(_pod("crasher", {"kiri.dev/sim": "crash"}), namespace=namespace)

    def restarted_twice() -> dict[str, Any] | None:
        pod = cluster.get_json("pod", "crasher", "-n", namespace)
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        return pod if statuses[0].get("restartCount", 0) >= 2 else None

    pod = cluster.wait_for(restarted_twice, timeout=60, message="the crash pod restarted twice")
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert _condition(pod, "Ready") == "False"


def test_node_taken_offline_turns_not_ready_then_ready_again(cluster: Cluster, namespace: str) -> None:
    # A random node, so parallel runs on the shared cluster rarely pick the same one.
    node = random.choice([n for n in cluster.edge_nodes() if cluster.node_ready(n)])

    def phase(name: str) -> str:
        return str(cluster.get_json("pod", name, "-n", namespace)["status"]["phase"])

    try:
        cluster.set_node_ready(node, False, timeout=30)
        assert cluster.kubectl("get", "node", node, "--no-headers").split()[1].startswith("NotReady")

        # Nobody answers for an offline node: a pod bound to it is not started. kwok learns that it lost the
        # node's lease through its lease informer, which lags a few seconds on a loaded machine: probe with
        # pods bound to the node until one is left Pending, within a minute. (kwok is built with a fix for
        # this: see hack/build-binaries.sh, kwok_patched_wrapper.)
        deadline = time.monotonic() + 60
        for attempt in itertools.count():
            pinned = _pod(f"pinned-{attempt}", {"app": "pinned"})
            pinned["spec"]["nodeName"] = node
            cluster.apply(pinned, namespace=namespace)
            time.sleep(3)
            if phase(f"pinned-{attempt}") == "Pending":
                break
            assert time.monotonic() < deadline, (
                f"kwok still starts pods on {node} a minute after it went offline"
            )
            cluster.kubectl(
                "delete", "pod", f"pinned-{attempt}", "-n", namespace, "--grace-period=0", "--force"
            )
        # ... and it stays Pending: nothing starts it later.
        time.sleep(3)
        assert phase(f"pinned-{attempt}") == "Pending"

        # The real node lifecycle controller reacts to it, as it would to a lost edge site.
        def tainted() -> bool:
            taints = cluster.get_json("node", node)["spec"].get("taints", [])
            return any(t["key"] == "node.kubernetes.io/not-ready" for t in taints)

        cluster.wait_for(tainted, timeout=60, message=f"node lifecycle controller tainted {node} not-ready")
    finally:
        cluster.set_node_ready(node, True, timeout=30)
    assert cluster.kubectl("get", "node", node, "--no-headers").split()[1] == "Ready"
    cluster.wait_for(lambda: not tainted(), timeout=60, message=f"not-ready taint removed from {node}")
    # Back online, the node runs what was bound to it while it was away.
    cluster.kubectl(
        "wait", f"pod/pinned-{attempt}", "-n", namespace, "--for=condition=Ready", "--timeout=30s", timeout=40
    )


def test_crd_cel_rule_rejects_a_bad_object_with_the_api_servers_message(
    cluster: Cluster, namespace: str
) -> None:
    group = f"e2e{uuid.uuid4().hex[:8]}.kiri.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["minReplicas", "maxReplicas"],
                                    "properties": {
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.maxReplicas",
                                            "message": "minReplicas must not exceed maxReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.apply(crd)
    try:
        cluster.wait_crd_established(f"widgets.{group}", timeout=30)

        def widget(name: str, lo: Any, hi: Any) -> dict[str, Any]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"minReplicas": lo, "maxReplicas": hi},
            }

        cluster.apply(widget("good", 1, 3), namespace=namespace)

        with pytest.raises(KubectlError) as cel:
            cluster.apply(widget("bad", 5, 2), namespace=namespace)
        # The API server's own wording: object kind and name, field path, the rule's message.
        assert (
            'The Widget "bad" is invalid: spec: Invalid value: minReplicas must not exceed maxReplicas'
            in (cel.value.stderr)
        )

        with pytest.raises(KubectlError) as typed:
            cluster.apply(widget("typo", "one", 2), namespace=namespace)
        assert "spec.minReplicas in body must be of type integer" in typed.value.stderr

        names = cluster.kubectl("get", f"widgets.{group}", "-n", namespace, "-o", "name").split()
        assert names == [f"widget.{group}/good"]
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_up_again_is_idempotent(cluster: Cluster) -> None:
    before = json.loads((Path(cluster.kubeconfig).parent / "state.json").read_text())["procs"]
    proc = subprocess.run(
        [str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    after = json.loads((Path(cluster.kubeconfig).parent / "state.json").read_text())["procs"]
    assert {k: v["pid"] for k, v in after.items()} == {k: v["pid"] for k, v in before.items()}


# ---------------------------------------------------------------------------------------------- bad input


def _our_processes(state_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in cmd and "cluster.py" not in cmd:
            pids.append(int(proc.name))
    return pids


def _run_up(state_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "KIRI_STATE_DIR": str(state_dir), **env}
    return subprocess.run(
        [str(CLUSTER_SCRIPT), "up", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=full_env,
        cwd=REPO_ROOT,
    )


def test_up_with_the_port_taken_and_stale_state_fails_clearly_and_starts_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "kiri"
    state_dir.mkdir()
    # A previous run died without `down`: its state names a process that is long gone.
    (state_dir / "state.json").write_text(
        json.dumps(
            {"ports": {"apiserver": 1}, "procs": {"etcd": {"pid": 2**22 + 7, "binary": "/x", "log": "/x"}}}
        )
    )
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = _run_up(state_dir, "--apiserver-port", str(port))

    assert proc.returncode == 1
    assert "stale state from an earlier run: etcd is not running" in proc.stderr
    assert f"port {port} on 127.0.0.1 (requested for apiserver) is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (state_dir / "state.json").exists()
    assert _our_processes(state_dir) == []


def test_up_with_binaries_missing_names_them_and_the_fix(tmp_path: Path) -> None:
    proc = _run_up(tmp_path / "kiri", KIRI_CACHE=str(tmp_path / "empty-cache"))
    assert proc.returncode == 1
    assert "binaries missing: etcd, kube-apiserver" in proc.stderr
    assert "make binaries" in proc.stderr
    assert _our_processes(tmp_path / "kiri") == []
