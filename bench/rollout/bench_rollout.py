"""Progressive delivery on the real control plane: rollout time against the bake it must wait, and rollback
latency after a failed gate.

Run: `.venv/bin/python bench/rollout/bench_rollout.py` (starts or reuses `hack/cluster`). It adds 100
simulated edge nodes (4 sites, label `kiri.dev/bench=edge` and no `kiri.dev/tier`, so no other
ModelDeployment selects them and `hack/cluster up` does not prune them as strays)
and removes them at the end, runs `kiri operator` as a process scoped to its own namespace, and the real
compressor for the variant.

1. A 4-stage rollout (1 node, 10%, 50%, 100%) over the 100 nodes, each stage baking BAKE seconds, against a
   baseline measured in the same run: the same rollout with no bake. Overhead = total - sum of bakes.
2. Rollback after a readiness gate failure: the new revision's pods never become Ready; latency is the time
   from the progress deadline passing to every node being back (phase RolledBack).
3. Rollback after a metric gate failure: a real Prometheus scrapes a real `kiri serve --fail-ratio 0.5`
   labelled with the canary's revision; latency is measured from the moment the first analysis was due
   (the canary Ready + minSamples x interval) to RolledBack. Target: <= one interval + 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import Cluster, start_cluster  # noqa: E402
from tests.e2e.operator_harness import KIRI, Operator, build_model, children, free_port, model_deployment  # noqa: E402

SITES = 4
BENCH_LABEL = ("kiri.dev/bench", "edge")
PROMETHEUS = "/usr/bin/prometheus"


def _hack_cluster() -> Any:
    spec = importlib.util.spec_from_file_location("hack_cluster", ROOT / "hack" / "cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hack_cluster"] = module
    spec.loader.exec_module(module)
    return module


def bench_nodes(count: int) -> list[dict[str, Any]]:
    hc = _hack_cluster()
    nodes = []
    for i in range(count):
        site = f"bench-{chr(97 + i % SITES)}"
        labels = {
            BENCH_LABEL[0]: BENCH_LABEL[1],
            "kiri.dev/site": site,
            "kubernetes.io/arch": "amd64",
            "kiri.dev/accelerator": "none",
        }
        # Group 150: a pod-CIDR range of its own, far from the default fleet's.
        nodes.append(
            hc._node(f"kiri-bench-{i:03d}", 150, i, labels, {"cpu": "4", "memory": "4096Mi", "pods": "110"})
        )
    return nodes


class Bench:
    def __init__(self, cluster: Cluster, namespace: str, workdir: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir
        model, sha = build_model(workdir)
        self.model = model
        self.body = model_deployment(
            "bench",
            namespace,
            model,
            sha,
            workdir / "store",
            [{"name": "int8", "method": "int8-dynamic"}],
            rollout={"stages": [{"percent": 100}], "maxUnavailable": "100%"},
        )
        self.body["spec"]["cloud"] = {"replicas": 0}
        self.body["spec"]["edge"]["nodeSelector"] = {BENCH_LABEL[0]: BENCH_LABEL[1]}

    def apply(self) -> None:
        self.cluster.apply(self.body)

    def status(self) -> dict[str, Any]:
        md = self.cluster.get_json("modeldeployment", "bench", "-n", self.namespace)
        return dict(md.get("status") or {})

    def wait(self, predicate: Any, timeout: float, what: str, interval: float = 0.2) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status()
            return status if predicate(status) else None

        return dict(self.cluster.wait_for(check, timeout, interval, what))

    def first_rollout(self) -> str:
        self.apply()
        jobs = self.cluster.wait_for(
            lambda: children(self.cluster, self.namespace, "bench", "jobs"), 60, 0.5, "Job"
        )
        pod = jobs[0]["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            subprocess.run(
                [*KIRI, *container["args"]],
                env=self.cluster.env,
                check=True,
                capture_output=True,
                timeout=300,
            )
        status = self.wait(lambda s: s.get("phase") == "Healthy", 300, "first rollout")
        return str(status["currentRevision"])

    def roll(self, build: str, stages: list[dict[str, Any]], **rollout: Any) -> tuple[str, float]:
        """Apply a new revision; return it and the seconds from apply to the rollout finishing (or failing)."""
        previous = self.status().get("updateRevision")
        self.body["spec"]["edge"]["podLabels"] = {"build": build, **rollout.pop("pod_labels", {})}
        self.body["spec"]["rollout"] = {"stages": stages, "maxUnavailable": "100%", **rollout}
        started = time.monotonic()
        self.apply()
        status = self.wait(lambda s: s.get("updateRevision") != previous, 60, "new revision")
        return str(status["updateRevision"]), started


def rollout_time(b: Bench, bake: int, build: str) -> tuple[float, int]:
    stages = [
        {"nodes": 1, "bakeSeconds": bake},
        {"percent": 10, "bakeSeconds": bake},
        {"percent": 50, "bakeSeconds": bake},
        {"percent": 100, "bakeSeconds": bake},
    ]
    revision, started = b.roll(build, stages)
    b.wait(
        lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == revision, 900, "rollout done"
    )
    return time.monotonic() - started, 4 * bake


def readiness_rollback(b: Bench, deadline: int) -> float:
    b.roll(
        "never-ready",
        [{"nodes": 1}, {"percent": 100}],
        progressDeadlineSeconds=deadline,
        pod_labels={"kiri.dev/sim": "never-ready"},
    )
    b.cluster.wait_for(
        lambda: (b.status().get("edge") or {}).get("updatedNodes") == 1, 60, 0.1, "canary moved"
    )
    moved = time.monotonic()
    b.wait(lambda s: s.get("phase") == "RolledBack", 120, "rolled back", interval=0.1)
    return time.monotonic() - moved - deadline


class Lab:
    """A real Prometheus scraping a real `kiri serve --fail-ratio 0.5`, with load."""

    def __init__(self, workdir: Path, model: Path) -> None:
        self.workdir = workdir
        self.serve_port = free_port()
        self.prom_port = free_port()
        sha = hashlib.sha256(model.read_bytes()).hexdigest()
        self.serve = subprocess.Popen(
            [*KIRI, "serve", "--model-uri", model.as_uri(), "--name", "tiny", "--sha256", sha, "--host", "127.0.0.1",
             "--port", str(self.serve_port), "--threads", "1", "--cache-dir", str(workdir / "serve-cache"),
             "--fail-ratio", "0.5", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.config = workdir / "prometheus.yml"
        self.write_config("none")
        self.prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.stop = threading.Event()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.serve_port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.loader = threading.Thread(target=self._load, daemon=True)
        self.loader.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def write_config(self, revision: str) -> None:
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "edge",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{self.serve_port}"], "labels": {"revision": revision}}
                    ],
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(config))

    def relabel(self, revision: str) -> None:
        """The runtime now runs as the canary's revision: what Kubernetes service discovery would report."""
        self.write_config(revision)
        self.prom.send_signal(signal.SIGHUP)

    def _load(self) -> None:
        body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.1] * 16}]}
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"http://127.0.0.1:{self.serve_port}/v2/models/tiny/infer", json=body)
                time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        for p in (self.serve, self.prom):
            p.terminate()
            p.wait(10)


