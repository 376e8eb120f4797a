"""The operator on the real control plane: cloud tier, compression channel, edge placement, status,
events, metrics and writes. The operator runs as a process per test, scoped to the test's namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiri_runtime import probing

from .conftest import Cluster
from .operator_harness import (
    Operator,
    build_model,
    children,
    condition,
    crd,
    get_md,
    manifest_of,
    model_deployment,
    operator_fixture,
    run_compression_job,
    wait_condition,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

GATE = [{"metric": "cosine", "stat": "mean", "op": ">=", "threshold": 0.99}]
VARIANTS = [
    {
        "name": "fp16",
        "method": "fp16",
        "gate": GATE,
        "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}},
    },
    {
        "name": "int8",
        "method": "int8-dynamic",
        "gate": GATE,
        "requires": {"matchLabels": {"kubernetes.io/arch": "amd64"}},
    },
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def _nodes_by_label(cluster: Cluster) -> dict[str, dict[str, str]]:
    nodes = cluster.get_json("nodes", "-l", "kiri.dev/tier=edge")["items"]
    return {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}


def _expected_variant(labels: dict[str, str]) -> str | None:
    if labels.get("kiri.dev/accelerator") == "gpu":
        return "fp16"
    if labels.get("kubernetes.io/arch") == "amd64":
        return "int8"
    return None


def _affinity(ds: dict) -> list[str]:
    terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    return sorted(v for t in terms["nodeSelectorTerms"] for f in t["matchFields"] for v in f["values"])


def test_model_deployment_reconciles_into_cloud_compression_and_edge(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    md = model_deployment("tiny", namespace, model, sha, tmp_path / "store", VARIANTS)
    cluster.apply(md)

    # Cloud: a Deployment whose pods land on cloud GPU nodes only; CloudReady follows it.
    got = wait_condition(cluster, namespace, "tiny", "CloudReady", "True", "DeploymentAvailable")
    pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=cloud")["items"]
    cloud_nodes = set(cluster.cloud_nodes())
    assert pods and all(p["spec"]["nodeName"] in cloud_nodes for p in pods)
    dep = cluster.get_json("deployment", "tiny-cloud", "-n", namespace)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["exec"]["command"] == probing.command(8080)
    assert cluster.get_json("service", "tiny-cloud", "-n", namespace)["spec"]["ports"][0]["port"] == 8080

    # Compression: a Job on a cloud node; its commands, run here, publish the real manifest.
    assert got["status"]["phase"] == "Compressing"
    (job,) = children(cluster, namespace, "tiny", "jobs")
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"kiri.dev/tier": "cloud"}
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    got = wait_condition(cluster, namespace, "tiny", "VariantsVerified", "True", "Verified")
    cm_name = job["spec"]["template"]["spec"]["containers"][0]["args"][4]
    manifest = manifest_of(cluster, namespace, cm_name)
    by_name = {v["name"]: v for v in got["status"]["variants"]}
    for v in manifest["variants"]:
        assert by_name[v["name"]]["state"] == "Verified"
        assert by_name[v["name"]]["sha256"] == v["sha256"]
        assert by_name[v["name"]]["sizeBytes"] == v["sizeBytes"]
        assert by_name[v["name"]]["fidelity"]["cosine"]["mean"] == pytest.approx(
            v["fidelity"]["cosine"]["mean"]
        )

    # Edge: each node gets exactly one variant, the first whose requires matches; the rest are reported.
    got = wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)
    labels = _nodes_by_label(cluster)
    expected = {n: _expected_variant(lbl) for n, lbl in labels.items()}
    placed: dict[str, str] = {}
    for ds in children(cluster, namespace, "tiny", "daemonsets"):
        variant = ds["metadata"]["labels"]["kiri.dev/variant"]
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--sha256") + 1] == by_name[variant]["sha256"]
        assert args[args.index("--model-uri") + 1].endswith(f"/{variant}.onnx")
        assert args[args.index("--fallback-url") + 1] == f"http://tiny-cloud.{namespace}.svc:8080"
        for node in _affinity(ds):
            assert node not in placed, f"{node} is in two DaemonSets"
            placed[node] = variant
    assert placed == {n: v for n, v in expected.items() if v is not None}
    unmatched = sorted(n for n, v in expected.items() if v is None)
    status = got["status"]
    assert status["edge"]["unmatchedNodes"] == len(unmatched)
    assert status["edge"]["targetNodes"] == len(placed) == status["edge"]["readyNodes"]
    assert status["phase"] == "Healthy" and status["currentRevision"] == status["updateRevision"]
    assert status["observedGeneration"] == got["metadata"]["generation"]
    edge_pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=edge")["items"]
    assert sorted(p["spec"]["nodeName"] for p in edge_pods) == sorted(placed)

    # Events for the decisions, and the printer columns.
    events = cluster.get_json(
        "events", "-n", namespace, "--field-selector", "involvedObject.kind=ModelDeployment"
    )
    reasons = {e["reason"] for e in events["items"]}
    assert {"Created", "Verified", "Promoted"} <= reasons
    if unmatched:
        assert "UnmatchedNodes" in reasons
    row = cluster.kubectl("get", "mdep", "tiny", "-n", namespace, "--no-headers").split()
    assert row[:5] == ["tiny", "Healthy", "1", str(len(placed)), str(len(placed))], row

    # Operator metrics: reconcile histogram, API requests by verb and resource, nodes per variant.
    assert operator.reconciles() > 0
    assert operator.counter("kiri_api_requests_total", verb="apply", resource="daemonsets") >= 2
    ready_int8 = operator.counter("kiri_edge_nodes", namespace=namespace, variant="int8", phase="ready")
    assert ready_int8 == sum(1 for v in placed.values() if v == "int8")


def test_steady_state_and_metadata_changes_make_no_writes_and_deletion_removes_everything(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    cluster.apply(model_deployment("tiny", namespace, model, sha, tmp_path / "store", VARIANTS))
    cluster.wait_for(
        lambda: children(cluster, namespace, "tiny", "jobs"), timeout=30, message="compression Job"
    )
    (job,) = children(cluster, namespace, "tiny", "jobs")
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)

    def versions() -> dict[str, str]:
        out = {}
        for kind in (
            "deployments",
            "services",
            "daemonsets",
            "jobs",
            "configmaps",
            "serviceaccounts",
            "roles",
        ):
            for obj in children(cluster, namespace, "tiny", kind):
                out[f"{kind}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
        return out

    # A label and an annotation on the ModelDeployment: each triggers a reconcile, neither makes a write.
    # On a loaded machine a node can miss a heartbeat and go NotReady for a moment; that is a real change
    # the status must report, so an attempt during which the observed world moved is retried.
    clean = 0
    for attempt in range(4):
        cluster.wait_for(lambda: _quiet(operator), timeout=30, message="operator to go quiet")
        before_writes, before_versions = operator.write_breakdown(), versions()
        before_status = get_md(cluster, namespace, "tiny")["status"]
        reconciles = operator.reconciles()
        cluster.kubectl("label", "mdep", "tiny", "-n", namespace, f"team=vision-{attempt}", "--overwrite")
        cluster.wait_for(
            lambda r=reconciles: operator.reconciles() > r, timeout=30, message="reconcile after label"
        )
        reconciles = operator.reconciles()
        cluster.kubectl("annotate", "mdep", "tiny", "-n", namespace, f"note=hello-{attempt}", "--overwrite")
        cluster.wait_for(
            lambda r=reconciles: operator.reconciles() > r, timeout=30, message="reconcile after annotation"
        )
        child_writes = {
            k: v for k, v in operator.write_breakdown().items() if k[1] not in ("modeldeployments", "events")
        }
        assert child_writes == {
            k: v for k, v in before_writes.items() if k[1] not in ("modeldeployments", "events")
        }
        assert versions() == before_versions
        if get_md(cluster, namespace, "tiny")["status"] != before_status:
            continue
        assert operator.write_breakdown() == before_writes, operator.tail()
        clean += 1
        break
    assert clean, "the status kept changing: no quiet attempt to count writes on"
    md = get_md(cluster, namespace, "tiny")
    assert "kopf.zalando.org/last-handled-configuration" not in md["metadata"].get("annotations", {})
    assert not md["metadata"].get("finalizers")

    # Deleting the ModelDeployment removes every child (owner references, garbage collector).
    cluster.kubectl("delete", "mdep", "tiny", "-n", namespace, "--wait=true", timeout=60)

    def gone() -> bool:
        left = []
        for kind in (
            "deployments",
            "services",
            "daemonsets",
            "jobs",
            "configmaps",
            "serviceaccounts",
            "roles",
            "rolebindings",
            "pods",
        ):
            left += children(cluster, namespace, "tiny", kind)
        return not left

    cluster.wait_for(gone, timeout=90, message="children of the deleted ModelDeployment to go")


def _quiet(operator: Operator) -> bool:
    import time

    writes, reconciles = operator.writes(), operator.reconciles()
    time.sleep(1.5)
    return operator.writes() == writes and operator.reconciles() == reconciles


def test_rejected_variant_is_never_rolled_out(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    # An int8 model cannot reproduce fp32 outputs to 1e-9: the real measurement rejects it.
    strict = [{"metric": "max-abs-error", "op": "<", "threshold": 1e-9}]
    variants = [
        {"name": "int8", "method": "int8-dynamic", "gate": strict},
        {"name": "fp16", "method": "fp16", "gate": GATE},
    ]
    cluster.apply(model_deployment("tiny", namespace, model, sha, tmp_path / "store", variants))
    cluster.wait_for(
        lambda: children(cluster, namespace, "tiny", "jobs"), timeout=30, message="compression Job"
    )
    (job,) = children(cluster, namespace, "tiny", "jobs")
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    md = wait_condition(cluster, namespace, "tiny", "VariantsVerified", "True", "PartiallyRejected")
    states = {v["name"]: v["state"] for v in md["status"]["variants"]}
    assert states == {"int8": "Rejected", "fp16": "Verified"}
    md = wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)
    dss = children(cluster, namespace, "tiny", "daemonsets")
    assert {d["metadata"]["labels"]["kiri.dev/variant"] for d in dss} == {"fp16"}
    # Every edge node falls through to fp16 (no requires): none runs the rejected variant.
    assert sorted(_affinity(dss[0])) == cluster.edge_nodes()
    assert "max-abs-error" in json.dumps(md["status"]["variants"][0])
    assert condition(md, "Degraded")["status"] == "False"


def test_node_label_changes_and_spec_updates_are_reconciled(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    # A label key only this test's ModelDeployment looks at, so other tests sharing the fleet are unaffected.
    key = f"e2e.kiri.dev/{namespace[-6:]}"
    variants = [
        {"name": "special", "method": "fp16", "gate": GATE, "requires": {"matchLabels": {key: "yes"}}},
        {"name": "int8", "method": "int8-dynamic", "gate": GATE},
    ]
    md = model_deployment("tiny", namespace, model, sha, tmp_path / "store", variants)
    cluster.apply(md)
    cluster.wait_for(
        lambda: children(cluster, namespace, "tiny", "jobs"), timeout=30, message="compression Job"
    )
    (job,) = children(cluster, namespace, "tiny", "jobs")
    run_compression_job(cluster, namespace, job["metadata"]["name"])
    first = wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)["status"]
    node = cluster.edge_nodes()[0]

    def pinned() -> dict[str, list[str]]:
        return {
            ds["metadata"]["labels"]["kiri.dev/variant"]: _affinity(ds)
            for ds in children(cluster, namespace, "tiny", "daemonsets")
        }

    assert set(pinned()) == {"int8"}
    try:
        # A Node watch event: the node now meets `special`'s requires and moves to it.
        cluster.kubectl("label", "node", node, f"{key}=yes")
        cluster.wait_for(
            lambda: pinned().get("special") == [node], timeout=30, message="node moved to special"
        )
        assert node not in pinned()["int8"]
        wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=60)
    finally:
        cluster.kubectl("label", "node", node, f"{key}-")
    cluster.wait_for(lambda: set(pinned()) == {"int8"}, timeout=30, message="node back on int8")

    # A spec update that changes what runs (the runtime image) but not the variants: a new revision, new
    # DaemonSets from the same verified manifest, no second compression Job; the old revision goes.
    md["spec"]["runtime"] = {"image": "example.com/kiri-runtime:2"}
    cluster.apply(md)

    def promoted() -> dict | None:
        status = get_md(cluster, namespace, "tiny").get("status") or {}
        if (
            status.get("currentRevision") not in (None, first["currentRevision"])
            and status.get("phase") == "Healthy"
        ):
            return status
        return None

    status = cluster.wait_for(promoted, timeout=90, message="new revision promoted")
    assert status["updateRevision"] == status["currentRevision"] != first["currentRevision"]
    assert len(children(cluster, namespace, "tiny", "jobs")) == 1
    new = status["currentRevision"]

    def moved() -> bool:
        pinned: dict[str, list[str]] = {}
        for d in children(cluster, namespace, "tiny", "daemonsets"):
            nodes = [n for n in _affinity(d) if n != "kiri.dev-no-node"]
            pinned.setdefault(d["metadata"]["labels"]["kiri.dev/revision"], []).extend(nodes)
        # The previous revision's DaemonSets may stay, emptied, as the rollback path; no node is left on them.
        return sorted(pinned.get(new, [])) == cluster.edge_nodes() and all(
            not nodes for rev, nodes in pinned.items() if rev != new
        )

    cluster.wait_for(moved, timeout=30, message="every node on the new revision")

    def revisions_running() -> set[str]:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=edge")["items"]
        return {
            p["metadata"]["labels"]["kiri.dev/revision"]
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
        }

    cluster.wait_for(lambda: revisions_running() == {new}, timeout=30, message="old revision's pods gone")
    (ds,) = [
        d
        for d in children(cluster, namespace, "tiny", "daemonsets")
        if d["metadata"]["labels"]["kiri.dev/revision"] == new
    ]
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "example.com/kiri-runtime:2"
    assert [h["revision"] for h in status["history"] if h["outcome"] == "Promoted"][-2:] == [
        first["currentRevision"],
        status["currentRevision"],
    ]
