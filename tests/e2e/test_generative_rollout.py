"""A generative ModelDeployment rolled out in waves on the real control plane, gated on the language-model
presets (issue 22, operator): TTFT p95 and inter-token latency p95 against the stable revision, the error ratio,
and the cascade's hand-off ratio against the stable revision's.

The source is the tests' tiny trained LLaMA (tests/lm_fixture.py) as an `hf` checkpoint directory; the
compression Job's `kiri compress` (the real LM compressor: onnxruntime-genai builder, int4, gated on the eval
chats) runs here, as in test_rollout.py. kwok pods run no containers, so each revision's edge pods are one real
`kiri serve` process here, started with the args the operator rendered into that revision's DaemonSet (the
int4 artifact from the store, the sha256, the `--collaboration cascade --cascade-*` flags), only the address,
cache directory, thread count and the cloud URL (the cloud Service's in-cluster name) replaced. The cloud
is a real `kiri serve` started the same way from the args the operator rendered into the cloud Deployment once
the Job had published: the full model's fp32 onnxruntime-genai pack from the store (the manifest's `model.uri`)
with its sha256. A real Prometheus scrapes the edge processes with the target labels the chart's PodMonitor gives edge
pods (`namespace`, `revision`, `component`), which is what the presets select on. Load: greedy completions of
held-out Python source (modules the model never trained on), all the time, to every edge process.

Revision 1 hands off above uncertainty 0.9; revision 2 keeps more on the edge (0.98) and rolls out in three
waves with every gate passing; revision 3 hands off above 0.3, roughly every token, and is rolled back by
the hand-off gate on its first wave while the latency and error gates pass.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiri_runtime import manifests
from kiri_runtime.compressing.lm.sources import directory_sha256

from .conftest import Cluster
from .operator_harness import KIRI, Operator, children, condition, crd, free_port, operator_fixture
from .test_rollout import NAME, Rollout

pytestmark = [pytest.mark.timeout(1500), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

PROM_PORT = free_port()
MODEL = "tiny-chat"
INTERVAL = 3
HELD_OUT = ("fractions.py", "shlex.py", "bisect.py")  # not in lm_fixture.CORPUS_MODULES
THRESHOLDS = {1: 0.9, 2: 0.98, 3: 0.3}


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace, f"--allowed-prometheus=http://127.0.0.1:{PROM_PORT}")


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The checkpoint (a copy under the temporary directory, which the operator's host-store roots allow),
    its eval chats and the artifact store."""
    from lm_fixture import tiny_llama

    root = tmp_path_factory.mktemp("generative")
    checkpoint = shutil.copytree(tiny_llama(), root / "checkpoint")
    chats = [
        {"messages": [{"role": "user", "content": "What does def dedent do?"}]},
        {"messages": [{"role": "user", "content": "What does class Template do?"}]},
        {"text": "def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width, **kwargs)\n"},
        {"text": "import functools\n\n@functools.lru_cache(maxsize=None)\ndef fib(n):\n"},
    ]
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return {
        "checkpoint": checkpoint,
        "model": checkpoint,  # what test_rollout.Rollout builds its (replaced) tensor body from
        "sha": directory_sha256(checkpoint),
        "eval": eval_data,
        "store": root / "store",
        "built": None,
        "kstatus": None,
    }


def prompts() -> list[str]:
    """Held-out source: six-line windows of three stdlib modules the tiny model never trained on."""
    out = []
    for name in HELD_OUT:
        lines = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text().splitlines()
        out += ["\n".join(lines[i : i + 6]) for i in range(20, min(len(lines) - 6, 180), 20)]
    return out


