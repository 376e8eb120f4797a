"""The local Kubernetes control plane Kiri is tested on: `hack/cluster up|down|status|env|node-offline|node-online|restart`.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built from Go modules by
hack/build-binaries.sh) are started by hand as child processes bound to 127.0.0.1, and kwok plays the
kubelet of every simulated node. Processes are started by hand rather than through kwokctl so that every
flag, port and pid is ours: `down` stops exactly what `up` started, and nothing is downloaded.

State lives in $KIRI_STATE_DIR (default <repo>/.kiri): the kubeconfig, certificates, etcd data, logs and
state.json with the pids and ports. `up --real-nodes N` adds real kubelets beside the kwok fleet; their
network, containerd and kubelet set-up is in hack/realnodes.py.

Why one module: the control plane's lifecycle (ports, pids, state, lock, clean-up) is one piece that every
command shares; the kwok stages, the fleet and the real nodes are the parts that could live apart, and the
real nodes (the largest) do, in hack/realnodes.py.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import datetime
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images as kiri_images
import realnodes

REPO_ROOT = Path(__file__).resolve().parents[1]
HACK_DIR = REPO_ROOT / "hack"
STATE_DIR = Path(os.environ.get("KIRI_STATE_DIR") or REPO_ROOT / ".kiri").resolve()
# Names and addresses derived from the state dir: real nodes, and the Service range every cluster uses.
LAYOUT = realnodes.Layout(STATE_DIR)
FIELD_MANAGER = "kiri-cluster"
OFFLINE_ANNOTATION = "kiri.dev/sim-offline"
OFFLINE_LEASE_HOLDER = "kiri-sim-offline"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
SIM_LABEL = "kiri.dev/sim"
# A lease renewed every 15s keeps node objects still (no status heartbeats for watchers to chew on) while
# the node lifecycle controller still notices a dead kwok within a minute.
NODE_LEASE_SECONDS = 60
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
BINARIES = (*COMPONENTS, "kubectl")
# What one cloud GPU node and one edge node offer; edge memory varies per node (see edge_memory_mb).
CLOUD_ALLOCATABLE = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "4"}
EDGE_MEMORY_MB = (2048, 4096, 8192, 16384)
DEFAULT_FLEET = (2, 12, 3)  # cloud nodes, edge nodes, sites
# The simulated fleet: real nodes carry kiri.dev/tier too, and are not the fleet's to delete.
KWOK_FLEET = "kiri.dev%2Ftier%2Ctype%3Dkwok"


class ClusterError(Exception):
    """A failure with a message meant for the user; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- paths


class Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state.json"
        self.lock = root / "cluster.lock"
        self.kubeconfig = root / "kubeconfig"
        self.pki = root / "pki"
        self.etcd_data = root / "etcd-data"
        self.logs = root / "logs"
        self.config = root / "config"
        self.nodes = root / "nodes"

    def owned(self) -> list[Path]:
        # Only what `up` creates: the state dir may hold other tools' files.
        return [self.state, self.kubeconfig, self.pki, self.etcd_data, self.config, self.nodes]


