"""What the operator trusts, on the real control plane: a manifest ConfigMap forged by someone in the
namespace, with every label the real one has but no ownerReference to the ModelDeployment (or one to
another object), is ignored with a Warning Event and changes nothing; the Job's own manifest is then
accepted; and a compression Job's pod holds no API token but in its publishing container."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

NAME = "trust"
VARIANTS = [{"name": "int8", "method": "int8-dynamic"}]


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def forged_manifest(name: str, namespace: str, labels: dict[str, str], sha: str) -> dict[str, Any]:
    """A manifest that accepts a variant whose file and digest the forger chose."""
    manifest = {
        "model": {"source_uri": "file:///forged", "source_sha256": sha, "format": "onnx", "uri": "model.onnx",
                  "onnx_sha256": sha, "size_bytes": 1},
        "baseline": {"p50_latency_ms": 1.0, "size_bytes": 1},
        "seed": 0,
        "variants": [{"name": "int8", "method": "int8-dynamic", "uri": "https://evil.example/int8.onnx",
                      "sha256": "e" * 64, "size_bytes": 1, "accepted": True, "reason": "forged"}],
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {"manifest.json": json.dumps(manifest)},
    }


def not_owned_events(cluster: Cluster, namespace: str) -> list[str]:
    items = cluster.get_json(
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.kind=ModelDeployment,reason=NotOwnedIgnored",
    )["items"]
    return [e["message"] for e in items]


def test_a_forged_manifest_configmap_is_ignored_and_the_jobs_own_manifest_is_trusted(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    model, sha = build_model(tmp_path)
    cluster.apply(model_deployment(NAME, namespace, model, sha, tmp_path / "store", VARIANTS))
    (job,) = cluster.wait_for(
        lambda: children(cluster, namespace, NAME, "jobs"), timeout=30, message="compression Job"
    )
    pod = job["spec"]["template"]["spec"]
    # The Job: the namespace's account, no token pod-wide, a projected one in `publish` alone.
    assert pod["serviceAccountName"] == "kiri-compressor"
    assert pod["automountServiceAccountToken"] is False
    tokened = [
        c["name"]
        for c in pod["initContainers"] + pod["containers"]
        if any(m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" for m in c["volumeMounts"])
    ]
    assert tokened == ["publish"]
    publish = pod["containers"][0]["args"]
    cm_name = publish[publish.index("--name") + 1]
    labels = {
        "app.kubernetes.io/managed-by": "kiri",
        "app.kubernetes.io/name": "kiri",
        "app.kubernetes.io/component": "manifest",
        "app.kubernetes.io/part-of": "kiri",
        "kiri.dev/modeldeployment": NAME,
        "kiri.dev/compression": publish[publish.index("--compression") + 1],
    }
    # Forged with the real one's name and labels, first with no owner, then owned by another object.
    cluster.apply(forged_manifest(cm_name, namespace, labels, sha))
    events = cluster.wait_for(
        lambda: not_owned_events(cluster, namespace), timeout=30, message="NotOwnedIgnored event"
    )
    assert cm_name in events[0]
    md = get_md(cluster, namespace, NAME)
    assert condition(md, "VariantsVerified")["status"] == "Unknown"
    assert {v["name"]: v["state"] for v in md["status"]["variants"]} == {"int8": "Compressing"}
    assert not children(cluster, namespace, NAME, "daemonsets")
    # Owned by another object that exists (an owner that does not exist would have the garbage collector
    # delete the ConfigMap, which proves nothing about the operator).
    other = cluster.get_json("configmap", "kube-root-ca.crt", "-n", namespace)["metadata"]["uid"]
    cluster.kubectl(
        "patch", "configmap", cm_name, "-n", namespace, "--type=merge", "-p",
        json.dumps({"metadata": {"ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "kube-root-ca.crt", "uid": other}
        ]}}),
    )  # fmt: skip
    operator_reconciles = operator.reconciles()
    cluster.wait_for(lambda: operator.reconciles() > operator_reconciles, timeout=30, message="reconcile")
    md = get_md(cluster, namespace, NAME)
    assert condition(md, "VariantsVerified")["status"] == "Unknown"
    assert not children(cluster, namespace, NAME, "daemonsets")
    # Never deleted or overwritten by the operator either: it is not Kiri's.
    forged = cluster.get_json("configmap", cm_name, "-n", namespace)
    assert json.loads(forged["data"]["manifest.json"])["variants"][0]["reason"] == "forged"
    assert operator.counter("kiri_api_requests_total", verb="delete", resource="configmaps") == 0

    # The Job's own publish step writes over it with the ModelDeployment as owner: now it is trusted.
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    md = wait_condition(cluster, namespace, NAME, "VariantsVerified", "True", timeout=60)
    assert {v["name"]: v["state"] for v in md["status"]["variants"]} == {"int8": "Verified"}
    cluster.wait_for(
        lambda: children(cluster, namespace, NAME, "daemonsets"), timeout=30, message="DaemonSet"
    )
