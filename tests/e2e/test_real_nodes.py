"""The Kiri runtime image in a real pod on a real node (issue 16, first part).

Unlike the rest of tests/e2e, nothing here is simulated past the API server: a real kubelet and
containerd (`hack/cluster up --real-nodes 1`) pull nothing, run the image that hack/images.py built
without Docker, probe it and route its pod IP to this host through the node's veth. Marked `real_nodes`
and skipped unless asked for (`-m real_nodes` or KIRI_REAL_NODES=1): the first run builds the kubelet,
containerd, runc and the image (minutes; see hack/README.md), and it needs root.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster, KubectlError

pytestmark = pytest.mark.real_nodes

RUNTIME_IMAGE = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"  # hack/images.py RUNTIME_REF
REAL_NODE = "kiri-real-0"
FEATURES, CLASSES = 4, 3


def _run(*cmd: str, timeout: float) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def real_node(cluster: Cluster) -> Iterator[str]:
    """One real node with the runtime image in its containerd (each step is cached when already done).

    Real nodes carry edge labels (site `site-real`), and the rest of the suite expects the kwok edge fleet
    alone (e.g. the operator's edge DaemonSets span every edge node): a node this fixture added is removed
    when the module ends, so the shared cluster is left as it was found.
    """
    before = len(cluster.kubectl("get", "nodes", "-l", "kiri.dev/node-kind=real", "-o", "name").split())
    _run("bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "real-nodes", timeout=1800)
    _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(max(before, 1)), timeout=600)
    try:
        _run(sys.executable, str(REPO_ROOT / "hack" / "images.py"), "load", "runtime", timeout=1800)
        yield REAL_NODE
    finally:
        if before == 0:
            _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", "0", timeout=600)


def classifier_onnx() -> tuple[bytes, np.ndarray, np.ndarray]:
    """softmax(x @ W + b), dynamic batch: the runtime tests' classifier, as bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(16)
    w = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), w, b


def runtime_pod(name: str, model_sha: str) -> dict[str, Any]:
    restricted = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kiri.dev/node-kind": "real"},
            "tolerations": [{"key": "kiri.dev/node-kind", "value": "real", "effect": "NoSchedule"}],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # The real nodes have no cluster DNS (and pods no route out): the node's empty resolv.conf.
            "dnsPolicy": "Default",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "runtime",
                    "image": RUNTIME_IMAGE,
                    # Imported by hack/images.py; the nodes have no registry to pull from.
                    "imagePullPolicy": "Never",
                    "args": [
                        "serve",
                        "--model-uri=file:///models/model.onnx",
                        "--name=clf",
                        f"--sha256={model_sha}",
                        "--port=8080",
                        "--threads=1",
                        "--cache-dir=/var/cache/kiri",
                    ],
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/v2/health/ready", "port": 8080},
                        "periodSeconds": 1,
                        "failureThreshold": 120,
                    },
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "256Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "securityContext": restricted,
                    "volumeMounts": [
                        {"name": "model", "mountPath": "/models", "readOnly": True},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "cache", "mountPath": "/var/cache/kiri"},
                    ],
                }
            ],
            "volumes": [
                {"name": "model", "configMap": {"name": f"{name}-model"}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "cache", "emptyDir": {}},
            ],
        },
    }


def test_runtime_image_serves_a_model_in_a_real_pod(cluster: Cluster, real_node: str, namespace: str) -> None:
    model, w, b = classifier_onnx()
    sha = hashlib.sha256(model).hexdigest()
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "clf-model"},
            "binaryData": {"model.onnx": base64.b64encode(model).decode()},
        },
        namespace=namespace,
    )
    t0 = time.monotonic()
    cluster.apply(runtime_pod("clf", sha), namespace=namespace)

    def ready() -> dict[str, Any] | None:
        pod: dict[str, Any] = cluster.get_json("pod", "clf", "-n", namespace)
        conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        return pod if conds.get("Ready") == "True" else None

    try:
        pod = cluster.wait_for(ready, timeout=180, interval=0.5, message="runtime pod Ready on the real node")
    except TimeoutError:
        detail = cluster.kubectl("describe", "pod", "clf", "-n", namespace, check=False)
        logs = cluster.kubectl("logs", "clf", "-n", namespace, check=False)
        raise AssertionError(f"pod not Ready:\n{detail}\n--- logs ---\n{logs}") from None
    print(f"\nruntime pod created -> Ready: {time.monotonic() - t0:.1f}s", file=sys.stderr)

    assert pod["spec"]["nodeName"] == real_node
    status = pod["status"]["containerStatuses"][0]
    assert status["containerID"].startswith("containerd://"), status
    assert status["ready"] and status["restartCount"] == 0
    pod_ip = pod["status"]["podIP"]

    # Through the pod IP, from this host: the node's netns routes it over its veth.
    x = np.random.default_rng(1).standard_normal((3, FEATURES)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [3, FEATURES], "datatype": "FP32", "data": x.ravel().tolist()}]}
    reply = httpx.post(f"http://{pod_ip}:8080/v2/models/clf/infer", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    out = reply.json()["outputs"][0]
    assert out["name"] == "probs" and out["shape"] == [3, CLASSES]
    logits = x @ w + b
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, CLASSES), expected, rtol=1e-5, atol=1e-6)

    # The API server reaches the kubelet at the node's InternalIP: logs, and exec through containerd's
    # stream server on the node's address (the image has no shell; its Python answers).
    assert cluster.kubectl("logs", "clf", "-n", namespace).strip()
    uid = cluster.kubectl(
        "exec", "clf", "-n", namespace, "--", "python3", "-c", "import os; print(os.getuid())"
    )
    assert uid.strip() == "65532"
    # The root filesystem is read-only in the pod.
    with pytest.raises(KubectlError, match="Read-only file system"):
        cluster.kubectl("exec", "clf", "-n", namespace, "--", "python3", "-c", "open('/opt/kiri/x', 'w')")
