"""Issue 17 on real kubelets: two operator replicas installed by helm/kiri on two real nodes elect a leader
with their Lease and survive the leader's SIGKILL mid-wave; a cloud pod on a real node fetches its model
from an http store that requires a bearer token given through `credentials.secretRef`.

tests/e2e/test_ha.py proves the election with operator processes; here the operator runs from its image,
in the chart's pods (two replicas on two real nodes, `podAntiAffinity` by hostname), and the leader's
container is killed with SIGKILL through its node's containerd (`ctr task kill`), as an OOM kill or a
crashed process would end it: no SIGTERM, so no Lease release; the standby must take it over.

Marked `real_nodes` (part of `make test`; KIRI_REAL_NODES=0 leaves it out): it needs root, the real-node
binaries and the images (hack/README.md).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CLUSTER_SCRIPT, REPO_ROOT, Cluster
from .operator_harness import WRITE_VERBS, Operator, build_model, crd, get_md
from .test_rollout import Rollout, three_steps

pytestmark = [pytest.mark.real_nodes, pytest.mark.timeout(600), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

# Short election timings (the chart's values), so the test does not wait out the 15 s default.
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 6, 4, 1
RUNTIME_IMAGE = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"  # hack/images.py RUNTIME_REF
REAL = {"key": "kiri.dev/node-kind", "operator": "Equal", "value": "real", "effect": "NoSchedule"}


def _run(*cmd: str, timeout: float) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def real_pair(cluster: Cluster) -> Iterator[list[str]]:
    """Two real nodes with the runtime and operator images; nodes this fixture added are removed after."""
    before = len(cluster.kubectl("get", "nodes", "-l", "kiri.dev/node-kind=real", "-o", "name").split())
    _run("bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "real-nodes", timeout=1800)
    _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(max(before, 2)), timeout=600)
    try:
        _run(
            sys.executable, str(REPO_ROOT / "hack" / "images.py"), "load", "runtime", "operator", timeout=1800
        )
        yield ["kiri-real-0", "kiri-real-1"]
    finally:
        if before < 2:
            _run(str(CLUSTER_SCRIPT), "up", "--real-nodes", str(before), timeout=600)


def node_containerd(name: str) -> tuple[str, str]:
    """(ctr binary, containerd socket) of a real node, from the cluster's state (hack/images.py reads it)."""
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    import images

    for node, ctr, socket in images.real_node_sockets():
        if node == name:
            return ctr, socket
    raise AssertionError(f"no real node {name}")


# ------------------------------------------------------------------ two operator replicas, one Lease


