"""Federated learning on the real control plane: the operator schedules a round's Jobs onto the right nodes,
their own command lines run here as local processes (the simulated nodes run no containers), the round record
comes back through `kiri publish-round`, and the operator records it, asks the update policy, and turns the
allowed round into a new revision; the next round is deferred by `minIntervalSeconds`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from learning_tiny_model import make_model, write_sites

from .conftest import REPO_ROOT, Cluster
from .operator_harness import (
    KIRI,
    Operator,
    crd,
    get_md,
    model_deployment,
    operator_fixture,
    run_compression_job,
    wait_condition,
)

pytestmark = [pytest.mark.timeout(480), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

FACTORY = f"{REPO_ROOT / 'tests' / 'learning_tiny_model.py'}:make_model"
SITES = ("site-a", "site-b", "site-c")
TOKENS = {s: f"e2e-token-{s}-{'y' * 16}" for s in SITES}


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def _jobs(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return list(cluster.get_json("jobs", "-n", namespace, "-l", selector).get("items") or [])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _run_round(
    cluster: Cluster, namespace: str, n: int, tmp: Path, site_files: dict[str, Path]
) -> dict[str, Any]:
    """Play the kubelet for round n: the aggregator Job's containers and each trainer Job's, here."""
    agg_job = _wait(
        lambda: _jobs(cluster, namespace, f"kiri.dev/learning-role=aggregator,kiri.dev/learning-round={n}"),
        90,
        f"round {n} aggregator Job",
    )[0]
    pod = agg_job["spec"]["template"]["spec"]
    agg_args = pod["initContainers"][0]["args"]
    # In the pod the Secret is mounted at --tokens and the port is fixed; here both are local.
    tokens_dir = tmp / "tokens"
    tokens_dir.mkdir(exist_ok=True)
    for site, token in TOKENS.items():
        (tokens_dir / site).write_text(token)
    port_file = tmp / f"port-{n}"
    local = _swap(_swap(agg_args, "--tokens", str(tokens_dir)), "--port", "0")
    local += ["--host", "127.0.0.1", "--port-file", str(port_file)]
    log = (tmp / f"aggregator-{n}.log").open("wb")
    agg = subprocess.Popen([*KIRI, *local], stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
    port = int(_wait(lambda: port_file.exists() and port_file.read_text(), 60, "aggregator port"))
    trainers = []
    for site in SITES:
        job = next(
            j
            for j in _jobs(cluster, namespace, f"kiri.dev/learning-round={n}")
            if f"--site {site} " in " ".join(j["spec"]["template"]["spec"]["containers"][0]["args"]) + " "
        )
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        token_file = tmp / f"token-{site}"
        token_file.write_text(TOKENS[site])
        args = _swap(args, "--aggregator", f"http://127.0.0.1:{port}")
        args = _swap(_swap(args, "--token-file", str(token_file)), "--data", str(site_files[site]))
        args = _swap(args, "--work-dir", str(tmp / f"work-{site}-{n}"))
        out = (tmp / f"trainer-{site}-{n}.log").open("wb")
        trainers.append(
            subprocess.Popen([*KIRI, *args], stdout=out, stderr=subprocess.STDOUT, env=cluster.env)
        )
    codes = [t.wait(timeout=240) for t in trainers]
    logs = [(tmp / f"trainer-{site}-{n}.log").read_text()[-2000:] for site in SITES]
    assert codes == [0, 0, 0], logs
    assert agg.wait(timeout=120) in (0, 3), (tmp / f"aggregator-{n}.log").read_text()
    publish = subprocess.run(
        [*KIRI, *pod["containers"][0]["args"]],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=60,
        check=False,
    )
    assert publish.returncode == 0, publish.stderr
    return dict(agg_job)


def test_rounds_run_as_jobs_on_the_right_nodes_and_become_revisions_under_the_update_policy(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    import safetensors.torch
    import torch

    paths, held_out = write_sites(tmp_path, len(SITES), seed=3)
    site_files = dict(zip(SITES, paths, strict=True))
    torch.manual_seed(0)
    start: Any = make_model()
    weights = tmp_path / "v1.safetensors"
    safetensors.torch.save_file(start.state_dict(), weights)
    # The cloud serves the same model as ONNX; its inputs (no labels) are the compressor's eval data.
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(
        start.eval(), (torch.randn(1, 8),), str(onnx_path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.load(held_out)["x"][:64])
    cluster.kubectl(
        "create", "secret", "generic", "lm-learning-tokens", "-n", namespace,
        *[f"--from-literal={s}={t}" for s, t in TOKENS.items()],
    )  # fmt: skip
    body = model_deployment(
        "lm",
        namespace,
        onnx_path,
        onnx_sha,
        tmp_path / "store",
        [{"name": "int8", "method": "int8-dynamic"}],
        rollout={"updatePolicy": {"minIntervalSeconds": 3600, "minImprovement": 0.0}},
        learning={
            "trainable": {
                "factory": FACTORY,
                "weightsUri": f"file://{weights}",
                "weightsSha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            },
            "evalDataUri": f"file://{held_out}",
            "trained": {"kind": "layers", "layers": ["2"]},
            "rounds": 2,
            "minClients": 2,
            "localEpochs": 2,
            "learningRate": 0.1,
            "batchSize": 16,
            "dp": {"clipNorm": 1.0, "noiseMultiplier": 0.3, "targetEpsilon": 100},
            "schedule": {"intervalSeconds": 60, "deadlineSeconds": 120, "graceSeconds": 30},
        },
    )
    body["spec"]["model"]["evalDataUri"] = f"file://{inputs}"
    cluster.apply(body, namespace)

    # Round 1: an aggregator Job on a cloud node, one trainer per site on that site's nodes.
    trainers = _wait(
        lambda: (j := _jobs(cluster, namespace, "kiri.dev/learning-role=trainer")) and len(j) == 3 and j,
        90,
        "trainer Jobs",
    )
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in cluster.get_json("nodes")["items"]}
    for job in trainers:
        selector = job["spec"]["template"]["spec"]["nodeSelector"]
        assert selector["kiri.dev/tier"] == "edge" and selector["kiri.dev/site"] in SITES

    def scheduled() -> list[dict[str, Any]] | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "kiri.dev/learning-round=1")["items"]
        bound = [p for p in pods if p["spec"].get("nodeName")]
        return bound if len(bound) == 4 else None

    for p in _wait(scheduled, 90, "round 1 pods bound to nodes"):
        labels = nodes[p["spec"]["nodeName"]]
        role = p["metadata"]["labels"]["kiri.dev/learning-role"]
        if role == "aggregator":
            assert labels["kiri.dev/tier"] == "cloud"
        else:
            site = p["spec"]["nodeSelector"]["kiri.dev/site"]
            assert labels["kiri.dev/tier"] == "edge" and labels["kiri.dev/site"] == site
    revision_before = _wait(
        lambda: get_md(cluster, namespace, "lm").get("status", {}).get("updateRevision"), 60, "revision"
    )

    _run_round(cluster, namespace, 1, tmp_path, site_files)

    def recorded(n: int) -> dict[str, Any] | None:
        learning = get_md(cluster, namespace, "lm").get("status", {}).get("learning") or {}
        return (
            learning
            if learning.get("roundsCompleted", 0) >= n and learning.get("update", {}).get("round") == n
            else None
        )

    learning = _wait(lambda: recorded(1), 60, "round 1 in status")
    (r1,) = learning["rounds"]
    assert r1["outcome"] == "Accepted" and sorted(r1["participants"]) == list(SITES)
    assert r1["epsilon"] > 0 and "accuracy" in r1 and r1["modelSha256"]
    assert learning["update"]["allowed"] is True
    assert learning["model"]["round"] == 1 and learning["model"]["sha256"] == r1["modelSha256"]

    # The allowed round is a new revision: the edge is rebuilt from the learned weights.
    md = _wait(
        lambda: (
            (m := get_md(cluster, namespace, "lm"))["status"].get("updateRevision") != revision_before and m
        ),
        60,
        "new revision",
    )
    compress = [
        j
        for j in _jobs(cluster, namespace, "app.kubernetes.io/component=compress")
        if "--state-dict" in j["spec"]["template"]["spec"]["initContainers"][0]["args"]
    ]
    assert compress, "no compression Job for the learned weights"
    cargs = compress[0]["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert cargs[cargs.index("--source") + 1] == FACTORY
    assert cargs[cargs.index("--state-dict") + 1].endswith("/learning/rounds/0001/weights.safetensors")
    assert cargs[cargs.index("--model-version") + 1] == "1-fl1"
    # The real compressor exports the learned weights and verifies the variant: the revision's gate passes.
    run_compression_job(cluster, namespace, compress[0]["metadata"]["name"])
    md = wait_condition(cluster, namespace, "lm", "VariantsVerified", "True", timeout=120)
    assert [v["state"] for v in md["status"]["variants"]] == ["Verified"]
    # Round 1's Jobs are gone once its record is in; the record stays.
    _wait(lambda: not _jobs(cluster, namespace, "kiri.dev/learning-round=1"), 60, "round 1 Jobs removed")
    assert cluster.get_json("configmap", "lm-learn-r1-record", "-n", namespace)["data"]["round.json"]

    # Round 2 starts intervalSeconds after round 1 closed; its model is deferred by minIntervalSeconds.
    _run_round(cluster, namespace, 2, tmp_path, site_files)
    learning = _wait(lambda: recorded(2), 60, "round 2 in status")
    assert learning["update"]["allowed"] is False
    assert learning["update"]["reason"].startswith("minIntervalSeconds: last rollout started")
    assert 0 < learning["update"]["retryAfterSeconds"] <= 3600
    assert learning["model"]["round"] == 1  # the edge stays on round 1's model
    assert get_md(cluster, namespace, "lm")["status"]["updateRevision"] == md["status"]["updateRevision"]
    events = cluster.get_json("events", "-n", namespace)["items"]
    assert any(e["reason"] == "LearnedModelDeferred" for e in events), json.dumps(
        [e["reason"] for e in events]
    )


# A site that claims 10**400 samples: the real trainer, its upload's header rewritten just before it is sent.
HOSTILE_TRAINER = (
    "import dataclasses, sys\n"
    "from kiri_runtime.learning import deltas\n"
    "encode = deltas.encode\n"
    "deltas.encode = lambda d: encode(dataclasses.replace(d, samples=10**400))\n"
    "from kiri_operator.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_the_privacy_ledger_survives_an_operator_killed_mid_round_and_a_huge_samples_report(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Issue 19: the spend of a round is in the ledger ConfigMap before the round is accepted, whatever
    happens to the operator meanwhile, and a site reporting 10**400 samples is refused without losing it."""
    import safetensors.torch
    import torch

    paths, held_out = write_sites(tmp_path, len(SITES), seed=3)
    site_files = dict(zip(SITES, paths, strict=True))
    torch.manual_seed(0)
    start: Any = make_model()
    weights = tmp_path / "v1.safetensors"
    safetensors.torch.save_file(start.state_dict(), weights)
    model = tmp_path / "model.onnx"
    torch.onnx.export(
        start.eval(), (torch.randn(1, 8),), str(model), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    cluster.kubectl(
        "create", "secret", "generic", "lm-learning-tokens", "-n", namespace,
        *[f"--from-literal={s}={t}" for s, t in TOKENS.items()],
    )  # fmt: skip
    body = model_deployment(
        "lm",
        namespace,
        model,
        sha,
        tmp_path / "store",
        [{"name": "int8", "method": "int8-dynamic"}],
        learning={
            "trainable": {
                "factory": FACTORY,
                "weightsUri": f"file://{weights}",
                "weightsSha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            },
            "evalDataUri": f"file://{held_out}",
            "trained": {"kind": "layers", "layers": ["2"]},
            "rounds": 1,
            "minClients": 2,
            "localEpochs": 1,
            "batchSize": 16,
            "dp": {"clipNorm": 1.0, "noiseMultiplier": 0.3, "targetEpsilon": 100},
            "schedule": {"intervalSeconds": 60, "deadlineSeconds": 120, "graceSeconds": 2},
        },
    )
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.load(held_out)["x"][:64])
    body["spec"]["model"]["evalDataUri"] = f"file://{inputs}"
    op = Operator(cluster, namespace).start()
    try:
        cluster.apply(body, namespace)
        agg_job = _wait(
            lambda: _jobs(cluster, namespace, "kiri.dev/learning-role=aggregator,kiri.dev/learning-round=1"),
            90,
            "round 1 aggregator Job",
        )[0]
        _wait(lambda: len(_jobs(cluster, namespace, "kiri.dev/learning-role=trainer")) == 3, 60, "trainers")
        op.kill()  # mid-round: the Jobs are out, nothing is recorded yet

        pod = agg_job["spec"]["template"]["spec"]
        tokens_dir = tmp_path / "tokens"
        tokens_dir.mkdir()
        for site, token in TOKENS.items():
            (tokens_dir / site).write_text(token)
        port_file = tmp_path / "port"
        local = _swap(_swap(pod["initContainers"][0]["args"], "--tokens", str(tokens_dir)), "--port", "0")
        local += ["--host", "127.0.0.1", "--port-file", str(port_file)]
        agg_log = tmp_path / "aggregator.log"
        agg = subprocess.Popen(
            [*KIRI, *local], stdout=agg_log.open("wb"), stderr=subprocess.STDOUT, env=cluster.env
        )
        port = int(_wait(lambda: port_file.exists() and port_file.read_text(), 60, "aggregator port"))
        trainers = {}
        for site in SITES:
            job = next(
                j
                for j in _jobs(cluster, namespace, "kiri.dev/learning-round=1")
                if f"--site {site} " in " ".join(j["spec"]["template"]["spec"]["containers"][0]["args"]) + " "
            )
            args = job["spec"]["template"]["spec"]["containers"][0]["args"]
            (tmp_path / f"token-{site}").write_text(TOKENS[site])
            args = _swap(args, "--aggregator", f"http://127.0.0.1:{port}")
            args = _swap(
                _swap(args, "--token-file", str(tmp_path / f"token-{site}")), "--data", str(site_files[site])
            )
            args = _swap(args, "--work-dir", str(tmp_path / f"work-{site}"))
            cmd = [*KIRI, *args] if site != "site-c" else [sys.executable, "-c", HOSTILE_TRAINER, *args]
            out = (tmp_path / f"trainer-{site}.log").open("wb")
            trainers[site] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env)
        codes = {site: t.wait(timeout=240) for site, t in trainers.items()}
        logs = {site: (tmp_path / f"trainer-{site}.log").read_text()[-1500:] for site in SITES}
        assert codes["site-a"] == codes["site-b"] == 0, logs
        assert codes["site-c"] != 0 and "at most 1000000000 are taken" in logs["site-c"], logs["site-c"]

        # The round closes; its spend is in the API before the record exists. The operator comes back now,
        # mid-round, and must neither drop nor rewrite the ledger.
        ledger_name = "lm-learning-ledger"

        def ledger() -> dict[str, Any] | None:
            cm = cluster.kubectl("get", "configmap", ledger_name, "-n", namespace, "-o", "json", check=False)
            return json.loads(cm) if cm else None

        written = _wait(ledger, 120, "the ledger ConfigMap")
        spends = json.loads(written["data"]["ledger.json"])["spends"]
        assert [(s["round"], sorted(s["sites"])) for s in spends] == [(1, ["site-a", "site-b"])], spends
        epsilon = max(float(e) for e in spends[0]["epsilon"].values())
        assert epsilon > 0
        op.start()
        assert agg.wait(timeout=120) in (0, 3), agg_log.read_text()[-3000:]
        publish = subprocess.run(
            [*KIRI, *pod["containers"][0]["args"]],
            capture_output=True,
            text=True,
            env=cluster.env,
            timeout=60,
        )
        assert publish.returncode == 0, publish.stderr

        def recorded() -> dict[str, Any] | None:
            learning = get_md(cluster, namespace, "lm").get("status", {}).get("learning") or {}
            return learning if learning.get("roundsCompleted", 0) >= 1 else None

        learning = _wait(recorded, 60, "round 1 in status")
        (r1,) = learning["rounds"]
        assert r1["outcome"] == "Accepted" and sorted(r1["participants"]) == ["site-a", "site-b"], r1
        assert learning["epsilonSpent"] == round(max(epsilon, r1["epsilon"]), 6)

        # Killed again and restarted: the ledger is the same object with the same spends, the budget too.
        op.kill()
        op.start()
        _wait(lambda: op.reconciles() >= 1, 60, "a reconcile after the restart")
        again = ledger()
        assert again is not None
        assert again["metadata"]["uid"] == written["metadata"]["uid"]
        assert again["data"] == written["data"]
        assert (
            get_md(cluster, namespace, "lm")["status"]["learning"]["epsilonSpent"] == learning["epsilonSpent"]
        )
    finally:
        op.stop()
