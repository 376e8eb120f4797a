"""Real nodes for hack/cluster: a real kubelet + containerd per node, beside the kwok fleet.

`hack/cluster up --real-nodes N` calls into this module; `down` calls `teardown`. Layout of node i
(`kiri-real-<i>`), all under $KIRI_STATE_DIR/nodes/<name>/ and named after a short hash of the state dir,
so clusters of several checkouts never share a name, an address or a cgroup:

- network: a network namespace `kiri-<h>-<i>` joined to the host by a veth pair (host end `kr<h>h<i>`,
  172.<16+h%16>.<i>.1/30; node end `eth0`, .2/30). containerd, the CNI bridge `kiri0` and every pod live in
  the namespace; the pod subnet 172.<b>.<128+i>.0/24 is routed from the host through the veth, so the host
  (tests, probes, the API server) reaches pod IPs directly. The namespace has no default route: pods reach
  their node and the host end of the veth, never the machine's external interface. Between nodes: each
  node's second link `fab0` (172.<b>.96.<i+1>/24) is on one bridge in a namespace of its own,
  `kiri-<h>-fab`, and each node routes the other nodes' pod subnets there: pods on two real nodes reach
  each other, and the host forwards nothing.
- kubelet: runs in the host network namespace. It must: the API server listens on 127.0.0.1 only, and the
  kubelet refuses a node IP that is not on one of its own interfaces (and a loopback one). Its node IP
  (the node's InternalIP, which the API server dials for logs/exec) is the host end of the veth, and it
  binds its server and healthz there only. It shares the host's mount namespace with containerd (no mount
  here is shared, so volumes it mounts must be where containerd sees them).
- containerd: its own root, state, socket and config; started through `nsenter --net` (network namespace
  only, so mounts stay shared with the kubelet). CRI options forced by the host (see check_host):
  `restrict_oom_score_adj`, cgroupfs; the pause image is local (hack/images.py) and pinned.
- cgroups: the kubelet's `cgroupRoot` is `/kiri-<h>-<i>`, so `down` can kill every container by cgroup.
- Services: kube-proxy runs per node in the node's netns (iptables mode; its rules live and die with the
  netns, the host's tables are not touched). The cluster's host address (172.<b>.127.1 on a link
  `kr<h>svc`, routed from every netns to its veth's host end) carries the API server's proxy
  (hack/tcpproxy.py; the `kubernetes` Service's endpoint) and CoreDNS (the kubelets' clusterDNS), both host
  processes started by hack/cluster with the first real node and stopped with the last. The host reaches
  ClusterIPs through the lowest node's netns.
- labels: like an edge node (`kiri.dev/tier=edge`, `kiri.dev/site=site-real`, zone, accelerator none,
  memory-mb) plus `kiri.dev/node-kind=real`, and the taint `kiri.dev/node-kind=real:NoSchedule`, so only
  pods that ask for a real node land there (the e2e suite's kwok-era pods would not start on it).

Why one module: set-up and tear-down of a node are mirror images (every netns, mount, cgroup and process
`start_node` makes, `teardown_node_files` must find again, even without state.json); apart they would drift.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REAL_LABEL = "kiri.dev/node-kind"
REAL_SITE = "site-real"
MAX_REAL_NODES = 64
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
REAL_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "runc", "coredns")
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
# The kubelet sets these VM-wide sysctls at start (protectKernelDefaults: false) or refuses to start
# (true). `up` records the values it found and `down` puts them back once no kubelet runs on the machine.
KERNEL_TUNABLES = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


class RealNodeError(Exception):
    """A failure with a message for the user (hack/cluster prints it as one error)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


