"""The real nodes of `make demo` (hack/demo.sh, through hack/demo.py): real kubelets beside the kwok fleet.

    python hack/demo.py real-setup [--system-namespace NS]
    python hack/demo.py real-infer --namespace NS --name MD --requests FILE
    python hack/demo.py lm-tiers --namespace NS --name MD

`hack/cluster up --real-nodes 2` joins `kiri-real-0` and `kiri-real-1`, both labelled as edge nodes of the site
`site-real` and tainted `kiri.dev/node-kind=real:NoSchedule` (hack/README.md). `real-setup` makes the first the one
node of the edge site `lab`, which sorts before `site-a`, so it is the canary site of every rollout grouped by zone,
and the second a cloud node (tier cloud, no site); it then installs the chart's node-cache CSI driver on the real
edge node (edge pods mount their cache through it), as tests/e2e/test_real_node_cache.py does. `lm-tiers` finds
the generative act's two tiers, the operator's own pods, on the two real nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("KIRI_STATE_DIR") or REPO_ROOT / ".kiri").resolve()
REAL_EDGE, REAL_CLOUD = "kiri-real-0", "kiri-real-1"
REAL_SITE = "lab"  # sorts before site-a: the canary site of a rollout grouped by zone
REAL_TOLERATION = {"key": "kiri.dev/node-kind", "operator": "Equal", "value": "real", "effect": "NoSchedule"}
CSI_DRIVER = "cache.kiri.dev"


def _run(*cmd: str, timeout: float = 120, stdin: str | None = None) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def kubectl_json(*args: str) -> Any:
    return json.loads(_run("kubectl", *args, "-o", "json", timeout=30))


def real_nodes() -> list[dict[str, Any]]:
    return list(kubectl_json("get", "nodes", "-l", "kiri.dev/node-kind=real")["items"])


def _shared(path: Path) -> None:
    """Make `path` a shared mount point: the CSI driver's mounts (Bidirectional) must reach the kubelet's view."""
    path.mkdir(parents=True, exist_ok=True)
    points = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    if str(path) not in points:
        _run("mount", "--rbind", str(path), str(path))
    _run("mount", "--make-rshared", str(path))


def helm_binary() -> str:
    """The helm that hack/build-binaries.sh built (the cluster's PATH has the control plane's binaries only)."""
    dirs = _run("bash", str(REPO_ROOT / "hack" / "build-binaries.sh"), "--print-bin-dirs").split()
    for d in dirs:
        if (Path(d) / "helm").is_file():
            return str(Path(d) / "helm")
    raise RuntimeError(f"no helm in {dirs}: run `make binaries`")


def cmd_real_setup(args: argparse.Namespace) -> int:
    names = {n["metadata"]["name"] for n in real_nodes()}
    if REAL_EDGE not in names:
        print(f"  no real node {REAL_EDGE}", file=sys.stderr)
        return 1
    site = f"kiri.dev/site={REAL_SITE}"
    _run(
        "kubectl", "label", "node", REAL_EDGE, "--overwrite", site, f"topology.kubernetes.io/zone={REAL_SITE}"
    )
    if REAL_CLOUD in names:
        _run("kubectl", "label", "node", REAL_CLOUD, "--overwrite", "kiri.dev/tier=cloud", "kiri.dev/site-",
             "topology.kubernetes.io/zone-")  # fmt: skip

    # The chart's node-cache CSI driver, rendered for the real edge node (its own kubelet root and cache root).
    ns = args.system_namespace
    manifest = _run("kubectl", "create", "namespace", ns, "--dry-run=client", "-o", "yaml")
    _run("kubectl", "apply", "-f", "-", stdin=manifest)
    _run("kubectl", "label", "namespace", ns, "--overwrite", "pod-security.kubernetes.io/enforce=privileged")
    node_dir = STATE_DIR / "nodes" / REAL_EDGE
    kubelet_root, cache_root = node_dir / "kubelet" / "root", node_dir / "kiri-cache"
    _shared(kubelet_root)
    _shared(cache_root)
    values = {
        "edgeCache": {
            "root": str(cache_root),
            "kubeletDir": str(kubelet_root),
            "image": {"pullPolicy": "Never"},
            "nodeSelector": {"kubernetes.io/hostname": REAL_EDGE},
            "tolerations": [REAL_TOLERATION],
        }
    }
    values_file = Path(args.work) / "csi-values.yaml"
    values_file.parent.mkdir(parents=True, exist_ok=True)
    values_file.write_text(json.dumps(values))
    home = Path(args.work) / "helm-home"
    env = {
        **os.environ,
        **{
            v: str(home / s)
            for v, s in (("HELM_CACHE_HOME", "c"), ("HELM_CONFIG_HOME", "f"), ("HELM_DATA_HOME", "d"))
        },
    }
    rendered = subprocess.run(
        [helm_binary(), "template", "demo-csi", str(REPO_ROOT / "helm" / "kiri"), "--namespace", ns, "-f", str(values_file),
         "--show-only", "templates/cache-csi.yaml"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    if rendered.returncode != 0:
        print(f"  helm template failed: {rendered.stderr.strip()}", file=sys.stderr)
        return 1
    _run("kubectl", "apply", "-n", ns, "-f", "-", stdin=rendered.stdout)
    deadline = time.monotonic() + args.timeout
    while True:
        csinode = kubectl_json("get", "csinode", REAL_EDGE)
        if CSI_DRIVER in [d["name"] for d in csinode.get("spec", {}).get("drivers") or []]:
            break
        if time.monotonic() > deadline:
            pods = _run("kubectl", "get", "pods", "-n", ns, "-o", "wide")
            print(
                f"  {CSI_DRIVER} not registered on {REAL_EDGE} after {args.timeout}s:\n{pods}",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)
    print(f"  {REAL_EDGE}: edge site '{REAL_SITE}' (the canary site: it sorts first), node cache driver "
          f"{CSI_DRIVER} registered" + (f"; {REAL_CLOUD}: cloud tier" if REAL_CLOUD in names else ""))  # fmt: skip
    return 0


def ready_pod(namespace: str, name: str, component: str, node: str) -> dict[str, Any] | None:
    """A Ready pod of the ModelDeployment's `component` (edge or cloud) on `node`, or None."""
    sel = f"kiri.dev/modeldeployment={name},app.kubernetes.io/component={component}"
    for pod in kubectl_json("get", "pods", "-n", namespace, "-l", sel)["items"]:
        if pod["spec"].get("nodeName") != node or pod["metadata"].get("deletionTimestamp"):
            continue
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        ):
            return dict(pod)
    return None


