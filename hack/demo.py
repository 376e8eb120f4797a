"""The parts of `make demo` (hack/demo.sh) that are easier in Python: the model, the live views, the
inference calls and the summary table.

    python hack/demo.py fleet
    python hack/demo.py build-model --out DIR --version V --seed S
    python hack/demo.py variants --manifest DIR [--label v1]
    python hack/demo.py run-job --namespace NS --name MD [--label v1]
    python hack/demo.py watch --namespace NS --name MD --until Healthy[,RolledBack] [--timeout S]
    python hack/demo.py infer --url URL --model NAME --requests FILE
    python hack/demo.py summary
    python hack/demo.py lm-build | chat          (hack/demo_lm.py: the generative act)
    python hack/demo.py real-setup | real-infer   (hack/demo_real.py: real nodes)

Every number printed comes from a real run (the trained model, `kiri compress`, `kiri serve`, the
cluster's objects); the steps record what they saw in $DEMO_DIR/summary.json for the closing table.
Each command exits non-zero on failure so the shell script stops there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import demo_lm
import demo_real

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = Path(os.environ.get("DEMO_DIR") or REPO_ROOT / ".kiri" / "demo")
SUMMARY = DEMO_DIR / "summary.json"

FEATURES = 16
CLASSES = 4
REAL_LABEL = (
    "kiri.dev/node-kind"  # hack/realnodes.py: `real` on the kubelets of `hack/cluster up --real-nodes`
)

# ---- output helpers ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line for line in lines)


def record(section: str, value: Any) -> None:
    data = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    data[section] = value
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    tmp = SUMMARY.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(SUMMARY)


def kubectl_json(*args: str) -> Any:
    proc = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


# ---- fleet ------------------------------------------------------------------------------------------


def _ready(obj: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in obj.get("status", {}).get("conditions", [])
    )


def cmd_fleet(args: argparse.Namespace) -> int:
    nodes = kubectl_json("get", "nodes", "-l", "kiri.dev/tier")["items"]
    rows = []
    for n in sorted(
        nodes, key=lambda n: (n["metadata"]["labels"].get("kiri.dev/tier", ""), n["metadata"]["name"])
    ):
        labels = n["metadata"]["labels"]
        alloc = n["status"].get("allocatable", {})
        taints = ",".join(
            f"{t['key']}:{t['effect']}"
            for t in n["spec"].get("taints", [])
            if "kiri" in t["key"] or "gpu" in t["key"]
        )
        rows.append(
            [
                n["metadata"]["name"],
                "real" if labels.get(REAL_LABEL) == "real" else "kwok",
                labels.get("kiri.dev/tier", "-"),
                labels.get("topology.kubernetes.io/zone", "-"),
                labels.get("kiri.dev/accelerator", "-"),
                labels.get("kubernetes.io/arch", "-"),
                alloc.get("memory", "-"),
                alloc.get("nvidia.com/gpu", "-"),
                taints or "-",
                "Ready" if _ready(n) else "NotReady",
            ]
        )
    print(
        table(["NODE", "KIND", "TIER", "ZONE", "ACCEL", "ARCH", "MEMORY", "GPUS", "TAINTS", "STATUS"], rows)
    )
    real = [n for n in nodes if n["metadata"]["labels"].get(REAL_LABEL) == "real"]
    for n in real:
        info = n["status"].get("nodeInfo", {})
        addr = next(
            (a["address"] for a in n["status"].get("addresses", []) if a["type"] == "InternalIP"), "-"
        )
        print(f"  real node {n['metadata']['name']}: kubelet {info.get('kubeletVersion', '?')}, "
              f"{info.get('containerRuntimeVersion', '?')}, InternalIP {addr} (its own network namespace)")  # fmt: skip
    if real:
        print(f"  real nodes: {', '.join(n['metadata']['name'] for n in real)}; every other node is simulated by "
              "kwok (runs no containers)")  # fmt: skip
    else:
        print("  real nodes: none; every node is simulated by kwok (runs no containers)")
    tiers: dict[str, int] = {}
    for n in nodes:
        tier = n["metadata"]["labels"].get("kiri.dev/tier", "?")
        tiers[tier] = tiers.get(tier, 0) + 1
    sites = {n["metadata"]["labels"].get("topology.kubernetes.io/zone") for n in nodes} - {None}
    record(
        "fleet",
        {
            "cloud": tiers.get("cloud", 0),
            "edge": tiers.get("edge", 0),
            "sites": len(sites),
            "real": sorted(n["metadata"]["name"] for n in real),
        },
    )
    return 0


# ---- the model --------------------------------------------------------------------------------------


def cmd_build_model(args: argparse.Namespace) -> int:
    """Train a small sensor classifier on seeded synthetic data and save it as a torch.export program.

    Four Gaussian clusters in 16 dimensions; the requests file mixes points near a cluster centre (the
    edge model is confident) with points between two clusters (it is not, so the runtime asks the cloud).
    """
    import numpy as np
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((CLASSES, FEATURES)).astype(np.float32) * 2.0

    def sample(n: int) -> tuple[Any, Any]:
        y = rng.integers(0, CLASSES, n)
        x = centres[y] + rng.standard_normal((n, FEATURES)).astype(np.float32) * 1.2
        return x.astype(np.float32), y

    x_train, y_train = sample(4096)
    x_test, y_test = sample(1024)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(args.epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 256):
            idx = perm[i : i + 256]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())

    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.from_numpy(x_test[:4]),), dynamic_shapes=({0: batch},))
    model_path = out / "model.pt2"
    torch.export.save(program, model_path)
    np.savez(out / "eval.npz", x=x_test[:256])

    # Requests: 6 near a centre, 6 halfway between two centres (ambiguous by construction).
    near = centres[np.arange(6) % CLASSES] + rng.standard_normal((6, FEATURES)).astype(np.float32) * 0.3
    pairs = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
    between = np.stack([(centres[a] + centres[b]) / 2 for a, b in pairs]).astype(np.float32)
    kinds = ["near"] * len(near) + ["between"] * len(between)
    np.savez(out / "requests.npz", x=np.concatenate([near, between]).astype(np.float32), kind=np.array(kinds))

    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    info = {
        "version": args.version,
        "seed": args.seed,
        "sha256": sha,
        "path": str(model_path),
        "accuracy": accuracy,
    }
    (out / "model.json").write_text(json.dumps(info, indent=2))
    print(
        f"  model {args.version}: 16 -> 128 -> 128 -> 4 MLP, seed {args.seed}, test accuracy {accuracy:.3f}"
    )
    print(f"  {model_path} sha256 {sha[:16]}...")
    record(f"model-{args.version}", info)
    return 0


# ---- compression manifest -----------------------------------------------------------------------------


def cmd_variants(args: argparse.Namespace) -> int:
    from kiri_runtime import manifests

    m = manifests.load(args.manifest)
    if m.model.kind == "causal-lm":
        record(
            f"variants-{args.label}",
            {"manifest": str(args.manifest), "variants": demo_lm.print_lm_variants(m, table)},
        )
        return 0
    rows = []
    recorded = []
    for v in m.variants:
        fid = v.fidelity
        cos = f"{fid.cosine.mean:.5f}" if fid else "-"
        cos_min = f"{fid.cosine.min:.5f}" if fid else "-"
        top1 = f"{fid.top1_agreement:.3f}" if fid and fid.top1_agreement is not None else "-"
        size = f"{v.size_bytes / 1024:.1f} KiB" if v.size_bytes else "-"
        ratio = f"{v.size_ratio_vs_fp32:.2f}x" if v.size_ratio_vs_fp32 else "-"
        lat = f"{v.latency.ratio_vs_fp32:.2f}x" if v.latency else "-"
        verdict = "accepted" if v.accepted else f"REJECTED ({v.reason})"
        rows.append([v.name, v.method, cos, cos_min, top1, size, ratio, lat, verdict])
        recorded.append(
            {
                "name": v.name,
                "method": v.method,
                "cosine_mean": fid.cosine.mean if fid else None,
                "top1": fid.top1_agreement if fid else None,
                "size_bytes": v.size_bytes,
                "size_ratio": v.size_ratio_vs_fp32,
                "accepted": v.accepted,
                "uri": v.uri,
                "sha256": v.sha256,
            }
        )
    base = m.baseline
    print(f"  full model (fp32 ONNX): {base.size_bytes / 1024:.1f} KiB, export max |err| vs eager PyTorch "
          f"{m.model.export_max_abs_error:.2e}")  # fmt: skip
    headers = ["VARIANT", "METHOD", "COSINE", "COS.MIN", "TOP1", "SIZE", "VS FP32", "P50 VS FP32", "GATE"]
    print(table(headers, rows))
    record(f"variants-{args.label}", {"manifest": str(args.manifest), "variants": recorded})
    return 0


# ---- the compression Job ------------------------------------------------------------------------------


def cmd_run_job(args: argparse.Namespace) -> int:
    """Play the kubelet for the operator's compression Job: run its containers' `kiri` commands here.

    The simulated cloud node runs no containers, so the Job's init container (`kiri compress ...`) and main
    container (`kiri publish-manifest ...`) run as local processes with exactly the arguments the operator
    wrote into the Job; the manifest lands where the Job would have written it.
    """
    done_file = DEMO_DIR / "jobs-run.json"
    done: list[str] = json.loads(done_file.read_text()) if done_file.exists() else []
    deadline = time.monotonic() + args.timeout
    selector = f"kiri.dev/modeldeployment={args.name},app.kubernetes.io/component=compress"
    while True:
        jobs = [
            j
            for j in kubectl_json("get", "jobs", "-n", args.namespace, "-l", selector)["items"]
            if j["metadata"]["name"] not in done
        ]
        if jobs:
            break
        if time.monotonic() > deadline:
            print(f"  no new compression Job for {args.name} after {args.timeout}s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    job = max(jobs, key=lambda j: j["metadata"]["creationTimestamp"])
    name = job["metadata"]["name"]
    pod = job["spec"]["template"]["spec"]
    print(f"  Job {name} (node selector {pod.get('nodeSelector')}); running its containers here:")
    out_dir = None
    log_path = DEMO_DIR / "logs" / f"job-{args.label}.log"
    with log_path.open("w") as log:
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            cmd = [str(Path(sys.executable).parent / "kiri"), *container["args"]]
            if container["args"][0] == "compress":
                out_dir = container["args"][container["args"].index("--out") + 1]
            shown = " ".join(a if len(a) < 60 else a[:57] + "..." for a in container["args"][:8])
            print(f"    [{container['name']}] kiri {shown} ...", flush=True)
            started = time.monotonic()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600, check=False)
            print(f"    [{container['name']}] exit {proc.returncode} in {time.monotonic() - started:.1f}s")
            if proc.returncode != 0:
                print(f"  container {container['name']} failed; see {log_path}", file=sys.stderr)
                return 1
            if container["args"][0] == "compress" and args.damage and out_dir:
                demo_real.damage_variant(Path(out_dir), args.damage)
    done_file.write_text(json.dumps([*done, name]))
    for line in log_path.read_text().splitlines():
        if "export verified" in line or ": ACCEPTED" in line or ": REJECTED" in line:
            print(f"    {line}")
    if out_dir is None:
        print("  the Job has no `kiri compress` container", file=sys.stderr)
        return 1
    return cmd_variants(argparse.Namespace(manifest=out_dir, label=args.label))


# ---- the rollout ------------------------------------------------------------------------------------


def _edge_pods(namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl_json(
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        f"kiri.dev/modeldeployment={name},app.kubernetes.io/component=edge",
    )["items"]
    return [p for p in items if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")]


def _node_view(namespace: str, name: str, revisions: dict[str, str]) -> tuple[str, dict[str, str]]:
    nodes = kubectl_json("get", "nodes", "-l", "kiri.dev/tier=edge")["items"]
    by_node: dict[str, str] = {}
    for pod in _edge_pods(namespace, name):
        labels = pod["metadata"]["labels"]
        rev = labels.get("kiri.dev/revision", "?")
        short = revisions.get(rev, rev[:6])
        mark = "ok" if _ready(pod) else ".."
        by_node[pod["spec"]["nodeName"]] = f"{short}/{labels.get('kiri.dev/variant', '?')} {mark}"
    sites: dict[str, list[str]] = {}
    for n in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        zone = n["metadata"]["labels"].get("topology.kubernetes.io/zone", "-")
        cell = by_node.get(n["metadata"]["name"], "-")
        if not _ready(n):
            cell += " (offline)"
        name = n["metadata"]["name"]
        short = (
            name.removeprefix("kiri-")
            if n["metadata"]["labels"].get(REAL_LABEL) == "real"
            else name.rsplit("-", 1)[-1]
        )
        sites.setdefault(zone, []).append(f"{short}:{cell}")
    lines = [f"      {zone:<7} " + "  ".join(cells) for zone, cells in sorted(sites.items())]
    return "\n".join(lines), by_node


def cmd_watch(args: argparse.Namespace) -> int:
    until = set(args.until.split(","))
    fail_on = set(args.fail_on.split(",")) if args.fail_on else set()
    deadline = time.monotonic() + args.timeout
    start = time.monotonic()
    labels: dict[str, str] = {}
    if SUMMARY.exists():  # earlier rollouts name their revisions (v1, ...) in the node view
        for key, r in json.loads(SUMMARY.read_text()).items():
            if key.startswith("rollout-") and r.get("updateRevision"):
                labels[r["updateRevision"]] = key.removeprefix("rollout-")
    last = None
    last_nodes = None
    phase = "?"
    waves: list[str] = []
    while True:
        md = kubectl_json("get", "modeldeployment", args.name, "-n", args.namespace)
        status = md.get("status", {})
        # Until the operator has seen the spec just applied, the status describes the previous one.
        current = status.get("observedGeneration") == md["metadata"].get("generation")
        phase = status.get("phase", "Pending") if current else "(applying)"
        edge = status.get("edge", {})
        update = status.get("updateRevision") or "-"
        if current and update != "-" and update not in labels:
            labels[update] = args.label
        per_variant = ", ".join(
            f"{v['name']} {v.get('ready', 0)}/{v.get('nodes', 0)}" for v in edge.get("perVariant", [])
        )
        line = (
            f"phase={phase:<11} stage={edge.get('stage') or '-':<12} "
            f"updated={edge.get('updatedNodes', 0)}/{edge.get('targetNodes', 0)} ready={edge.get('readyNodes', 0)} "
            f"deferred={edge.get('deferredNodes', 0)} cloud={status.get('cloud', {}).get('ready', 0)}/"
            f"{status.get('cloud', {}).get('replicas', 0)}  [{per_variant}]"
        )
        if line != last:
            print(f"  {time.monotonic() - start:6.1f}s  {line}", flush=True)
            if edge.get("stage") and edge.get("stage") not in waves:
                waves.append(edge["stage"])
            last = line
        view, by_node = _node_view(args.namespace, args.name, labels)
        if by_node != last_nodes:
            print(view, flush=True)
            last_nodes = by_node
        if phase in until:
            break
        if phase in fail_on:
            print(f"  FAILED: {args.name} reached phase {phase}", file=sys.stderr)
            _print_conditions(status)
            return 1
        if time.monotonic() > deadline:
            print(f"  FAILED: {args.name} still {phase} after {args.timeout}s", file=sys.stderr)
            _print_conditions(status)
            return 1
        time.sleep(args.interval)
    elapsed = time.monotonic() - start
    # Let pods being replaced (a rollback moves nodes back) settle, so the tally below is the end state.
    settle = time.monotonic() + 30
    while time.monotonic() < settle:
        view, by_node = _node_view(args.namespace, args.name, labels)
        if len(by_node) >= int(edge.get("targetNodes") or 0) and all(
            c.endswith(" ok") for c in by_node.values()
        ):
            break
        time.sleep(args.interval)
    if by_node != last_nodes:
        print(view, flush=True)
    _print_conditions(status)
    variants_on_nodes: dict[str, int] = {}
    for cell in by_node.values():
        key = cell.split()[0]
        variants_on_nodes[key] = variants_on_nodes.get(key, 0) + 1
    record(
        f"rollout-{args.label}",
        {
            "phase": phase,
            "seconds": round(elapsed, 1),
            "waves": waves,
            "nodes": variants_on_nodes,
            "currentRevision": status.get("currentRevision"),
            "updateRevision": status.get("updateRevision"),
            "history": status.get("history", []),
            "reason": next(
                (c.get("reason") for c in status.get("conditions", []) if c.get("type") == "RolledBack"), None
            ),
        },
    )
    return 0


def _print_conditions(status: dict[str, Any]) -> None:
    for c in status.get("conditions", []):
        print(f"      {c['type']:<16} {c['status']:<7} {c.get('reason', '')}: {c.get('message', '')}"[:200])


# ---- inference --------------------------------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np

    data = np.load(args.requests)
    xs, kinds = data["x"], data["kind"]
    rows = []
    tiers: dict[str, int] = {}
    with httpx.Client(base_url=args.url, timeout=30) as client:
        meta = client.get(f"/v2/models/{args.model}")
        meta.raise_for_status()
        input_name = meta.json()["inputs"][0]["name"]
        for i, (x, kind) in enumerate(zip(xs, kinds, strict=True)):
            body = {
                "id": f"demo-{i}",
                "inputs": [
                    {"name": input_name, "shape": [1, FEATURES], "datatype": "FP32", "data": x.tolist()}
                ],
            }
            started = time.perf_counter()
            resp = client.post(f"/v2/models/{args.model}/infer", json=body)
            ms = (time.perf_counter() - started) * 1000
            if resp.status_code != 200:
                print(f"  request {i} failed: HTTP {resp.status_code} {resp.text}", file=sys.stderr)
                return 1
            out = resp.json()
            scores = np.asarray(out["outputs"][0]["data"], dtype=np.float64).reshape(-1, CLASSES)[0]
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            params = out.get("parameters", {})
            tier = params.get("kiri_tier", "?")
            tiers[tier] = tiers.get(tier, 0) + 1
            rows.append(
                [i, str(kind), int(probs.argmax()), f"{probs.max():.2f}", tier,
                 params.get("kiri_fallback_reason", "-"), f"{ms:.1f}"]
            )  # fmt: skip
    print(table(["REQ", "INPUT", "CLASS", "CONFIDENCE", "ANSWERED BY", "REASON", "MS"], rows))
    record("inference", {"requests": len(rows), "tiers": tiers})
    if not tiers.get("edge") or not tiers.get("cloud"):
        print(f"  expected both edge and cloud answers, got {tiers}", file=sys.stderr)
        return 1
    return 0


# ---- summary ----------------------------------------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> int:
    record(args.key, json.loads(args.value))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    data = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    rows: list[list[str]] = []
    fleet = data.get("fleet")
    if fleet:
        real = (
            f" ({len(fleet['real'])} of them real: {', '.join(fleet['real'])})" if fleet.get("real") else ""
        )
        rows.append(
            [
                "fleet",
                f"{fleet['cloud']} cloud nodes, {fleet['edge']} edge nodes in {fleet['sites']} sites{real}",
            ]
        )
    for key in sorted(k for k in data if k.startswith("model-")):
        m = data[key]
        rows.append([key, f"seed {m['seed']}, test accuracy {m['accuracy']:.3f}, sha256 {m['sha256'][:12]}"])
    for key in sorted(k for k in data if k.startswith("variants-")):
        for v in data[key]["variants"]:
            size = f"{v['size_ratio']:.2f}x fp32 size" if v.get("size_ratio") else "-"
            if v.get("kl_mean") is not None:
                cos = f"KL {v['kl_mean']:.4f}, top-1 {v['top1']:.3f}"
            else:
                cos = f"cosine {v['cosine_mean']:.5f}" if v.get("cosine_mean") is not None else "no fidelity"
            rows.append(
                [
                    f"{key}/{v['name']}",
                    f"{v['method']}: {cos}, {size}, {'accepted' if v['accepted'] else 'REJECTED'}",
                ]
            )
    for key in sorted(k for k in data if k.startswith("rollout-")):
        r = data[key]
        nodes = ", ".join(f"{k}: {n}" for k, n in sorted(r["nodes"].items()))
        reason = f" ({r['reason']})" if r.get("reason") else ""
        waves = r["waves"]
        walked = (
            f"{len(waves)} wave(s): {waves[0]} ... {waves[-1]}" if len(waves) > 1 else (waves or ["-"])[0]
        )
        rows.append([key, f"{r['phase']}{reason} after {r['seconds']}s; {walked}; nodes {nodes}"])
    inf = data.get("inference")
    if inf:
        tiers = ", ".join(f"{t}: {n}" for t, n in sorted(inf["tiers"].items()))
        rows.append(["inference", f"{inf['requests']} OIP v2 requests; answered by {tiers}"])
    real = data.get("real-inference")
    if real:
        tiers = ", ".join(f"{t}: {n}" for t, n in sorted(real["tiers"].items()))
        rows.append(
            [
                "real pods",
                f"{real['requests']} OIP v2 requests to {real['pod']} on {real['node']}; answered by {tiers}",
            ]
        )
    chat = data.get("chat")
    if chat:
        t = chat["tokens"]
        share = 100 * t["edge"] / max(1, t["edge"] + t["cloud"])
        rows.append(
            [
                "chat",
                f"tokens edge {t['edge']}, cloud {t['cloud']} ({share:.0f} % at the edge); hard prompt: "
                f"{chat['hard']['cloud_tokens']} cloud tokens after {chat['hard']['handoffs']} hand-off(s); "
                f"speculative equal to cloud-only: {chat['speculative_exact']}",
            ]
        )
        rows.append(["chat served by", chat["where"]])
    if "elapsed" in data:
        rows.append(["wall time", f"{data['elapsed']} s"])
    print(table(["STEP", "RESULT"], rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/demo.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fleet").set_defaults(fn=cmd_fleet)
    p = sub.add_parser("build-model")
    p.add_argument("--out", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.set_defaults(fn=cmd_build_model)
    p = sub.add_parser("variants")
    p.add_argument("--manifest", required=True)
    p.add_argument("--label", default="v1")
    p.set_defaults(fn=cmd_variants)
    p = sub.add_parser("watch")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--until", required=True, help="phases that end the watch, comma-separated")
    p.add_argument("--fail-on", default="", help="phases that fail the watch, comma-separated")
    p.add_argument("--label", default="v1", help="short name of the update revision in the node view")
    p.add_argument("--timeout", type=float, default=180)
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(fn=cmd_watch)
    p = sub.add_parser("run-job")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--label", default="v1")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--damage", default="", help="damage this variant before the manifest is published")
    p.set_defaults(fn=cmd_run_job)
    p = sub.add_parser("infer")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.set_defaults(fn=cmd_infer)
    p = sub.add_parser("record")
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(fn=cmd_record)
    sub.add_parser("summary").set_defaults(fn=cmd_summary)
    demo_lm.register(sub, record, table)
    demo_real.register(sub, record, table)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"hack/demo.py {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