class Layout:
    """Names, addresses and paths of the real nodes of one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.h = hashlib.sha256(str(state_dir).encode()).hexdigest()[:4]
        self.octet = 16 + int(self.h, 16) % 16  # 172.16-31: private, unused by kwok's fake 10.x/100.x
        self.root = state_dir / "nodes"

    def name(self, i: int) -> str:
        return f"kiri-real-{i}"

    def netns(self, i: int) -> str:
        return f"kiri-{self.h}-{i}"

    def veth(self, i: int) -> str:
        return f"kr{self.h}h{i}"  # IFNAMSIZ: at most 15 characters

    def host_ip(self, i: int) -> str:
        return f"172.{self.octet}.{i * 4 // 256}.{i * 4 % 256 + 1}"

    def node_ip(self, i: int) -> str:
        return f"172.{self.octet}.{i * 4 // 256}.{i * 4 % 256 + 2}"

    def pod_cidr(self, i: int) -> str:
        return f"172.{self.octet}.{128 + i}.0/24"

    # Services: the cluster's Service range (the API server's --service-cluster-ip-range, so the
    # `kubernetes` Service is its first address) and one host address every node routes to its veth's host
    # end, on a dummy link of its own: the API server's proxy and CoreDNS listen there (--advertise-address).
    def service_cidr(self) -> str:
        return f"172.{self.octet}.64.0/19"

    def kubernetes_service_ip(self) -> str:
        return f"172.{self.octet}.64.1"

    def svc_ip(self) -> str:
        return f"172.{self.octet}.127.1"

    def svc_link(self) -> str:
        return f"kr{self.h}svc"

    def pods_cidr(self) -> str:
        """Every real node's pod subnet (kube-proxy's clusterCIDR)."""
        return f"172.{self.octet}.128.0/18"

    # The fabric: every node's second link, `fab0`, on one bridge in a namespace of its own, so that pods
    # on two real nodes reach each other (Services with endpoints on another node, a store on the cloud
    # node) without the host forwarding anything.
    def fabric_netns(self) -> str:
        return f"kiri-{self.h}-fab"

    def fabric_ip(self, i: int) -> str:
        return f"172.{self.octet}.96.{i + 1}"

    def fabric_veth(self, i: int) -> str:
        return f"kr{self.h}f{i}"

    def cgroup(self, i: int) -> str:
        return f"/kiri-{self.h}-{i}"

    def dir(self, i: int) -> Path:
        return self.root / self.name(i)

    def socket(self, i: int) -> Path:
        return self.dir(i) / "containerd.sock"


# ---------------------------------------------------------------------------------------------- host checks


def find_binaries(bin_dirs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in REAL_BINARIES:
        for d in bin_dirs:
            if os.access(d / name, os.X_OK):
                found[name] = d / name
                break
    missing = [n for n in REAL_BINARIES if n not in found]
    if missing:
        raise RealNodeError(
            f"real-node binaries missing: {', '.join(missing)}; build them with "
            "`hack/build-binaries.sh real-nodes` (and `hack/install-debs.sh --real-nodes`)"
        )
    return found


def cni_bin_dir() -> str:
    for d in CNI_BIN_DIRS:
        if all(os.access(Path(d) / p, os.X_OK) for p in CNI_PLUGINS):
            return d
    raise RealNodeError(
        f"CNI plugins {', '.join(CNI_PLUGINS)} not found in {' or '.join(CNI_BIN_DIRS)}; "
        "run `hack/install-debs.sh --real-nodes` (Debian containernetworking-plugins)"
    )


def check_host() -> dict[str, Any]:
    """What this machine allows, or one error naming the limit that blocks real nodes.

    Returns the facts the node configs adapt to: `cgroup_v1` (the kubelet needs failCgroupV1: false and
    the cgroupfs driver) and `negative_oom_score_adj` (when forbidden, even to root, runc cannot create a
    CRI sandbox, whose oom_score_adj is -998, unless containerd's restrict_oom_score_adj caps it).
    """
    problems = []
    if os.geteuid() != 0:
        problems.append("real nodes need root (network namespaces, veths, mounts, cgroups)")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is missing (iproute2 / util-linux)")
    cgroup_v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    if not cgroup_v2:
        absent = [
            c
            for c in ("cpu", "cpuacct", "memory", "pids", "cpuset")
            if not Path(f"/sys/fs/cgroup/{c}").is_dir()
        ]
        if absent:
            problems.append(f"cgroup v1 controllers not mounted under /sys/fs/cgroup: {', '.join(absent)}")
    if not Path("/proc/sys/net/ipv4").is_dir():
        problems.append("no /proc/sys/net/ipv4 (no IPv4 networking)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        problems.append("the kernel has no overlay filesystem (containerd's overlayfs snapshotter)")
    if problems:
        raise RealNodeError("this host cannot run real nodes: " + "; ".join(problems))
    probe = _run("sh", "-c", "echo -998 > /proc/self/oom_score_adj", check=False)
    return {"cgroup_v1": not cgroup_v2, "negative_oom_score_adj": probe.returncode == 0}


# ---------------------------------------------------------------------------------------------- network


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns, "ip"] if netns else ["ip"]
    return _run(*prefix, *args, check=check)


def setup_network(lay: Layout, i: int) -> None:
    ns, veth = lay.netns(i), lay.veth(i)
    teardown_network(lay, i)  # idempotent: a stale namespace from a killed `up` is replaced
    for cidr in (f"{lay.host_ip(i)}/30", lay.pod_cidr(i)):
        route = _ip("route", "show", "match", cidr.split("/")[0]).stdout
        taken = [line for line in route.splitlines() if not line.startswith("default")]
        if taken:
            raise RealNodeError(
                f"{cidr} (real node {lay.name(i)}) is already routed on this host ({taken[0].strip()}): "
                "another cluster's real nodes? Use another KIRI_STATE_DIR or stop that cluster"
            )
    _ip("netns", "add", ns)
    _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}n")
    _ip("link", "set", f"{veth}n", "netns", ns)
    _ip("addr", "add", f"{lay.host_ip(i)}/30", "dev", veth)
    _ip("link", "set", veth, "up")
    _ip("link", "set", "lo", "up", netns=ns)
    _ip("link", "set", f"{veth}n", "name", "eth0", netns=ns)
    _ip("addr", "add", f"{lay.node_ip(i)}/30", "dev", "eth0", netns=ns)
    _ip("link", "set", "eth0", "up", netns=ns)
    # The node forwards between its pods' bridge and the veth; the host needs no forwarding (it only talks
    # to pods, it never routes them anywhere).
    _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _ip("route", "add", lay.pod_cidr(i), "via", lay.node_ip(i), "dev", veth)
    # The cluster's host address (API server proxy, CoreDNS): the one host address the node routes to.
    _ip("route", "add", f"{lay.svc_ip()}/32", "via", lay.host_ip(i), "dev", "eth0", netns=ns)
    join_fabric(lay, i)


def join_fabric(lay: Layout, i: int) -> None:
    """Node i's `fab0` on the fabric bridge, and routes between its pod subnet and every other node's.

    The bridge lives in a namespace of its own (`kiri-<h>-fab`), not in the host's: the host forwards
    nothing (its ip_forward stays 0) and no host netfilter rule sees this traffic. Each node routes the
    other nodes' pod subnets via their fabric address; kube-proxy's masquerade (masqueradeAll) makes a
    Service connection come from the caller's node, which the endpoint's node reaches on the fabric."""
    fab, ns, veth = lay.fabric_netns(), lay.netns(i), lay.fabric_veth(i)
    if not Path(f"/run/netns/{fab}").exists():
        _ip("netns", "add", fab)
        _ip("link", "set", "lo", "up", netns=fab)
        _ip("link", "add", "fabric", "type", "bridge", netns=fab)
        _ip("link", "set", "fabric", "up", netns=fab)
    _ip("link", "delete", veth, netns=fab, check=False)  # a stale end from a killed `up`
    _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}n", netns=fab)
    _ip("link", "set", f"{veth}n", "netns", ns, netns=fab)
    _ip("link", "set", veth, "master", "fabric", netns=fab)
    _ip("link", "set", veth, "up", netns=fab)
    _ip("link", "set", f"{veth}n", "name", "fab0", netns=ns)
    _ip("addr", "add", f"{lay.fabric_ip(i)}/24", "dev", "fab0", netns=ns)
    _ip("link", "set", "fab0", "up", netns=ns)
    for j in sorted(fabric_members(lay) - {i}):
        _ip("route", "replace", lay.pod_cidr(j), "via", lay.fabric_ip(j), "dev", "fab0", netns=ns)
        _ip("route", "replace", lay.pod_cidr(i), "via", lay.fabric_ip(i), "dev", "fab0", netns=lay.netns(j))


def fabric_members(lay: Layout) -> set[int]:
    """The nodes whose `fab0` is on the fabric (their veth end is in the fabric's namespace)."""
    fab = lay.fabric_netns()
    if not Path(f"/run/netns/{fab}").exists():
        return set()
    out = _ip("-o", "link", "show", "master", "fabric", netns=fab, check=False).stdout
    found = set()
    prefix = lay.fabric_veth(0)[:-1]
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        with contextlib.suppress(ValueError):
            found.add(int(name.removeprefix(prefix)))
    return found


def leave_fabric(lay: Layout, i: int) -> None:
    """Drops the other nodes' routes to node i's pods; the fabric goes with its last node."""
    fab = lay.fabric_netns()
    for j in sorted(fabric_members(lay) - {i}):
        _ip("route", "delete", lay.pod_cidr(i), netns=lay.netns(j), check=False)
    _ip("link", "delete", lay.fabric_veth(i), netns=fab, check=False)
    if Path(f"/run/netns/{fab}").exists() and not fabric_members(lay):
        _ip("netns", "delete", fab, check=False)


def setup_svc_link(lay: Layout) -> None:
    """The host address of the cluster's services, on a link of its own named after the state dir.

    Idempotent. The link is one end of a veth pair whose other end (`kr<h>svp`) is also here and carries
    nothing: an address needs an up link, and this machine's kernel has no dummy driver."""
    link = lay.svc_link()
    if not Path(f"/sys/class/net/{link}").exists():
        taken = _ip("route", "show", "match", lay.svc_ip()).stdout
        taken_lines = [line for line in taken.splitlines() if not line.startswith("default")]
        if taken_lines:
            raise RealNodeError(
                f"{lay.svc_ip()} is already routed on this host ({taken_lines[0].strip()}): another "
                "cluster's real nodes? Use another KIRI_STATE_DIR or stop that cluster"
            )
        # A veth pair with both ends here, not a dummy link: this machine's kernel has no dummy driver.
        _ip("link", "add", link, "type", "veth", "peer", "name", f"{link[:-1]}p")
        _ip("addr", "add", f"{lay.svc_ip()}/32", "dev", link)
    _ip("link", "set", f"{link[:-1]}p", "up")
    _ip("link", "set", link, "up")


def teardown_svc_link(lay: Layout) -> None:
    if Path(f"/sys/class/net/{lay.svc_link()}").exists():
        _ip("link", "delete", lay.svc_link(), check=False)


def route_services(lay: Layout, indices: list[int]) -> None:
    """The host reaches ClusterIPs through the lowest real node, whose kube-proxy (in its netns) DNATs.

    The route goes with that node's veth; the next sync points it at whichever node is left.
    """
    if indices:
        i = min(indices)
        _ip("route", "replace", lay.service_cidr(), "via", lay.node_ip(i), "dev", lay.veth(i))
    else:
        _ip("route", "delete", lay.service_cidr(), check=False)


def teardown_network(lay: Layout, i: int) -> None:
    ns = lay.netns(i)
    if Path(f"/run/netns/{lay.fabric_netns()}").exists():
        leave_fabric(lay, i)
    if Path(f"/run/netns/{ns}").exists():
        _ip("netns", "delete", ns, check=False)  # deletes eth0, so its peer and the route go too
    if Path(f"/sys/class/net/{lay.veth(i)}").exists():
        _ip("link", "delete", lay.veth(i), check=False)


def dns_query(server: str, name: str, timeout: float = 1.0) -> list[str] | None:
    """The A records of `name` from `server`:53 (UDP), [] for an empty answer, None without an answer."""
    qid = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, (server, 53))
            reply = sock.recv(4096)
        except OSError:
            return None
    rid, flags, _qd, an, _ns, _ar = struct.unpack(">HHHHHH", reply[:12])
    if rid != qid or flags & 0xF:
        return [] if rid == qid else None
    pos, found = 12 + len(question) + 4, []
    for _ in range(an):
        while reply[pos] and reply[pos] < 0xC0:  # the owner name: labels, or a pointer
            pos += reply[pos] + 1
        pos += 2 if reply[pos] >= 0xC0 else 1
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and length == 4:
            found.append(".".join(str(b) for b in reply[pos : pos + 4]))
        pos += length
    return found


# ---------------------------------------------------------------------------------------------- configs


def write_cni(lay: Layout, i: int, conf_dir: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    subnet = lay.pod_cidr(i)
    conf = {
        "cniVersion": "1.0.0",
        "name": "kiri-real",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "kiri0",
                "isGateway": True,
                # No masquerade: pod traffic never leaves the namespaces this script made.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "gateway": subnet.replace(".0/24", ".1")}]],
                    # Pods answer the host (kubelet probes, tests) through the bridge; the node's own
                    # namespace has no default route, so nothing goes further.
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # Leases with the node, not in the machine-wide /var/lib/cni.
                    "dataDir": str(lay.dir(i) / "cni-ipam"),
                },
            }
        ],
    }
    (conf_dir / "10-kiri.conflist").write_text(json.dumps(conf, indent=2))


