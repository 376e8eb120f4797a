"""Bad input and faults on the real control plane: each gets a condition with a reason and a message,
no crash loop and no orphaned partial objects; a killed operator converges without duplicates."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Cluster
from .operator_harness import (
    Operator,
    build_model,
    children,
    condition,
    crd,
    get_md,
    model_deployment,
    operator_fixture,
    run_compression_job,
    wait_condition,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

GATE = [{"metric": "cosine", "stat": "mean", "op": ">=", "threshold": 0.99}]
INT8 = {"name": "int8", "method": "int8-dynamic", "gate": GATE}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    # A short Job deadline turns an unschedulable compression Job into a real Job failure in seconds;
    # a short resync notices a PersistentVolumeClaim created later.
    yield from operator_fixture(cluster, namespace, "--compression-deadline", "3", "--resync-seconds", "3")


def _kinds(cluster: Cluster, namespace: str, name: str) -> dict[str, int]:
    out = {}
    for kind in ("deployments", "services", "jobs", "daemonsets", "replicasets"):
        out[kind] = len(children(cluster, namespace, name, kind))
    return out


def test_faults_get_conditions_with_reasons_and_leave_no_partial_objects(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    store = tmp_path / "store"
    missing_pvc = model_deployment("pvc", namespace, model, sha, store, [INT8])
    missing_pvc["spec"]["model"]["source"]["uri"] = "pvc://models/tiny.onnx"
    no_gpu = model_deployment("nogpu", namespace, model, sha, store, [], cloud={"resources": {"gpu": 8}})
    no_match = model_deployment(
        "nomatch",
        namespace,
        model,
        sha,
        store,
        [{**INT8, "requires": {"matchLabels": {"kiri.dev/accelerator": "tpu"}}}],
    )
    # No node can hold 100Ti: the Job's pod never schedules and the Job controller fails the Job.
    failing = model_deployment(
        "jobfail", namespace, model, sha, store, [INT8], cloud={"resources": {"memory": "100Ti"}}
    )
    cluster.apply([missing_pvc, no_gpu, no_match, failing])

    md = wait_condition(cluster, namespace, "pvc", "CloudReady", "False", "MissingPVC")
    assert "models" in condition(md, "CloudReady")["message"]
    assert condition(md, "Degraded")["status"] == "True" and md["status"]["phase"] == "Degraded"
    assert (
        _kinds(cluster, namespace, "pvc")["deployments"] == 0
        and _kinds(cluster, namespace, "pvc")["jobs"] == 0
    )

    md = wait_condition(cluster, namespace, "nogpu", "CloudReady", "False", "NoGPUNode")
    assert "8" in condition(md, "CloudReady")["message"]
    assert _kinds(cluster, namespace, "nogpu")["deployments"] == 0

    md = wait_condition(
        cluster, namespace, "jobfail", "VariantsVerified", "False", "CompressionFailed", timeout=90
    )
    assert "DeadlineExceeded" in condition(md, "VariantsVerified")["message"]
    assert md["status"]["phase"] == "Failed" and {v["state"] for v in md["status"]["variants"]} == {"Failed"}

    (job,) = children(cluster, namespace, "nomatch", "jobs")
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    md = wait_condition(cluster, namespace, "nomatch", "EdgeRolledOut", "False", "NoMatchingEdgeNode")
    assert md["status"]["edge"]["unmatchedNodes"] == len(cluster.edge_nodes())
    assert condition(md, "Degraded")["reason"] == "NoMatchingEdgeNode"
    assert _kinds(cluster, namespace, "nomatch")["daemonsets"] == 0

    # No crash loop: the failed Job is not retried, nothing else is half-made, and a quiet period is quiet.
    time.sleep(4)
    writes = operator.writes()
    time.sleep(4)
    assert operator.writes() == writes
    assert _kinds(cluster, namespace, "jobfail")["jobs"] == 1
    assert operator.proc is not None and operator.proc.poll() is None
    warnings = cluster.get_json("events", "-n", namespace, "--field-selector", "type=Warning")["items"]
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in warnings}
    assert {("pvc", "MissingPVC"), ("nogpu", "NoGPUNode"), ("jobfail", "CompressionFailed")} <= reasons

    # The fault clears when its cause does: the claim appears, the Deployment follows.
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": namespace},
            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
        }
    )
    cluster.wait_for(
        lambda: children(cluster, namespace, "pvc", "deployments"), timeout=30, message="Deployment"
    )
    dep = children(cluster, namespace, "pvc", "deployments")[0]
    assert dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "models"


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, namespace: str, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    variants = [
        {**INT8, "requires": {"matchLabels": {"kubernetes.io/arch": "amd64"}}},
        {"name": "fp16", "method": "fp16", "gate": GATE},
    ]
    op = Operator(cluster, namespace).start()
    try:
        cluster.apply(model_deployment("tiny", namespace, model, sha, tmp_path / "store", variants))
        # The Service is the first write of the first reconcile: kill the operator right there.
        cluster.wait_for(
            lambda: children(cluster, namespace, "tiny", "services"),
            timeout=30,
            interval=0.05,
            message="Service",
        )
        op.kill()
        partial = _kinds(cluster, namespace, "tiny")
        op.start()
        cluster.wait_for(
            lambda: children(cluster, namespace, "tiny", "jobs"), timeout=30, message="compression Job"
        )
        (job,) = children(cluster, namespace, "tiny", "jobs")
        run_compression_job(cluster, namespace, job["metadata"]["name"])
        # Kill again in the middle of the edge rollout, then let a fresh process finish it.
        cluster.wait_for(
            lambda: children(cluster, namespace, "tiny", "daemonsets"),
            timeout=30,
            interval=0.05,
            message="DS",
        )
        op.kill()
        op.start()
        md = wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)
    finally:
        op.stop()
    kinds = _kinds(cluster, namespace, "tiny")
    assert kinds == {"deployments": 1, "services": 1, "jobs": 1, "daemonsets": 2, "replicasets": 1}, (
        partial,
        kinds,
    )
    pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=edge")["items"]
    nodes = [p["spec"]["nodeName"] for p in pods]
    assert len(nodes) == len(set(nodes)) == len(cluster.edge_nodes())
    assert md["status"]["history"][-1]["outcome"] == "Promoted"
    assert (
        len(
            [h for h in get_md(cluster, namespace, "tiny")["status"]["history"] if h["outcome"] == "Promoted"]
        )
        == 1
    )
