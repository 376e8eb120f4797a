"""Kiri in real pods on a real node (issue 16): the runtime image serving a model; a Service reached by
name (CoreDNS) from a pod and by ClusterIP from the host (kube-proxy in the node's netns); a pod's
in-cluster config listing what its ServiceAccount may; the operator image installed by helm/kiri on the
real node reconciling a ModelDeployment to Healthy.

Unlike the rest of tests/e2e, nothing here is simulated past the API server: a real kubelet and
containerd (`hack/cluster up --real-nodes 1`) pull nothing, run the image that hack/images.py built
without Docker, probe it and route its pod IP to this host through the node's veth. Marked `real_nodes`,
part of `make test` (which first builds the kubelet, containerd, runc and the images: minutes cold, see
hack/README.md); it needs root, and KIRI_REAL_NODES=0 leaves it out (tests/e2e/conftest.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
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
        _run(
            sys.executable, str(REPO_ROOT / "hack" / "images.py"), "load", "runtime", "operator", timeout=1800
        )
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
            # kiri-real-0 by name: a cluster may have more real nodes (test_real_edge_path.py adds one).
            "nodeSelector": {"kiri.dev/node-kind": "real", "kubernetes.io/hostname": REAL_NODE},
            "tolerations": [{"key": "kiri.dev/node-kind", "value": "real", "effect": "NoSchedule"}],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            # The server needs no names: the node's empty resolv.conf (client_pod uses the cluster DNS).
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


# ------------------------------------------------------------------ Services, DNS and the API server


def client_pod(name: str, service_account: str) -> dict[str, Any]:
    """A pod of the runtime image that only waits: the tests exec into it to act as a workload would."""
    pod = runtime_pod(name, "")
    spec = pod["spec"]
    spec.update(
        serviceAccountName=service_account,
        automountServiceAccountToken=True,
        # Cluster DNS: the kubelet's clusterDNS (CoreDNS on the cluster's host address).
        dnsPolicy="ClusterFirst",
    )
    container = spec["containers"][0]
    container.update(command=["python3", "-c", "import time; time.sleep(3600)"], args=[])
    for key in ("readinessProbe", "ports"):
        container.pop(key)
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "model"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "model"]
    return pod


@pytest.fixture(scope="module")
def served(cluster: Cluster, real_node: str) -> Iterator[dict[str, str]]:
    """A namespace with the runtime pod behind a Service `clf` (port 80) and an idle client pod, both on
    the real node; the client's ServiceAccount `lister` may list pods in the namespace, nothing else."""
    ns = f"e2e-real-svc-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", ns, check=False),
        timeout=30,
        message=f"default ServiceAccount in {ns}",
    )
    model, _w, _b = classifier_onnx()
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "clf-model"},
                "binaryData": {"model.onnx": base64.b64encode(model).decode()},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "clf"},
                "spec": {"selector": {"app": "clf"}, "ports": [{"port": 80, "targetPort": "http"}]},
            },
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "lister"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "pod-lister"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "lister"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
                "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": ns}],
            },
            runtime_pod("clf", hashlib.sha256(model).hexdigest()),
            client_pod("client", "lister"),
        ],
        namespace=ns,
    )
    t0 = time.monotonic()
    for pod in ("clf", "client"):
        cluster.kubectl(
            "wait", "--for=condition=Ready", f"pod/{pod}", "-n", ns, "--timeout=180s", timeout=200
        )
    print(f"\nserver + client pods Ready: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        yield {
            "namespace": ns,
            "cluster_ip": cluster.get_json("service", "clf", "-n", ns)["spec"]["clusterIP"],
        }
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def in_pod(cluster: Cluster, ns: str, code: str) -> str:
    return cluster.kubectl("exec", "client", "-n", ns, "--", "python3", "-c", code, timeout=90)


