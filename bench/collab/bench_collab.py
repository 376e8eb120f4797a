"""Edge-cloud collaborative generation: an edge `kiri serve` (int4) and a cloud `kiri serve` (fp32) as separate
processes, a simulated WAN between them (bench/collab/delay_proxy.py on loopback), every figure against cloud-only
and edge-only measured in this same run.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/collab/bench_collab.py [--quick] [--json out.json]

The models are the tests' tiny trained LLaMA (tests/lm_fixture.py): the cloud serves its fp32 build, the edge the
int4 build `kiri compress` makes by default. Prompts are held out: standard-library modules the model never
trained on (fractions, shlex, bisect). Decoding is greedy.

1. Speculative vs cloud-only vs edge-only at RTT 20, 50, 100 ms and concurrency 1 and 4: answers token-exact
   against cloud-only, cloud forward passes per generated token, latency per request (p50) and its ratio to
   cloud-only. Two clouds: the tiny fp32 model as it is (a decode step costs ~0.1 ms, so cloud-only pays one RTT and
   nothing else), and the same with `--delay-ms 20` per forward pass (a cloud model whose step costs 20 ms, as a
   large model's does; a verify is one pass, so it pays 20 ms once).
2. Cascade: the share of answer tokens made at the edge against quality, per threshold and per check
   (`kiri.cascade_check`: off, handoffs, full; margin uncertainty, one cloud token per hand-off): greedy match
   against cloud-only (answers equal; share of the common prefix), cloud requests per answer (the final check's
   cost), and a task with checkable answers: next-token prediction on held-out source, the answer checked against
   the source (one-token requests on the true prefix, given as token ids). `--part cascade` runs this part only.
   `--edge smaller-int4` puts the int4 build of a smaller model (same tokenizer and text, one layer, hidden 64)
   at the edge instead: the cloud model's own int4 build is as accurate as the cloud on that task (14.5 % vs
   14.4 %), the smaller one is not (8.6 %), so only that pair shows what the cascade buys back.

Writes docs/collab-latency.png and docs/collab-cascade.png (docs/collab-cascade-smaller.png with `--edge
smaller-int4`) (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "runtime"))
sys.path.insert(0, str(ROOT / "tests"))
from loadgen import free_port, wait_http  # noqa: E402

HELD_OUT = ("fractions", "shlex", "bisect")  # not in lm_fixture.CORPUS_MODULES
RTTS = (20, 50, 100)
EDGES = {"int4": "int4 edge", "smaller-int4": "smaller int4 edge (1 layer, hidden 64)"}
THRESHOLDS = (0.0, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 1.01)


def held_out_ids(tokenizer: Any, n: int, length: int, stride: int) -> list[list[int]]:
    out: list[list[int]] = []
    for name in HELD_OUT:
        text = Path(importlib.import_module(name).__file__ or "").read_text()
        ids = [int(t) for t in tokenizer.encode(text)]
        for start in range(0, len(ids) - length - 1, stride):
            out.append(ids[start : start + length + 1])
    step = max(1, len(out) // n)
    return out[::step][:n]


def kiri_serve(model_dir: Path, cache: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", str(model_dir), "--name", "lm",
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--cache-dir", str(cache),
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
    return proc, port


def delay_proxy(target: int, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("delay_proxy.py")), "--port", str(port)]
    cmd += ["--target-port", str(target), "--rtt-ms", str(rtt_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    return proc, port


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


async def run_all(
    port: int, bodies: list[dict[str, Any]], concurrency: int
) -> list[tuple[float, dict[str, Any]]]:
    """Every body through /v1/completions with `concurrency` in flight; (seconds, answer) in order."""
    results: list[tuple[float, dict[str, Any]] | None] = [None] * len(bodies)
    queue = list(enumerate(bodies))
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                start = time.perf_counter()
                reply = await client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                if reply.status_code != 200:
                    raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")
                results[i] = (elapsed, reply.json())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def body(prompt: list[int], n: int, mode: str, **kiri: Any) -> dict[str, Any]:
    return {
        "model": "lm",
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "kiri": {"collaboration": mode, **kiri},
    }


def speculative_part(
    args: argparse.Namespace, edge_dir: Path, cloud_dir: Path, prompts: list[list[int]], work: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    clouds = [("tiny fp32", ()), ("fp32 + 20 ms/pass", ("--delay-ms", "20"))]
    for cloud_name, cloud_args in clouds:
        cloud, cloud_port = kiri_serve(cloud_dir, work / f"cloud-{len(rows)}", *cloud_args)
        try:
            for rtt in RTTS if not args.quick else (50,):
                proxy, proxy_port = delay_proxy(cloud_port, rtt)
                edge, edge_port = kiri_serve(
                    edge_dir,
                    work / f"edge-{len(rows)}",
                    "--fallback-url",
                    f"http://127.0.0.1:{proxy_port}",
                    "--collaboration",
                    "speculative",
                )
                try:
                    asyncio.run(run_all(edge_port, [body(prompts[0], 8, "speculative")], 1))  # warm up
                    for concurrency in (1, 4):
                        answers: dict[str, list[tuple[float, dict[str, Any]]]] = {}
                        for mode in ("cloud-only", "speculative", "edge-only"):
                            bodies = [body(p, args.new_tokens, mode) for p in prompts]
                            answers[mode] = asyncio.run(run_all(edge_port, bodies, concurrency))
                        rows.append(summarise(cloud_name, rtt, concurrency, answers))
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    stop(edge, proxy)
        finally:
            stop(cloud)
    return rows


def summarise(cloud: str, rtt: int, concurrency: int, answers: dict[str, Any]) -> dict[str, Any]:
    def text(a: tuple[float, dict[str, Any]]) -> str:
        return str(a[1]["choices"][0]["text"])

    def p50(mode: str) -> float:
        return statistics.median(a[0] for a in answers[mode]) * 1000

    spec, ref, edge = answers["speculative"], answers["cloud-only"], answers["edge-only"]
    exact = sum(text(s) == text(c) for s, c in zip(spec, ref, strict=True))
    kiri = [a[1]["usage"]["kiri"] for a in spec]
    tokens = sum(a[1]["usage"]["completion_tokens"] for a in spec)
    return {
        "cloud": cloud,
        "rtt_ms": rtt,
        "concurrency": concurrency,
        "requests": len(spec),
        "speculative_exact": exact,
        "edge_only_exact": sum(text(e) == text(c) for e, c in zip(edge, ref, strict=True)),
        "cloud_passes_per_token": sum(k["cloud_passes"] for k in kiri) / tokens,
        "acceptance": sum(k["accepted_tokens"] for k in kiri) / max(1, sum(k["draft_tokens"] for k in kiri)),
        "edge_token_share": sum(k["edge_tokens"] for k in kiri) / tokens,
        "p50_ms": {m: p50(m) for m in answers},
        "speculative_vs_cloud_only": p50("speculative") / p50("cloud-only"),
    }


def cascade_part(
    args: argparse.Namespace,
    edge_dir: Path,
    cloud_dir: Path,
    prompts: list[list[int]],
    positions: list[list[int]],
    work: Path,
) -> dict[str, Any]:
    cloud, cloud_port = kiri_serve(cloud_dir, work / "cloud-cascade")
    proxy, proxy_port = delay_proxy(cloud_port, 20)
    edge, edge_port = kiri_serve(
        edge_dir, work / "edge-cascade", "--fallback-url", f"http://127.0.0.1:{proxy_port}"
    )
    try:
        ref = asyncio.run(run_all(edge_port, [body(p, args.new_tokens, "cloud-only") for p in prompts], 4))
        ref_tokens = [a[1]["choices"][0]["text"] for a in ref]
        alone = asyncio.run(run_all(edge_port, [body(p, args.new_tokens, "edge-only") for p in prompts], 4))
        alone_texts = [a[1]["choices"][0]["text"] for a in alone]
        edge_only = {
            "exact_answers": sum(x == y for x, y in zip(alone_texts, ref_tokens, strict=True)) / len(prompts),
            "prefix_share": statistics.mean(
                common_prefix(x, y) / max(1, len(y)) for x, y in zip(alone_texts, ref_tokens, strict=True)
            ),
        }
        print(json.dumps({"edge_only_answers": edge_only}), flush=True)
        truth = [p[-1] for p in positions]
        task = [p[:-1] for p in positions]

        def next_token(mode: str, **kiri: Any) -> tuple[float, float]:
            # one token each, compared as text (cascade answers carry no logprobs: two models made them)
            got = asyncio.run(run_all(edge_port, [body(p, 1, mode, **kiri) for p in task], 4))
            correct, edge_tokens = 0, 0
            for (_, a), want in zip(got, truth, strict=True):
                correct += a["choices"][0]["text"] == texts[want]
                edge_tokens += a["usage"]["kiri"]["edge_tokens"]
            return correct / len(task), edge_tokens / len(task)

        import onnxruntime_genai as og

        tok = og.Tokenizer(og.Model(str(cloud_dir)))
        texts = {t: str(tok.decode([t])) for t in set(truth)}
        cloud_acc, _ = next_token("cloud-only")
        edge_acc, _ = next_token("edge-only")
        print(json.dumps({"cloud_task_accuracy": cloud_acc, "edge_task_accuracy": edge_acc}), flush=True)
        curve = []
        for threshold in args.thresholds:
            for check in args.checks:
                kiri_opts = {
                    "cascade_threshold": threshold,
                    "cascade_cloud_tokens": 1,
                    "cascade_check": check,
                }
                cascade = asyncio.run(
                    run_all(edge_port, [body(p, args.new_tokens, "cascade", **kiri_opts) for p in prompts], 4)
                )
                kiri = [a[1]["usage"]["kiri"] for a in cascade]
                tokens = sum(a[1]["usage"]["completion_tokens"] for a in cascade)
                texts_out = [a[1]["choices"][0]["text"] for a in cascade]
                prefix = [
                    common_prefix(x, y) / max(1, len(y)) for x, y in zip(texts_out, ref_tokens, strict=True)
                ]
                acc, task_edge = next_token("cascade", **kiri_opts) if args.positions else (0.0, 0.0)
                curve.append(
                    {
                        "threshold": threshold,
                        "check": check,
                        "edge_token_share": sum(k["edge_tokens"] for k in kiri) / tokens,
                        "exact_answers": sum(x == y for x, y in zip(texts_out, ref_tokens, strict=True))
                        / len(prompts),
                        "prefix_share": statistics.mean(prefix),
                        "cloud_requests_per_answer": sum(k["cloud_requests"] for k in kiri) / len(kiri),
                        "handoffs_per_answer": sum(k["handoffs"] for k in kiri) / len(kiri),
                        "cloud_passes_per_token": sum(k["cloud_passes"] for k in kiri) / tokens,
                        "corrected_per_answer": sum(k.get("corrected_tokens", 0) for k in kiri) / len(kiri),
                        "task_edge_share": task_edge,
                        "task_accuracy": acc,
                        "task_quality": acc / cloud_acc if cloud_acc else 0.0,
                        "p50_ms": statistics.median(a[0] for a in cascade) * 1000,
                    }
                )
                print(json.dumps(curve[-1]), flush=True)
        return {
            "cloud_task_accuracy": cloud_acc,
            "edge_task_accuracy": edge_acc,
            "edge_only_answers": edge_only,
            "curve": curve,
        }
    finally:
        stop(edge, proxy, cloud)


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plots(spec: list[dict[str, Any]], cascade: dict[str, Any], out_dir: Path, edge: str) -> None:
    """The parts that ran: docs/collab-latency.png (speculative) and docs/collab-cascade.png (cascade); with
    `--edge smaller-int4`, docs/collab-cascade-smaller.png."""
    import matplotlib

    matplotlib.use("Agg")
    if spec:
        latency_plot(spec, out_dir)
    if cascade:
        cascade_plot(cascade, out_dir, edge)


def latency_plot(spec: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib.pyplot as plt

    clouds = sorted({r["cloud"] for r in spec})
    fig, axes = plt.subplots(1, len(clouds), figsize=(6 * len(clouds), 4.2), squeeze=False)
    for ax, cloud in zip(axes[0], clouds, strict=True):
        for concurrency, style in ((1, "-"), (4, "--")):
            rows = [r for r in spec if r["cloud"] == cloud and r["concurrency"] == concurrency]
            rtts = [r["rtt_ms"] for r in rows]
            for mode, color in (
                ("cloud-only", "tab:blue"),
                ("speculative", "tab:orange"),
                ("edge-only", "tab:green"),
            ):
                ax.plot(
                    rtts, [r["p50_ms"][mode] for r in rows], style, color=color, marker="o",
                    label=f"{mode}, concurrency {concurrency}",
                )  # fmt: skip
        ax.set_title(f"cloud: {cloud}")
        ax.set_xlabel("simulated WAN round trip (ms)")
        ax.set_ylabel("p50 latency per answer (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Edge int4 + cloud fp32 (tiny LLaMA), greedy answers: latency vs RTT")
    fig.tight_layout()
    fig.savefig(out_dir / "collab-latency.png", dpi=110)
    plt.close(fig)


def cascade_plot(cascade: dict[str, Any], out_dir: Path, edge: str) -> None:
    import matplotlib.pyplot as plt

    curve = cascade["curve"]
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = {"off": "tab:red", "handoffs": "tab:orange", "full": "tab:blue"}
    for check in dict.fromkeys(c["check"] for c in curve):
        rows = [c for c in curve if c["check"] == check]
        color = colors.get(check, "tab:grey")
        share = [c["edge_token_share"] for c in rows]
        ax.plot(
            share, [c["prefix_share"] for c in rows], "o-", color=color, label=f"check {check}: common prefix"
        )
        ax.plot(
            share,
            [c["exact_answers"] for c in rows],
            "s--",
            color=color,
            label=f"check {check}: answers equal",
        )
        if any(c["task_edge_share"] for c in rows):
            ax.plot(
                [c["task_edge_share"] for c in rows], [c["task_quality"] for c in rows], "^:", color=color,
                alpha=0.6, label=f"check {check}: next-token task, accuracy / cloud's",
            )  # fmt: skip
    ax.axhline(0.975, color="grey", lw=0.8, ls=":")
    ax.axvline(0.6, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("share of answer tokens produced at the edge (kept)")
    ax.set_ylabel("quality relative to cloud-only greedy")
    if cascade["cloud_task_accuracy"]:
        ax.axhline(
            cascade["edge_task_accuracy"] / cascade["cloud_task_accuracy"], color="tab:green", lw=0.8, ls="-.",
            label="edge-only: next-token task, accuracy / cloud's",
        )  # fmt: skip
    ax.set_title(f"Cascade: {EDGES[edge]} + fp32 cloud\n(margin, 1 cloud token per hand-off)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / ("collab-cascade.png" if edge == "int4" else "collab-cascade-smaller.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument(
        "--part", choices=["all", "speculative", "cascade"], default="all", help="which part to run"
    )
    parser.add_argument(
        "--thresholds",
        type=lambda v: [float(x) for x in v.split(",")],
        default=list(THRESHOLDS),
        help="cascade thresholds, comma-separated",
    )
    parser.add_argument(
        "--checks",
        type=lambda v: v.split(","),
        default=["off", "handoffs", "full"],
        help="cascade checks (kiri.cascade_check), comma-separated",
    )
    parser.add_argument(
        "--edge",
        choices=list(EDGES),
        default="int4",
        help="the edge model: the cloud model's int4 build (what Kiri rolls out), or the int4 build of a smaller"
        " model of the same tokenizer (tests/lm_fixture.py SMALLER), on which the tiers' accuracy separates",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plots", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)

    import onnxruntime_genai as og

    from lm_fixture import tiny_genai

    cloud_dir, edge_dir = tiny_genai(), tiny_genai(precision="int4", smaller=args.edge == "smaller-int4")
    tok = og.Tokenizer(og.Model(str(cloud_dir)))
    prompts = [p[:-1] for p in held_out_ids(tok, args.prompts, 16, 150)]
    positions = held_out_ids(tok, args.positions, 32, 7)
    with tempfile.TemporaryDirectory(prefix="kiri-bench-collab-") as tmp:
        work = Path(tmp)
        spec = speculative_part(args, edge_dir, cloud_dir, prompts, work) if args.part != "cascade" else []
        cascade = (
            cascade_part(args, edge_dir, cloud_dir, prompts, positions, work)
            if args.part != "speculative"
            else {}
        )
    result = {"speculative": spec, "cascade": cascade}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    plots(spec, cascade, args.plots, args.edge)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
