"""Running the Kiri operator as a process against the local control plane, and reading what it did.

`Operator` starts `kiri operator --namespace NS` (a real process, so tests can kill it), waits for its
metrics endpoint, and reads its counters: reconciles done and API writes made. `run_compression_job`
plays the kubelet for a compression Job: the simulated cloud node runs no containers, so the Job's own
container command lines run here, as local processes, against the real cluster.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

try:
    from kiri_operator.planning.settings import DEFAULT_HOST_STORE_ROOTS

    HOST_STORE_ROOTS = True
except ImportError:  # the code before the planner redesign and host-path rules, which bench/scale runs
    HOST_STORE_ROOTS = False

from .conftest import REPO_ROOT, Cluster, KubectlError

WRITE_VERBS = ("create", "update", "patch", "apply", "delete")
KIRI = [sys.executable, "-m", "kiri_operator.cli"]
# The operators this test started and has not stopped: a failing test's report carries their logs' tails
# (conftest.pytest_runtest_makereport), so a CI failure explains itself without a rerun.
RUNNING: list[Operator] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    def __init__(self, cluster: Cluster, namespace: str, *extra: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix=f"kiri-operator-{namespace}-", suffix=".log")[1])

    def start(self) -> Operator:
        self.port = free_port()
        cmd = [
            *KIRI,
            "operator",
            "--namespace",
            self.namespace,
            "--metrics-port",
            str(self.port),
            *self.extra,
        ]
        if HOST_STORE_ROOTS and not any(e.startswith("--host-store-root") for e in self.extra):
            # The tests' file:// stores live in pytest's temporary directories: the admin allows those, and
            # the chart's defaults (the learning tests' site data is the API's default path).
            for root in (tempfile.gettempdir(), *DEFAULT_HOST_STORE_ROOTS):
                cmd += ["--host-store-root", root]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.cluster.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        if self not in RUNNING:  # a restarted operator is one entry
            RUNNING.append(self)
        self.cluster.wait_for(
            self._up, timeout=60, interval=0.2, message=f"operator metrics on :{self.port}\n{self.tail()}"
        )
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            self.scrape()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush; whatever the reconcile was doing stops mid-way."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def scrape(self) -> list[Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return list(text_string_to_metric_families(r.read().decode()))

    def counter(self, name: str, **labels: str) -> float:
        total = 0.0
        for family in self.scrape():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def writes(self) -> float:
        return sum(self.counter("kiri_api_requests_total", verb=v) for v in WRITE_VERBS)

    def write_breakdown(self) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for family in self.scrape():
            for s in family.samples:
                if s.name == "kiri_api_requests_total" and s.labels.get("verb") in WRITE_VERBS:
                    key = (s.labels["verb"], s.labels["resource"])
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def reconciles(self) -> float:
        return self.counter("kiri_reconcile_duration_seconds_count")


def operator_fixture(cluster: Cluster, namespace: str, *extra: str) -> Iterator[Operator]:
    op = Operator(cluster, namespace, *extra).start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("KIRI_E2E_OPERATOR_LOG"):
            print(op.tail(200))


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds" / "modeldeployment.yaml")
    )
    cluster.wait_crd_established("modeldeployments.kiri.dev")


def get_md(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("modeldeployment", name, "-n", namespace))


def condition(md: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (md.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def wait_condition(
    cluster: Cluster,
    namespace: str,
    name: str,
    type_: str,
    status: str,
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        md = get_md(cluster, namespace, name)
        c = condition(md, type_)
        if c.get("status") == status and (reason is None or c.get("reason") == reason):
            return md
        return None

    try:
        md = cluster.wait_for(check, timeout=timeout, message=f"{name}: {type_}={status} ({reason})")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{explain(cluster, namespace, name)}") from None
    assert md is not None
    return md


def explain(cluster: Cluster, namespace: str, name: str) -> str:
    """What a wait that timed out saw last: the ModelDeployment's conditions, the namespace's pods and its
    latest events (the operator's log goes with the failing test's report)."""
    try:
        conditions = (get_md(cluster, namespace, name).get("status") or {}).get("conditions") or []
    except KubectlError as exc:
        conditions = [{"error": str(exc)}]
    lines = [f"{c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}" for c in conditions]
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False)
    # When each pod was scheduled and turned Ready: a pod that turned Ready late is a slow kwok, not Kiri.
    ready_at = cluster.kubectl(
        "get",
        "pods",
        "-n",
        namespace,
        "-o",
        "custom-columns=NAME:.metadata.name,CREATED:.metadata.creationTimestamp,"
        'SCHEDULED:.status.conditions[?(@.type=="PodScheduled")].lastTransitionTime,'
        'READY:.status.conditions[?(@.type=="Ready")].lastTransitionTime',
        check=False,
    )
    # The API server's own view of the workloads: against the conditions above it tells a controller that
    # lags (the server says 0 ready too) from an operator that missed an event (the server says ready).
    workloads = cluster.kubectl(
        "get", "deployments,replicasets,daemonsets,jobs", "-n", namespace, "-o", "wide", check=False
    )
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)
    return "\n".join(
        [
            f"conditions (at {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}):",
            *lines,
            "pods:",
            pods,
            ready_at,
            "workloads:",
            workloads,
            "events (latest):",
            *events.splitlines()[-25:],
        ]
    )


def children(cluster: Cluster, namespace: str, name: str, kinds: str) -> list[dict[str, Any]]:
    out = cluster.get_json(kinds, "-n", namespace, "-l", f"kiri.dev/modeldeployment={name}")
    return list(out.get("items") or [])


def run_compression_job(cluster: Cluster, namespace: str, job_name: str) -> subprocess.CompletedProcess[str]:
    """Run the Job's init container (`kiri compress`) and main container (`kiri publish-manifest`) here."""
    job = cluster.get_json("job", job_name, "-n", namespace)
    pod = job["spec"]["template"]["spec"]
    steps = [c for c in pod.get("initContainers", [])] + list(pod["containers"])
    result: subprocess.CompletedProcess[str] | None = None
    for container in steps:
        assert container["command"] == ["kiri"], container["command"]
        result = subprocess.run(
            [*KIRI, *container["args"]],
            env=cluster.env,
            capture_output=True,
            text=True,
            # An upper bound only: the tiny LLaMA's compress step took over 180 s on a box loaded 8x its cores.
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{container['name']} failed ({result.returncode}):\n{result.stderr[-3000:]}"
            )
    assert result is not None
    return result


def build_model(directory: Path) -> tuple[Path, str]:
    """A tiny seeded MLP exported to ONNX by torch: a real model for the real compressor."""
    import hashlib

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = directory / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, 16),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,
    )
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def model_deployment(
    name: str,
    namespace: str,
    model: Path,
    sha256: str,
    store: Path,
    variants: list[dict[str, Any]],
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {
                "name": "tiny",
                "version": "1",
                "source": {"uri": f"file://{model}", "format": "onnx", "sha256": sha256},
            },
            "edge": {"variants": variants, "artifacts": {"uri": f"file://{store}"}},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = value
    return body


def manifest_of(cluster: Cluster, namespace: str, cm_name: str) -> dict[str, Any]:
    cm = cluster.get_json("configmap", cm_name, "-n", namespace)
    return dict(json.loads(cm["data"]["manifest.json"]))


def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)