def test_service_reached_by_name_from_a_pod_and_by_cluster_ip_from_the_host(
    cluster: Cluster, served: dict[str, str]
) -> None:
    ns, ip = served["namespace"], served["cluster_ip"]
    # From this host: the Service range is routed into the lowest real node, whose kube-proxy DNATs.
    t0 = time.monotonic()

    def ready_via_cluster_ip() -> bool:
        try:
            return httpx.get(f"http://{ip}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    cluster.wait_for(ready_via_cluster_ip, timeout=60, interval=0.5, message=f"Service clf at {ip}:80")
    print(f"\nService reachable from the host {time.monotonic() - t0:.1f}s after the pods were Ready")

    # From a pod: CoreDNS resolves the Service's full name and its short one (the pod's search path).
    code = f"""
import socket, urllib.request
for name in ("clf.{ns}.svc.cluster.local", "clf"):
    print(name, socket.gethostbyname(name))
    with urllib.request.urlopen(f"http://{{name}}/v2/health/ready", timeout=10) as r:
        print(name, r.status)
try:
    socket.gethostbyname("example.com")
    print("example.com resolved")
except OSError:
    print("example.com unknown")
"""
    out = in_pod(cluster, ns, code).split("\n")
    assert f"clf.{ns}.svc.cluster.local {ip}" in out, out
    assert f"clf.{ns}.svc.cluster.local 200" in out, out
    assert f"clf {ip}" in out and "clf 200" in out, out
    # Nothing outside the cluster is resolved (CoreDNS forwards nowhere).
    assert "example.com unknown" in out, out


def test_pod_lists_what_its_service_account_may_through_in_cluster_config(
    cluster: Cluster, served: dict[str, str]
) -> None:
    """Kiri's own in-cluster loader (KUBERNETES_SERVICE_HOST, the mounted token and CA) in a real pod:
    the `kubernetes` Service's ClusterIP, DNATed by the node's kube-proxy to the API server's proxy on the
    cluster's host address, and TLS end to end (the serving certificate names the ClusterIP)."""
    ns = served["namespace"]
    code = f"""
from kiri_operator.kube import client, loading
creds = loading.load()
print("server", creds.server)
http = client.http_client(creds)
r = http.get("/api/v1/namespaces/{ns}/pods")
print("pods", r.status_code, sorted(p["metadata"]["name"] for p in r.json()["items"]))
print("nodes", http.get("/api/v1/nodes").status_code)
print("secrets", http.get("/api/v1/namespaces/{ns}/secrets").status_code)
"""
    out = in_pod(cluster, ns, code).split("\n")
    kubernetes_ip = cluster.get_json("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    assert f"server https://{kubernetes_ip}:443" in out, out
    assert "pods 200 ['clf', 'client']" in out, out
    # RBAC still applies: the ServiceAccount may list pods here and nothing else.
    assert "nodes 403" in out and "secrets 403" in out, out


def test_operator_installed_by_the_chart_reconciles_from_a_real_pod(
    cluster: Cluster, real_node: str, namespace: str, tmp_path: Path
) -> None:
    """The operator image (hack/images.py, the Dockerfile's `operator` target) installed by helm/kiri onto
    the real node, watching this namespace, takes a ModelDeployment to Healthy from inside its pod: its
    API calls go through the `kubernetes` Service with the chart's ServiceAccount token.
    """
    from .operator_harness import build_model, model_deployment, run_compression_job
    from .test_helm import CHART, _with_helm, helm

    env = _with_helm(cluster.env, tmp_path / "helm-home")
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                # The CRD is applied below, not owned by this release (another may have kept it).
                "crds": {"install": False},
                # This test's ModelDeployment names its own file:// store.
                "store": {"enabled": False},
                "operator": {"watchNamespaces": [namespace]},
                # The test's file:// store (the operator in its pod only names it; the Job runs here).
                "hostStores": {"roots": [str(tmp_path)]},
                # The edge fleet is kwok's here: no cache driver (test_real_node_cache runs it).
                "edgeCache": {"enabled": False},
                # One pod on the one real node: this test is about API access from inside a pod (two
                # replicas and their Lease are tests/e2e/test_ha.py's).
                "replicaCount": 1,
                # Imported into the node's containerd by hack/images.py: there is no registry to pull from.
                "image": {"pullPolicy": "Never"},
                "nodeSelector": {"kiri.dev/node-kind": "real", "kubernetes.io/hostname": real_node},
                "tolerations": [
                    {
                        "key": "kiri.dev/node-kind",
                        "operator": "Equal",
                        "value": "real",
                        "effect": "NoSchedule",
                    }
                ],
            }
        )
    )
    release = "kiri-" + namespace[-6:]
    # The chart makes the Jobs' account in the watched namespace: drop the one the fixture made.
    cluster.kubectl("delete", "serviceaccount,role,rolebinding", "kiri-compressor", "-n", namespace)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    t0 = time.monotonic()
    try:
        helm(env, "install", release, str(CHART), "--namespace", namespace, "-f", str(values),
             "--wait", "--timeout", "180s")  # fmt: skip
        print(f"\nhelm install --wait (operator pod Ready on the real node): {time.monotonic() - t0:.1f}s")
        (pod,) = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/name=kiri")["items"]
        assert pod["spec"]["nodeName"] == real_node
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
        op_pod = pod["metadata"]["name"]

        def logs() -> str:
            return cluster.kubectl("logs", op_pod, "-n", namespace, "--tail=60", check=False)

        model, sha = build_model(tmp_path)
        variants = [{"name": "int8", "method": "int8-dynamic"}]
        t1 = time.monotonic()
        md = model_deployment("inpod", namespace, model, sha, tmp_path / "store", variants)
        # The edge fleet is the kwok one: the real node is labelled edge too, but its taint keeps the
        # runtime's edge pods (which would read the host's file:// artifacts) off it.
        md["spec"]["edge"]["nodeSelector"] = {"kiri.dev/tier": "edge", "type": "kwok"}
        cluster.apply(md)
        try:
            job = cluster.wait_for(
                lambda: cluster.get_json("jobs", "-n", namespace, "-l", "kiri.dev/modeldeployment=inpod")[
                    "items"
                ],
                timeout=90,
                message="the compression Job, created by the operator in its pod",
            )[0]
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n{logs()}") from None
        print(f"ModelDeployment applied -> compression Job: {time.monotonic() - t1:.1f}s")
        # The Job's steps run here (the kwok fleet runs no containers); the operator sees the manifest.
        run_compression_job(cluster, namespace, job["metadata"]["name"])

        def phase() -> str | None:
            md = cluster.get_json("modeldeployment", "inpod", "-n", namespace)
            value = md.get("status", {}).get("phase")
            return value if value in ("Healthy", "Failed", "Degraded") else None

        try:
            final = cluster.wait_for(phase, timeout=180, message="Healthy")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- operator log ---\n{logs()}") from None
        assert final == "Healthy", logs()
        print(f"ModelDeployment applied -> Healthy: {time.monotonic() - t1:.1f}s")
        # Every API call of the operator went through the Service path, and none was refused.
        text = logs()
        assert "Forbidden" not in text, text
    finally:
        helm(env, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)


