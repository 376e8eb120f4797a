"""The edge node cache on real kubelets (issue 17): the chart's CSI driver (csi/kiri-cache-csi, image
`cache-csi` of hack/images.py) registered with two real kubelets, and the edge DaemonSet the operator builds
(planning.building.edge_daemonset) in two tenant namespaces that enforce Pod Security "baseline" and
"restricted": the pods are admitted, fetch and verify their model into their own cache directory, turn
Ready, and neither namespace sees the other's cache, even when a pod asks for the other's by name.

The driver runs as the chart renders it (helm template, one release per real node: the nodes of
`hack/cluster up --real-nodes 2` share this host, so each has its own kubelet root and cache root), in a
namespace labelled `privileged`. Bidirectional mount propagation needs the host paths on a shared mount;
the real nodes' state dir is not, so the fixture makes the two it needs shared (`hack/cluster down` unmounts
everything under the state dir). Marked `real_nodes` (see tests/e2e/test_real_nodes.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster
from .test_real_nodes import RUNTIME_IMAGE, classifier_onnx

pytestmark = pytest.mark.real_nodes

REAL_NODES = ("kiri-real-0", "kiri-real-1")
REAL_TOLERATION = {"key": "kiri.dev/node-kind", "operator": "Equal", "value": "real", "effect": "NoSchedule"}
STATE_DIR = Path(os.environ.get("KIRI_STATE_DIR") or REPO_ROOT / ".kiri").resolve()


def _run(*cmd: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def _shared(path: Path) -> None:
    """Make `path` a shared mount point (a recursive bind onto itself first, unless it is one already)."""
    path.mkdir(parents=True, exist_ok=True)
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    if str(path) not in points:
        _run("mount", "--rbind", str(path), str(path))
    _run("mount", "--make-rshared", str(path))


def kubelet_root(node: str) -> Path:
    return STATE_DIR / "nodes" / node / "kubelet" / "root"


def cache_root(node: str) -> Path:
    return STATE_DIR / "nodes" / node / "kiri-cache"


@contextlib.contextmanager
def cache_driver_on(cluster: Cluster, nodes: Sequence[str], workdir: Path) -> Iterator[str]:
    """The chart's CSI driver (helm template, one release per real node: each has its own kubelet root and
    cache root) registered with the kubelets of `nodes`, in a namespace of its own labelled `privileged`;
    yields that namespace, and removes the namespace and the CSIDriver afterwards. The runtime and
    `cache-csi` images must be loaded (hack/images.py)."""
    from .test_helm import CHART, _with_helm, helm

    workdir.mkdir(parents=True, exist_ok=True)
    system = f"kiri-system-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", system)
    cluster.kubectl("label", "namespace", system, "pod-security.kubernetes.io/enforce=privileged")
    env = _with_helm(cluster.env, workdir / "helm-home")
    try:
        for node in nodes:
            _shared(kubelet_root(node))
            _shared(cache_root(node))
            values = workdir / f"values-{node}.yaml"
            values.write_text(
                yaml.safe_dump(
                    {
                        "edgeCache": {
                            "root": str(cache_root(node)),
                            "kubeletDir": str(kubelet_root(node)),
                            "image": {"pullPolicy": "Never"},
                            "nodeSelector": {"kubernetes.io/hostname": node},
                            "tolerations": [REAL_TOLERATION],
                        }
                    }
                )
            )
            rendered = helm(env, "template", f"csi-{node[-1]}", str(CHART), "--namespace", system,
                            "-f", str(values), "--show-only", "templates/cache-csi.yaml").stdout  # fmt: skip
            cluster.apply([d for d in yaml.safe_load_all(rendered) if d], namespace=system)

        def registered() -> bool:
            for node in nodes:
                csinode = cluster.get_json("csinode", node)
                if "cache.kiri.dev" not in [d["name"] for d in csinode.get("spec", {}).get("drivers") or []]:
                    return False
            return True

        try:
            cluster.wait_for(
                registered, timeout=120, interval=1, message=f"cache.kiri.dev in CSINodes {nodes}"
            )
        except TimeoutError:
            raise AssertionError(cluster.kubectl("describe", "pods", "-n", system, check=False)) from None
        yield system
    finally:
        # Pods that mount the driver's volumes (deleted by their tests without waiting) first: a kubelet
        # unmounts a CSI volume through the driver, so one still terminating when the driver goes never
        # finishes, nor does its namespace.
        with contextlib.suppress(TimeoutError):
            cluster.wait_for(lambda: not cache_volume_pods(cluster), timeout=90, interval=1)
        cluster.kubectl("delete", "namespace", system, "--wait=true", "--timeout=60s", check=False)
        cluster.kubectl("delete", "csidriver", "cache.kiri.dev", "--ignore-not-found", check=False)


def cache_volume_pods(cluster: Cluster) -> list[str]:
    """`namespace/name` of the pods, in any namespace, with a volume of the node-cache driver."""
    pods = cluster.get_json("pods", "--all-namespaces")["items"]
    return [
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in pods
        if any((v.get("csi") or {}).get("driver") == "cache.kiri.dev" for v in p["spec"].get("volumes") or [])
    ]


@pytest.fixture(scope="module")
def cache_driver(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The chart's CSI driver on both real nodes, with the runtime and driver images in their containerd."""
    _run("bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "real-nodes", timeout=1800)
    _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(len(REAL_NODES)), timeout=600)
    _run(sys.executable, str(REPO_ROOT / "hack" / "images.py"), "load", "runtime", "cache-csi", timeout=1800)
    with cache_driver_on(cluster, REAL_NODES, tmp_path_factory.mktemp("csi")) as system:
        yield system