def scrape(pod_ip: str) -> list[Any]:
    with urllib.request.urlopen(f"http://{pod_ip}:9102/metrics", timeout=5) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def counter(pod_ip: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in scrape(pod_ip):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def leading(pod_ip: str) -> bool:
    try:
        return counter(pod_ip, "kiri_leader") == 1
    except OSError:
        return False


def writes(pod_ip: str) -> float:
    return sum(counter(pod_ip, "kiri_api_requests_total", verb=v) for v in WRITE_VERBS)


def test_two_chart_replicas_on_real_nodes_survive_the_leaders_sigkill_mid_wave_with_each_step_once(
    cluster: Cluster, real_pair: list[str], namespace: str, tmp_path: Path
) -> None:
    from .test_helm import CHART, _with_helm, helm

    env = _with_helm(cluster.env, tmp_path / "helm-home")
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "crds": {"install": False},
                "store": {"enabled": False},
                "operator": {
                    "watchNamespaces": [namespace],
                    # A pod watch that starts quiet after the take-over holds the wave at most this long.
                    "extraArgs": ["--resync-seconds=15"],
                },
                "hostStores": {"roots": [str(tmp_path)]},
                "edgeCache": {"enabled": False},
                "replicaCount": 2,
                "leaderElection": {
                    "enabled": True,
                    "leaseDuration": LEASE_DURATION,
                    "renewDeadline": RENEW_DEADLINE,
                    "retryPeriod": RETRY_PERIOD,
                },
                "image": {"pullPolicy": "Never"},
                "nodeSelector": {"kiri.dev/node-kind": "real"},
                "tolerations": [REAL],
                # One replica per real node: the take-over crosses kubelets.
                "affinity": {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kiri"}},
                                "topologyKey": "kubernetes.io/hostname",
                            }
                        ]
                    }
                },
            }
        )
    )
    release = "kiri-" + namespace[-6:]
    cluster.kubectl("delete", "serviceaccount,role,rolebinding", "kiri-compressor", "-n", namespace)
    model, sha = build_model(tmp_path)
    store = {"model": model, "sha": sha, "store": tmp_path / "store", "built": None, "kstatus": ""}
    t0 = time.monotonic()
    try:
        helm(env, "install", release, str(CHART), "--namespace", namespace, "-f", str(values),
             "--wait", "--timeout", "180s")  # fmt: skip
        print(f"\nhelm install --wait, 2 replicas Ready: {time.monotonic() - t0:.1f}s", file=sys.stderr)
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/name=kiri")["items"]
        assert sorted(p["spec"]["nodeName"] for p in pods) == real_pair
        ip = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        node = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
        container = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["containerID"] for p in pods}

        def lease() -> dict[str, Any]:
            (item,) = cluster.get_json("leases", "-n", namespace)["items"]
            return dict(item["spec"])

        def leader_pod() -> str | None:
            holder = str(cluster.wait_for(lease, timeout=30, message="the Lease").get("holderIdentity") or "")
            # The identity is "<hostname>_<random>", and a pod's hostname is its name.
            name = holder.rsplit("_", 1)[0]
            return name if name in ip and leading(ip[name]) else None

        first = cluster.wait_for(leader_pod, timeout=60, message="one replica leads")
        (second,) = set(ip) - {first}

        def log(pod: str) -> str:
            return cluster.kubectl("logs", pod, "-n", namespace, "--tail=60", check=False)

        r = Rollout(
            cluster,
            namespace,
            store,
            three_steps(),
        )
        # The edge fleet is kwok's: real nodes carry edge labels too, and their taint keeps the DaemonSets off.
        r.body["spec"]["edge"]["nodeSelector"] = {"kiri.dev/tier": "edge", "type": "kwok"}
        try:
            r.deploy_first()
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- leader log ---\n{log(first)}") from None
        r.set(pod_labels={"build": "2"})
        stages: list[str] = []

        def record(s: dict[str, Any]) -> bool:
            stage = str((s.get("edge") or {}).get("stage") or "")
            if "/" in stage and stage not in stages:
                stages.append(stage)
            return stage.startswith("2/3")

        r.wait(record, timeout=120, what="second wave")
        # The standby watched and wrote nothing: not one child, status, Event or Lease renew.
        assert not leading(ip[second])
        assert writes(ip[second]) == 0
        held = lease()
        assert held["leaseDurationSeconds"] == LEASE_DURATION
        assert held["holderIdentity"].startswith(first + "_")

        ctr, socket = node_containerd(node[first])
        _run(ctr, "--address", socket, "--namespace", "k8s.io", "task", "kill", "--signal", "SIGKILL",
             container[first].removeprefix("containerd://"), timeout=30)  # fmt: skip
        killed_at = time.monotonic()
        frozen = r.status()
        assert frozen["edge"]["stage"].startswith("2/3"), frozen
        cluster.wait_for(lambda: leading(ip[second]), timeout=60, interval=0.2, message="the standby leads")
        takeover = time.monotonic() - killed_at
        # One lease duration after the last renew it saw, plus its own retry period and the scrape's polling.
        assert takeover <= LEASE_DURATION + 3 * RETRY_PERIOD, takeover
        now = lease()
        assert now["holderIdentity"].startswith(second + "_"), now
        # Taken over from a live-looking holder (SIGKILL released nothing), not handed over.
        assert now["leaseTransitions"] == held.get("leaseTransitions", 0) + 1
        try:
            status = r.wait(
                lambda s: (
                    (record(s) or True)
                    and s.get("phase") == "Healthy"
                    and s.get("currentRevision") == frozen["updateRevision"]
                ),
                timeout=120,
                what="the new leader completes the rollout",
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- new leader log ---\n{log(second)}") from None
        assert [s.split(" ")[0] for s in stages] == ["1/3", "2/3", "3/3"], stages
        steps = [e["message"] for e in r.events("StepStarted")]
        assert len(steps) == len(set(steps)), steps
        promoted = [h for h in status.get("history") or [] if h.get("revision") == status["currentRevision"]]
        assert [h["outcome"] for h in promoted] == ["Promoted"]
        assert writes(ip[second]) > 0
        # The kubelet restarted the killed container; it came back as a standby, with a new identity.
        restarted = cluster.get_json("pod", first, "-n", namespace)["status"]["containerStatuses"][0]
        assert restarted["restartCount"] == 1
        assert restarted["lastState"]["terminated"]["exitCode"] == 137
        print(
            f"standby pod took the Lease {takeover:.1f}s after the leader's SIGKILL (lease {LEASE_DURATION}s); "
            f"rollout done {time.monotonic() - killed_at:.1f}s after it",
            file=sys.stderr,
        )
    finally:
        helm(env, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)


# ------------------------------------------------------------------ store credentials from a Secret


class BearerStore(http.server.ThreadingHTTPServer):
    """One file behind `Authorization: Bearer <token>`; records what each GET sent (present or not)."""

    def __init__(self, address: tuple[str, int], body: bytes, token: str) -> None:
        self.body, self.token = body, token
        self.seen: list[str] = []
        super().__init__(address, _BearerHandler)


class _BearerHandler(http.server.BaseHTTPRequestHandler):
    server: BearerStore

    def do_GET(self) -> None:
        sent = self.headers.get("Authorization") or ""
        ok = sent == f"Bearer {self.server.token}"
        self.server.seen.append("ok" if ok else ("wrong" if sent else "none"))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", "Bearer")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args: Any) -> None:
        pass


def host_address(cluster: Cluster) -> str:
    """The cluster's host address (hack/README.md): the `kubernetes` Service's endpoint (the API server's
    proxy listens there), on this host and routed from every real node's pods."""
    endpoints = cluster.get_json("endpoints", "kubernetes", "-n", "default")
    return str(endpoints["subsets"][0]["addresses"][0]["ip"])


@pytest.fixture
def bearer_store(cluster: Cluster, real_pair: list[str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The test's model behind a bearer token, served from this host on the cluster's host address."""
    model, sha = build_model(tmp_path)
    token = uuid.uuid4().hex
    server = BearerStore((host_address(cluster), 0), model.read_bytes(), token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield {"uri": f"http://{host}:{port}/models/tiny.onnx", "sha": sha, "token": token, "server": server}
    finally:
        server.shutdown()
        server.server_close()


def test_a_cloud_pod_on_a_real_node_fetches_from_an_http_store_with_the_bearer_token_of_its_secret_ref(
    cluster: Cluster, namespace: str, bearer_store: dict[str, Any]
) -> None:
    server: BearerStore = bearer_store["server"]
    op = Operator(cluster, namespace).start()
    try:
        cluster.apply(
            {
                "apiVersion": "kiri.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "private", "namespace": namespace},
                "spec": {
                    "model": {
                        "name": "tiny",
                        "version": "1",
                        "source": {
                            "uri": bearer_store["uri"],
                            "format": "onnx",
                            "sha256": bearer_store["sha"],
                            # The Secret does not exist yet: its keys are optional, the pod starts without.
                            "credentials": {"secretRef": {"name": "store-token"}},
                        },
                    },
                    "runtime": {"imagePullPolicy": "Never"},
                    "cloud": {
                        "replicas": 1,
                        "resources": {"cpu": "500m", "memory": "1Gi", "gpu": 0},
                        "nodeSelector": {"kiri.dev/node-kind": "real"},
                        "tolerations": [REAL],
                    },
                },
            }
        )

        def pod() -> dict[str, Any] | None:
            items = cluster.get_json("pods", "-n", namespace, "-l", "kiri.dev/modeldeployment=private")[
                "items"
            ]
            live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
            return live[0] if len(live) == 1 and live[0]["status"].get("podIP") else None

        def readiness(p: dict[str, Any]) -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(f"http://{p['status']['podIP']}:8080/v2/health/ready", timeout=5):
                    return 200, ""
            except urllib.error.HTTPError as err:
                return err.code, str(json.loads(err.read() or b"{}").get("reason", ""))
            except OSError:
                return None

        t0 = time.monotonic()
        first = cluster.wait_for(pod, timeout=120, message="the cloud pod has an IP")
        assert first["spec"]["nodeName"].startswith("kiri-real-")
        said = cluster.wait_for(
            lambda: (r := readiness(first)) and r[0] == 503 and "HTTP 401" in r[1] and r,
            timeout=120,
            interval=0.5,
            message="the not-ready reason",
        )
        assert said[1].endswith(
            "HTTP 401: no credentials were sent (set KIRI_HTTP_BEARER_TOKEN(_FILE) or "
            "KIRI_HTTP_USERNAME/KIRI_HTTP_PASSWORD, e.g. with the spec's credentials.secretRef)"
        ), said
        assert set(server.seen) == {"none"}, server.seen
        status = first["status"].get("containerStatuses") or [{}]
        assert not status[0].get("ready")
        print(f"\nwithout the Secret: 401 reason after {time.monotonic() - t0:.1f}s", file=sys.stderr)
        # The same reason in the ModelDeployment's status: the exec readiness probe printed it, the kubelet
        # kept it in its Unhealthy Event, and the operator quoted it in CloudReady.
        event = cluster.wait_for(
            lambda: [
                e
                for e in cluster.get_json("events", "-n", namespace)["items"]
                if e["involvedObject"]["name"] == first["metadata"]["name"] and e["reason"] == "Unhealthy"
            ],
            timeout=60,
            message="the kubelet's Unhealthy Event",
        )[-1]
        assert event["message"].startswith("Readiness probe failed: "), event
        assert event["source"]["host"] == first["spec"]["nodeName"], event

        def cloud_ready() -> dict[str, Any]:
            conds = get_md(cluster, namespace, "private").get("status", {}).get("conditions", [])
            return next((c for c in conds if c["type"] == "CloudReady"), {})

        quoted = cluster.wait_for(
            lambda: "pods not ready: readiness probe:" in (c := cloud_ready()).get("message", "") and c,
            timeout=90,
            interval=1,
            message="CloudReady quoting the probe's reason",
        )
        assert quoted["status"] == "False", quoted
        assert quoted["message"].endswith(f"; 1 pods not ready: readiness probe: {said[1]}"), (quoted, said)
        print(f"the reason in CloudReady after {time.monotonic() - t0:.1f}s", file=sys.stderr)

        # The Secret, then a new pod (env from a Secret is read when the container starts).
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "store-token"},
                "stringData": {"KIRI_HTTP_BEARER_TOKEN": bearer_store["token"]},
            },
            namespace=namespace,
        )
        seen_before = len(server.seen)
        cluster.kubectl("delete", "pod", first["metadata"]["name"], "-n", namespace, "--wait=false")
        t1 = time.monotonic()

        def ready() -> dict[str, Any] | None:
            p = pod()
            if p is None or p["metadata"]["uid"] == first["metadata"]["uid"]:
                return None
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            return p if conds.get("Ready") == "True" else None

        second = cluster.wait_for(ready, timeout=180, interval=0.5, message="the pod with the token Ready")
        print(f"with the Secret: new pod Ready in {time.monotonic() - t1:.1f}s", file=sys.stderr)
        assert second["spec"]["nodeName"].startswith("kiri-real-")
        assert readiness(second) == (200, "")
        assert "ok" in server.seen[seen_before:], server.seen
        # The token is in no log of the pod (names only, never values).
        logs = cluster.kubectl("logs", second["metadata"]["name"], "-n", namespace)
        assert bearer_store["token"] not in logs
        cluster.wait_for(
            lambda: get_md(cluster, namespace, "private").get("status", {}).get("phase") == "Healthy",
            timeout=60,
            message="the ModelDeployment Healthy",
        )
    finally:
        op.stop()
