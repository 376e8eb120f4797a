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

Marked `real_nodes` (root; part of `make test`, which builds what it needs first; see tests/e2e/conftest.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster
from .test_real_node_cache import _shared, cache_root, kubelet_root

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
            "compressor-quantize", "cache-csi", timeout=1800,
        )  # fmt: skip
        # The chart's node cache driver mounts with Bidirectional propagation: its host paths must be shared.
        _shared(kubelet_root(EDGE_NODE))
        _shared(cache_root(EDGE_NODE))
        yield
    finally:
        if before < 2:
            _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(before), timeout=600)
        else:
            # Kept: an edge node again, as `up` labels real nodes (the next module may want two edge nodes).
            cluster.kubectl(
                "label", "node", CLOUD_NODE, "--overwrite", "kiri.dev/tier=edge", "kiri.dev/site=site-real",
                "topology.kubernetes.io/zone=site-real",
            )  # fmt: skip


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


def failing_classifier(path: Path) -> tuple[bytes, str]:
    """The tiny classifier's revision 2, which really fails: a row whose first feature is above 50 makes
    its Gather index 1000 into a 4-element tensor, and ONNX Runtime refuses (the runtime answers 500).
    The compression Job's random inputs never go there, so it passes its gates like a real regression."""
    import hashlib

    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {
        "W1": rng.standard_normal((16, 32)).astype(np.float32),
        "W2": rng.standard_normal((32, 4)).astype(np.float32),
        "s0": np.array([0], np.int64),
        "s1": np.array([1], np.int64),
        "ax": np.array([1], np.int64),
        "fifty": np.array(50.0, np.float32),
        "thousand": np.array(1000, np.int64),
        "zero4": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y0"]),
        helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["c"]),
        helper.make_node("Greater", ["c", "fifty"], ["big"]),
        helper.make_node("Cast", ["big"], ["bigi"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bigi", "thousand"], ["idx"]),
        helper.make_node("Squeeze", ["idx", "ax"], ["idx1"]),
        helper.make_node("Gather", ["zero4", "idx1"], ["g"], axis=0),
        helper.make_node("Unsqueeze", ["g", "ax"], ["g1"]),
        helper.make_node("Add", ["y0", "g1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def store_counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("kiri_store_") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pod_metric(pod_ip: str, name: str) -> float:
    text = httpx.get(f"http://{pod_ip}:8080/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def prometheus_binary() -> str:
    """Prometheus with Kubernetes service discovery, built by hack/build-binaries.sh (real-nodes builds it;
    Debian's package, hack/install-test-servers.sh, has no kubernetes_sd_configs)."""
    return _run(
        "bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "--print-prometheus", timeout=60
    ).strip()


# A confident row (its first feature is 100): answered at the edge by revision 1, refused by revision 2.
CONFIDENT = np.concatenate([[100.0], np.random.default_rng(3).standard_normal(15) * 100]).astype(np.float32)
UNSURE = (np.random.default_rng(4).standard_normal(16) * 1e-4).astype(np.float32)


def infer_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ready_seconds(pod: dict[str, Any]) -> float:
    """Pod created -> Ready, from the pod's own timestamps (whole seconds)."""
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    return ts(ready["lastTransitionTime"]) - ts(pod["metadata"]["creationTimestamp"])


@dataclass
class Deployed:
    cluster: Cluster
    ns: str
    store_host: str
    store_dns: str
    md: dict[str, Any]
    tmp: Path
    logs: dict[str, str] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=lambda: {"200": 0, "500": 0, "other": 0})
    stop: threading.Event = field(default_factory=threading.Event)

    def edge_pods(self) -> list[dict[str, Any]]:
        sel = "app.kubernetes.io/component=edge,kiri.dev/modeldeployment=tiny"
        return list(self.cluster.get_json("pods", "-n", self.ns, "-l", sel)["items"])

    def ready_edge_pod(self, revision: str | None = None) -> dict[str, Any] | None:
        for pod in self.edge_pods():
            conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if pod["metadata"].get("deletionTimestamp"):
                continue
            if revision is not None and pod["metadata"]["labels"].get("kiri.dev/revision") != revision:
                continue
            if conds.get("Ready") == "True":
                return pod
        return None

    def status(self) -> dict[str, Any]:
        return dict(self.cluster.get_json("modeldeployment", "tiny", "-n", self.ns).get("status", {}))

    def operator_log(self) -> str:
        return self.cluster.kubectl(
            "logs", "-n", self.ns, "-l", "app.kubernetes.io/component=operator", "--tail=80", check=False
        )

    def explain(self) -> str:
        pods = self.cluster.kubectl("get", "pods", "-n", self.ns, "-o", "wide", check=False)
        return f"{pods}\nstatus: {self.status()}\n--- operator ---\n{self.operator_log()}"


def _send_traffic(d: Deployed) -> None:
    """Confident rows to whichever edge pod is Ready, a few a second: what the analysis gate measures."""
    ip, checked = None, 0.0
    while not d.stop.is_set():
        if time.monotonic() - checked > 3:
            checked = time.monotonic()
            try:
                pod = d.ready_edge_pod()
                ip = pod["status"]["podIP"] if pod else None
            except Exception:
                pass
        if ip:
            try:
                code = httpx.post(
                    f"http://{ip}:8080/v2/models/tiny/infer", json=infer_body(CONFIDENT), timeout=10
                )
                key = str(code.status_code) if code.status_code in (200, 500) else "other"
            except httpx.HTTPError:
                key = "other"
            d.traffic[key] += 1
        time.sleep(0.25)


def _start_prometheus(cluster: Cluster, ns: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus on this host discovering the namespace's pods with kubernetes_sd_configs (the
    API server with the admin client certificate) and scraping the serving pods by pod IP, with the
    relabelling of docs/operations.md ("Scraping the serving pods")."""
    kubeconfig = yaml.safe_load(Path(cluster.env["KUBECONFIG"]).read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    pki = Path(cluster.env["KUBECONFIG"]).parent / "pki"
    # The operator asks it from its pod: Prometheus listens on the cluster's host address, the one host
    # address real nodes route to (the `kubernetes` Service's endpoint).
    endpoints = cluster.get_json("endpoints", "kubernetes", "-n", "default")
    host_address = endpoints["subsets"][0]["addresses"][0]["ip"]
    port = _free_port()
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {
                "job_name": "kiri-serving",
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "api_server": server,
                        "namespaces": {"names": [ns]},
                        "tls_config": {
                            "ca_file": str(pki / "ca.crt"),
                            "cert_file": str(pki / "admin.crt"),
                            "key_file": str(pki / "admin.key"),
                        },
                    }
                ],
                "relabel_configs": [
                    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_managed_by"],
                     "regex": "kiri", "action": "keep"},
                    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
                     "regex": "cloud|edge", "action": "keep"},
                    {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http",
                     "action": "keep"},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_label_kiri_dev_modeldeployment"],
                     "target_label": "modeldeployment"},
                    {"source_labels": ["__meta_kubernetes_pod_label_kiri_dev_revision"],
                     "target_label": "revision"},
                    {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
                     "target_label": "component"},
                    {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
                ],
            }
        ],
    }  # fmt: skip
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = work / "prometheus.log"
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address={host_address}:{port}"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    url = f"http://{host_address}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Prometheus did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deployed(
    cluster: Cluster, real_pair: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    """helm/kiri (operator + store) on the cloud node, Prometheus on this host, and revision 1 of a
    ModelDeployment whose edge pod is Ready on the edge node; confident traffic flows to the edge pod."""
    from .test_helm import CHART, _with_helm, helm

    tmp = tmp_path_factory.mktemp("realpath")
    ns = f"e2e-realpath-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", ns, check=False),
        timeout=30,
        message=f"default ServiceAccount in {ns}",
    )
    env = _with_helm(cluster.env, tmp / "helm-home")
    on_cloud = {**REAL, "kiri.dev/tier": "cloud"}
    prometheus, prom_url = _start_prometheus(cluster, ns, tmp)
    (tmp / "values.yaml").write_text(
        yaml.safe_dump(
            {
                # The CRD is applied below, not owned by this release (other releases may have kept it).
                "crds": {"install": False},
                # The operator asks only the Prometheus addresses the administrator allows.
                "analysis": {"allowedPrometheus": [prom_url]},
                "operator": {"watchNamespaces": [ns]},
                "image": {"pullPolicy": "Never"},
                "nodeSelector": on_cloud,
                "tolerations": TOLERATE_REAL,
                # The node cache driver on the edge node only, with that kubelet's root dir and a cache
                # root of its own (real nodes share this host; see test_real_node_cache.py).
                "edgeCache": {
                    "root": str(cache_root(EDGE_NODE)),
                    "kubeletDir": str(kubelet_root(EDGE_NODE)),
                    "image": {"pullPolicy": "Never"},
                    "nodeSelector": {"kubernetes.io/hostname": EDGE_NODE},
                    "tolerations": TOLERATE_REAL,
                },
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
    thread: threading.Thread | None = None
    d: Deployed | None = None
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
        t0 = time.monotonic()
        helm(env, "install", release, str(CHART), "--namespace", ns, "-f", str(tmp / "values.yaml"),
             "--wait", "--timeout", "240s", timeout=300)  # fmt: skip
        figure("helm install --wait (operator + store pods Ready), s", time.monotonic() - t0)
        store_ip = cluster.get_json("service", f"{release}-store", "-n", ns)["spec"]["clusterIP"]
        store_host = f"http://{store_ip}:8080"  # from this host: through kiri-real-0's kube-proxy
        store_dns = f"http://{release}-store.{ns}.svc:8080"  # what pods use
        cluster.wait_for(
            lambda: httpx.get(f"{store_host}/healthz", timeout=3).status_code == 200,
            timeout=60,
            message="the store's ClusterIP from the host",
        )
        model, sha = tiny_classifier(tmp / "tiny.onnx")
        # The source model goes into the store too: the Job fetches it by Service name.
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
                "rollout": {
                    "stages": [{"percent": 100, "bakeSeconds": 12}],
                    "progressDeadlineSeconds": 600,
                    "analysis": {
                        "prometheus": {"address": prom_url},
                        "queries": [
                            {
                                "name": "edge-error-ratio",
                                "query": '(sum(rate(kiri_requests_total{namespace="$namespace",component="edge",'
                                'revision="$revision",code=~"5.."}[10s])) or vector(0)) / '
                                'sum(rate(kiri_requests_total{namespace="$namespace",component="edge",'
                                'revision="$revision"}[10s]))',
                                "successCondition": "result < 0.1",
                                "interval": 3,
                                "minSamples": 2,
                            }
                        ],
                    },
                },
            },
        }
        d = Deployed(cluster, ns, store_host, store_dns, md, tmp)
        thread = threading.Thread(target=_send_traffic, args=(d,), daemon=True)
        thread.start()
        d.logs["t_apply"] = str(time.monotonic())
        cluster.apply(md)
        yield d
    finally:
        if d is not None:
            d.stop.set()
        if thread is not None:
            thread.join(10)
        prometheus.terminate()
        prometheus.wait(20)
        helm(env, "uninstall", release, "--namespace", ns, "--wait", "--timeout", "60s", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.kubectl("delete", "csidriver", "cache.kiri.dev", "--ignore-not-found", check=False)
        shutil.rmtree(tmp / "tsdb", ignore_errors=True)


def _job_done(d: Deployed) -> dict[str, Any] | None:
    jobs = d.cluster.get_json("jobs", "-n", d.ns, "-l", "kiri.dev/modeldeployment=tiny")["items"]
    for job in jobs:
        conds = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        if job["metadata"]["name"] in d.logs.get("jobs_seen", ""):
            continue
        if conds.get("Complete") == "True" or conds.get("Failed") == "True":
            return dict(job)
    return None


def test_a_model_deployment_compresses_publishes_fetches_and_serves_on_real_pods(deployed: Deployed) -> None:
    d, cluster, ns = deployed, deployed.cluster, deployed.ns
    t1 = float(d.logs["t_apply"])
    try:
        job = cluster.wait_for(
            lambda: _job_done(d), timeout=420, interval=2, message="compression Job finished"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
    d.logs["jobs_seen"] = job["metadata"]["name"]
    (job_pod,) = cluster.get_json("pods", "-n", ns, "-l", f"job-name={job['metadata']['name']}")["items"]
    logs = {
        c: cluster.kubectl("logs", job_pod["metadata"]["name"], "-n", ns, "-c", c, check=False)
        for c in ("compress", "publish")
    }
    conds = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conds.get("Complete") == "True", f"{job['status']}\n{logs}"
    figure("ModelDeployment applied -> compression Job complete (in a pod), s", time.monotonic() - t1)
    assert job_pod["spec"]["nodeName"] == CLOUD_NODE
    assert all(c["containerID"].startswith("containerd://") for c in job_pod["status"]["containerStatuses"])
    assert "uploaded 2 files" in logs["publish"], logs["publish"]

    try:
        pod = cluster.wait_for(d.ready_edge_pod, timeout=300, interval=1, message="edge pod Ready")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
    figure("ModelDeployment applied -> edge pod Ready, s", time.monotonic() - t1)
    figure("edge pod created -> Ready, artifact cold (pod timestamps), s", ready_seconds(pod))
    assert pod["spec"]["nodeName"] == EDGE_NODE
    edge_ip = pod["status"]["podIP"]
    d.logs["rev1"] = pod["metadata"]["labels"]["kiri.dev/revision"]

    (variant,) = d.status()["variants"]
    assert variant["state"] == "Verified"
    assert variant["uri"].startswith(f"{d.store_dns}/{ns}/tiny/"), variant
    assert pod_metric(edge_ip, 'kiri_artifact_fetches_total{result="downloaded"}') == 1.0
    fetched = pod_metric(edge_ip, "kiri_artifact_fetch_bytes_total")
    assert fetched == variant["sizeBytes"], (fetched, variant)
    figure("bytes downloaded by the edge node, revision 1", fetched)

    # OIP v2 on the edge pod: a confident row is answered at the edge, an unsure one by the cloud
    # Deployment on the other node, reached by its Service name.
    for x, tier in ((CONFIDENT, "edge"), (UNSURE, "cloud")):
        reply = httpx.post(f"http://{edge_ip}:8080/v2/models/tiny/infer", json=infer_body(x), timeout=60)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["parameters"]["kiri_tier"] == tier, answer
        assert answer["outputs"][0]["shape"] == [1, 4]
    assert pod_metric(edge_ip, "kiri_fallback_total") == 1.0

    try:
        cluster.wait_for(
            lambda: d.status().get("phase") == "Healthy", timeout=240, interval=2, message="Healthy"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
    # A first rollout has no stable revision to fall back to: it runs no analysis (planning/waves.py).
    figure("ModelDeployment applied -> Healthy, s", time.monotonic() - t1)
    print(f"\nstore counters after revision 1: {store_counters(d.store_host)}", file=sys.stderr)


def test_a_failing_revision_is_rolled_back_on_real_metrics_and_the_node_serves_the_previous_one_from_its_cache(
    deployed: Deployed,
) -> None:
    d, cluster = deployed, deployed.cluster
    rev1 = d.logs["rev1"]
    bad, sha = failing_classifier(d.tmp / "tiny-v2.onnx")
    assert (
        httpx.put(f"{d.store_host}/models/tiny-{sha[:12]}.onnx", content=bad, timeout=30).status_code == 201
    )
    before = store_counters(d.store_host)
    md = yaml.safe_load(yaml.safe_dump(d.md))
    md["spec"]["model"]["version"] = "2"
    md["spec"]["model"]["source"] = {
        "uri": f"{d.store_dns}/models/tiny-{sha[:12]}.onnx",
        "format": "onnx",
        "sha256": sha,
    }
    t0 = time.monotonic()
    cluster.apply(md)

    def canary() -> dict[str, Any] | None:
        pod = d.ready_edge_pod()
        return pod if pod and pod["metadata"]["labels"]["kiri.dev/revision"] != rev1 else None

    try:
        bad_pod = cluster.wait_for(canary, timeout=420, interval=1, message="the revision-2 edge pod Ready")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
    t_canary = time.monotonic()
    figure("revision 2 applied -> its edge pod Ready (compression included), s", t_canary - t0)
    rev2 = bad_pod["metadata"]["labels"]["kiri.dev/revision"]
    bad_bytes = pod_metric(bad_pod["status"]["podIP"], "kiri_artifact_fetch_bytes_total")
    figure("bytes downloaded by the edge node, revision 2", bad_bytes)

    try:
        cluster.wait_for(
            lambda: d.status().get("phase") == "RolledBack", timeout=300, interval=1, message="RolledBack"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\ntraffic {d.traffic}\n{d.explain()}") from None
    figure("failing canary Ready -> RolledBack (real analysis), s", time.monotonic() - t_canary)
    status = d.status()
    rolled = [c for c in status["conditions"] if c.get("reason") == "AnalysisFailed"]
    assert rolled, status["conditions"]
    assert d.traffic["500"] > 0, d.traffic

    try:
        back = cluster.wait_for(
            lambda: d.ready_edge_pod(rev1), timeout=180, interval=1, message="revision 1 back"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
    figure("failing canary Ready -> revision-1 pod Ready again, s", time.monotonic() - t_canary)
    figure("edge pod created -> Ready, artifact cached (pod timestamps), s", ready_seconds(back))
    ip = back["status"]["podIP"]
    # From the node cache: one hit, nothing downloaded, and the store sent only revision 2's files.
    assert pod_metric(ip, 'kiri_artifact_fetches_total{result="hit"}') == 1.0
    assert pod_metric(ip, 'kiri_artifact_fetches_total{result="downloaded"}') == 0.0
    assert pod_metric(ip, "kiri_artifact_fetch_bytes_total") == 0.0
    after = store_counters(d.store_host)
    gets = 'kiri_store_requests_total{code="200",method="GET"}'
    # What revision 2 cost the store (its source for the Job and the cloud pod, its variant for the edge);
    # the rolled-back edge pod added nothing (its metrics above).
    print(
        f"\nstore GETs during revision 2 and its rollback: {after[gets] - before[gets]:.0f}", file=sys.stderr
    )
    reply = httpx.post(f"http://{ip}:8080/v2/models/tiny/infer", json=infer_body(CONFIDENT), timeout=60)
    assert reply.status_code == 200 and reply.json()["parameters"]["kiri_tier"] == "edge", reply.text
    assert rev2 != rev1