@pytest.fixture(scope="module")
def model_server() -> Iterator[tuple[str, str]]:
    """The classifier over HTTP on the cluster's host address, which every real node's netns routes to."""
    model, _, _ = classifier_onnx()
    state = json.loads((STATE_DIR / "state.json").read_text())
    first = state["real_nodes"]["nodes"][REAL_NODES[0]]["internal_ip"]  # 172.<b>.0.1
    host = ".".join(first.split(".")[:2]) + ".127.1"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(model)))
            self.end_headers()
            self.wfile.write(model)

        def log_message(self, *args: Any) -> None:
            pass

    server = socketserver.ThreadingTCPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/clf.onnx", hashlib.sha256(model).hexdigest()
    finally:
        server.shutdown()


def edge_daemonset(namespace: str, name: str, uri: str, sha: str) -> dict[str, Any]:
    """What the operator builds for an edge variant, pinned to both real nodes, without its owner (there
    is no ModelDeployment here for the garbage collector to find)."""
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"name": "clf", "version": "1", "source": {"uri": uri, "sha256": sha}},
            "runtime": {"image": RUNTIME_IMAGE, "imagePullPolicy": "Never"},
            "cloud": {"replicas": 0},
            "edge": {"tolerations": [REAL_TOLERATION], "variants": [{"name": "fp32", "method": "fp16"}]},
        }
    )
    owner = B.Owner(name, namespace, "uid-" + name)
    ds = B.edge_daemonset(spec, owner, "rev1", "comp1", "fp32", B.EdgeArtifact(uri, sha), REAL_NODES, {})
    del ds["metadata"]["ownerReferences"]
    return ds


def tenant(cluster: Cluster, level: str) -> str:
    name = f"e2e-cache-{level}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl(
        "label", "namespace", name, f"pod-security.kubernetes.io/enforce={level}", "kiri.dev/e2e=true"
    )
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False),
        timeout=30,
        message=f"default ServiceAccount in {name}",
    )
    return name


def ready_pods(cluster: Cluster, namespace: str) -> dict[str, str] | None:
    """node -> pod name once a Ready pod runs on every real node."""
    pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=edge")["items"]
    out = {}
    for pod in pods:
        conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        if conds.get("Ready") == "True":
            out[pod["spec"]["nodeName"]] = pod["metadata"]["name"]
    return out if set(out) == set(REAL_NODES) else None


def in_pod(cluster: Cluster, namespace: str, pod: str, code: str) -> str:
    return cluster.kubectl("exec", pod, "-n", namespace, "--", "python3", "-c", code, timeout=60).strip()


