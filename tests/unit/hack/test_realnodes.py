"""Real nodes (hack/realnodes.py): names, addresses and the configs the host's limits force.

Starting a real node needs root and minutes of builds (tests/e2e/test_real_nodes.py does it); the pure
parts are checked here: two state dirs never share a name or an address, every name fits the kernel's
limits, and the kubelet and containerd settings that this machine kind needs are in the configs.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "realnodes.py"


@pytest.fixture(scope="module")
def realnodes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiri_hack_realnodes", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_names_fit_the_kernel_and_addresses_are_private_and_disjoint(realnodes: ModuleType) -> None:
    lay = realnodes.Layout(Path("/tmp/some-state"))
    nets = []
    for i in range(realnodes.MAX_REAL_NODES):
        assert len(lay.veth(i)) + 1 <= 15  # the node end is the host end + "n" before it is renamed eth0
        link = ipaddress.ip_network(f"{lay.host_ip(i)}/30", strict=False)
        assert ipaddress.ip_address(lay.node_ip(i)) in link
        pods = ipaddress.ip_network(lay.pod_cidr(i))
        assert link.is_private and pods.is_private
        nets += [link, pods]
    assert not any(a.overlaps(b) for n, a in enumerate(nets) for b in nets[n + 1 :])
    # Nothing in 172.16.0.0/12 overlaps kwok's fake pod (10.63+) and node (100.64+) addresses.
    assert all(n.subnet_of(ipaddress.ip_network("172.16.0.0/12")) for n in nets)


def test_two_state_dirs_get_different_names(realnodes: ModuleType) -> None:
    a, b = realnodes.Layout(Path("/work/main/.kiri")), realnodes.Layout(Path("/tmp/kiri-pods"))
    assert a.netns(0) != b.netns(0) and a.veth(0) != b.veth(0) and a.cgroup(0) != b.cgroup(0)


def test_containerd_config_caps_oom_score_adj_and_keeps_everything_under_the_node(
    realnodes: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(realnodes, "cni_bin_dir", lambda: "/usr/lib/cni")
    lay = realnodes.Layout(tmp_path)
    lay.dir(0).mkdir(parents=True)
    bins = {"runc": Path("/bin/runc")}
    host = {"cgroup_v1": True, "negative_oom_score_adj": False}
    cfg = tomllib.loads(realnodes.write_containerd_config(lay, 0, bins, host, "kiri.dev/pause:x").read_text())
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    assert runtime["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cfg["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "kiri.dev/pause:x"
    assert cfg["plugins"]["io.containerd.nri.v1.nri"]["disable"] is True
    assert cfg["plugins"]["io.containerd.grpc.v1.cri"]["stream_server_address"] == lay.node_ip(0)
    for path in (cfg["root"], cfg["state"], cfg["grpc"]["address"], runtime["cni"]["conf_dir"]):
        assert path.startswith(f"{lay.dir(0)}/")
    host["negative_oom_score_adj"] = True
    cfg = tomllib.loads(realnodes.write_containerd_config(lay, 0, bins, host, "p").read_text())
    assert cfg["plugins"]["io.containerd.cri.v1.runtime"]["restrict_oom_score_adj"] is False


def test_kubelet_binds_only_the_node_address_and_accepts_cgroup_v1(
    realnodes: ModuleType, tmp_path: Path
) -> None:
    lay = realnodes.Layout(tmp_path)
    (lay.dir(1) / "kubelet").mkdir(parents=True)
    path, kubeconfig = realnodes.write_kubelet_config(lay, 1, tmp_path / "pki", 6443)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["address"] == cfg["healthzBindAddress"] == lay.host_ip(1)
    assert cfg["readOnlyPort"] == 0
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["cgroupRoot"] == lay.cgroup(1)
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["resolvConf"] == ""
    assert (
        yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    )


def test_pods_get_a_default_route_but_no_masquerade(realnodes: ModuleType, tmp_path: Path) -> None:
    lay = realnodes.Layout(tmp_path)
    realnodes.write_cni(lay, 0, tmp_path / "net.d")
    (plugin,) = json.loads((tmp_path / "net.d" / "10-kiri.conflist").read_text())["plugins"]
    assert plugin["ipMasq"] is False
    assert plugin["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}]
    assert plugin["ipam"]["ranges"][0][0]["subnet"] == lay.pod_cidr(0)


def test_real_nodes_are_labelled_like_edge_nodes_plus_real(realnodes: ModuleType) -> None:
    labels = realnodes.node_labels(0)
    assert labels["kiri.dev/tier"] == "edge" and labels["kiri.dev/node-kind"] == "real"
    assert labels["kiri.dev/site"] == labels["topology.kubernetes.io/zone"] == realnodes.REAL_SITE
    assert int(labels["kiri.dev/memory-mb"]) > 0