def cmd_real_infer(
    args: argparse.Namespace, record: Callable[[str, Any], None], table: Callable[..., str]
) -> int:
    """The confident requests of the demo's request file, sent to the edge pod on the real edge node."""
    import httpx
    import numpy as np

    deadline = time.monotonic() + args.timeout
    while (pod := ready_pod(args.namespace, args.name, "edge", REAL_EDGE)) is None:
        if time.monotonic() > deadline:
            print(f"  no Ready edge pod of {args.name} on {REAL_EDGE} after {args.timeout}s", file=sys.stderr)
            return 1
        time.sleep(1)
    ip = pod["status"]["podIP"]
    (container,) = pod["status"]["containerStatuses"]
    print(f"  pod {pod['metadata']['name']} on {REAL_EDGE}: {container['containerID'][:25]}..., "
          f"image {container['image']}, revision {pod['metadata']['labels'].get('kiri.dev/revision', '?')[:10]}, "
          f"pod IP {ip}")  # fmt: skip
    data = np.load(args.requests)
    rows, tiers = [], {}
    with httpx.Client(base_url=f"http://{ip}:8080", timeout=30) as client:
        for i, (x, kind) in enumerate(zip(data["x"], data["kind"], strict=True)):
            if str(kind) != "near":
                continue
            body = {
                "inputs": [{"name": "input", "shape": [1, x.size], "datatype": "FP32", "data": x.tolist()}]
            }
            meta = client.get(f"/v2/models/{args.model}").json()
            body["inputs"][0]["name"] = meta["inputs"][0]["name"]
            started = time.perf_counter()
            resp = client.post(f"/v2/models/{args.model}/infer", json=body)
            ms = (time.perf_counter() - started) * 1000
            if resp.status_code != 200:
                print(f"  request {i}: HTTP {resp.status_code} {resp.text[:200]}", file=sys.stderr)
                return 1
            out = resp.json()
            scores = np.asarray(out["outputs"][0]["data"], dtype=np.float64)
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            tier = out.get("parameters", {}).get("kiri_tier", "?")
            tiers[tier] = tiers.get(tier, 0) + 1
            rows.append(
                [i, str(kind), int(probs.argmax()), f"{probs.max():.2f}", tier, REAL_EDGE, f"{ms:.1f}"]
            )
    print(table(["REQ", "INPUT", "CLASS", "CONFIDENCE", "ANSWERED BY", "NODE", "MS"], rows))
    record("real-inference", {"node": REAL_EDGE, "pod": pod["metadata"]["name"], "requests": len(rows),
                              "tiers": tiers})  # fmt: skip
    if tiers != {"edge": len(rows)}:
        print(f"  expected every confident request answered at the edge, got {tiers}", file=sys.stderr)
        return 1
    return 0


