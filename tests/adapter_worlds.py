"""A language model with per-site LoRA adapters on a sited fleet, for planning tests (issue 23): the spec,
its compression manifest, and a simulated API server whose pods of chosen adapter revisions never become
Ready."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from kiri_operator import labels as L
from kiri_operator.analyzing import Substitutions, site_dues
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.observations import Measurement, NodeView, Outcome
from kiri_operator.planning.building import affinity_nodes
from kiri_operator.plans import Plan
from kiri_runtime import serving_cli
from kiri_runtime.manifests import Baseline, Manifest, ModelInfo, Variant
from planning_worlds import SHA, FakeServer, cloud_node, observed

SHOP_SHA = "1" * 64
SHOP2_SHA = "2" * 64
CLINIC_SHA = "3" * 64
SITE_NODES = {"site-a": ("a-1", "a-2", "a-3"), "site-b": ("b-1", "b-2")}


def edge(name: str, site: str) -> NodeView:
    return NodeView(
        name=name,
        labels={"kiri.dev/tier": "edge", "kiri.dev/site": site, "kubernetes.io/arch": "amd64"},
        allocatable={"memory": "4096Mi"},
    )


def world() -> Any:
    nodes = (cloud_node(), *(edge(n, site) for site, names in SITE_NODES.items() for n in names))
    return observed(nodes)


def adapter(name: str, sha: str, sites: list[str], **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "uri": f"https://adapters.example/{name}-{sha[:4]}.onnx_adapter",
        "sha256": sha,
        "sizeBytes": 1000,
        "sites": sites,
        **more,
    }


def lm_spec(adapters: list[dict[str, Any]], **rollout: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "assistant",
                "version": "1",
                "source": {"uri": "s3://models/smollm.tar", "format": "hf", "sha256": SHA},
                "evalDataUri": "s3://eval/chat.jsonl",
            },
            "edge": {
                "variants": [{"name": "q4", "method": "int4", "options": {"loraTargets": "q_proj,v_proj"}}],
                "artifacts": {"uri": "https://store.example"},
                "adapters": adapters,
            },
            "rollout": {
                "stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}],
                "progressDeadlineSeconds": 10,
                **rollout,
            },
        }
    )


def lm_manifest() -> Manifest:
    return Manifest(
        model=ModelInfo(
            source_uri="s3://models/smollm.tar",
            source_sha256=SHA,
            format="hf",
            uri="model.tar",
            onnx_sha256="e" * 64,
            size_bytes=9000,
            kind="causal-lm",
            architecture="LlamaForCausalLM",
        ),
        baseline=Baseline(p50_latency_ms=5.0, size_bytes=9000),
        seed=0,
        variants=[
            Variant(
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


SHOP = adapter("shop", SHOP_SHA, ["site-a", "site-b"], default=True)
CLINIC = adapter("clinic", CLINIC_SHA, ["site-a"])


class Server(FakeServer):
    """Pods of the adapter revisions in `never_ready` never become Ready (a bad adapter). With `analysis`
    (site -> the outcome and message its adapter wave's measurements give), each step hands the planner a
    measurement for every site whose wave's analysis is due, as reconcile does (`analyzing.site_dues`
    decides from the stored status); `asked` records each due measurement (site, its substitutions)."""

    never_ready: set[str]
    analysis: dict[str, tuple[Outcome, str]]
    asked: list[tuple[str, Substitutions]]

    def step(self, s: Any, settings: Any = None, dt: float = 1.0) -> Plan:
        world = self.world
        dues = site_dues(s, world.namespace, world.status, world.now) if self.analysis else {}
        taken = {}
        for name, d in dues.items():
            self.asked.append((name, d.substitutions))
            outcome, message = self.analysis.get(name, ("Successful", "no queries"))
            taken[name] = Measurement(at=world.now, outcome=outcome, message=message)
        self.world = replace(world, site_measurements=taken)
        p = super().step(s, settings, dt)
        pods = tuple(
            replace(pod, ready=False) if pod.labels.get(L.ADAPTERS) in self.never_ready else pod
            for pod in self.world.pods
        )
        self.world = replace(self.world, pods=pods)
        return p


def started(adapters: list[dict[str, Any]], **rollout: Any) -> Server:
    s = lm_spec(adapters, **rollout)
    server = Server(world())
    server.never_ready = set()
    server.analysis = {}
    server.asked = []
    server.step(s)
    server.publish(s, lm_manifest())
    for _ in range(4):
        server.step(s)
    assert server.world.status["phase"] == "Healthy"
    return server


def daemonsets(server: FakeServer) -> dict[str, dict[str, Any]]:
    return {name: child.body for (kind, name), child in server.world.children.items() if kind == "DaemonSet"}


def adapters_by_node(server: FakeServer) -> dict[str, str]:
    """node -> the adapter revision of the DaemonSet it is pinned to ("" for none)."""
    out: dict[str, str] = {}
    for body in daemonsets(server).values():
        for node in affinity_nodes(body):
            out[node] = body["metadata"]["labels"].get(L.ADAPTERS, "")
    return out


def site(status: dict[str, Any], name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(s for s in status["edge"]["adapters"] if s["site"] == name)
    return entry


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in status["conditions"] if c["type"] == type_)
    return found


def serve_args(body: dict[str, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kiri")
    serving_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(body["spec"]["template"]["spec"]["containers"][0]["args"])