def write_containerd_config(
    lay: Layout, i: int, bins: dict[str, Path], host: dict[str, Any], pause_ref: str
) -> Path:
    d = lay.dir(i)
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    cfg = f"""# Real node {lay.name(i)}: written by hack/cluster (hack/realnodes.py) at every `up`.
version = 3
root = '{d / "containerd" / "root"}'
state = '{d / "containerd" / "state"}'
imports = []

[grpc]
  address = '{lay.socket(i)}'

[ttrpc]
  address = '{d / "containerd-ttrpc.sock"}'

[debug]
  level = 'warn'

[plugins.'io.containerd.internal.v1.opt']
  path = '{d / "containerd" / "opt"}'

# One NRI socket per machine (/var/run/nri): not ours to take.
[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # Built locally by hack/images.py and imported at `up`: nodes pull nothing.
    sandbox = '{pause_ref}'

[{runtime}]
  # A negative oom_score_adj is forbidden on this host: {not host["negative_oom_score_adj"]}.
  restrict_oom_score_adj = {str(not host["negative_oom_score_adj"]).lower()}
  enable_selinux = false
  disable_apparmor = true
  # Pod network namespaces under the node's state dir, so `down` unmounts exactly ours.
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [{runtime}.cni]
    bin_dirs = ['{cni_bin_dir()}']
    conf_dir = '{d / "cni" / "net.d"}'
  [{runtime}.containerd]
    default_runtime_name = 'runc'
    [{runtime}.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [{runtime}.containerd.runtimes.runc.options]
        BinaryName = '{bins["runc"]}'
        Root = '{d / "runc"}'
        SystemdCgroup = false

[plugins.'io.containerd.grpc.v1.cri']
  # exec/attach/port-forward streams: on the node's own address, where the kubelet (host side) reaches it.
  stream_server_address = '{lay.node_ip(i)}'
  stream_server_port = '0'
"""
    path = d / "containerd.toml"
    path.write_text(cfg)
    return path