def test_edge_pods_under_baseline_and_restricted_cache_their_model_apart_on_real_nodes(
    cluster: Cluster, cache_driver: str, model_server: tuple[str, str]
) -> None:
    uri, sha = model_server
    spaces = {"baseline": tenant(cluster, "baseline"), "restricted": tenant(cluster, "restricted")}
    try:
        t0 = time.monotonic()
        for ns in spaces.values():
            cluster.apply(edge_daemonset(ns, "clf", uri, sha), namespace=ns)
        pods: dict[str, dict[str, str]] = {}
        for level, ns in spaces.items():
            try:
                pods[level] = cluster.wait_for(
                    lambda ns=ns: ready_pods(cluster, ns),
                    timeout=240,
                    interval=1,
                    message=f"{level} edge pods Ready",
                )
            except TimeoutError:
                detail = cluster.kubectl("describe", "pods", "-n", ns, check=False)
                events = cluster.kubectl("get", "events", "-n", ns, check=False)
                raise AssertionError(f"{level}: pods not Ready\n{detail}\n{events}") from None
        print(f"\nedge DaemonSets applied -> 4 pods Ready: {time.monotonic() - t0:.1f}s", file=sys.stderr)

        blob = f"blobs/sha256/{sha}"
        for node in REAL_NODES:
            for level, ns in spaces.items():
                # On the node: <root>/<namespace>/<model>, the runtime's, holding the verified blob.
                own = cache_root(node) / ns / "clf"
                st = own.stat()
                assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (65532, 65532, "0o750")
                assert (own / blob).is_file()
                ns_dir = (cache_root(node) / ns).stat()
                assert (ns_dir.st_uid, oct(ns_dir.st_mode & 0o777)) == (0, "0o711")
                # In the pod: the mount is that directory and nothing above it.
                pod = pods[level][node]
                source = in_pod(cluster, ns, pod, (
                    "print(next(l.split()[3] for l in open('/proc/self/mountinfo') if l.split()[4] == '/var/cache/kiri'))"
                ))  # fmt: skip
                assert source.endswith(f"/kiri-cache/{ns}/clf"), source
            # Each namespace writes a file of its own; the other never sees it.
            a, b = spaces["baseline"], spaces["restricted"]
            in_pod(cluster, a, pods["baseline"][node], "open('/var/cache/kiri/mine-a', 'w').write('a')")
            listing = in_pod(
                cluster,
                b,
                pods["restricted"][node],
                "import os; print(sorted(os.listdir('/var/cache/kiri')))",
            )
            assert "mine-a" not in listing and "blobs" in listing, listing
            assert (cache_root(node) / a / "clf" / "mine-a").read_text() == "a"
            assert not (cache_root(node) / b / "clf" / "mine-a").exists()
    finally:
        for ns in spaces.values():
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def test_a_pod_naming_another_namespace_in_its_volume_attributes_still_gets_its_own_directory(
    cluster: Cluster, cache_driver: str
) -> None:
    mine, theirs = tenant(cluster, "restricted"), f"victim-{uuid.uuid4().hex[:6]}"
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "snoop"},
            "spec": {
                "nodeName": REAL_NODES[0],
                "tolerations": [REAL_TOLERATION],
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "c",
                        "image": RUNTIME_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["python3", "-c", "import time; time.sleep(3600)"],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                    }
                ],
                "volumes": [
                    {
                        "name": "cache",
                        "csi": {
                            "driver": "cache.kiri.dev",
                            # The kubelet's own pod.namespace replaces this one.
                            "volumeAttributes": {"model": "clf", "csi.storage.k8s.io/pod.namespace": theirs},
                        },
                    }
                ],
            },
        }
        cluster.apply(pod, namespace=mine)

        def running() -> bool:
            got = cluster.get_json("pod", "snoop", "-n", mine)
            return bool(got.get("status", {}).get("phase") == "Running")

        try:
            cluster.wait_for(running, timeout=120, interval=1, message="snoop Running")
        except TimeoutError:
            raise AssertionError(
                cluster.kubectl("describe", "pod", "snoop", "-n", mine, check=False)
            ) from None
        source = in_pod(cluster, mine, "snoop", (
            "print(next(l.split()[3] for l in open('/proc/self/mountinfo') if l.split()[4] == '/cache'))"
        ))  # fmt: skip
        assert source.endswith(f"/kiri-cache/{mine}/clf"), source
        assert not (cache_root(REAL_NODES[0]) / theirs).exists()
    finally:
        cluster.kubectl("delete", "namespace", mine, "--wait=false", "--ignore-not-found", check=False)


