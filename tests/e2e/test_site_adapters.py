"""Per-site LoRA adapters on the real control plane (issue 23, operator): each site's edge DaemonSet carries
that site's adapters, a change to one site's adapters moves one canary node of that site first and then the
rest of it while the other sites' DaemonSets are never written, and an adapter measured worse than the base
never rolls out.

kwok pods run no containers, so what is under test is the operator against a real API server: its
DaemonSets, node affinity, status and Events. The compression Job's `kiri compress` is not run (a language
model's build is minutes of CPU, and test_generative_rollout.py covers it): its output directory gets a
causal-LM manifest (kiri_runtime.manifests, the models the Job writes), published by the Job's own
`kiri publish-manifest` step. Rollback of a site's adapters on never-Ready pods is covered by the planner's
unit tests (tests/unit/operator/planning/test_site_adapters.py): kwok's never-Ready stage selects a pod label
that `spec.edge.podLabels` sets on every DaemonSet, so it cannot fail one adapter set alone; the rollback on
a failed analysis, and `kiri rollback --site`, run here in test_site_adapter_analysis.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiri_runtime import manifests

from .conftest import Cluster
from .operator_harness import KIRI, Operator, children, condition, crd, get_md, operator_fixture

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

NAME = "assistant"
SOURCE_SHA = "5c2f8a4e1d7b3c9a0e6f2d8b4a1c7e3f9d5b2a8c6e4f1d3b7a9c5e2f8d4b1a6c"


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def adapter(name: str, sha: str, sites: list[str], **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "uri": f"https://adapters.example/{name}-{sha[:6]}.onnx_adapter",
        "sha256": sha,
        "sizeBytes": 15368,
        "sites": sites,
        **more,
    }


def body(namespace: str, root: Path, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {
                "name": NAME,
                "version": "1",
                "source": {"uri": f"file://{root}/checkpoint.tar", "format": "hf", "sha256": SOURCE_SHA},
                "evalDataUri": f"file://{root}/eval.jsonl",
            },
            "cloud": {"replicas": 0},
            "edge": {
                "variants": [{"name": "q4", "method": "int4", "options": {"loraTargets": "q_proj,v_proj"}}],
                "artifacts": {"uri": f"file://{root}/store"},
                "adapters": adapters,
            },
            "rollout": {
                "stages": [{"nodes": 1, "bakeSeconds": 2}, {"percent": 100}],
                "maxUnavailable": "100%",
                "progressDeadlineSeconds": 120,
            },
        },
    }


def lm_manifest() -> manifests.Manifest:
    return manifests.Manifest(
        model=manifests.ModelInfo(
            source_uri="checkpoint.tar",
            source_sha256=SOURCE_SHA,
            format="hf",
            uri="model.tar",
            onnx_sha256="e" * 64,
            size_bytes=9000,
            kind="causal-lm",
            architecture="LlamaForCausalLM",
        ),
        baseline=manifests.Baseline(p50_latency_ms=5.0, size_bytes=9000),
        seed=0,
        variants=[
            manifests.Variant(
                name="q4",
                method="int4",
                uri="q4.tar",
                sha256="f" * 64,
                size_bytes=2000,
                accepted=True,
                reason="all gates passed",
            )
        ],
    )


def publish(cluster: Cluster, namespace: str) -> None:
    """The compression Job's output directory gets its manifest, and the Job's last step publishes it."""
    jobs = cluster.wait_for(
        lambda: children(cluster, namespace, NAME, "jobs"), timeout=60, message="compression Job"
    )
    pod = jobs[0]["spec"]["template"]["spec"]
    args = pod["initContainers"][0]["args"]
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(manifests.dumps(lm_manifest()))
    result = subprocess.run(
        [*KIRI, *pod["containers"][0]["args"]],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def daemonsets(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {ds["metadata"]["name"]: ds for ds in children(cluster, namespace, NAME, "daemonsets")}


def adapters_by_node(cluster: Cluster, namespace: str) -> dict[str, str]:
    """node -> the adapter revision of the DaemonSet it is pinned to ("" for none)."""
    out: dict[str, str] = {}
    for ds in daemonsets(cluster, namespace).values():
        revision = ds["metadata"]["labels"].get("kiri.dev/adapters", "")
        terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        for term in terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]:
            for field in term.get("matchFields") or []:
                for node in field.get("values") or []:
                    if node.startswith("kiri-"):
                        out[node] = revision
    return out


def site_status(cluster: Cluster, namespace: str, site: str) -> dict[str, Any]:
    status = get_md(cluster, namespace, NAME).get("status") or {}
    for entry in (status.get("edge") or {}).get("adapters") or []:
        if entry.get("site") == site:
            return dict(entry)
    return {}


def ready_pods(cluster: Cluster, namespace: str, adapters: str) -> int:
    pods = cluster.get_json("pods", "-n", namespace, "-l", f"kiri.dev/adapters={adapters}")["items"]
    return sum(
        1
        for p in pods
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
    )


def test_one_sites_adapters_roll_out_on_that_site_alone_canary_first_and_a_worse_adapter_never_does(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    a_nodes, b_nodes = cluster.edge_nodes("site-a"), cluster.edge_nodes("site-b")
    c_nodes = cluster.edge_nodes("site-c")
    assert len(a_nodes) >= 2 and b_nodes and c_nodes
    shop = adapter("shop", "1" * 64, ["site-a", "site-b"], default=True)
    clinic = adapter("clinic", "3" * 64, ["site-a"])
    cluster.apply(body(namespace, tmp_path, [shop, clinic]))
    publish(cluster, namespace)
    last: dict[str, Any] = {}

    def healthy() -> bool:
        last.update(get_md(cluster, namespace, NAME).get("status") or {})
        return last.get("phase") == "Healthy"

    try:
        cluster.wait_for(healthy, timeout=120, message="revision 1 with adapters everywhere")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {last}\n{operator.tail(40)}") from None
    first = adapters_by_node(cluster, namespace)
    rev_a, rev_b = first[a_nodes[0]], first[b_nodes[0]]
    assert {first[n] for n in a_nodes} == {rev_a} and {first[n] for n in b_nodes} == {rev_b}
    assert {first[n] for n in c_nodes} == {""}  # a site the spec does not name serves the base model
    assert "" not in (rev_a, rev_b) and rev_a != rev_b
    by_set = {
        ds["metadata"]["labels"].get("kiri.dev/adapters", ""): ds
        for ds in daemonsets(cluster, namespace).values()
    }
    args = by_set[rev_a]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--default-adapter") + 1] == "shop"
    assert sum(1 for a in args if a == "--adapter") == 2
    assert (
        site_status(cluster, namespace, "site-a")["revision"],
        site_status(cluster, namespace, "site-b")["revision"],
    ) == (rev_a, rev_b)
    b_versions = {
        name: ds["metadata"]["resourceVersion"]
        for name, ds in daemonsets(cluster, namespace).items()
        if ds["metadata"]["labels"].get("kiri.dev/adapters") == rev_b
    }

    # Site a's clinic adapter changes: one canary node of site a, then the rest of site a.
    cluster.apply(body(namespace, tmp_path, [shop, adapter("clinic", "4" * 64, ["site-a"])]))
    seen_partial = False
    deadline = time.monotonic() + 120
    new_a = ""
    while time.monotonic() < deadline:
        placed = adapters_by_node(cluster, namespace)
        new_a = site_status(cluster, namespace, "site-a").get("updateRevision", "")
        on_new = [n for n in a_nodes if placed.get(n) == new_a and new_a != rev_a]
        assert {placed[n] for n in b_nodes} == {rev_b}
        assert {placed[n] for n in c_nodes} == {""}
        if on_new == a_nodes[:1]:
            seen_partial = True
        if (
            len(on_new) == len(a_nodes)
            and site_status(cluster, namespace, "site-a").get("verdict") == "Completed"
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(
            f"site a did not complete: {site_status(cluster, namespace, 'site-a')}\n{operator.tail(40)}"
        )
    assert seen_partial, "the canary step (one node of site a) was never observed"
    a = site_status(cluster, namespace, "site-a")
    assert (a["revision"], a["previousRevision"]) == (new_a, rev_a)
    assert ready_pods(cluster, namespace, new_a) == len(a_nodes)
    assert {
        name: ds["metadata"]["resourceVersion"]
        for name, ds in daemonsets(cluster, namespace).items()
        if ds["metadata"]["labels"].get("kiri.dev/adapters") == rev_b
    } == b_versions  # site b's DaemonSet was never written
    started = cluster.get_json(
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.kind=ModelDeployment,reason=RolloutStarted",
    )["items"]
    assert any(e["message"].startswith("adapters of site site-a: ") for e in started)

    # A site-b adapter its producer measured worse than the base is refused; site b keeps what it serves.
    # (Site a's set stays the same: shop, now for site a only, and the new clinic.)
    held_out = {"metric": "perplexity", "base": 10, "adapter": 11}
    worse = adapter("shop-b", "5" * 64, ["site-b"], default=True, heldOut=held_out)
    a_set = [{**shop, "sites": ["site-a"]}, adapter("clinic", "4" * 64, ["site-a"])]
    cluster.apply(body(namespace, tmp_path, [*a_set, worse]))

    def refused() -> dict[str, Any] | None:
        md = get_md(cluster, namespace, NAME)
        return md if condition(md, "AdaptersRolledOut").get("reason") == "AdapterWorseThanBase" else None

    try:
        md = cluster.wait_for(refused, timeout=60, message="AdaptersRolledOut=False/AdapterWorseThanBase")
    except TimeoutError as exc:
        status = get_md(cluster, namespace, NAME).get("status") or {}
        raise AssertionError(f"{exc}: {status}\n{operator.tail(40)}") from None
    assert condition(md, "AdaptersRolledOut")["status"] == "False"
    assert (
        "site site-b: adapter shop-b (perplexity 11 vs base 10)"
        in condition(md, "AdaptersRolledOut")["message"]
    )
    warned = cluster.get_json(
        "events",
        "-n",
        namespace,
        "--field-selector",
        "involvedObject.kind=ModelDeployment,reason=AdapterWorseThanBase",
    )["items"]
    assert [e["type"] for e in warned if e["type"] == "Warning"] == ["Warning"]
    time.sleep(3)
    assert {adapters_by_node(cluster, namespace)[n] for n in b_nodes} == {rev_b}
    assert condition(get_md(cluster, namespace, NAME), "Ready")["status"] == "True"
