"""The simulated fleet's names and labels are an interface: the operator and the e2e tests code against them."""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "cluster.py"


@pytest.fixture(scope="module")
def cluster_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiri_hack_cluster", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _labels(node: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = node["metadata"]["labels"]
    return labels


def test_default_fleet_has_two_gpu_cloud_nodes_and_twelve_edge_nodes_in_three_sites(
    cluster_script: ModuleType,
) -> None:
    nodes = cluster_script.fleet(*cluster_script.DEFAULT_FLEET)
    cloud = [n for n in nodes if _labels(n)["kiri.dev/tier"] == "cloud"]
    edge = [n for n in nodes if _labels(n)["kiri.dev/tier"] == "edge"]

    assert [n["metadata"]["name"] for n in cloud] == ["kiri-cloud-0", "kiri-cloud-1"]
    for node in cloud:
        assert _labels(node)["kiri.dev/accelerator"] == "gpu"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        assert node["spec"]["taints"] == [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
        ]

    assert len(edge) == 12
    assert Counter(_labels(n)["kiri.dev/site"] for n in edge) == {"site-a": 4, "site-b": 4, "site-c": 4}
    assert "kiri-edge-site-b-3" in {n["metadata"]["name"] for n in edge}
    for node in edge:
        labels = _labels(node)
        assert labels["topology.kubernetes.io/zone"] == labels["kiri.dev/site"]
        assert labels["kiri.dev/accelerator"] in {"none", "gpu"}
        assert labels["kubernetes.io/arch"] in {"amd64", "arm64"}
        assert node["status"]["allocatable"]["memory"] == f"{labels['kiri.dev/memory-mb']}Mi"
        assert ("nvidia.com/gpu" in node["status"]["allocatable"]) == (
            labels["kiri.dev/accelerator"] == "gpu"
        )
        assert "taints" not in node["spec"]
    # The fleet is varied, so capability-based variant selection has something to choose between.
    assert {_labels(n)["kiri.dev/accelerator"] for n in edge} == {"none", "gpu"}
    assert {_labels(n)["kubernetes.io/arch"] for n in edge} == {"amd64", "arm64"}
    assert len({_labels(n)["kiri.dev/memory-mb"] for n in edge}) > 1


def test_every_node_is_a_kwok_node(cluster_script: ModuleType) -> None:
    for node in cluster_script.fleet(1, 5, 2):
        assert _labels(node)["type"] == "kwok"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_a_thousand_edge_nodes_get_distinct_pod_cidrs_that_survive_rescaling(
    cluster_script: ModuleType,
) -> None:
    big = cluster_script.fleet(2, 1000, 20)
    cidrs = [ipaddress.ip_network(n["spec"]["podCIDR"]) for n in big]
    assert len(big) == 1002
    assert len(set(cidrs)) == len(cidrs)
    assert all(not a.overlaps(b) for a, b in itertools.pairwise(sorted(cidrs)))
    assert cluster_script.site_name(19) == "site-t"
    assert cluster_script.site_name(26) == "site-aa"

    # podCIDR is immutable: a node keeps its CIDR when the fleet grows around it.
    small = {n["metadata"]["name"]: n["spec"]["podCIDR"] for n in cluster_script.fleet(2, 40, 20)}
    assert all(
        small[n["metadata"]["name"]] == n["spec"]["podCIDR"] for n in big if n["metadata"]["name"] in small
    )


def test_fleet_beyond_the_address_plan_is_refused_with_a_clear_error(cluster_script: ModuleType) -> None:
    with pytest.raises(cluster_script.ClusterError, match="1024 nodes per site"):
        cluster_script.fleet(0, 2000, 1)


def test_kwok_stages_keep_the_defaults_and_add_kiri_behaviours(
    cluster_script: ModuleType, tmp_path: Path
) -> None:
    kwok_dir = tmp_path / "kwok"
    real = cluster_script.kwok_module_dir()
    stages = cluster_script.kiri_stages(real)
    names = [s["metadata"]["name"] for s in stages]
    for default in (
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-complete",
        "pod-delete",
    ):
        assert default in names
    for ours in ("kiri-node-offline", "kiri-pod-start-unready", "kiri-pod-crash", "kiri-pod-crash-restart"):
        assert ours in names
    by_name = {s["metadata"]["name"]: s for s in stages}
    # Plain pod-ready must not claim the failure pods, or they would turn Ready.
    keys = [e["key"] for e in by_name["pod-ready"]["spec"]["selector"]["matchExpressions"]]
    assert '.metadata.labels["kiri.dev/sim"]' in keys

    kwok_dir.mkdir()
    with pytest.raises(cluster_script.ClusterError, match="default stage"):
        cluster_script.kiri_stages(kwok_dir)


def test_check_host_names_the_limit_and_how_to_leave_real_nodes_out_in_one_line(
    cluster_script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse() -> dict[str, Any]:
        raise cluster_script.realnodes.RealNodeError(
            "this host cannot run real nodes: the kernel has no overlay filesystem"
        )

    monkeypatch.setattr(cluster_script.signal, "signal", lambda *a: None)  # main() installs handlers
    monkeypatch.setattr(cluster_script.realnodes, "check_host", refuse)
    assert cluster_script.main(["check-host"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "hack/cluster check-host: error: this host cannot run real nodes: the kernel has no overlay filesystem. "
    )
    assert "`make test KIRI_REAL_NODES=0`" in err

    monkeypatch.setattr(
        cluster_script.realnodes, "check_host", lambda: {"cgroup_v1": True, "negative_oom_score_adj": True}
    )
    assert cluster_script.main(["check-host"]) == 0
    assert capsys.readouterr().out == "hack/cluster check-host: this host can run real nodes (cgroup v1)\n"
