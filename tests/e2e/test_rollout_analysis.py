"""The metric gate end to end: the operator on the real control plane asks a real Prometheus, which scrapes
real `kiri serve` processes labelled as the canary's revision (what a Kubernetes service-discovery scrape
config gives in a cluster; kwok pods run no containers, so the runtimes run here).

A failing runtime (`--fail-ratio 0.5`) rolls the wave back with `AnalysisFailed`; a runtime with no traffic
holds the wave with `AnalysisInconclusive` and no rollback, until traffic comes and the gate passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import Cluster
from .operator_harness import KIRI, Operator, condition, crd, free_port, operator_fixture
from .test_rollout import Rollout, store

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd", "store"]

# The lab's Prometheus listens here; the operator may query it and nothing else (its allow-list).
PROM_PORT = free_port()


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace, f"--allowed-prometheus=http://127.0.0.1:{PROM_PORT}")


INTERVAL = 3
ERROR_RATIO = (
    '(sum(rate(kiri_requests_total{revision="$revision",code=~"5.."}[4s])) or vector(0))'
    ' / sum(rate(kiri_requests_total{revision="$revision"}[4s]))'
)


class Lab:
    """Two runtimes (healthy, faulty), load on demand, and a Prometheus whose targets say which revision
    each runtime is."""

    def __init__(self, workdir: Path, model: Path) -> None:
        sha = hashlib.sha256(model.read_bytes()).hexdigest()
        self.ports = {"healthy": free_port(), "faulty": free_port()}
        self.procs = [
            subprocess.Popen(
                [
                    *KIRI,
                    "serve",
                    "--model-uri",
                    model.as_uri(),
                    "--name",
                    "tiny",
                    "--sha256",
                    sha,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--threads",
                    "1",
                    "--cache-dir",
                    str(workdir / f"cache-{name}"),
                    "--log-level",
                    "WARNING",
                    "--fail-ratio",
                    "0.5" if name == "faulty" else "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, port in self.ports.items()
        ]
        self.revisions = {"healthy": "none", "faulty": "none"}
        self.loaded: set[str] = set()
        self.config = workdir / "prometheus.yml"
        self._write()
        self.prom_port = PROM_PORT
        self.procs.append(
            subprocess.Popen(
                [
                    "/usr/bin/prometheus",
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.prom_port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for port in self.ports.values():
            Cluster.wait_for(
                lambda port=port: _ready(f"http://127.0.0.1:{port}/v2/health/ready"), 60, 0.2, "kiri serve"
            )
        Cluster.wait_for(lambda: _ready(f"{self.address}/-/ready"), 60, 0.2, "Prometheus")
        self.stop = threading.Event()
        self.loader = threading.Thread(target=self._load, daemon=True)
        self.loader.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def _write(self) -> None:
        targets = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"revision": self.revisions[name]}}
            for name, port in self.ports.items()
        ]
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "edge", "static_configs": targets}],
        }
        self.config.write_text(yaml.safe_dump(config))

    def serve_as(self, name: str, revision: str, load: bool) -> None:
        self.revisions[name] = revision
        (self.loaded.add if load else self.loaded.discard)(name)
        self._write()
        self.procs[-1].send_signal(signal.SIGHUP)  # Prometheus reloads its targets

    def _load(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.1] * 16}]}
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                for name in list(self.loaded):
                    with contextlib.suppress(httpx.HTTPError):
                        client.post(f"http://127.0.0.1:{self.ports[name]}/v2/models/tiny/infer", json=body)
                time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def lab(store: dict[str, Any], tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, store["model"])
    try:
        yield lab
    finally:
        lab.close()


def test_metric_gate_rolls_back_a_failing_canary_and_holds_an_idle_one(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any], lab: Lab
) -> None:
    analysis = {
        "prometheus": {"address": lab.address},
        "queries": [
            {"name": "error-ratio", "query": ERROR_RATIO, "successCondition": "result < 0.1",
             "interval": INTERVAL, "failureLimit": 0, "minSamples": 2}
        ],
    }  # fmt: skip
    r = Rollout(
        cluster,
        namespace,
        store,
        {"stages": [{"nodes": 1, "bakeSeconds": 1}, {"percent": 100}], "analysis": analysis},
    )
    rev1 = r.deploy_first()

    # A canary whose runtime answers half its requests with 500: rolled back on the analysis.
    r.set(pod_labels={"build": "faulty"})
    rev2 = r.wait(lambda s: s.get("updateRevision") not in (None, rev1), what="revision 2")["updateRevision"]
    lab.serve_as("faulty", rev2, load=True)
    status = r.wait_phase("RolledBack", timeout=90)
    rolled = condition({"status": status}, "RolledBack")
    assert rolled["reason"] == "AnalysisFailed", rolled
    assert "error-ratio" in rolled["message"]
    assert set(r.placement().values()) == {rev1}

    # A canary whose site has no traffic: inconclusive, the wave holds, nothing rolls back.
    r.set(pod_labels={"build": "quiet"})
    rev3 = r.wait(lambda s: s.get("updateRevision") not in (rev1, rev2), what="revision 3")["updateRevision"]
    lab.serve_as("healthy", rev3, load=False)
    status = r.wait(
        lambda s: condition({"status": s}, "EdgeProgressing").get("reason") == "AnalysisInconclusive",
        timeout=60,
        what="inconclusive",
    )
    assert "too few samples" in condition({"status": status}, "EdgeProgressing")["message"]
    time.sleep(2 * INTERVAL)
    status = r.status()
    assert status["phase"] == "Progressing"
    assert list(r.placement().values()).count(rev3) == 1

    # Traffic arrives and the runtime is healthy: the gate passes and the rollout completes.
    lab.serve_as("healthy", rev3, load=True)
    status = r.wait(
        lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == rev3, timeout=90, what="done"
    )
    assert r.events("AnalysisPassed")
    assert set(r.placement().values()) == {rev3}