# ------------------------------------------------------------------ a full cache disk on the real node


def test_a_full_cache_disk_on_a_real_node_is_the_readiness_reason_and_heals_when_space_is_freed(
    cluster: Cluster, real_node: str, namespace: str, tmp_path: Path
) -> None:
    """Issue 19: the runtime's cache on a real, size-limited filesystem (a memory emptyDir with a
    `sizeLimit`: the kubelet mounts a tmpfs of that size), 2.5 MiB of it taken by another file, and a
    2.8 MB model. The pod stays live and not Ready, its readiness body and log say the cache is full, no
    partial file is left; deleting the other file lets the next retry load the model and the pod turns Ready.
    """
    sys.path.insert(0, str(REPO_ROOT / "tests" / "integration" / "runtime"))
    from test_runtime_disk_full import big_model

    # The model is read from the host through a hostPath (a ConfigMap holds 1 MiB at most): the kubelet
    # runs on this host, so the path is the node's too.
    store = Path("/tmp") / f"kiri-diskfull-{uuid.uuid4().hex[:8]}"
    store.mkdir(mode=0o755)
    model, _, _ = big_model(store / "big.onnx")
    model.chmod(0o644)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    pod = runtime_pod("full", sha)
    spec = pod["spec"]
    container = spec["containers"][0]
    container["args"] = [
        a.replace("--name=clf", "--name=big").replace(
            "--cache-dir=/var/cache/kiri", "--cache-dir=/var/cache/kiri/md"
        )
        for a in container["args"]
    ]
    container["args"] = [
        a.replace("file:///models/model.onnx", "file:///models/big.onnx") for a in container["args"]
    ]
    spec["volumes"] = [
        {"name": "model", "hostPath": {"path": str(store), "type": "Directory"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
    ]
    # Another tenant's files already on the disk: 2.5 MiB of the 4.
    spec["initContainers"] = [
        {
            "name": "ballast",
            "image": RUNTIME_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["python3", "-c", "open('/var/cache/kiri/other.bin', 'wb').write(bytes(2621440))"],
            "securityContext": container["securityContext"],
            "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/kiri"}],
        }
    ]
    container["readinessProbe"]["failureThreshold"] = 1
    try:
        cluster.apply(pod, namespace=namespace)

        def reason() -> str | None:
            body = cluster.get_json("pod", "full", "-n", namespace)
            ip = body.get("status", {}).get("podIP")
            if not ip:
                return None
            try:
                reply = httpx.get(f"http://{ip}:8080/v2/health/ready", timeout=5)
            except httpx.TransportError:
                return None
            text = str(reply.json().get("reason", ""))
            return text if reply.status_code == 503 and "is full" in text else None

        said = cluster.wait_for(reason, timeout=180, interval=0.5, message="the not-ready reason")
        assert said.startswith(
            "model big not loaded: cache dir /var/cache/kiri/md is full: the artifact needs "
        ), said
        logs = cluster.kubectl("logs", "full", "-n", namespace, "-c", "runtime")
        assert " ERROR " in logs and "cache dir /var/cache/kiri/md is full" in logs, logs[-2000:]
        listing = cluster.kubectl(
            "exec", "full", "-n", namespace, "-c", "runtime", "--", "python3", "-c",
            "import json, os; print(json.dumps(sorted(os.path.join(d, f)[len('/var/cache/kiri'):] "
            "for d, _, fs in os.walk('/var/cache/kiri') for f in fs)))",
        )  # fmt: skip
        files = [f for f in json.loads(listing) if not f.startswith("/md/locks/")]
        assert files == ["/other.bin"], files
        ready = cluster.get_json("pod", "full", "-n", namespace)["status"]["containerStatuses"][0]
        assert not ready["ready"] and ready["restartCount"] == 0  # live, not Ready, not restarted

        cluster.kubectl(
            "exec", "full", "-n", namespace, "-c", "runtime", "--",
            "python3", "-c", "import os; os.remove('/var/cache/kiri/other.bin')",
        )  # fmt: skip

        def pod_ready() -> bool:
            body = cluster.get_json("pod", "full", "-n", namespace)
            return any(
                c["type"] == "Ready" and c["status"] == "True" for c in body["status"].get("conditions", [])
            )

        cluster.wait_for(pod_ready, timeout=120, interval=0.5, message="Ready once space was freed")
        blob = cluster.kubectl(
            "exec", "full", "-n", namespace, "-c", "runtime", "--", "python3", "-c",
            f"import hashlib; print(hashlib.sha256(open('/var/cache/kiri/md/blobs/sha256/{sha}', 'rb').read()).hexdigest())",
        )  # fmt: skip
        assert blob.strip() == sha
    finally:
        cluster.kubectl("delete", "pod", "full", "-n", namespace, "--wait=false", check=False)
        import shutil

        shutil.rmtree(store, ignore_errors=True)