def bin_dirs() -> list[Path]:
    out = subprocess.run(
        ["bash", str(HACK_DIR / "build-binaries.sh"), "--print-bin-dirs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [Path(line) for line in out.split()]


def real_node_bin_dirs() -> list[Path]:
    out = subprocess.run(
        ["bash", str(HACK_DIR / "build-binaries.sh"), "--print-real-node-bin-dirs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [Path(line) for line in out.split()]


def find_binaries() -> dict[str, Path]:
    dirs = bin_dirs()
    found: dict[str, Path] = {}
    missing = []
    for name in BINARIES:
        for d in dirs:
            if (d / name).is_file() and os.access(d / name, os.X_OK):
                found[name] = d / name
                break
        else:
            missing.append(name)
    if missing:
        raise ClusterError(
            f"binaries missing: {', '.join(missing)} (looked in {', '.join(map(str, dirs))}).\n"
            "Build them with `make binaries` (hack/build-binaries.sh)."
        )
    return found


# ---------------------------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(names: list[str], fixed: dict[str, int]) -> dict[str, int]:
    for name, port in fixed.items():
        if port and not port_free(port):
            raise ClusterError(
                f"port {port} on 127.0.0.1 (requested for {name}) is already in use; "
                "free it or choose another port"
            )
    ports: dict[str, int] = {k: v for k, v in fixed.items() if v}
    held: list[socket.socket] = []
    try:
        for name in names:
            if name in ports:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)  # keep it bound so the next pick cannot return the same port
            ports[name] = s.getsockname()[1]
    finally:
        for s in held:
            s.close()
    return ports


# ---------------------------------------------------------------------------------------------- processes


# Processes this invocation started: poll() is the truth about them, and reaps them.
_children: dict[int, subprocess.Popen[bytes]] = {}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_ours(pid: int, binary: str) -> bool:
    """The pid is alive and still runs our binary with our state dir (pids get reused)."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    args = cmdline(pid)
    deadline = time.monotonic() + 1
    while not args and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        # Just after exec the kernel shows an empty cmdline for a moment.
        time.sleep(0.02)
        args = cmdline(pid)
    if not args or args[0] != binary:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return any(f"{STATE_DIR}/" in a for a in args[1:])


def stop_pids(procs: dict[str, dict[str, Any]], timeout: float = 10) -> None:
    """Stop clients first, then kube-apiserver, then etcd (an apiserver without etcd hangs on SIGTERM).

    Each group gets SIGTERM, then SIGKILL after `timeout`; only pids that are still ours are signalled.
    """

    def rank(name: str) -> int:
        return 2 if "etcd" in name else 1 if "kube-apiserver" in name else 0

    for group in (0, 1, 2):
        live = [(n, p) for n, p in procs.items() if rank(n) == group and is_ours(p["pid"], p["binary"])]
        for name, p in live:
            log(f"stopping {name} (pid {p['pid']})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _name, p in live:
            while is_ours(p["pid"], p["binary"]) and time.monotonic() < deadline:
                _reap(p["pid"])
                time.sleep(0.05)
            if is_ours(p["pid"], p["binary"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p["pid"], signal.SIGKILL)
            _reap(p["pid"])


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


# ---------------------------------------------------------------------------------------------- pki


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def make_pki(pki: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("openssl is required to create the cluster certificates (apt-get install openssl)")
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)  # private keys inside
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=kiri-local-ca",
        cwd=pki,
    )

    def leaf(name: str, subj: str, ext: str) -> None:
        (pki / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "3650", "-extfile", f"{name}.ext", cwd=pki,
        )  # fmt: skip

    leaf(
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,"
        # The `kubernetes` Service (pods' in-cluster config) and the host address real nodes reach it by.
        f"IP:{LAYOUT.kubernetes_service_ip()},IP:{LAYOUT.svc_ip()}\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    # system:masters: the local admin, and the identity of the control-plane components and kwok.
    leaf("admin", "/O=system:masters/CN=kiri-admin", "extendedKeyUsage=clientAuth,serverAuth\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=pki)
    openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, pki: Path, port: int) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kiri",
                "cluster": {
                    "server": f"https://127.0.0.1:{port}",
                    "certificate-authority-data": b64("ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": "kiri-admin",
                "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")},
            }
        ],
        "contexts": [{"name": "kiri", "context": {"cluster": "kiri", "user": "kiri-admin"}}],
        "current-context": "kiri",
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.chmod(0o600)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- API access


class Api:
    """A minimal HTTPS client with the admin certificate: enough for health checks and bulk node writes."""

    def __init__(self, pki: Path, port: int) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        # One kept-alive connection per thread: a TLS handshake per node write would cost more than the write.
        self.local = threading.local()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for attempt in (0, 1):
            conn: http.client.HTTPSConnection | None = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=timeout)
                self.local.conn = conn
            conn.timeout = timeout
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt:  # a second failure is real, not a stale kept-alive connection
                    raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def ok(self, path: str) -> bool:
        try:
            status, _ = self.request("GET", path, timeout=5)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def apply(self, path: str, obj: dict[str, Any]) -> None:
        status, body = self.request(
            "PATCH",
            f"{path}?fieldManager={FIELD_MANAGER}&force=true",
            obj,
            content_type="application/apply-patch+yaml",
        )
        if status >= 300:
            msg = body.get("message") if isinstance(body, dict) else body
            raise ClusterError(f"apply {path} failed ({status}): {msg}")


def wait_until(what: str, check: Any, timeout: float, procs: dict[str, dict[str, Any]], paths: Paths) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if not is_ours(p["pid"], p["binary"]):
                raise ClusterError(
                    f"{name} exited while waiting for {what}; last lines of {p['log']}:\n{log_tail(Path(p['log']))}"
                )
        if check():
            return
        time.sleep(0.2)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------------------------------------- kwok stages


def kwok_module_dir() -> Path:
    gomod = (HACK_DIR / "tools" / "kwok" / "go.mod").read_text()
    version = next(
        line.split()[-1]
        for line in gomod.splitlines()
        if "sigs.k8s.io/kwok " in line and not line.strip().startswith("//")
    )
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"],
        cwd=HACK_DIR / "tools" / "kwok",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ClusterError(
            f"cannot locate the kwok {version} module source: {proc.stderr.strip() or proc.stdout}"
        )
    return Path(json.loads(proc.stdout)["Dir"])


def _not_in(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "NotIn", "values": list(values)}


def _in(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


OFFLINE_KEY = f'.metadata.annotations["{OFFLINE_ANNOTATION}"]'
SIM_KEY = f'.metadata.labels["{SIM_LABEL}"]'

POD_ADDRESSES = """
{{ $hostIPs := NodeIPsWith .spec.nodeName }}
{{ with $hostIPs }}
hostIP: {{ index . 0 | Quote }}
hostIPs:
{{ range . }}
- ip: {{ . | Quote }}
{{ end }}
{{ end }}
{{ $podIPs := PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
{{ with $podIPs }}
podIP: {{ index . 0 | Quote }}
podIPs:
{{ range . }}
- ip: {{ . | Quote }}
{{ end }}
{{ end }}
"""

UNREADY_CONDITIONS = """
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodScheduled
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: ContainersReady
"""


def _stage(
    name: str, kind: str, selector: list[dict[str, Any]], template: str, delay_ms: int = 0
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": kind},
        "selector": {"matchExpressions": selector},
        "next": {"statusTemplate": template},
    }
    if delay_ms:
        spec["delay"] = {"durationMilliseconds": delay_ms, "jitterDurationMilliseconds": delay_ms // 2}
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


def kiri_stages(kwok_dir: Path) -> list[dict[str, Any]]:
    """kwok's default stages (a custom Stage replaces them all), narrowed so the Kiri stages own their cases."""
    base = kwok_dir / "kustomize" / "stage"

    def load(rel: str) -> dict[str, Any]:
        path = base / rel
        if not path.is_file():
            raise ClusterError(f"kwok default stage {path} not found; is the kwok module complete?")
        doc: dict[str, Any] = yaml.safe_load(path.read_text())
        return doc

    node_init = load("node/fast/node-initialize.yaml")
    heartbeat = load("node/heartbeat-with-lease/node-heartbeat-with-lease.yaml")
    pod_ready = load("pod/fast/pod-ready.yaml")
    pod_complete = load("pod/fast/pod-complete.yaml")
    pod_delete = load("pod/fast/pod-delete.yaml")
    for stage in (node_init, heartbeat):
        stage["spec"]["selector"]["matchExpressions"].append(_not_in(OFFLINE_KEY, "true"))
    pod_ready["spec"]["selector"]["matchExpressions"].append(_not_in(SIM_KEY, "never-ready", "crash"))

    offline = _stage(
        "kiri-node-offline",
        "Node",
        [
            _in(OFFLINE_KEY, "true"),
            _in('.status.conditions.[] | select( .type == "Ready" ) | .status', "True"),
        ],
        """
{{ $now := Now }}
conditions:
{{ range NodeConditions }}
{{ if eq .type "Ready" }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $now | Quote }}
  message: "node taken offline (hack/cluster node-offline)"
  reason: KiriSimulatedOffline
  status: "False"
  type: Ready
{{ else }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $now | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
{{ end }}
""",
    )
    not_deleting = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    # never-ready and crash pods start like any pod but their containers never pass readiness.
    start_unready = _stage(
        "kiri-pod-start-unready",
        "Pod",
        [not_deleting, _in(".status.phase", "Pending"), _in(SIM_KEY, "never-ready", "crash")],
        "{{ $now := Now }}\n"
        + UNREADY_CONDITIONS
        + """
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
"""
        + POD_ADDRESSES
        + "phase: Running\nstartTime: {{ $now | Quote }}\n",
    )
    crash = _stage(
        "kiri-pod-crash",
        "Pod",
        [
            not_deleting,
            _in(".status.phase", "Running"),
            _in(SIM_KEY, "crash"),
            {"key": ".status.containerStatuses.[].state.running.startedAt", "operator": "Exists"},
        ],
        "{{ $now := Now }}\n"
        + UNREADY_CONDITIONS
        + """
containerStatuses:
{{ range .status.containerStatuses }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: false
  restartCount: {{ add1 .restartCount }}
  lastState:
    terminated:
      exitCode: 1
      reason: Error
      message: "simulated crash (kiri.dev/sim=crash)"
      startedAt: {{ .state.running.startedAt | Quote }}
      finishedAt: {{ $now | Quote }}
  state:
    waiting:
      reason: CrashLoopBackOff
      message: "back-off restarting failed container"
{{ end }}
""",
        delay_ms=2000,
    )
    restart = _stage(
        "kiri-pod-crash-restart",
        "Pod",
        [
            not_deleting,
            _in(".status.phase", "Running"),
            _in(SIM_KEY, "crash"),
            _in(".status.containerStatuses.[].state.waiting.reason", "CrashLoopBackOff"),
        ],
        """{{ $now := Now }}
containerStatuses:
{{ range .status.containerStatuses }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: false
  started: true
  restartCount: {{ .restartCount }}
  lastState:
{{ YAML .lastState 2 }}
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
""",
        delay_ms=3000,
    )
    return [node_init, heartbeat, offline, pod_ready, pod_complete, pod_delete, start_unready, crash, restart]


def write_kwok_config(path: Path, stages: list[dict[str, Any]]) -> None:
    config = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "manageAllNodes": False,
            "manageNodesWithAnnotationSelector": f"{KWOK_ANNOTATION}=fake",
            "nodeLeaseDurationSeconds": NODE_LEASE_SECONDS,
            # Fallback pool for nodes without spec.podCIDR; every node we create has its own /24.
            "cidr": "10.0.0.1/16",
            "nodeIP": "127.0.0.1",
            # A config file skips kwok's defaulting: the settings of kwok's own kustomize/kwok/kwok.yaml.
            "nodeLeaseParallelism": 8,
            "nodePlayStageParallelism": 8,
            "podPlayStageParallelism": 8,
            "podsOnNodeSyncParallelism": 2,
            "enablePodsOnNodeSyncListPager": False,
            "enablePodsOnNodeSyncStreamWatch": True,
            "enableProfilingHandler": False,
            "enableContentionProfiling": False,
        },
    }
    path.write_text(yaml.safe_dump_all([config, *stages], sort_keys=False))


# ---------------------------------------------------------------------------------------------- the fleet


def site_name(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return f"site-{letters}"


MAX_SITES = 190
MAX_NODES_PER_SITE = 1024


def _node(
    name: str, group: int, index: int, labels: dict[str, str], allocatable: dict[str, str]
) -> dict[str, Any]:
    """One node; `group` is 0 for the cloud, 1 + site number for a site, `index` the node's place in it.

    Addresses derive from the node's own name parts, not its place in the whole fleet, so scaling the fleet
    never asks to change a node's (immutable) podCIDR. Each node has its own /26 of pod IPs, so kwok never
    runs out at 1,000 nodes: 10.(63 + group).0.0/16 per group, 1,024 nodes of 64 pod IPs each.
    """
    block = index * 64
    cidr = f"10.{63 + group}.{block // 256}.{block % 256}/26"
    internal_ip = f"100.{64 + group % 64}.{index // 256}.{index % 256}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **labels},
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "allocatable": allocatable,
            "capacity": allocatable,
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {"architecture": labels["kubernetes.io/arch"], "operatingSystem": "linux"},
        },
    }


def fleet(cloud: int, edge: int, sites: int) -> list[dict[str, Any]]:
    nodes = []
    for i in range(cloud):
        node = _node(
            f"kiri-cloud-{i}",
            0,
            i,
            {"kiri.dev/tier": "cloud", "kiri.dev/accelerator": "gpu", "kubernetes.io/arch": "amd64"},
            dict(CLOUD_ALLOCATABLE),
        )
        node["spec"]["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        nodes.append(node)
    per_site = [edge // sites + (1 if s < edge % sites else 0) for s in range(sites)] if sites else []
    if sites > MAX_SITES or cloud > MAX_NODES_PER_SITE or max(per_site, default=0) > MAX_NODES_PER_SITE:
        raise ClusterError(
            f"at most {MAX_SITES} sites and {MAX_NODES_PER_SITE} nodes per site (and cloud nodes) are supported"
        )
    for s, count in enumerate(per_site):
        site = site_name(s)
        for i in range(count):
            # Deterministic variety: 1 in 4 edge nodes has a GPU, 1 in 3 is arm64, memory cycles 2-16 GiB.
            gpu = i % 4 == 3
            memory_mb = EDGE_MEMORY_MB[(i + s) % len(EDGE_MEMORY_MB)]
            allocatable = {"cpu": "4", "memory": f"{memory_mb}Mi", "pods": "110"}
            if gpu:
                allocatable["nvidia.com/gpu"] = "1"
            nodes.append(
                _node(
                    f"kiri-edge-{site}-{i}",
                    1 + s,
                    i,
                    {
                        "kiri.dev/tier": "edge",
                        "kiri.dev/site": site,
                        "topology.kubernetes.io/zone": site,
                        "kiri.dev/accelerator": "gpu" if gpu else "none",
                        "kubernetes.io/arch": "arm64" if i % 3 == 2 else "amd64",
                        "kiri.dev/memory-mb": str(memory_mb),
                    },
                    allocatable,
                )
            )
    return nodes


def sync_fleet(api: Api, cloud: int, edge: int, sites: int, timeout: float) -> None:
    if edge and sites < 1:
        raise ClusterError("--sites must be at least 1 when there are edge nodes")
    desired = fleet(cloud, edge, sites)
    names = {n["metadata"]["name"] for n in desired}
    status, body = api.request("GET", f"/api/v1/nodes?labelSelector={KWOK_FLEET}")
    if status != 200:
        raise ClusterError(f"listing nodes failed ({status}): {body}")
    existing = {n["metadata"]["name"]: n for n in body["items"]}
    extra = sorted(set(existing) - names)
    start = time.monotonic()
    for node in desired:
        current = existing.get(node["metadata"]["name"])
        if current:
            # podCIDR is immutable and status is the kubelet's (kwok's): keep what the node has.
            node.pop("status")
            for key in ("podCIDR", "podCIDRs"):
                if key in current["spec"]:
                    node["spec"][key] = current["spec"][key]
                else:
                    node["spec"].pop(key)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda n: api.apply(f"/api/v1/nodes/{n['metadata']['name']}", n), desired))
        list(pool.map(lambda n: api.request("DELETE", f"/api/v1/nodes/{n}"), extra))
    log(f"nodes: {cloud} cloud + {edge} edge in {sites} sites applied in {time.monotonic() - start:.1f}s"
        + (f", {len(extra)} removed" if extra else ""))  # fmt: skip

    def all_ready() -> bool:
        status, body = api.request("GET", f"/api/v1/nodes?labelSelector={KWOK_FLEET}", timeout=60)
        if status != 200:
            return False
        ready = 0
        for n in body["items"]:
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            offline = n["metadata"].get("annotations", {}).get(OFFLINE_ANNOTATION) == "true"
            ready += conds.get("Ready") == "True" or offline
        return ready >= len(names)

    deadline = time.monotonic() + timeout
    while not all_ready():
        if time.monotonic() > deadline:
            raise ClusterError(f"nodes not Ready after {timeout:.0f}s; see {STATE_DIR / 'logs' / 'kwok.log'}")
        time.sleep(0.5)
    log(f"nodes Ready after {time.monotonic() - start:.1f}s")


# ---------------------------------------------------------------------------------------------- real nodes


def sync_real_nodes(api: Api, paths: Paths, state: dict[str, Any], count: int, timeout: float) -> None:
    """Make the cluster have `count` real nodes (kiri-real-0..count-1); see hack/realnodes.py."""
    lay = realnodes.Layout(STATE_DIR)
    real = state.setdefault("real_nodes", {"nodes": {}})
    nodes: dict[str, Any] = real["nodes"]
    if count > realnodes.MAX_REAL_NODES:
        raise ClusterError(f"at most {realnodes.MAX_REAL_NODES} real nodes are supported")
    procs = state["procs"]
    for name in sorted(set(nodes) - {lay.name(i) for i in range(count)}):
        stop_pids({k: v for k, v in procs.items() if k.startswith(f"{name}/")})
        realnodes.teardown_node_files(lay, nodes[name]["index"])
        for k in [k for k in procs if k.startswith(f"{name}/")]:
            del procs[k]
        del nodes[name]
        api.request("DELETE", f"/api/v1/nodes/{name}")
        if not nodes:
            stop_real_services(lay, procs)
            realnodes.restore_host(real)
        else:
            realnodes.route_services(lay, [n["index"] for n in nodes.values()])
        write_state(paths, state)
        log(f"{name}: removed")
    if not nodes and any(k.startswith(f"{SERVICES}/") for k in procs):
        stop_real_services(lay, procs)  # e.g. a first node that failed after the services started
        write_state(paths, state)
    wanted = [i for i in range(count) if lay.name(i) not in nodes]
    if not wanted:
        return
    if state.get("service_cidr") != lay.service_cidr():
        raise ClusterError(
            f"this cluster was started by an older hack/cluster (Service range {state.get('service_cidr')}, "
            f"real nodes need {lay.service_cidr()}): run `hack/cluster down` first"
        )
    t0 = time.monotonic()
    try:
        host = realnodes.check_host()
        bins = realnodes.find_binaries(real_node_bin_dirs())
        realnodes.cni_bin_dir()
    except realnodes.RealNodeError as exc:
        raise ClusterError(str(exc)) from None
    if host["cgroup_v1"]:
        log("host: cgroup v1, so the kubelets run with failCgroupV1: false and the cgroupfs driver")
    if not host["negative_oom_score_adj"]:
        log("host: a negative oom_score_adj is forbidden even to root, so containerd restricts it")
    # The kubelet rewrites these VM-wide sysctls when it starts; `down` puts back what was there first.
    real.setdefault("kernel_tunables", realnodes.read_tunables())
    # ... and adds iptables chains (KUBE-FIREWALL and canaries); `down` removes them if they were not there.
    real.setdefault("kubelet_chains_before", realnodes.kubelet_chains_present())
    pause = subprocess.run(
        [sys.executable, str(HACK_DIR / "images.py"), "build", "pause"],
        capture_output=True,
        text=True,
        check=False,
    )
    if pause.returncode != 0:
        raise ClusterError(f"building the pause image failed: {pause.stderr.strip()}")
    pause_archive = Path(pause.stdout.split()[-1])

    def start_proc(name: str, binary: Path, args: list[str], prefix: list[str]) -> None:
        start(name, binary, args, paths, procs, state, prefix)

    started = {}
    try:
        start_real_services(lay, paths, state, bins)
        for i in wanted:
            nodes[lay.name(i)] = realnodes.start_node(
                lay, i, bins=bins, host=host, pki=paths.pki, api_port=state["ports"]["apiserver"],
                pause_archive=pause_archive, pause_ref=kiri_images.PAUSE_REF, start=start_proc,
                openssl=openssl, log=log,
            )  # fmt: skip
            started[lay.name(i)] = time.monotonic()
            write_state(paths, state)
        realnodes.route_services(lay, [n["index"] for n in nodes.values()])
    except realnodes.RealNodeError as exc:
        raise ClusterError(str(exc)) from None
    deadline = time.monotonic() + timeout
    waiting = set(started)
    while waiting:
        for name in sorted(waiting):
            for comp in ("kubelet", "containerd", "kube-proxy"):
                p = procs[f"{name}/{comp}"]
                if not is_ours(p["pid"], p["binary"]):
                    raise ClusterError(
                        f"{name}: {comp} exited; last lines of {p['log']}:\n{log_tail(Path(p['log']))}"
                    )
            status, body = api.request("GET", f"/api/v1/nodes/{name}")
            conds = (
                {c["type"]: c["status"] for c in (body or {}).get("status", {}).get("conditions", [])}
                if status == 200
                else {}
            )
            if conds.get("Ready") == "True":
                waiting.discard(name)
                log(f"{name}: Ready {time.monotonic() - started[name]:.1f}s after its kubelet started")
        if waiting and time.monotonic() > deadline:
            raise ClusterError(
                f"real nodes not Ready after {timeout:.0f}s: {', '.join(sorted(waiting))}; see {paths.logs}"
            )
        time.sleep(0.5)
    log(f"real nodes: {count} Ready ({len(wanted)} joined in {time.monotonic() - t0:.1f}s)")


# The real nodes' cluster services in state["procs"]: `real-services/apiserver-proxy`, `.../coredns`.
SERVICES = "real-services"


def start_real_services(
    lay: realnodes.Layout, paths: Paths, state: dict[str, Any], bins: dict[str, Path]
) -> None:
    """What the real nodes' pods and kube-proxies reach on the cluster's host address (idempotent).

    - the API server, through hack/tcpproxy.py (it listens on 127.0.0.1 only; the `kubernetes` Service's
      endpoint is this address, --advertise-address), and
    - CoreDNS (cluster.local from the API server; the kubelets' clusterDNS), run here rather than as a
      pod so that DNS needs no image and no Service routing of its own.
    """
    procs = state["procs"]
    realnodes.setup_svc_link(lay)
    port = state["ports"]["apiserver"]
    svc = lay.svc_ip()
    t0 = time.monotonic()
    proxy = f"{SERVICES}/apiserver-proxy"
    if proxy not in procs or not is_ours(procs[proxy]["pid"], procs[proxy]["binary"]):
        start(proxy, Path(sys.executable),
              [str(HACK_DIR / "tcpproxy.py"), f"{svc}:{port}", f"127.0.0.1:{port}", f"--tag={STATE_DIR}/proxy"],
              paths, procs, state)  # fmt: skip
    coredns = f"{SERVICES}/coredns"
    if coredns not in procs or not is_ours(procs[coredns]["pid"], procs[coredns]["binary"]):
        corefile = realnodes.write_corefile(lay, paths.kubeconfig, paths.config / "Corefile")
        start(coredns, bins["coredns"], [f"-conf={corefile}"], paths, procs, state)

    def up() -> bool:
        try:
            socket.create_connection((svc, port), timeout=1).close()
        except OSError:
            return False
        return realnodes.dns_query(svc, f"kubernetes.default.svc.{realnodes.CLUSTER_DOMAIN}") == [
            lay.kubernetes_service_ip()
        ]

    wait_until("API server proxy and CoreDNS on " + svc, up, 30, procs, paths)
    log(f"real-node services on {svc}: API server proxy, CoreDNS ({time.monotonic() - t0:.1f}s)")


def stop_real_services(lay: realnodes.Layout, procs: dict[str, dict[str, Any]]) -> None:
    stop_pids({k: v for k, v in procs.items() if k.startswith(f"{SERVICES}/")})
    for k in [k for k in procs if k.startswith(f"{SERVICES}/")]:
        del procs[k]
    realnodes.route_services(lay, [])
    realnodes.teardown_svc_link(lay)


# ---------------------------------------------------------------------------------------------- commands


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    while True:
        paths.root.mkdir(parents=True, exist_ok=True)
        fh = open(paths.lock, "a")  # noqa: SIM115 (held across the yield)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(paths.lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # Someone removed the state dir while we waited: that lock guards nothing any more.
        fh.close()
    try:
        yield
    finally:
        fh.close()


def read_state(paths: Paths) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(paths.state.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"procs": {}, "corrupt": True}
    return state


def write_state(paths: Paths, state: dict[str, Any]) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(paths.state)


def healthy(paths: Paths, state: dict[str, Any]) -> tuple[bool, list[str]]:
    dead = [n for n, p in state.get("procs", {}).items() if not is_ours(p["pid"], p["binary"])]
    missing = [n for n in COMPONENTS if n not in state.get("procs", {})]
    problems = [f"{n} is not running" for n in dead] + [f"{n} was never started" for n in missing]
    if state.get("corrupt"):
        problems.append("state.json is unreadable")
    if not problems:
        api = Api(paths.pki, state["ports"]["apiserver"])
        if not api.ok("/readyz"):
            problems.append("kube-apiserver is not ready")
    return not problems, problems


def orphans(known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Our control-plane processes for this state dir that no state.json remembers (a killed `up`)."""
    try:
        binaries = {str(d / name) for d in bin_dirs() for name in COMPONENTS}
        binaries |= {
            str(d / name)
            for d in real_node_bin_dirs()
            for name in ("kubelet", "containerd", "kube-proxy", "coredns")
        }
    except (OSError, subprocess.CalledProcessError):
        return {}
    known_pids = {p["pid"] for p in known.values()}
    found: dict[str, dict[str, Any]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in known_pids:
            continue
        args = cmdline(int(entry.name))
        proxy = len(args) > 1 and args[0] == sys.executable and args[1] == str(HACK_DIR / "tcpproxy.py")
        if args and (args[0] in binaries or proxy) and any(f"{STATE_DIR}/" in a for a in args[1:]):
            found[f"orphaned {Path(args[0]).name} {entry.name}"] = {"pid": int(entry.name), "binary": args[0]}
    return found


def clean(paths: Paths, state: dict[str, Any] | None) -> None:
    procs = (state or {}).get("procs", {})
    stop_pids({**orphans(procs), **procs})
    # The real nodes' pods, shims, mounts, cgroups, network namespaces and veths (found even without state).
    realnodes.teardown(realnodes.Layout(STATE_DIR), state)
    for p in paths.owned():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def start(
    name: str,
    binary: Path,
    args: list[str],
    paths: Paths,
    procs: dict[str, dict[str, Any]],
    state: dict[str, Any],
    prefix: list[str] | None = None,
) -> None:
    """Start `binary` (through `prefix`, a command that execs it, e.g. nsenter) and record its pid."""
    logfile = paths.logs / f"{name.replace('/', '-')}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [*(prefix or []), str(binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell that ran `up`; `down` stops it by pid
            cwd=paths.root,
        )
    _children[proc.pid] = proc
    procs[name] = {"pid": proc.pid, "binary": str(binary), "log": str(logfile)}
    write_state(paths, state)  # record the pid at once so a failed `up` or a later `down` can stop it


def fleet_counts(args: argparse.Namespace, state: dict[str, Any] | None) -> tuple[int, int, int]:
    current = (state or {}).get("fleet") or DEFAULT_FLEET
    given = (args.cloud_nodes, args.edge_nodes, args.sites)
    cloud, edge, sites = (g if g is not None else c for g, c in zip(given, current, strict=True))
    return cloud, edge, sites


def cmd_up(args: argparse.Namespace) -> int:
    paths = Paths(STATE_DIR)
    bins = find_binaries()
    with locked(paths):
        state = read_state(paths)
        if state is not None:
            ok, problems = healthy(paths, state)
            if ok:
                log(f"already running (kube-apiserver https://127.0.0.1:{state['ports']['apiserver']})")
                stray = orphans(state["procs"])
                if stray:
                    stop_pids(stray)
                if (args.cloud_nodes, args.edge_nodes, args.sites) != (None, None, None):
                    api = Api(paths.pki, state["ports"]["apiserver"])
                    sync_fleet(api, *fleet_counts(args, state), args.timeout)
                    state["fleet"] = list(fleet_counts(args, state))
                    write_state(paths, state)
                if args.real_nodes is not None:
                    api = Api(paths.pki, state["ports"]["apiserver"])
                    before = len(state.get("real_nodes", {}).get("nodes", {}))
                    try:
                        sync_real_nodes(api, paths, state, args.real_nodes, args.timeout)
                    except BaseException:
                        # Leave the running cluster as it was, not with a half-started node in it.
                        log("adding real nodes failed; removing the ones this attempt started")
                        sync_real_nodes(api, paths, state, min(before, args.real_nodes), args.timeout)
                        raise
                return 0
            log(
                "stale state from an earlier run: "
                + "; ".join(problems)
                + ". Stopping what is left, starting afresh."
            )
            clean(paths, state)
        elif any(p.exists() for p in paths.owned()):
            log(f"stale files in {paths.root} without state.json; removing them")
            clean(paths, None)
        try:
            return _up(args, paths, bins)
        except BaseException:
            # Never leave half a control plane behind: stop whatever this attempt started.
            failed = read_state(paths)
            log("up failed; stopping the processes it started")
            clean(paths, failed)
            raise


def _up(args: argparse.Namespace, paths: Paths, bins: dict[str, Path]) -> int:
    t0 = time.monotonic()
    ports = pick_ports(
        ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"],
        {"apiserver": args.apiserver_port},
    )
    for d in (paths.logs, paths.config, paths.etcd_data):
        d.mkdir(parents=True, exist_ok=True)
    paths.etcd_data.chmod(0o700)
    procs: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {
        "service_cidr": LAYOUT.service_cidr(),
        "ports": ports,
        "procs": procs,
        "bin_dirs": sorted({str(b.parent) for b in bins.values()}),
    }
    write_state(paths, state)
    make_pki(paths.pki)
    pki = paths.pki

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    start(
        "etcd",
        bins["etcd"],
        [
            "--name=kiri",
            f"--data-dir={paths.etcd_data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kiri={peer_url}",
            "--listen-metrics-urls=",
            # A throwaway test store: fsync buys durability we do not need and costs most of the write latency.
            "--unsafe-no-fsync=true",
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        paths,
        procs,
        state,
    )

    def etcd_ok() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", ports["etcd"], timeout=2)
            conn.request("GET", "/health")
            return b'"true"' in conn.getresponse().read()
        except OSError:
            return False

    wait_until("etcd", etcd_ok, 30, procs, paths)

    start(
        "kube-apiserver",
        bins["kube-apiserver"],
        [
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            # Per state dir (172.<16-31>.64.0/19), so the ClusterIPs two clusters' real nodes route from
            # this host never overlap; the `kubernetes` Service's endpoint is the host address real nodes
            # reach the API server by (hack/tcpproxy.py there). Without real nodes nothing listens there,
            # which is still better than the default: the machine's external address.
            f"--service-cluster-ip-range={LAYOUT.service_cidr()}",
            f"--advertise-address={LAYOUT.svc_ip()}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            # One local admin and a handful of tests: flow control would only slow bulk node creation.
            "--enable-priority-and-fairness=false",
            "--max-requests-inflight=0",
            "--max-mutating-requests-inflight=0",
            "--profiling=false",
            # How it authenticates to real kubelets (logs, exec): the admin identity, system:masters.
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            # Dial kubelets at their InternalIP: the default tries the node name first, a DNS lookup that
            # would leave the machine.
            "--kubelet-preferred-address-types=InternalIP",
            "--v=0",
        ],
        paths,
        procs,
        state,
    )
    api = Api(pki, ports["apiserver"])
    wait_until("kube-apiserver /readyz", lambda: api.ok("/readyz"), 90, procs, paths)
    write_kubeconfig(paths.kubeconfig, pki, ports["apiserver"])
    kc = str(paths.kubeconfig)

    start(
        "kube-controller-manager",
        bins["kube-controller-manager"],
        [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller-manager']}",
            "--leader-elect=false",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--use-service-account-credentials=true",
            # Node lifecycle: notice a silent node within ~a lease, check often.
            "--node-monitor-period=2s",
            f"--node-monitor-grace-period={NODE_LEASE_SECONDS + 20}s",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--concurrent-daemonset-syncs=4",
            "--v=0",
        ],
        paths,
        procs,
        state,
    )
    sched_cfg = paths.config / "kube-scheduler.yaml"
    sched_cfg.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": kc, "qps": 500, "burst": 1000},
                "leaderElection": {"leaderElect": False},
            }
        )
    )
    start(
        "kube-scheduler",
        bins["kube-scheduler"],
        [
            f"--config={sched_cfg}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            "--v=0",
        ],
        paths,
        procs,
        state,
    )
    kwok_cfg = paths.config / "kwok.yaml"
    write_kwok_config(kwok_cfg, kiri_stages(kwok_module_dir()))
    start(
        "kwok",
        bins["kwok"],
        [
            f"--kubeconfig={kc}",
            f"--config={kwok_cfg}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            "--v=INFO",
        ],
        paths,
        procs,
        state,
    )

    # Pods cannot be created in a namespace before its default ServiceAccount exists; waiting for it here
    # also proves the controller manager works.
    wait_until(
        "kube-controller-manager (default ServiceAccount)",
        lambda: api.ok("/api/v1/namespaces/default/serviceaccounts/default"),
        60,
        procs,
        paths,
    )
    cloud, edge, sites = fleet_counts(args, None)
    state.update(started_at=time.time(), fleet=[cloud, edge, sites])
    write_state(paths, state)
    sync_fleet(api, cloud, edge, sites, args.timeout)
    sync_real_nodes(api, paths, state, args.real_nodes or 0, args.timeout)
    log(f"up in {time.monotonic() - t0:.1f}s: kube-apiserver https://127.0.0.1:{ports['apiserver']}")
    log(f'kubeconfig: {paths.kubeconfig}   (eval "$(hack/cluster env)")')
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    paths = Paths(STATE_DIR)
    if not paths.root.exists():
        stop_pids(orphans({}))
        realnodes.teardown(realnodes.Layout(STATE_DIR), None)  # namespaces and veths are found by name
        log("not running")
        return 0
    with locked(paths):
        state = read_state(paths)
        clean(paths, state)
        shutil.rmtree(paths.logs, ignore_errors=True)
    log("down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    paths = Paths(STATE_DIR)
    state = read_state(paths)
    if state is None:
        print("not running")
        return 1
    ok, problems = healthy(paths, state)
    for name, p in state.get("procs", {}).items():
        alive = "running" if is_ours(p["pid"], p["binary"]) else "DEAD"
        print(f"{name:24} pid {p['pid']:<8} {alive}")
    print(f"kube-apiserver           https://127.0.0.1:{state['ports']['apiserver']}")
    print(f"kubeconfig               {paths.kubeconfig}")
    if ok:
        api = Api(paths.pki, state["ports"]["apiserver"])
        _, body = api.request("GET", "/api/v1/nodes?labelSelector=kiri.dev%2Ftier")
        tiers: dict[str, list[int]] = {}
        for n in body["items"]:
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            labels = n["metadata"]["labels"]
            if labels.get(realnodes.REAL_LABEL) == "real":
                ready = "Ready" if conds.get("Ready") == "True" else "NotReady"
                addr = next(
                    (a["address"] for a in n["status"].get("addresses", []) if a["type"] == "InternalIP"), "-"
                )
                print(f"{n['metadata']['name'] + ' (real)':24} {ready}, InternalIP {addr}, kubelet "
                      f"{n['status'].get('nodeInfo', {}).get('kubeletVersion', '?')}, "
                      f"{n['status'].get('nodeInfo', {}).get('containerRuntimeVersion', '?')}")  # fmt: skip
                continue
            t = tiers.setdefault(labels["kiri.dev/tier"], [0, 0])
            t[0] += 1
            t[1] += conds.get("Ready") == "True"
        for tier, (total, n_ready) in sorted(tiers.items()):
            print(f"{tier + ' nodes':24} {n_ready}/{total} Ready (kwok)")
        print("healthy")
        return 0
    print("unhealthy: " + "; ".join(problems))
    return 1


def cmd_env(args: argparse.Namespace) -> int:
    paths = Paths(STATE_DIR)
    state = read_state(paths)
    dirs = state.get("bin_dirs") if state else None
    if not dirs:
        dirs = [str(d) for d in bin_dirs()]
    if args.json:
        print(json.dumps({"KUBECONFIG": str(paths.kubeconfig), "bin_dirs": dirs}))
    else:
        print(f"export KUBECONFIG='{paths.kubeconfig}'")
        print(f"export PATH='{':'.join(dirs)}':\"$PATH\"")
    return 0


def _ready_status(api: Api, name: str) -> str | None:
    status, body = api.request("GET", f"/api/v1/nodes/{name}")
    if status != 200:
        msg = body.get("message") if isinstance(body, dict) else body
        raise ClusterError(f"node {name}: {msg}")
    for cond in body.get("status", {}).get("conditions", []):
        if cond["type"] == "Ready":
            return str(cond["status"])
    return None


def _patch(api: Api, path: str, patch: dict[str, Any]) -> tuple[int, Any]:
    return api.request("PATCH", path, patch, content_type="application/merge-patch+json")


RESYNC_ANNOTATION = "kiri.dev/sim-resync"


LIFECYCLE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def _lifecycle_taints(api: Api, name: str) -> list[str]:
    status, body = api.request("GET", f"/api/v1/nodes/{name}")
    if status != 200:
        raise ClusterError(f"node {name}: {body.get('message') if isinstance(body, dict) else body}")
    return [t["key"] for t in body.get("spec", {}).get("taints") or [] if t.get("key") in LIFECYCLE_TAINTS]


def _resync_pods_on_return(api: Api, name: str) -> None:
    """Once the node is Ready again, touch every pod bound to it, as a returning kubelet resyncs its pods.

    kwok v0.8.0 replays a node's pods the moment it takes the lease back, but it decides "is this node
    mine?" from its lease cache, which can still hold the offline holder at that instant: the pods are
    then skipped and nothing replays them (a pod bound while the node was away stayed Pending for good,
    about one run in ten). Ready=True is posted by kwok only once its cache says it holds the node, so a
    pod event sent after that is always acted on.
    """
    deadline = time.monotonic() + NODE_LEASE_SECONDS
    while _ready_status(api, name) != "True":
        if time.monotonic() > deadline:
            raise ClusterError(f"node {name} not Ready {NODE_LEASE_SECONDS}s after node-online; see kwok.log")
        time.sleep(0.2)
    # The node lifecycle controller lifts its not-ready/unreachable taints a few seconds after Ready; until then
    # the DaemonSet controller and the scheduler leave the node alone, so the node is not back before that.
    while _lifecycle_taints(api, name):
        if time.monotonic() > deadline:
            raise ClusterError(f"node {name} still tainted {_lifecycle_taints(api, name)} after node-online")
        time.sleep(0.2)
    status, body = api.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{name}")
    if status != 200:
        raise ClusterError(f"pods on node {name}: {body.get('message') if isinstance(body, dict) else body}")
    stamp = datetime.datetime.now(datetime.UTC).isoformat()
    for pod in body.get("items", []):
        meta = pod["metadata"]
        status, body = _patch(
            api,
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
            {"metadata": {"annotations": {RESYNC_ANNOTATION: stamp}}},
        )
        if status not in (200, 404):  # a pod deleted meanwhile needs no resync
            raise ClusterError(f"pod {meta['namespace']}/{meta['name']}: {body}")


def cmd_node(args: argparse.Namespace) -> int:
    """Take a node offline the way an edge node is lost: its kubelet reports NotReady, then goes silent.

    1. The offline annotation makes kwok's kiri-node-offline stage post Ready=False (NotReady at once).
    2. The node's Lease is handed to another holder that never renews it. kwok treats a node whose lease it
       does not hold as someone else's and stops acting for it and its pods (new pods there stay Pending,
       deleted ones stay Terminating), and the real node lifecycle controller sees the lease go stale
       (Ready=Unknown after its grace period), exactly as for a kubelet that lost its network.
    Online reverses both; kwok takes the lease back at its next renewal (within NODE_LEASE_SECONDS / 4).
    """
    paths = Paths(STATE_DIR)
    state = read_state(paths)
    if state is None:
        raise ClusterError("the cluster is not running (hack/cluster up)")
    api = Api(paths.pki, state["ports"]["apiserver"])
    name = args.name
    offline = args.command == "node-offline"
    _ready_status(api, name)  # a clear error for an unknown node
    status, body = _patch(
        api,
        f"/api/v1/nodes/{name}",
        {"metadata": {"annotations": {OFFLINE_ANNOTATION: "true" if offline else None}}},
    )
    if status != 200:
        raise ClusterError(f"node {name}: {body.get('message') if isinstance(body, dict) else body}")
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
    if offline:
        deadline = time.monotonic() + 30
        while _ready_status(api, name) == "True":
            if time.monotonic() > deadline:
                raise ClusterError(f"node {name} still Ready 30s after the offline annotation; see kwok.log")
            time.sleep(0.2)
        # renewTime stays as kwok last wrote it: the lease is silent from that moment on.
        status, body = _patch(
            api, lease_path, {"spec": {"holderIdentity": OFFLINE_LEASE_HOLDER, "leaseDurationSeconds": 10**9}}
        )
        if status == 404:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": OFFLINE_LEASE_HOLDER, "leaseDurationSeconds": 10**9},
            }
            status, body = api.request("POST", lease_path.rsplit("/", 1)[0], lease)
    else:
        status, body = _patch(
            api, lease_path, {"spec": {"holderIdentity": None, "leaseDurationSeconds": NODE_LEASE_SECONDS}}
        )
        if status == 404:
            status = 200  # kwok creates it
    if status >= 300:
        raise ClusterError(f"lease of node {name}: {body.get('message') if isinstance(body, dict) else body}")
    if not offline:
        _resync_pods_on_return(api, name)
    log(f"{name}: {'offline (NotReady)' if offline else 'online (Ready, its pods resynced)'}")
    return 0


RESTARTABLE = {"apiserver": "kube-apiserver", "etcd": "etcd"}


def cmd_restart(args: argparse.Namespace) -> int:
    """Stop one control-plane process and start it again with the same command line (fault tests: an API
    server or etcd restart mid-rollout). Returns once it answers its health check again."""
    paths = Paths(STATE_DIR)
    name = RESTARTABLE[args.component]
    with locked(paths):
        state = read_state(paths)
        if state is None:
            raise ClusterError("no cluster: run hack/cluster up")
        procs = state["procs"]
        entry = procs.get(name)
        if entry is None or not is_ours(int(entry["pid"]), entry["binary"]):
            raise ClusterError(f"{name} is not running")
        argv = cmdline(int(entry["pid"]))
        stop_pids({name: entry})
        start(name, Path(argv[0]), argv[1:], paths, procs, state)
        if name == "etcd":
            port = state["ports"]["etcd"]

            def ok() -> bool:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    return b'"true"' in conn.getresponse().read()
                except OSError:
                    return False

            wait_until("etcd", ok, 60, procs, paths)
        api = Api(paths.pki, state["ports"]["apiserver"])
        wait_until("kube-apiserver /readyz", lambda: api.ok("/readyz"), 90, procs, paths)
    log(f"{name} restarted (pid {procs[name]['pid']})")
    return 0


def cmd_check_host(args: argparse.Namespace) -> int:
    """Whether this host can run real nodes: one line either way (make test runs it before any build)."""
    try:
        host = realnodes.check_host()
    except realnodes.RealNodeError as exc:
        raise ClusterError(
            f"{exc}. The real-node e2e is part of `make test`; on a host that cannot run it, leave it out "
            "by name: `make test KIRI_REAL_NODES=0` (pytest: KIRI_REAL_NODES=0 or -m 'not real_nodes')"
        ) from None
    notes = ["cgroup v1" if host["cgroup_v1"] else "cgroup v2"]
    if not host["negative_oom_score_adj"]:
        notes.append("negative oom_score_adj forbidden (containerd restricts it)")
    print(f"hack/cluster check-host: this host can run real nodes ({', '.join(notes)})")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # A `timeout` or a killed test run must still stop what `up` started (KeyboardInterrupt unwinds it).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    parser = argparse.ArgumentParser(
        prog="hack/cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane (idempotent) and create the simulated fleet")
    # No count flags on a running cluster: keep its fleet as it is (a benchmark may have scaled it).
    up.add_argument("--cloud-nodes", type=int, help=f"cloud GPU nodes (default {DEFAULT_FLEET[0]})")
    up.add_argument("--edge-nodes", type=int, help=f"edge nodes (default {DEFAULT_FLEET[1]})")
    up.add_argument("--sites", type=int, help=f"edge sites, site-a, site-b, ... (default {DEFAULT_FLEET[2]})")
    up.add_argument(
        "--real-nodes",
        type=int,
        help="real kubelet + containerd nodes beside the kwok fleet (default 0; see hack/README.md)",
    )
    up.add_argument("--apiserver-port", type=int, default=0, help="kube-apiserver port (default: a free one)")
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait for the nodes to be Ready")
    up.set_defaults(handler=cmd_up)
    sub.add_parser("down", help="stop every process `up` started and remove the state").set_defaults(
        handler=cmd_down
    )
    sub.add_parser("status", help="show processes and node readiness").set_defaults(handler=cmd_status)
    env = sub.add_parser("env", help="print shell exports (KUBECONFIG, PATH) for eval")
    env.add_argument("--json", action="store_true")
    env.set_defaults(handler=cmd_env)
    for name in ("node-offline", "node-online"):
        p = sub.add_parser(name, help=f"take a simulated node {name.split('-')[1]}")
        p.add_argument("name")
        p.set_defaults(handler=cmd_node)
    sub.add_parser(
        "check-host", help="say whether this host can run real nodes (root, namespaces, cgroups, overlayfs)"
    ).set_defaults(handler=cmd_check_host)
    restart = sub.add_parser("restart", help="restart kube-apiserver or etcd (fault tests)")
    restart.add_argument("component", choices=sorted(RESTARTABLE))
    restart.set_defaults(handler=cmd_restart)
    args = parser.parse_args(argv)
    for flag in ("cloud_nodes", "edge_nodes", "sites", "real_nodes"):
        if (getattr(args, flag, 0) or 0) < 0:
            parser.error(f"--{flag.replace('_', '-')} must not be negative")
    try:
        rc: int = args.handler(args)
    except ClusterError as exc:
        print(f"hack/cluster {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
