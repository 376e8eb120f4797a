"""The real nodes of `make demo` (hack/demo.sh, through hack/demo.py): real kubelets beside the kwok fleet.

    python hack/demo.py real-setup [--system-namespace NS]
    python hack/demo.py real-infer --namespace NS --name MD --requests FILE

`hack/cluster up --real-nodes 2` joins `kiri-real-0` and `kiri-real-1`, both labelled as edge nodes of the site
`site-real` and tainted `kiri.dev/node-kind=real:NoSchedule` (hack/README.md). `real-setup` makes the first the one
node of the edge site `lab`, which sorts before `site-a`, so it is the canary site of every rollout grouped by zone,
and the second a cloud node (tier cloud, no site); it then installs the chart's node-cache CSI driver on the real
edge node (edge pods mount their cache through it), as tests/e2e/test_real_node_cache.py does.
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


def real_edge_pod(namespace: str, name: str) -> dict[str, Any] | None:
    sel = f"kiri.dev/modeldeployment={name},app.kubernetes.io/component=edge"
    for pod in kubectl_json("get", "pods", "-n", namespace, "-l", sel)["items"]:
        if pod["spec"].get("nodeName") != REAL_EDGE or pod["metadata"].get("deletionTimestamp"):
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
    while (pod := real_edge_pod(args.namespace, args.name)) is None:
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


RUNTIME_IMAGE = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"  # hack/images.py RUNTIME_REF
RUNTIME_UID = 65532


def serve_pod(namespace: str, name: str, node: str, args: list[str]) -> dict[str, Any]:
    """A pod of `kiri serve` on one real node, with the security context the operator gives its runtimes."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": name,
                                                                       "app.kubernetes.io/part-of": "kiri-demo"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [REAL_TOLERATION],
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                                "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "kiri-serve",
                    "image": RUNTIME_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["kiri"],
                    "args": ["serve", *args, "--host", "0.0.0.0", "--port", "8080", "--threads", "1",
                             "--cache-dir", "/var/cache/kiri"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                            {"name": "POD_NAMESPACE", "value": namespace}],
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                    "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}, "periodSeconds": 1},
                    "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/kiri"},
                                     {"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        },
    }  # fmt: skip


def cmd_lm_pods(args: argparse.Namespace) -> int:
    """The chat model's two tiers as pods on the real nodes: the fp32 build on the real cloud node behind a Service,
    the int4 variant on the real edge node in cascade mode, its cloud tier that Service by name. Both fetch their
    model from the store over HTTP (`--store-url`, a host server on the cluster's host address) and check its
    sha256. Prints the edge pod's URL last."""
    manifest = json.loads((Path(args.manifest_dir) / "manifest.json").read_text())
    rel = Path(args.manifest_dir).resolve().relative_to(Path(args.store_root).resolve())
    base = f"{args.store_url.rstrip('/')}/{rel.as_posix()}"
    int4 = next(v for v in manifest["variants"] if v["name"] == args.variant)
    # Not `<name>-cloud`: that is the operator's own cloud Service of the ModelDeployment.
    cloud, edge, ns = f"{args.name}-collab-cloud", f"{args.name}-collab-edge", args.namespace
    common = ["--name", args.name, "--model-version", args.version]
    objs: list[dict[str, Any]] = [
        serve_pod(ns, cloud, REAL_CLOUD, [*common, "--model-uri", f"{base}/{manifest['model']['uri']}",
                                          "--sha256", manifest["model"]["onnxSha256"], "--variant", "full"]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": cloud, "namespace": ns},
         "spec": {"selector": {"app.kubernetes.io/name": cloud}, "ports": [{"name": "http", "port": 8080}]}},
        serve_pod(ns, edge, REAL_EDGE, [*common, "--model-uri", f"{base}/{int4['uri']}", "--sha256", int4["sha256"],
                                        "--variant", args.variant,
                                        "--fallback-url", f"http://{cloud}.{ns}.svc:8080", "--collaboration",
                                        "cascade", "--cascade-threshold", str(args.threshold)]),
    ]  # fmt: skip
    for obj in objs:
        if obj["kind"] == "Pod":
            _run(
                "kubectl",
                "delete",
                "pod",
                obj["metadata"]["name"],
                "-n",
                ns,
                "--ignore-not-found",
                "--wait=true",
            )
    _run("kubectl", "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    started = time.monotonic()
    pods: dict[str, dict[str, Any]] = {}
    while len(pods) < 2:
        for name in (cloud, edge):
            pod = kubectl_json("get", "pod", name, "-n", ns)
            conds = pod.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                pods[name] = pod
        if time.monotonic() - started > args.timeout:
            detail = _run("kubectl", "describe", "pods", "-n", ns, cloud, edge)
            print(f"  chat pods not Ready after {args.timeout}s:\n{detail[-3000:]}", file=sys.stderr)
            return 1
        time.sleep(1)
    for name, pod in pods.items():
        (status,) = pod["status"]["containerStatuses"]
        print(f"  pod {name} on {pod['spec']['nodeName']}: Ready {time.monotonic() - started:.0f}s after apply, "
              f"{status['containerID'][:25]}..., pod IP {pod['status']['podIP']}", file=sys.stderr)  # fmt: skip
    print(f"http://{pods[edge]['status']['podIP']}:8080")
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
    p = sub.add_parser("lm-pods")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--manifest-dir", required=True)
    p.add_argument("--variant", default="int4")
    p.add_argument("--store-root", required=True, help="the host directory --store-url serves")
    p.add_argument("--store-url", required=True)
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--timeout", type=float, default=180)
    p.set_defaults(fn=cmd_lm_pods)