def damage_variant(manifest_dir: Path, variant: str) -> None:
    """Flip bytes of a variant `kiri compress` wrote, before it is published: a damaged upload, which the edge
    runtime must refuse (its sha256 no longer matches the manifest's)."""
    import hashlib

    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    entry = next(v for v in manifest["variants"] if v["name"] == variant)
    path = manifest_dir / entry["uri"]
    blob = bytearray(path.read_bytes())
    for i in range(0, len(blob), 97):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    now = hashlib.sha256(blob).hexdigest()
    print(f"    damaged {path.name} in the store: every 97th byte flipped, sha256 now {now[:12]}..., the manifest "
          f"says {entry['sha256'][:12]}...")  # fmt: skip


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def cmd_lm_tiers(args: argparse.Namespace) -> int:
    """The chat model's two tiers as the operator made them: the pod of its edge DaemonSet on the real edge node
    (the int4 variant, `kiri serve --collaboration ...` with the cloud Service as its cloud tier) and the pod of
    its cloud Deployment on the real cloud node (the Job's fp32 pack), both Ready, and the Service's endpoint
    the cloud pod. Prints what it found (stderr) and the edge pod's URL last (stdout)."""
    ns, name = args.namespace, args.name
    deadline = time.monotonic() + args.timeout
    while True:
        edge = ready_pod(ns, name, "edge", REAL_EDGE)
        cloud = ready_pod(ns, name, "cloud", REAL_CLOUD)
        if edge is not None and cloud is not None:
            break
        if time.monotonic() > deadline:
            missing = [f"{t} pod on {n}" for t, n, p in (("edge", REAL_EDGE, edge), ("cloud", REAL_CLOUD, cloud))
                       if p is None]  # fmt: skip
            pods = _run(
                "kubectl", "get", "pods", "-n", ns, "-l", f"kiri.dev/modeldeployment={name}", "-o", "wide"
            )
            print(
                f"  no Ready {' or '.join(missing)} of {name} after {args.timeout}s:\n{pods}", file=sys.stderr
            )
            return 1
        time.sleep(1)
    service = f"{name}-cloud"
    (edge_c,) = edge["spec"]["containers"]
    (cloud_c,) = cloud["spec"]["containers"]
    fallback = _flag(edge_c["args"], "--fallback-url") or ""
    mode = _flag(edge_c["args"], "--collaboration")
    endpoints = kubectl_json("get", "endpoints", service, "-n", ns)
    ips = [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses") or []]
    problems = []
    if not fallback.startswith(f"http://{service}.{ns}.svc:"):
        problems.append(f"the edge pod's cloud tier is {fallback or 'unset'}, not Service {service}")
    if mode is None:
        problems.append("the edge pod runs no collaboration mode (spec.edge.collaboration unset?)")
    if cloud["status"]["podIP"] not in ips:
        problems.append(
            f"Service {service} has endpoints {ips}, not the cloud pod {cloud['status']['podIP']}"
        )
    if problems:
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    for tier, pod, c in (("edge", edge, edge_c), ("cloud", cloud, cloud_c)):
        owner = (pod["metadata"].get("ownerReferences") or [{}])[0]
        (status,) = pod["status"]["containerStatuses"]
        variant = pod["metadata"]["labels"].get("kiri.dev/variant") or _flag(c["args"], "--variant")
        print(f"  {tier}: pod {pod['metadata']['name']} ({owner.get('kind', '?')} {owner.get('name', '?')}) on "
              f"{pod['spec']['nodeName']}, variant {variant}, {status['containerID'][:25]}..., pod IP "
              f"{pod['status']['podIP']}", file=sys.stderr)  # fmt: skip
    threshold = _flag(edge_c["args"], "--cascade-threshold")
    print(f"  the edge pod's kiri serve: --collaboration {mode}"
          + (f" --cascade-threshold {threshold}" if threshold else "")
          + f" --fallback-url {fallback} (Service {service} -> {', '.join(ips)})", file=sys.stderr)  # fmt: skip
    print(f"http://{edge['status']['podIP']}:{edge_c['ports'][0]['containerPort']}")
    return 0


def register(sub: Any, record: Callable[[str, Any], None], table: Callable[..., str]) -> None:
    p = sub.add_parser("real-setup")
    p.add_argument("--system-namespace", default="kiri-demo-system")
    p.add_argument("--work", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(fn=cmd_real_setup)
    p = sub.add_parser("real-infer")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(fn=lambda a: cmd_real_infer(a, record, table))
    p = sub.add_parser("lm-tiers")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(fn=cmd_lm_tiers)
