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
        assert pods.subnet_of(ipaddress.ip_network(lay.pods_cidr()))
    services = ipaddress.ip_network(lay.service_cidr())
    host = ipaddress.ip_network(f"{lay.svc_ip()}/32")
    assert ipaddress.ip_address(lay.kubernetes_service_ip()) == services.network_address + 1
    assert len(lay.svc_link()) <= 15 and services.is_private and host.is_private
    fabric = ipaddress.ip_network(f"{lay.fabric_ip(0)}/24", strict=False)
    assert all(ipaddress.ip_address(lay.fabric_ip(i)) in fabric for i in range(realnodes.MAX_REAL_NODES))
    assert len({lay.fabric_ip(i) for i in range(realnodes.MAX_REAL_NODES)}) == realnodes.MAX_REAL_NODES
    assert all(len(lay.fabric_veth(i)) + 1 <= 15 for i in range(realnodes.MAX_REAL_NODES))
    assert lay.fabric_netns() not in {lay.netns(i) for i in range(realnodes.MAX_REAL_NODES)}
    nets += [services, host, fabric]
    assert not any(a.overlaps(b) for n, a in enumerate(nets) for b in nets[n + 1 :])
    # Nothing in 172.16.0.0/12 overlaps kwok's fake pod (10.63+) and node (100.64+) addresses.
    assert all(n.subnet_of(ipaddress.ip_network("172.16.0.0/12")) for n in nets)


def test_two_state_dirs_get_different_names(realnodes: ModuleType) -> None:
    a, b = realnodes.Layout(Path("/work/main/.kiri")), realnodes.Layout(Path("/tmp/kiri-pods"))
    assert a.netns(0) != b.netns(0) and a.veth(0) != b.veth(0) and a.cgroup(0) != b.cgroup(0)
    assert a.svc_link() != b.svc_link()


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
    assert cfg["clusterDNS"] == [lay.svc_ip()] and cfg["clusterDomain"] == "cluster.local"
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


def test_kube_proxy_runs_on_the_node_address_and_leaves_machine_wide_settings_alone(
    realnodes: ModuleType, tmp_path: Path
) -> None:
    lay = realnodes.Layout(tmp_path)
    (lay.dir(2) / "kube-proxy").mkdir(parents=True)
    cfg = yaml.safe_load(realnodes.write_kube_proxy_config(lay, 2, tmp_path / "pki", 6443).read_text())
    assert cfg["mode"] == "iptables" and cfg["hostnameOverride"] == lay.name(2)
    assert cfg["bindAddress"] == lay.node_ip(2)
    assert cfg["healthzBindAddress"].startswith(lay.node_ip(2) + ":")
    assert cfg["metricsBindAddress"].startswith("127.0.0.1:")  # the node netns's own loopback
    assert cfg["nodePortAddresses"] == [f"{lay.node_ip(2)}/32"]
    assert cfg["clusterCIDR"] == lay.pods_cidr() and cfg["iptables"]["masqueradeAll"] is True
    assert cfg["conntrack"]["maxPerCore"] == 0 and cfg["conntrack"]["min"] == 0
    kubeconfig = yaml.safe_load((lay.dir(2) / "kube-proxy" / "kubeconfig").read_text())
    # 127.0.0.1 inside the netns is the netns's: the API server is reached on the cluster's host address.
    assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://{lay.svc_ip()}:6443"


def test_coredns_serves_the_cluster_domain_and_forwards_nothing(
    realnodes: ModuleType, tmp_path: Path
) -> None:
    lay = realnodes.Layout(tmp_path)
    text = realnodes.write_corefile(lay, tmp_path / "kubeconfig", tmp_path / "Corefile").read_text()
    assert "forward" not in text and "proxy" not in text
    assert text.count(f"bind {lay.svc_ip()}") == 2  # never the machine's other addresses
    assert f"kubeconfig {tmp_path / 'kubeconfig'} kiri" in text
    assert "rcode NXDOMAIN" in text


def test_coredns_is_built_with_every_plugin_its_corefile_names_and_no_other(
    realnodes: ModuleType, tmp_path: Path
) -> None:
    """hack/tools/coredns-prometheus/main.go compiles in only the plugins the Corefile uses (a cold build without
    the cloud SDKs of the others); a directive whose plugin is missing would stop CoreDNS at start."""
    import re

    lay = realnodes.Layout(tmp_path)
    text = realnodes.write_corefile(lay, tmp_path / "kubeconfig", tmp_path / "Corefile").read_text()
    depth, directives = 0, set()
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if words and depth == 1 and words[0] != "}":
            directives.add(words[0])
        depth += line.count("{") - line.count("}")
    main_go = (SCRIPT.parent / "tools" / "coredns-prometheus" / "main.go").read_text()
    plugins = set(re.findall(r'_ "github.com/coredns/coredns/plugin/([a-z0-9_]+)"', main_go))
    assert directives == {"bind", "errors", "kubernetes", "cache", "template"}
    assert plugins == directives


def test_dns_query_reads_a_records(realnodes: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The A records of a reply, following a compressed owner name; None when nothing answers."""
    import socket
    import struct

    sent: list[bytes] = []

    class FakeSocket:
        def __init__(self, *_a: object) -> None:
            pass

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *_a: object) -> None:
            pass

        def settimeout(self, _t: float) -> None:
            pass

        def sendto(self, data: bytes, _addr: tuple[str, int]) -> None:
            sent.append(data)

        def recv(self, _n: int) -> bytes:
            query = sent[-1]
            header = query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
            answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + bytes([172, 30, 64, 1])
            return header + query[12:] + answer

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert realnodes.dns_query("172.30.127.1", "kubernetes.default.svc.cluster.local") == ["172.30.64.1"]
    # The question names each label.
    assert b"\x0akubernetes\x07default\x03svc" in sent[-1]

    class Silent(FakeSocket):
        def recv(self, _n: int) -> bytes:
            raise TimeoutError

    monkeypatch.setattr(socket, "socket", Silent)
    assert realnodes.dns_query("172.30.127.1", "x.cluster.local") is None
