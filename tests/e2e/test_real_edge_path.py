"""One ModelDeployment end to end on real pods (issue 16, item 4): two real nodes, `kiri-real-0` (edge)
and `kiri-real-1` (relabelled cloud), helm/kiri with its in-cluster artifact store, and nothing run on
the host but the test itself.

The path: the chart's store pod on the cloud node takes the source model (PUT from this host through its
ClusterIP); the operator, in its pod, creates the compression Job, whose pod on the cloud node
(`compressor-quantize` image, no torch) fetches the source from the store by Service name, quantizes it,
uploads the variant and manifest to the store and publishes the manifest ConfigMap; the edge DaemonSet
pod on the edge node fetches the variant from the store over the fabric between the nodes, checks its
sha256, caches it, turns Ready through its probes, answers OIP v2 and sends low-confidence rows to the
cloud Deployment by its Service name.

Marked `real_nodes` (opt-in, root, minutes of builds the first time; see tests/e2e/test_real_nodes.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster

pytestmark = pytest.mark.real_nodes

RUNTIME_IMAGE = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"  # hack/images.py RUNTIME_REF
COMPRESSOR_IMAGE = "ghcr.io/kiri-dev/kiri-compressor:0.1.0-quantize"  # hack/images.py COMPRESSOR_QUANTIZE_REF
EDGE_NODE, CLOUD_NODE = "kiri-real-0", "kiri-real-1"
REAL = {"kiri.dev/node-kind": "real"}
TOLERATE_REAL = [{"key": "kiri.dev/node-kind", "operator": "Equal", "value": "real", "effect": "NoSchedule"}]
FIGURES: dict[str, float] = {}


def _run(*cmd: str, timeout: float) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def figure(name: str, value: float) -> None:
    FIGURES[name] = value
    print(f"\n[figure] {name}: {value:.1f}", file=sys.stderr)


@pytest.fixture(scope="module")
def real_pair(cluster: Cluster) -> Iterator[None]:
    """Two real nodes, the second labelled as a cloud node, with the three images imported."""
    before = len(cluster.kubectl("get", "nodes", "-l", "kiri.dev/node-kind=real", "-o", "name").split())
    _run("bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "real-nodes", timeout=1800)
    _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(max(before, 2)), timeout=600)
    cluster.kubectl(
        "label", "node", CLOUD_NODE, "--overwrite", "kiri.dev/tier=cloud", "kiri.dev/site-",
        "topology.kubernetes.io/zone-",
    )  # fmt: skip
    try:
        _run(
            sys.executable, str(REPO_ROOT / "hack" / "images.py"), "load", "runtime", "operator",
            "compressor-quantize", timeout=1800,
        )  # fmt: skip
        yield
    finally:
        if before < 2:
            _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(before), timeout=600)


def tiny_classifier(path: Path) -> tuple[bytes, str]:
    """A seeded MLP (16 -> 32 -> 4) as ONNX, built with onnx (no torch): logits scale with the input, so a
    large input is confident and a tiny one is not."""
    import hashlib

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def store_counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("kiri_store_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pod_metric(pod_ip: str, name: str) -> float:
    text = httpx.get(f"http://{pod_ip}:8080/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_model_deployment_compresses_publishes_fetches_and_serves_on_real_pods(
    cluster: Cluster, real_pair: None, tmp_path: Path
) -> None:
    from .test_helm import CHART, _with_helm, helm

    ns = f"e2e-realpath-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", ns, check=False),
        timeout=30,
        message=f"default ServiceAccount in {ns}",
    )
    env = _with_helm(cluster.env, tmp_path / "helm-home")
    on_cloud = {**REAL, "kiri.dev/tier": "cloud"}
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "operator": {"watchNamespaces": [ns], "extraArgs": ["--resync-seconds=5"]},
                "image": {"pullPolicy": "Never"},
                "nodeSelector": on_cloud,
                "tolerations": TOLERATE_REAL,
                # No StorageClass in this cluster: the store keeps its files in an emptyDir.
                "store": {
                    "image": {"pullPolicy": "Never"},
                    "persistence": {"enabled": False},
                    "nodeSelector": on_cloud,
                    "tolerations": TOLERATE_REAL,
                },
            }
        )
    )
    release = "kiri-" + ns[-6:]
    logs: dict[str, str] = {}

    def operator_log() -> str:
        return cluster.kubectl(
            "logs", "-n", ns, "-l", "app.kubernetes.io/component=operator", "--tail=80", check=False
        )

    try:
        t0 = time.monotonic()
        helm(env, "install", release, str(CHART), "--namespace", ns, "-f", str(values), "--wait",
             "--timeout", "240s", timeout=300)  # fmt: skip
        figure("helm install --wait (operator + store pods Ready), s", time.monotonic() - t0)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        store_svc = cluster.get_json("service", f"{release}-store", "-n", ns)
        store_host = f"http://{store_svc['spec']['clusterIP']}:8080"  # from the host: via kiri-real-0's netns
        store_dns = f"http://{release}-store.{ns}.svc:8080"  # what pods use
        (store_pod,) = cluster.get_json("pods", "-n", ns, "-l", "app.kubernetes.io/component=store")["items"]
        assert store_pod["spec"]["nodeName"] == CLOUD_NODE

        # The source model goes into the store too: the Job fetches it by Service name.
        model, sha = tiny_classifier(tmp_path / "tiny.onnx")
        cluster.wait_for(
            lambda: httpx.get(f"{store_host}/healthz", timeout=3).status_code == 200,
            timeout=60,
            message="the store's ClusterIP from the host",
        )
        put = httpx.put(f"{store_host}/models/tiny-{sha[:12]}.onnx", content=model, timeout=30)
        assert put.status_code == 201, put.text

        md = {
            "apiVersion": "kiri.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": ns},
            "spec": {
                "model": {
                    "name": "tiny",
                    "version": "1",
                    "source": {
                        "uri": f"{store_dns}/models/tiny-{sha[:12]}.onnx",
                        "format": "onnx",
                        "sha256": sha,
                    },
                },
                "runtime": {
                    "image": RUNTIME_IMAGE,
                    "compressorImage": COMPRESSOR_IMAGE,
                    "imagePullPolicy": "Never",
                },
                "cloud": {
                    "replicas": 1,
                    "resources": {"cpu": "500m", "memory": "1Gi", "gpu": 0},
                    "nodeSelector": on_cloud,
                    "tolerations": TOLERATE_REAL,
                },
                "edge": {
                    "nodeSelector": {**REAL, "kiri.dev/tier": "edge"},
                    "tolerations": TOLERATE_REAL,
                    "variants": [{"name": "int8", "method": "int8-dynamic"}],
                    "fallback": {"confidenceThreshold": 0.9},
                    # edge.artifacts unset: the chart's store is the default.
                },
            },
        }
        t1 = time.monotonic()
        cluster.apply(md)

        def job_done() -> dict[str, Any] | None:
            jobs = cluster.get_json("jobs", "-n", ns, "-l", "kiri.dev/modeldeployment=tiny")["items"]
            for job in jobs:
                conds = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
                if conds.get("Complete") == "True" or conds.get("Failed") == "True":
                    return dict(job)
            return None

        try:
            job = cluster.wait_for(job_done, timeout=420, interval=2, message="compression Job finished")
        except TimeoutError as exc:
            pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False)
            raise AssertionError(f"{exc}\n{pods}\n--- operator ---\n{operator_log()}") from None
        (job_pod,) = cluster.get_json("pods", "-n", ns, "-l", f"job-name={job['metadata']['name']}")["items"]
        for c in ("compress", "publish"):
            logs[c] = cluster.kubectl("logs", job_pod["metadata"]["name"], "-n", ns, "-c", c, check=False)
        conds = {c["type"]: c["status"] for c in job["status"]["conditions"]}
        assert conds.get("Complete") == "True", f"{job['status']}\n{logs}"
        figure("ModelDeployment applied -> compression Job complete (in a pod), s", time.monotonic() - t1)
        assert job_pod["spec"]["nodeName"] == CLOUD_NODE
        assert job_pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
        assert "uploaded 2 files" in logs["publish"], logs["publish"]

        def edge_pod() -> dict[str, Any] | None:
            pods = cluster.get_json(
                "pods", "-n", ns, "-l", "app.kubernetes.io/component=edge,kiri.dev/modeldeployment=tiny"
            )["items"]
            for pod in pods:
                conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
                if conds.get("Ready") == "True":
                    return dict(pod)
            return None

        try:
            pod = cluster.wait_for(edge_pod, timeout=300, interval=1, message="edge pod Ready")
        except TimeoutError as exc:
            pods = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False)
            desc = cluster.kubectl(
                "describe",
                "pods",
                "-n",
                ns,
                "-l",
                "app.kubernetes.io/component=edge,kiri.dev/modeldeployment=tiny",
                check=False,
            )
            raise AssertionError(
                f"{exc}\n{pods}\n{desc[-4000:]}\n--- operator ---\n{operator_log()}"
            ) from None
        figure("ModelDeployment applied -> edge pod Ready (cold), s", time.monotonic() - t1)
        assert pod["spec"]["nodeName"] == EDGE_NODE
        edge_ip = pod["status"]["podIP"]

        status = cluster.get_json("modeldeployment", "tiny", "-n", ns)["status"]
        (variant,) = status["variants"]
        assert variant["state"] == "Verified"
        assert variant["uri"].startswith(f"{store_dns}/{ns}/tiny/"), variant
        counters = store_counters(store_host)
        assert pod_metric(edge_ip, 'kiri_artifact_fetches_total{result="downloaded"}') == 1.0
        fetched = pod_metric(edge_ip, "kiri_artifact_fetch_bytes_total")
        assert fetched == variant["sizeBytes"], (fetched, variant)
        figure("bytes downloaded by the edge node, revision 1", fetched)

        # OIP v2 on the edge pod: a confident row is answered at the edge, an unsure one by the cloud.
        confident = (np.random.default_rng(3).standard_normal((1, 16)) * 100).astype(np.float32)
        unsure = (np.random.default_rng(4).standard_normal((1, 16)) * 1e-4).astype(np.float32)
        for x, tier in ((confident, "edge"), (unsure, "cloud")):
            body = {
                "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]
            }
            reply = httpx.post(f"http://{edge_ip}:8080/v2/models/tiny/infer", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert answer["parameters"]["kiri_tier"] == tier, answer
            assert answer["outputs"][0]["shape"] == [1, 4]
        assert pod_metric(edge_ip, "kiri_fallback_total") == 1.0
        print(f"\nstore counters: {counters}", file=sys.stderr)
    finally:
        helm(env, "uninstall", release, "--namespace", ns, "--wait", "--timeout", "60s", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
