"""A real Prometheus (the Debian package) scraping real `kiri serve` processes, all on 127.0.0.1.

``analysis_lab`` (module scope) starts one ``kiri serve`` process per revision on a tiny ONNX model, each
with its own ``--fail-ratio``, a Prometheus scraping them every second with ``revision``/``variant`` (and the
PodMonitor's ``namespace``/``component``) target labels (what the Kubernetes scrape config's relabelling gives in a cluster), and a load thread sending
infer requests to the revisions that should have traffic.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

PROMETHEUS = os.environ.get("KIRI_PROMETHEUS", "/usr/bin/prometheus")
FEATURES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(rng.standard_normal((FEATURES, 2)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s: {what}")


@dataclass
class Revision:
    name: str
    fail_ratio: float
    traffic: bool
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    sent: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Lab:
    prometheus: str
    revisions: dict[str, Revision]
    started: float = field(default_factory=time.time)

    def query(self, promql: str) -> list[dict]:  # type: ignore[type-arg]
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        return list(r.json()["data"]["result"])


def _start_server(rev: Revision, model: Path, workdir: Path) -> None:
    rev.port = free_port()
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve",
        "--model-uri", model.as_uri(), "--name", "tiny", "--sha256", sha,
        "--host", "127.0.0.1", "--port", str(rev.port), "--threads", "1",
        "--variant", "int8", "--model-version", rev.name,
        "--cache-dir", str(workdir / f"cache-{rev.name}"), "--log-level", "WARNING",
        "--fail-ratio", str(rev.fail_ratio), "--fail-seed", "7",
    ]  # fmt: skip
    rev.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _load(lab: Lab, stop: threading.Event) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            for rev in lab.revisions.values():
                if rev.traffic:
                    client.post(f"{rev.url}/v2/models/tiny/infer", json=body)
                    rev.sent += 1
            time.sleep(0.02)


@pytest.fixture(scope="module")
def analysis_lab() -> Iterator[Lab]:
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: install the Debian package (make debs)")
    workdir = Path(tempfile.mkdtemp(prefix="kiri-analysis-"))
    revisions = {
        r.name: r
        for r in (
            Revision("healthy", 0.0, traffic=True),
            Revision("faulty", 0.5, traffic=True),
            Revision("idle", 0.0, traffic=False),
        )
    }
    model = tiny_model(workdir / "tiny.onnx")
    for rev in revisions.values():
        _start_server(rev, model, workdir)
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "kiri-edge",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{r.port}"],
                        "labels": {
                            "revision": r.name,
                            "variant": "int8",
                            "namespace": "default",
                            "component": "edge",
                            # The faulty runtime serves a site's adapter set (the PodMonitor's `adapters`
                            # label); the others serve the base model and have no such label.
                            **({"adapters": "a2"} if r.name == "faulty" else {}),
                        },
                    }
                    for r in revisions.values()
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lab = Lab(prometheus=f"http://127.0.0.1:{prom_port}", revisions=revisions)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(lab, stop), daemon=True)
    try:
        for rev in revisions.values():
            wait_until(
                lambda rev=rev: httpx.get(f"{rev.url}/v2/health/ready", timeout=1).status_code == 200,
                60,
                f"kiri serve ({rev.name}) ready",
            )
        wait_until(
            lambda: httpx.get(f"{lab.prometheus}/-/ready", timeout=1).status_code == 200,
            60,
            "Prometheus ready",
        )
        wait_until(lambda: len([s for s in lab.query("up == 1")]) == len(revisions), 30, "all targets up")
        lab.started = time.time()
        loader.start()
        yield lab
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(10)
        for p in [prom, *(r.proc for r in revisions.values())]:
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(workdir, ignore_errors=True)