class Lab:
    """The cloud `kiri serve`, one edge `kiri serve` per revision (from its DaemonSet's args), the load, and a
    Prometheus scraping the edges with their revision's target labels."""

    def __init__(self, workdir: Path, namespace: str) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.cloud_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.edges: dict[str, int] = {}  # revision -> port
        self.answers: dict[str, list[dict[str, Any]]] = {}
        self.config = workdir / "prometheus.yml"
        self._write()
        self.procs["prometheus"] = subprocess.Popen(
            [
                "/usr/bin/prometheus",
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ready(f"{self.address}/-/ready", "Prometheus")
        self.prompts = prompts()
        self.stop = threading.Event()
        self.loader = threading.Thread(target=self._load, daemon=True)
        self.loader.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{PROM_PORT}"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def serve_cloud(self, deployment: dict[str, Any]) -> list[str]:
        """Start the cloud `kiri serve` with the cloud Deployment's args; returns those args as rendered."""
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        rendered: list[str] = list(container["args"])
        local = {
            "--host": "127.0.0.1",
            "--port": str(self.cloud_port),
            "--cache-dir": str(self.workdir / "cache-cloud"),
        }
        args = [local.get(rendered[i - 1], a) if i else a for i, a in enumerate(rendered)]
        self._spawn("cloud", [*KIRI, *args, "--threads", "1", "--log-level", "WARNING"])
        _wait_ready(f"http://127.0.0.1:{self.cloud_port}/v2/health/ready", "cloud kiri serve")
        return rendered

    def serve_revision(self, daemonset: dict[str, Any]) -> list[str]:
        """Start the revision's edge `kiri serve` with its DaemonSet's args; returns those args as rendered."""
        revision = daemonset["metadata"]["labels"]["kiri.dev/revision"]
        (container,) = daemonset["spec"]["template"]["spec"]["containers"]
        rendered: list[str] = list(container["args"])
        port = free_port()
        local = {
            "--host": "127.0.0.1",
            "--port": str(port),
            "--cache-dir": str(self.workdir / f"cache-{revision}"),
            "--fallback-url": f"http://127.0.0.1:{self.cloud_port}",
        }
        args = [local.get(rendered[i - 1], a) if i else a for i, a in enumerate(rendered)]
        self._spawn(f"edge-{revision}", [*KIRI, *args, "--threads", "1", "--log-level", "WARNING"])
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", f"edge kiri serve of {revision}")
        self.edges[revision] = port
        self.answers[revision] = []
        self._write()
        self.procs["prometheus"].send_signal(signal.SIGHUP)  # Prometheus reloads its targets
        return rendered

    def _write(self) -> None:
        labels = {"namespace": self.namespace, "component": "edge"}
        targets = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {**labels, "revision": revision}}
            for revision, port in self.edges.items()
        ]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "edge", "static_configs": targets}],
        }
        self.config.write_text(yaml.safe_dump(config))

    def _load(self) -> None:
        n = 0
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                for revision, port in list(self.edges.items()):
                    body = {"model": MODEL, "prompt": self.prompts[n % len(self.prompts)], "max_tokens": 16,
                            "temperature": 0}  # fmt: skip
                    with contextlib.suppress(httpx.HTTPError):
                        reply = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
                        if reply.status_code == 200:
                            self.answers[revision].append(reply.json()["usage"]["kiri"])
                n += 1
                time.sleep(0.05)

    def query(self, promql: str) -> float | None:
        reply = httpx.get(f"{self.address}/api/v1/query", params={"query": promql}, timeout=5).json()
        result = reply["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.stop.set()
        self.loader.join(30)
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_ready(url: str, what: str) -> None:
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    Cluster.wait_for(ready, 90, 0.3, what)


@pytest.fixture
def lab(lm_store: dict[str, Any], namespace: str, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, namespace)
    try:
        yield lab
    finally:
        lab.close()


def generative_deployment(namespace: str, store: dict[str, Any]) -> dict[str, Any]:
    gate = {"successCondition": "result <= 4", "interval": INTERVAL, "failureLimit": 1, "minSamples": 2}
    return {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {
                "name": MODEL,
                "version": "1",
                "source": {"uri": store["checkpoint"].as_uri(), "format": "hf", "sha256": store["sha"]},
                "evalDataUri": store["eval"].as_uri(),
            },
            "cloud": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi", "gpu": 0}},
            "edge": {
                "variants": [{"name": "q4", "method": "int4"}],
                "artifacts": {"uri": store["store"].as_uri()},
                "collaboration": {"mode": "cascade", "cascade": {"threshold": THRESHOLDS[1], "cloudTokens": 1}},
            },
            "rollout": {
                "stages": [
                    {"nodes": 1, "bakeSeconds": 1},
                    {"percent": 50, "bakeSeconds": 1},
                    {"percent": 100, "bakeSeconds": 1},
                ],
                "maxUnavailable": "100%",
                "analysis": {
                    "prometheus": {"address": f"http://127.0.0.1:{PROM_PORT}"},
                    "queries": [
                        # Latencies: gross regressions only (this box is shared and noisy).
                        {"name": "ttft", "preset": "ttft-p95", "relativeToStable": True, **gate},
                        {"name": "itl", "preset": "itl-p95", "relativeToStable": True, **gate},
                        {"name": "errors", "preset": "error-ratio", **gate, "successCondition": "result < 0.05"},
                        {"name": "handoffs", "preset": "handoff-ratio", "relativeToStable": True, **gate,
                         "successCondition": "result <= 2"},
                    ],
                },
            },
        },
    }  # fmt: skip


