"""Reconcile cost against fleet size: the pure planner and the cache snapshot, steady state.

Baseline: the same steady-state reconcile on the 12-node test fleet, measured in the same run. Prints the
time per reconcile at each size, the ratio to the baseline, the per-node cost, and the writes the steady
state makes (must be 0). Run: .venv/bin/python bench/operator/bench_reconcile.py [--sizes 12,250,1000]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.caches import Cache
from kiri_operator.observations import NodeView, ObjectView, Observed, PodView
from kiri_operator.planning import plan
from kiri_operator.planning.building import affinity_nodes
from kiri_operator.planning.revisions import compression_key
from kiri_operator.plans import Check
from kiri_runtime.manifests import Baseline, CosineStats, Fidelity, Manifest, ModelInfo, Variant, dumps

SHA = "ab" * 32


def spec() -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {"name": "m", "version": "1", "source": {"uri": "https://x/m.onnx", "sha256": SHA}},
            "edge": {
                "variants": [
                    {
                        "name": "fp16",
                        "method": "fp16",
                        "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}},
                    },
                    {"name": "int8", "method": "int8-dynamic", "requires": {"minMemoryMb": 1024}},
                ]
            },
        }
    )


def fleet(edge: int) -> tuple[NodeView, ...]:
    nodes = [
        NodeView("cloud-0", {"kiri.dev/tier": "cloud"}, allocatable={"nvidia.com/gpu": "4", "memory": "64Gi"})
    ]
    for i in range(edge):
        labels = {"kiri.dev/tier": "edge", "kiri.dev/accelerator": "gpu" if i % 4 == 0 else "none"}
        nodes.append(
            NodeView(f"edge-{i:04d}", labels, allocatable={"memory": f"{512 if i % 10 == 9 else 4096}Mi"})
        )
    return tuple(nodes)


def manifest(s: ModelDeploymentSpec) -> ObjectView:
    fid = Fidelity(cosine=CosineStats(mean=1, min=1, p5=1), max_abs_error=0)
    m = Manifest(
        model=ModelInfo(
            source_uri="x", source_sha256=SHA, format="onnx", uri="m.onnx", onnx_sha256=SHA, size_bytes=1
        ),
        baseline=Baseline(p50_latency_ms=1, size_bytes=1),
        seed=0,
        variants=[
            Variant(
                name=n,
                method=meth,
                uri=f"{n}.onnx",
                sha256="c" * 64,
                size_bytes=1,
                fidelity=fid,
                accepted=True,
                reason="ok",
            )
            for n, meth in (("fp16", "fp16"), ("int8", "int8-dynamic"))
        ],
    )
    key = compression_key(s, s.edge.artifacts.uri)
    name = L.manifest_name("md", key)
    body = {
        "metadata": {
            "name": name,
            "labels": {**L.common_labels("md", L.COMPONENT_MANIFEST), L.COMPRESSION: key},
        },
        "data": {L.MANIFEST_KEY: dumps(m)},
    }
    return ObjectView("ConfigMap", name, body)


def converge(s: ModelDeploymentSpec, edge: int) -> Observed:
    cm = manifest(s)
    world = Observed(
        "md",
        "ns",
        "uid",
        1,
        datetime(2026, 1, 1, tzinfo=UTC),
        nodes=fleet(edge),
        children={("ConfigMap", cm.name): cm},
    )
    for _ in range(6):
        p = plan(s, world)
        children = dict(world.children)
        for a in p.actions:
            if a.check in (Check.CREATE, Check.UPDATE):
                body: dict[str, Any] = copy.deepcopy(a.body or {})
                if a.kind == "Deployment":
                    n = body["spec"]["replicas"]
                    body["status"] = {
                        "readyReplicas": n,
                        "availableReplicas": n,
                        "updatedReplicas": n,
                        "observedGeneration": 1,
                    }
                children[(a.kind, a.name)] = ObjectView(a.kind, a.name, body)
            elif a.check is Check.DELETE:
                children.pop((a.kind, a.name), None)
        pods = [
            PodView(f"{name}-{node}", node, True, "Running", c.body["spec"]["template"]["metadata"]["labels"])
            for (kind, name), c in children.items()
            if kind == "DaemonSet"
            for node in affinity_nodes(c.body)
        ]
        world = replace(
            world, children=children, pods=tuple(pods), status=p.status, now=world.now + timedelta(seconds=1)
        )
    return world


def timed(fn: Any, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def to_cache(world: Observed) -> Cache:
    cache = Cache()
    cache.put_md(
        {
            "metadata": {"name": "md", "namespace": "ns", "uid": "uid", "generation": 1},
            "status": dict(world.status),
        }
    )
    for (kind, _), child in world.children.items():
        body = copy.deepcopy(dict(child.body))
        body["metadata"] = {
            **body["metadata"],
            "namespace": "ns",
            "labels": {**body["metadata"].get("labels", {}), L.MODEL_DEPLOYMENT: "md"},
        }
        cache.put_child(kind, body)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="12,250,1000")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    s = spec()
    rows = []
    for edge in [int(x) for x in args.sizes.split(",")]:
        world = converge(s, edge)
        writes = len(plan(s, world).writes)
        plan_s = timed(lambda w=world: plan(s, w), args.rounds)
        cache = to_cache(world)
        snap_s = timed(lambda c=cache, now=world.now: c.observe(("ns", "md"), now, None), args.rounds)
        rows.append((edge, plan_s, snap_s, writes))
    base = rows[0][1] + rows[0][2]
    print(
        f"{'edge nodes':>10} {'plan ms':>9} {'snapshot ms':>12} {'total/baseline':>15} {'us/node':>8} {'steady writes':>14}"
    )
    for edge, p, o, w in rows:
        total = p + o
        print(
            f"{edge:>10} {p * 1e3:>9.2f} {o * 1e3:>12.2f} {total / base:>15.1f} {total / edge * 1e6:>8.0f} {w:>14}"
        )


if __name__ == "__main__":
    main()