def make_node_cert(pki: Path, name: str, node_pki: Path, openssl: Callable[..., None]) -> None:
    """A client certificate for the kubelet: system:node:<name> in system:nodes (the Node authorizer)."""
    make_client_cert(pki, f"/O=system:nodes/CN=system:node:{name}", node_pki, openssl)


def make_client_cert(pki: Path, subj: str, out: Path, openssl: Callable[..., None]) -> None:
    """client.key + client.crt in `out`, signed by the cluster CA, for the subject `subj`."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    (out / "client.ext").write_text("extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "client.key", cwd=out)
    openssl("req", "-new", "-key", "client.key", "-out", "client.csr", "-subj", subj, cwd=out)
    openssl("x509", "-req", "-in", "client.csr", "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-out", "client.crt", "-days", "3650", "-extfile", "client.ext", cwd=out)  # fmt: skip


def client_kubeconfig(path: Path, server: str, pki: Path, cert_dir: Path) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "kiri",
                        "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
                    }
                ],
                "users": [
                    {
                        "name": "client",
                        "user": {
                            "client-certificate": str(cert_dir / "client.crt"),
                            "client-key": str(cert_dir / "client.key"),
                        },
                    }
                ],
                "contexts": [{"name": "kiri", "context": {"cluster": "kiri", "user": "client"}}],
                "current-context": "kiri",
            }
        )
    )


def write_kube_proxy_config(lay: Layout, i: int, pki: Path, api_port: int) -> Path:
    """kube-proxy of node i, run in the node's netns: its iptables are the netns's, never the host's.

    It reaches the API server through the proxy on the cluster's host address (127.0.0.1 in the netns is
    the netns's own loopback), as system:kube-proxy (bound to system:node-proxier by the default RBAC).
    """
    d = lay.dir(i) / "kube-proxy"
    client_kubeconfig(d / "kubeconfig", f"https://{lay.svc_ip()}:{api_port}", pki, d / "pki")
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(d / "kubeconfig")},
        "hostnameOverride": lay.name(i),
        "bindAddress": lay.node_ip(i),
        "healthzBindAddress": f"{lay.node_ip(i)}:10256",
        "metricsBindAddress": "127.0.0.1:10249",  # the netns's loopback
        "mode": "iptables",
        "clusterCIDR": lay.pods_cidr(),
        # Pods on one bridge answer each other at layer 2, past the netns's conntrack: masquerading every
        # Service connection makes replies come back through the node, whatever br_netfilter says.
        "iptables": {"masqueradeAll": True, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        # 0: leave the conntrack sysctls alone (machine-wide ones are read-only in a netns anyway).
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
        "nodePortAddresses": [f"{lay.node_ip(i)}/32"],
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_corefile(lay: Layout, kubeconfig: Path, out: Path) -> Path:
    """CoreDNS on the cluster's host address: cluster.local from the API server, nothing forwarded.

    There is no `forward`: names outside the cluster get NXDOMAIN, so no query ever leaves the machine.
    """
    svc_rev = "in-addr.arpa"
    corefile = f"""# Written by hack/cluster (hack/realnodes.py) for the real nodes' pods.
{CLUSTER_DOMAIN}:53 {svc_rev}:53 {{
    bind {lay.svc_ip()}
    errors
    kubernetes {CLUSTER_DOMAIN} {svc_rev} {{
        kubeconfig {kubeconfig} kiri
        pods insecure
        ttl 5
    }}
    cache 5
}}
.:53 {{
    bind {lay.svc_ip()}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(corefile)
    return out


def write_kubelet_config(lay: Layout, i: int, pki: Path, api_port: int) -> tuple[Path, Path]:
    d = lay.dir(i) / "kubelet"
    kubeconfig = d / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "kiri",
                        "cluster": {
                            "server": f"https://127.0.0.1:{api_port}",
                            "certificate-authority": str(pki / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "node",
                        "user": {
                            "client-certificate": str(d / "pki" / "client.crt"),
                            "client-key": str(d / "pki" / "client.key"),
                        },
                    }
                ],
                "contexts": [{"name": "kiri", "context": {"cluster": "kiri", "user": "node"}}],
                "current-context": "kiri",
            }
        )
    )
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Only on the host end of the node's veth: never on the machine's external interface.
        "address": lay.host_ip(i),
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": lay.host_ip(i),
        "healthzPort": 10248,
        # The API server authenticates with the admin client certificate (--kubelet-client-certificate).
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        # This machine kind has cgroup v1 (hybrid) and no systemd: both are refused by default in 1.36.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupRoot": lay.cgroup(i),
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{lay.socket(i)}",
        # Cluster DNS: CoreDNS on the cluster's host address. No host resolvers (they are outside):
        # `dnsPolicy: Default` pods get an empty resolv.conf.
        "resolvConf": "",
        "clusterDNS": [lay.svc_ip()],
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(lay.dir(i) / "pod-logs"),
        "registerNode": True,
        "serializeImagePulls": False,
        # Shared 2-core test machines with other clusters running: evict only on real exhaustion.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "2%",
        },
        "imageGCHighThresholdPercent": 98,
        "imageGCLowThresholdPercent": 95,
        "nodeStatusReportFrequency": "1m",
        "maxPods": 32,
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, kubeconfig


