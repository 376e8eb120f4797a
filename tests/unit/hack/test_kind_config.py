"""kind-config.yaml gives Docker users the same fleet shape as the simulated one, so examples run on both."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def kind() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    return config


@pytest.fixture(scope="module")
def simulated() -> list[dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("kiri_hack_cluster_for_kind", ROOT / "hack" / "cluster.py")
    assert spec and spec.loader
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    nodes: list[dict[str, Any]] = module.fleet(2, 12, 3)
    return nodes


def _taints(node: dict[str, Any]) -> list[dict[str, Any]]:
    taints: list[dict[str, Any]] = []
    for patch in node.get("kubeadmConfigPatches", []):
        doc = yaml.safe_load(patch)
        assert doc["kind"] == "JoinConfiguration"
        taints += doc["nodeRegistration"]["taints"]
    return taints


def test_one_control_plane_two_cloud_and_three_edge_sites(kind: dict[str, Any]) -> None:
    assert kind["kind"] == "Cluster" and kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = Counter(n["role"] for n in kind["nodes"])
    assert roles["control-plane"] == 1
    workers = [n for n in kind["nodes"] if n["role"] == "worker"]
    tiers = Counter(n["labels"]["kiri.dev/tier"] for n in workers)
    assert tiers == {"cloud": 2, "edge": 6}
    sites = Counter(
        n["labels"]["topology.kubernetes.io/zone"] for n in workers if n["labels"]["kiri.dev/tier"] == "edge"
    )
    assert sites == {"site-a": 2, "site-b": 2, "site-c": 2}


def test_labels_and_taints_match_the_simulated_fleet(
    kind: dict[str, Any], simulated: list[dict[str, Any]]
) -> None:
    """Every label a kind node carries is one the simulated node of the same tier carries, with a value it takes."""
    for node in (n for n in kind["nodes"] if n["role"] == "worker"):
        tier = node["labels"]["kiri.dev/tier"]
        peers = [s for s in simulated if s["metadata"]["labels"]["kiri.dev/tier"] == tier]
        for key, value in node["labels"].items():
            seen = {p["metadata"]["labels"].get(key) for p in peers}
            assert value in seen, f"{tier} label {key}={value}: the simulated fleet has {seen}"
        if tier == "edge":
            assert node["labels"]["kiri.dev/site"] == node["labels"]["topology.kubernetes.io/zone"]
            assert not _taints(node)
        else:
            assert _taints(node) == peers[0]["spec"]["taints"]
