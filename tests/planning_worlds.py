"""Small observed worlds for planning tests, and a fake API server that 'applies' a plan to them."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.observations import NodeView, ObjectView, Observed, PodView
from kiri_operator.planning import Settings, plan
from kiri_operator.planning.building import affinity_nodes, store_uri
from kiri_operator.planning.revisions import compression_key
from kiri_operator.plans import Check, Plan
from kiri_runtime.manifests import (
    Baseline,
    CosineStats,
    Fidelity,
    Latency,
    Manifest,
    ModelInfo,
    Variant,
    dumps,
)

SHA = "ab" * 32
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def spec(**overrides: Any) -> ModelDeploymentSpec:
    body: dict[str, Any] = {
        "model": {
            "name": "resnet",
            "version": "1",
            "source": {"uri": "https://models.example/r.onnx", "sha256": SHA},
        },
        "edge": {
            "variants": [
                {
                    "name": "fp16",
                    "method": "fp16",
                    "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}},
                },
                {
                    "name": "int8",
                    "method": "int8-dynamic",
                    "requires": {"matchLabels": {"kubernetes.io/arch": "amd64"}, "minMemoryMb": 1024},
                },
            ]
        },
    }
    for path, value in overrides.items():
        node = body
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return ModelDeploymentSpec.model_validate(body)


def cloud_node(name: str = "kiri-cloud-0", gpus: int = 4) -> NodeView:
    return NodeView(
        name=name,
        labels={"kiri.dev/tier": "cloud", "kiri.dev/accelerator": "gpu"},
        allocatable={"nvidia.com/gpu": str(gpus), "memory": "64Gi"},
    )


def edge_node(name: str, accelerator: str = "none", arch: str = "amd64", memory_mb: int = 4096) -> NodeView:
    return NodeView(
        name=name,
        labels={
            "kiri.dev/tier": "edge",
            "kiri.dev/accelerator": accelerator,
            "kubernetes.io/arch": arch,
            "kiri.dev/memory-mb": str(memory_mb),
        },
        allocatable={"memory": f"{memory_mb}Mi"},
    )


def fleet() -> tuple[NodeView, ...]:
    return (
        cloud_node(),
        edge_node("edge-gpu", accelerator="gpu"),
        edge_node("edge-cpu-1"),
        edge_node("edge-cpu-2"),
        edge_node("edge-arm", arch="arm64"),  # matches neither variant
        edge_node("edge-small", memory_mb=512),  # too little memory for int8
    )


def observed(nodes: tuple[NodeView, ...] | None = None, **kw: Any) -> Observed:
    return Observed(
        name="md",
        namespace="ns",
        uid="uid-1",
        generation=1,
        now=NOW,
        nodes=fleet() if nodes is None else nodes,
        pvcs=frozenset(),
        **kw,
    )


def manifest(accepted: dict[str, bool], source_sha: str = SHA) -> Manifest:
    variants = []
    for name, ok in accepted.items():
        variants.append(
            Variant(
                name=name,
                method="fp16" if name == "fp16" else "int8-dynamic",
                uri=f"{name}.onnx" if ok else None,
                sha256=(("c" if name == "fp16" else "d") * 64) if ok else None,
                size_bytes=1000,
                fidelity=Fidelity(
                    cosine=CosineStats(mean=0.999, min=0.99, p5=0.995), max_abs_error=0.01, samples=64
                ),
                latency=Latency(p50_ms=1.0, ratio_vs_fp32=0.5),
                accepted=ok,
                reason="all gates passed" if ok else "cosine.mean>=0.99 missed",
            )
        )
    return Manifest(
        model=ModelInfo(
            source_uri="https://models.example/r.onnx",
            source_sha256=source_sha,
            format="onnx",
            uri="model.onnx",
            onnx_sha256=SHA,
            size_bytes=4000,
        ),
        baseline=Baseline(p50_latency_ms=2.0, size_bytes=4000),
        seed=0,
        variants=variants,
    )


def manifest_configmap(s: ModelDeploymentSpec, m: Manifest) -> ObjectView:
    key = compression_key(s, store_uri(s))
    name = L.manifest_name("md", key)
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {**L.common_labels("md", L.COMPONENT_MANIFEST), L.COMPRESSION: key},
            "creationTimestamp": "2026-01-01T11:00:00Z",
        },
        "data": {L.MANIFEST_KEY: dumps(m)},
    }
    return ObjectView("ConfigMap", name, body)


class FakeServer:
    """Applies plans the way the API server and the built-in controllers would, minus the details.

    Objects are stored as sent, Deployments and Jobs finish, DaemonSet pods become Ready on their nodes
    (unless the node is listed in `unready`), and the planned status replaces the stored one.
    """

    def __init__(self, world: Observed) -> None:
        self.world = world
        self.writes = 0
        self.unready: set[str] = set()
        self.unready_reason = ""
        """What the pods on `unready` nodes say about why (`PodView.reason`)."""

    def step(self, s: ModelDeploymentSpec, settings: Settings | None = None, dt: float = 1.0) -> Plan:
        p = plan(s, self.world, settings)
        children = dict(self.world.children)
        for action in p.actions:
            key = (action.kind, action.name)
            if action.check in (Check.CREATE, Check.UPDATE):
                assert action.body is not None
                body = copy.deepcopy(action.body)
                body["metadata"].setdefault("creationTimestamp", "2026-01-01T11:30:00Z")
                body["metadata"]["generation"] = 1
                children[key] = ObjectView(action.kind, action.name, body)
                self.writes += 1
            elif action.check is Check.DELETE:
                children.pop(key, None)
                self.writes += 1
        if p.status != dict(self.world.status):
            self.writes += 1
        children = {k: self._settle(v) for k, v in children.items()}
        pods = []
        for (kind, name), child in children.items():
            if kind != "DaemonSet":
                continue
            for node in affinity_nodes(child.body):
                labels = child.body["spec"]["template"]["metadata"]["labels"]
                ready = node not in self.unready
                reason = "" if ready else self.unready_reason
                pods.append(PodView(f"{name}-{node}", node, ready, "Running", labels, reason=reason))
        self.world = replace(
            self.world,
            children=children,
            pods=tuple(pods),
            status=p.status,
            now=self.world.now + timedelta(seconds=dt),
        )
        return p

    @staticmethod
    def _settle(child: ObjectView) -> ObjectView:
        body = copy.deepcopy(dict(child.body))
        if child.kind == "Deployment":
            n = body["spec"]["replicas"]
            body["status"] = {
                "observedGeneration": 1,
                "replicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "updatedReplicas": n,
            }
        elif child.kind == "Job" and not body.get("status"):
            body["status"] = {"active": 1}
        else:
            return child
        return ObjectView(child.kind, child.name, body)

    def publish(self, s: ModelDeploymentSpec, m: Manifest) -> None:
        cm = manifest_configmap(s, m)
        self.world = replace(self.world, children={**self.world.children, ("ConfigMap", cm.name): cm})

    def fail_job(self, name: str, message: str = "BackoffLimitExceeded") -> None:
        job = self.world.children[("Job", name)]
        body = copy.deepcopy(dict(job.body))
        body["status"] = {
            "conditions": [{"type": "Failed", "status": "True", "reason": message, "message": "pod failed"}]
        }
        self.world = replace(
            self.world, children={**self.world.children, ("Job", name): ObjectView("Job", name, body)}
        )