def analysis_rollback(b: Bench, lab: Lab, interval: int) -> tuple[float, float]:
    query = (
        '(sum(rate(kiri_requests_total{revision="$revision",code=~"5.."}[5s])) or vector(0))'
        ' / sum(rate(kiri_requests_total{revision="$revision"}[5s]))'
    )
    analysis = {
        "prometheus": {"address": lab.address},
        "queries": [
            {"name": "error-ratio", "query": query, "successCondition": "result < 0.1", "interval": interval,
             "failureLimit": 0, "minSamples": 1}
        ],
    }  # fmt: skip
    previous = b.status().get("updateRevision")
    b.body["spec"]["edge"]["podLabels"] = {"build": "faulty"}
    b.body["spec"]["rollout"] = {
        "stages": [{"nodes": 1, "bakeSeconds": 60}, {"percent": 100}],
        "maxUnavailable": "100%",
        "analysis": analysis,
    }
    b.apply()
    status = b.wait(lambda s: s.get("updateRevision") != previous, 60, "new revision")
    lab.relabel(str(status["updateRevision"]))
    status = b.wait(lambda s: (s.get("rollout") or {}).get("readyAt"), 120, "canary Ready", interval=0.1)
    ready_at = datetime.fromisoformat(status["rollout"]["readyAt"].replace("Z", "+00:00")).timestamp()
    b.wait(lambda s: s.get("phase") == "RolledBack", 180, "rolled back on analysis", interval=0.1)
    done = time.time()
    reason = next(c for c in b.status()["conditions"] if c["type"] == "RolledBack")["reason"]
    assert reason == "AnalysisFailed", reason
    due = ready_at + interval  # minSamples 1: the first measurement is due one interval after Ready
    return done - due, done - ready_at


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--bake", type=int, default=10, help="bakeSeconds of each of the 4 stages")
    parser.add_argument(
        "--deadline", type=int, default=10, help="progressDeadlineSeconds for the readiness gate"
    )
    parser.add_argument("--interval", type=int, default=10, help="analysis interval")
    args = parser.parse_args()

    cluster = start_cluster()
    namespace = f"bench-rollout-{uuid.uuid4().hex[:6]}"
    nodes = bench_nodes(args.nodes)
    workdir = Path(tempfile.mkdtemp(prefix="kiri-bench-rollout-"))
    cluster.apply(nodes)
    cluster.kubectl("create", "namespace", namespace)
    op = lab = None
    try:
        cluster.wait_for(
            lambda: all(
                cluster.node_ready(n["metadata"]["name"]) for n in nodes[:: max(1, len(nodes) // 10)]
            ),
            120,
            1,
            "bench nodes Ready",
        )
        op = Operator(cluster, namespace).start()
        b = Bench(cluster, namespace, workdir)
        b.first_rollout()
        base, _ = rollout_time(b, 0, "baseline")
        total, bakes = rollout_time(b, args.bake, "baked")
        lab = Lab(workdir, b.model)
        ready_latency = readiness_rollback(b, args.deadline)
        b.roll("recover", [{"percent": 100}])
        b.wait(lambda s: s.get("phase") == "Healthy", 300, "recovered")
        after_due, after_ready = analysis_rollback(b, lab, args.interval)
        result = {
            "nodes": args.nodes,
            "stages": 4,
            "bake_s": args.bake,
            "sum_of_bakes_s": bakes,
            "rollout_s": round(total, 1),
            "overhead_s": round(total - bakes, 1),
            "ratio_vs_bakes": round(total / bakes, 3) if bakes else None,
            "baseline_no_bake_s": round(base, 1),
            "readiness_rollback_after_deadline_s": round(ready_latency, 1),
            "analysis_interval_s": args.interval,
            "analysis_rollback_after_first_due_s": round(after_due, 1),
            "analysis_rollback_after_canary_ready_s": round(after_ready, 1),
            "analysis_target_s": args.interval + 10,
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if lab is not None:
            lab.close()
        if op is not None:
            op.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "nodes", "-l", f"{BENCH_LABEL[0]}={BENCH_LABEL[1]}", "--wait=false", check=False
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