def node_labels(i: int) -> dict[str, str]:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return {
        "kiri.dev/tier": "edge",
        "kiri.dev/site": REAL_SITE,
        "topology.kubernetes.io/zone": REAL_SITE,
        "kiri.dev/accelerator": "none",
        "kiri.dev/memory-mb": str(memory_mb),
        REAL_LABEL: "real",
    }


# ---------------------------------------------------------------------------------------------- lifecycle


Starter = Callable[[str, Path, list[str], list[str]], None]


def read_tunables() -> dict[str, str]:
    out = {}
    for t in KERNEL_TUNABLES:
        with contextlib.suppress(OSError):
            out[t] = Path("/proc/sys", t).read_text().strip()
    return out


def start_node(
    lay: Layout,
    i: int,
    *,
    bins: dict[str, Path],
    host: dict[str, Any],
    pki: Path,
    api_port: int,
    pause_archive: Path,
    pause_ref: str,
    start: Starter,
    openssl: Callable[..., None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Network, containerd (+ the pause image), kubelet for node i; returns its entry for state.json."""
    name, d = lay.name(i), lay.dir(i)
    teardown_node_files(lay, i)
    for sub in ("containerd", "kubelet", "pod-logs", "cni-ipam", "runc", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    setup_network(lay, i)
    write_cni(lay, i, d / "cni" / "net.d")
    cfg = write_containerd_config(lay, i, bins, host, pause_ref)
    # The shim and runc are found on containerd's PATH.
    path_env = f"{bins['containerd'].parent}:{bins['runc'].parent}:/usr/sbin:/usr/bin:/sbin:/bin"
    start(
        f"{name}/containerd",
        bins["containerd"],
        ["--config", str(cfg)],
        ["nsenter", f"--net=/run/netns/{lay.netns(i)}", "--", "env", f"PATH={path_env}"],
    )
    deadline = time.monotonic() + 30
    while not lay.socket(i).exists():
        if time.monotonic() > deadline:
            raise RealNodeError(f"{name}: containerd did not open {lay.socket(i)} in 30s; see its log")
        time.sleep(0.1)
    ctr = [str(bins["ctr"]), "--address", str(lay.socket(i)), "--namespace", "k8s.io"]
    _run(*ctr, "images", "import", str(pause_archive))
    make_node_cert(pki, name, d / "kubelet" / "pki", openssl)
    make_cgroup(lay.cgroup(i))
    kcfg, kubeconfig = write_kubelet_config(lay, i, pki, api_port)
    labels = ",".join(f"{k}={v}" for k, v in node_labels(i).items())
    start(
        f"{name}/kubelet",
        bins["kubelet"],
        [
            f"--config={kcfg}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={d / 'kubelet' / 'root'}",
            f"--cert-dir={d / 'kubelet' / 'pki'}",
            f"--hostname-override={name}",
            f"--node-ip={lay.host_ip(i)}",
            f"--node-labels={labels}",
            f"--register-with-taints={REAL_LABEL}=real:NoSchedule",
            "--v=1",
        ],
        [],
    )
    make_client_cert(pki, "/CN=system:kube-proxy", d / "kube-proxy" / "pki", openssl)
    start(
        f"{name}/kube-proxy",
        bins["kube-proxy"],
        [f"--config={write_kube_proxy_config(lay, i, pki, api_port)}", "--v=1"],
        ["nsenter", f"--net=/run/netns/{lay.netns(i)}", "--", "env", f"PATH={path_env}"],
    )
    log(
        f"{name}: kubelet, containerd and kube-proxy started (node IP {lay.host_ip(i)}, "
        f"pods {lay.pod_cidr(i)})"
    )
    return {
        "index": i,
        "netns": lay.netns(i),
        "internal_ip": lay.host_ip(i),
        "pod_cidr": lay.pod_cidr(i),
        "containerd_socket": str(lay.socket(i)),
        "ctr": str(bins["ctr"]),
        "cgroup": lay.cgroup(i),
    }


# ---------------------------------------------------------------------------------------------- teardown


def _cgroup_dirs(cgroup: str) -> list[Path]:
    roots = [Path("/sys/fs/cgroup")]
    if not Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        roots = [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.is_symlink()]
    return [r / cgroup.lstrip("/") for r in roots if (r / cgroup.lstrip("/")).is_dir()]


def make_cgroup(cgroup: str) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy before it starts (it creates what is below)."""
    roots = [Path("/sys/fs/cgroup")]
    if not Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        roots = [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.is_symlink()]
    for r in roots:
        d = r / cgroup.lstrip("/")
        d.mkdir(exist_ok=True)
        # A new v1 cpuset has no CPUs and no memory nodes: nothing could run in it.
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (r / f).is_file() and not (d / f).read_text().strip():
                (d / f).write_text((r / f).read_text())


def kill_cgroup(cgroup: str) -> None:
    """SIGKILL every process in the node's cgroup tree (its pods' containers), then remove the tree."""
    for _ in range(50):
        pids = set()
        for top in _cgroup_dirs(cgroup):
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for top in _cgroup_dirs(cgroup):
        for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def kill_shims(node_dir: Path) -> None:
    """containerd-shim-runc-v2 processes outlive containerd; ours name the node's socket or state."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            args
            and args[0].endswith(b"containerd-shim-runc-v2")
            and any(str(node_dir).encode() in a for a in args)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def unmount_under(root: Path) -> None:
    """Unmount everything at or below `root`, deepest first (overlay rootfs, shm, volumes, pod netns)."""
    for _ in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                mounts.append(point)
        if not mounts:
            return
        for point in sorted(mounts, key=lambda p: -p.count("/")):
            if _run("umount", point, check=False).returncode != 0:
                _run("umount", "-l", point, check=False)


def teardown_node_files(lay: Layout, i: int) -> None:
    d = lay.dir(i)
    kill_shims(d)
    kill_cgroup(lay.cgroup(i))
    unmount_under(d)
    teardown_network(lay, i)
    # The kubelet links each container's log into the machine-wide /var/log/containers.
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and str(d) in os.readlink(link):
                    link.unlink()
    shutil.rmtree(d, ignore_errors=True)


def existing_indices(lay: Layout) -> set[int]:
    """Real nodes of this state dir found on the machine (state.json may be gone after a killed `up`)."""
    found = set()
    if lay.root.is_dir():
        found |= {
            int(p.name.rsplit("-", 1)[1]) for p in lay.root.glob("kiri-real-*") if p.name[10:].isdigit()
        }
    for p in Path("/run/netns").glob(f"kiri-{lay.h}-*") if Path("/run/netns").is_dir() else []:
        with contextlib.suppress(ValueError):
            found.add(int(p.name.rsplit("-", 1)[1]))
    for p in Path("/sys/class/net").glob(f"kr{lay.h}h*"):
        with contextlib.suppress(ValueError):
            found.add(int(p.name[len(f"kr{lay.h}h") :]))
    return found


def teardown(lay: Layout, state: dict[str, Any] | None) -> None:
    """After the kubelets and containerds were stopped: kill pods and shims, unmount, delete netns/veths."""
    real = (state or {}).get("real_nodes", {})
    indices = {n["index"] for n in real.get("nodes", {}).values()} | existing_indices(lay)
    for i in sorted(indices):
        teardown_node_files(lay, i)
    teardown_svc_link(lay)  # the Service route went with the veths
    if Path(f"/run/netns/{lay.fabric_netns()}").exists():
        _ip("netns", "delete", lay.fabric_netns(), check=False)
    with contextlib.suppress(OSError):
        lay.root.rmdir()
    restore_host(real)


def restore_host(real: dict[str, Any]) -> None:
    """Undo what the kubelets did to the machine (sysctls, iptables chains) once none runs any more."""
    if not real.get("kernel_tunables") or any_kubelet_running():
        return  # no real node was started here, or another kubelet still relies on the host as it is
    for t, v in real.pop("kernel_tunables").items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", t).write_text(v)
    if real.pop("kubelet_chains_before", None) is False:
        remove_kubelet_chains()
    # The device-plugin socket is the one path every kubelet shares whatever its root dir (hard-coded in
    # k8s.io/kubelet's deviceplugin API). No kubelet runs now: remove it, and the directories if empty.
    plugins = Path("/var/lib/kubelet/device-plugins")
    for f in ("kubelet.sock", "kubelet_internal_checkpoint"):
        with contextlib.suppress(OSError):
            (plugins / f).unlink()
    for d in (plugins, plugins.parent):
        with contextlib.suppress(OSError):
            d.rmdir()


# What the kubelet adds to the host's iptables at start (1.36 still does): a canary chain per table, a hint
# chain, and KUBE-FIREWALL, which drops packets to 127.0.0.0/8 from other sources, hooked into INPUT and OUTPUT.
KUBELET_CHAINS = (
    ("filter", "KUBE-FIREWALL"),
    ("filter", "KUBE-KUBELET-CANARY"),
    ("nat", "KUBE-KUBELET-CANARY"),
    ("mangle", "KUBE-KUBELET-CANARY"),
    ("mangle", "KUBE-IPTABLES-HINT"),
)


def kubelet_chains_present() -> bool:
    if shutil.which("iptables") is None:
        return False
    return _run("iptables", "-t", "filter", "-S", "KUBE-KUBELET-CANARY", check=False).returncode == 0


def remove_kubelet_chains() -> None:
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for hook in ("INPUT", "OUTPUT"):
            while _run(tool, "-t", "filter", "-D", hook, "-j", "KUBE-FIREWALL", check=False).returncode == 0:
                pass
        for table, chain in KUBELET_CHAINS:
            _run(tool, "-t", table, "-F", chain, check=False)
            _run(tool, "-t", table, "-X", chain, check=False)


def any_kubelet_running() -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().split(b"\0")[0].endswith(b"/kubelet"):
                    return True
    return False