BIG_FEATURES, BIG_HIDDEN = (
    2048,
    8192,
)  # one float32 weight matrix: 64 MiB, the size of a small int8 LLM layer stack


@pytest.fixture(scope="module")
def big_model_server() -> Iterator[tuple[str, str, int, list[int]]]:
    """A 64 MiB ONNX model (x @ W, seeded) over HTTP on the cluster's host address: a realistic artifact
    size, so that a node's download shows in the pod's start."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((BIG_FEATURES, BIG_HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", BIG_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", BIG_HIDDEN])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    state = json.loads((STATE_DIR / "state.json").read_text())
    first = state["real_nodes"]["nodes"][REAL_NODES[0]]["internal_ip"]
    host = ".".join(first.split(".")[:2]) + ".127.1"
    served: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            served.append(len(data))

        def log_message(self, *args: Any) -> None:
            pass

    server = socketserver.ThreadingTCPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"http://{host}:{server.server_address[1]}/big.onnx",
            hashlib.sha256(data).hexdigest(),
            len(data),
            served,
        )
    finally:
        server.shutdown()


def _pod_metric(ip: str, name: str) -> float:
    import httpx

    text = httpx.get(f"http://{ip}:8080/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _ready_seconds(pod: dict[str, Any]) -> float:
    from datetime import datetime

    def ts(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    return ts(ready["lastTransitionTime"]) - ts(pod["metadata"]["creationTimestamp"])


def test_a_64_mib_artifact_is_downloaded_once_per_node_and_a_replaced_pod_starts_from_the_cache(
    cluster: Cluster, cache_driver: str, big_model_server: tuple[str, str, int, list[int]]
) -> None:
    uri, sha, size, served = big_model_server
    ns = tenant(cluster, "restricted")
    try:
        cluster.apply(edge_daemonset(ns, "big", uri, sha), namespace=ns)

        def ready() -> list[dict[str, Any]] | None:
            got = ready_pods(cluster, ns)
            if got is None:
                return None
            return [cluster.get_json("pod", name, "-n", ns) for name in got.values()]

        try:
            cold = cluster.wait_for(ready, timeout=300, interval=1, message="edge pods Ready (cold)")
        except TimeoutError:
            raise AssertionError(cluster.kubectl("describe", "pods", "-n", ns, check=False)) from None
        for pod in cold:
            ip = pod["status"]["podIP"]
            assert _pod_metric(ip, 'kiri_artifact_fetches_total{result="downloaded"}') == 1.0
            assert _pod_metric(ip, "kiri_artifact_fetch_bytes_total") == size
            print(f"\n[figure] {size} B artifact, pod created -> Ready, cold: {_ready_seconds(pod):.0f} s",
                  file=sys.stderr)  # fmt: skip

        assert served == [size] * len(REAL_NODES)  # one download per node
        # New pods on the same nodes (the DaemonSet replaces the deleted ones): from the node cache.
        old = {p["metadata"]["uid"] for p in cold}
        cluster.kubectl("delete", "pods", "-n", ns, "-l", "app.kubernetes.io/component=edge", "--wait=false")

        def replaced() -> list[dict[str, Any]] | None:
            pods = ready()
            return pods if pods and not old & {p["metadata"]["uid"] for p in pods} else None

        warm = cluster.wait_for(replaced, timeout=300, interval=1, message="replaced edge pods Ready")
        for pod in warm:
            ip = pod["status"]["podIP"]
            assert _pod_metric(ip, 'kiri_artifact_fetches_total{result="hit"}') == 1.0
            assert _pod_metric(ip, 'kiri_artifact_fetches_total{result="downloaded"}') == 0.0
            assert _pod_metric(ip, "kiri_artifact_fetch_bytes_total") == 0.0
            print(f"[figure] {size} B artifact, pod created -> Ready, cached: {_ready_seconds(pod):.0f} s",
                  file=sys.stderr)  # fmt: skip
        assert served == [size] * len(REAL_NODES)  # and none more
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