def _daemonset_of(r: Rollout, revision: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for ds in children(r.cluster, r.namespace, NAME, "daemonsets"):
            if ds["metadata"]["labels"]["kiri.dev/revision"] == revision:
                return ds
        return None

    return dict(r.cluster.wait_for(found, timeout=60, interval=0.3, message=f"DaemonSet of {revision}"))


def _set_threshold(r: Rollout, revision: int) -> None:
    r.body["spec"]["edge"]["collaboration"]["cascade"]["threshold"] = THRESHOLDS[revision]
    r.apply()


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _handoff_ratio(lab: Lab, revision: str) -> float | None:
    sel = f'namespace="{lab.namespace}",revision="{revision}",component="edge"'
    return lab.query(
        f'(sum(increase(kiri:collab_handoffs_total{{{sel},reason="uncertainty"}}[10m])) or vector(0))'
        f" / sum(increase(kiri:collab_tokens_total{{{sel}}}[10m]))"
    )


def test_a_generative_model_deployment_rolls_out_in_waves_on_the_lm_presets_and_one_handing_off_far_more_rolls_back(
    cluster: Cluster, namespace: str, operator: Operator, lm_store: dict[str, Any], lab: Lab
) -> None:
    r = Rollout(cluster, namespace, lm_store, {})
    r.body = generative_deployment(namespace, lm_store)

    # Revision 1 everywhere (a first rollout has nothing to protect), compressed by the real LM compressor.
    rev1 = r.deploy_first()
    # The cloud serves the full model's pack the Job published beside the edge variants, not the checkpoint.
    deployments = r.cluster.wait_for(
        lambda: children(r.cluster, namespace, NAME, "deployments"), timeout=60, message="cloud Deployment"
    )
    (deployment,) = deployments
    cloud_args = lab.serve_cloud(deployment)
    built = r.built
    assert built is not None and namespace in str(built), built
    assert _flag(cloud_args, "--model-uri") == (built / "model.tar").as_uri()
    assert _flag(cloud_args, "--sha256") == manifests.load(built).model.onnx_sha256
    args1 = lab.serve_revision(_daemonset_of(r, rev1))
    assert args1[args1.index("--collaboration") :] == [
        "--collaboration", "cascade", "--cloud-model", MODEL, "--cascade-metric", "margin",
        "--cascade-threshold", "0.9", "--cascade-window", "1", "--cascade-cloud-tokens", "1",
        "--cascade-check", "full",
    ]  # fmt: skip
    assert _flag(args1, "--fallback-url") == f"http://{NAME}-cloud.{namespace}.svc:8080"
    assert condition(r.md(), "CloudReady")["status"] == "True"

    # Revision 2 keeps more tokens on the edge: three waves, each gated, every gate passing.
    _set_threshold(r, 2)
    rev2 = r.wait(lambda s: s.get("updateRevision") not in (None, rev1), what="revision 2")["updateRevision"]
    args2 = lab.serve_revision(_daemonset_of(r, rev2))
    assert _flag(args2, "--cascade-threshold") == "0.98"
    status = r.wait(
        lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == rev2,
        timeout=240,
        what="revision 2",
    )
    assert set(r.placement().values()) == {rev2}
    steps = sorted(
        {e["message"].split(" (")[0] for e in r.events("StepStarted") if f"revision {rev2}," in e["message"]}
    )
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], steps
    passed = [e["message"] for e in r.events("AnalysisPassed")]
    assert len(passed) == 3, passed
    for message in passed:
        assert [q.split(":")[0] for q in message.split("analysis passed: ")[1].split("; ")] == [
            "ttft", "itl", "errors", "handoffs",
        ], message  # fmt: skip
    assert [h["outcome"] for h in status["history"][-1:]] == ["Promoted"]

    # Revision 3 hands off at nearly every token: its first wave is rolled back by the hand-off gate alone.
    _set_threshold(r, 3)
    rev3 = r.wait(lambda s: s.get("updateRevision") not in (rev1, rev2), what="revision 3")["updateRevision"]
    args3 = lab.serve_revision(_daemonset_of(r, rev3))
    assert _flag(args3, "--cascade-threshold") == "0.3"
    status = r.wait_phase("RolledBack", timeout=180)
    rolled = condition({"status": status}, "RolledBack")
    assert rolled["reason"] == "AnalysisFailed", rolled
    failed = rolled["message"].split("analysis failed: ")[1]
    assert [q.split(":")[0] for q in failed.split("; ")] == ["handoffs"], rolled["message"]
    assert set(r.placement().values()) == {rev2}
    assert status["currentRevision"] == rev2

    # What the gates saw, from the runtimes' own counters: revision 3 handed off several times as often.
    ratios = {rev: _handoff_ratio(lab, rev) for rev in (rev1, rev2, rev3)}
    print(f"\n[figure] hand-offs per token by revision (threshold): {ratios} {THRESHOLDS}", file=sys.stderr)
    print(f"[figure] rolled back: {rolled['message']}", file=sys.stderr)
    for message in passed:
        print(f"[figure] revision 2 wave: {message}", file=sys.stderr)
    assert all(v is not None for v in ratios.values()), ratios
    assert ratios[rev2] < ratios[rev1] < ratios[rev3], ratios  # type: ignore[operator]
    assert ratios[rev3] > 2 * ratios[rev2], ratios  # type: ignore[operator]
    # Every answer said which tier made its tokens: revision 3's mostly the cloud's, one hand-off each.
    kiri3 = lab.answers[rev3]
    assert kiri3 and all(a["collaboration"] == "cascade" for a in kiri3)
    assert sum(a["cloud_tokens"] for a in kiri3) > sum(a["edge_tokens"] for a in kiri3)
    assert {a["handoff_reason"] for a in kiri3 if a["handoffs"]} == {"uncertainty"}
