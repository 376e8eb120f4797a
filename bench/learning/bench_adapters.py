"""Per-site LoRA adapters: bytes, held-out perplexity, serving cost, and live swaps under load.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/learning/bench_adapters.py [--steps 60] [--json out.json]

The model is the tests' tiny trained LLaMA (tests/lm_fixture.py: hidden 128, 2 layers, vocab 512, trained on Python
stdlib text). Three sites write text from vocabularies of their own (tests/lm_sites.py: a harbour, an orchard,
an observatory); each trains a rank-4 adapter on q_proj and v_proj (learning/adapters.py) on its own text.

1. Bytes: the adapter each site would upload (adapter_model.safetensors) against the base checkpoint's weight
   bytes (the 1 % budget), and the served `.onnx_adapter` against the served model directory (fp32 and int4).
2. Held-out perplexity (torch, peft): every adapter, and the base, on every site's held-out text (other
   documents of the same grammar). The baseline is the base model on the same text, same run: own-site ratio
   (goal < 1) and the worst other-site ratio (the stated bound).
3. Decode cost of a LoRA-ready build (onnxruntime-genai greedy loop, one thread, same run, ABAB blocks): the plain
   build, the LoRA-ready build without an adapter, and with one.
4. Swaps: `kiri serve` as its own process (one ONNX Runtime thread) with harbour loaded; closed-loop streaming
   clients on `assistant:harbour` and `assistant:orchard` while the admin route swaps harbour between two files
   (`replace`) every 0.5 s, in alternating phases with no swaps (ABAB). Swap time (the admin call's wall time,
   the server's total_ms and load_ms), requests
   dropped (any non-200, error event or missing finish), and decode tokens/s against a phase with no swaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "runtime"))
from loadgen import free_port, stop, wait_http  # noqa: E402

SITES = ("harbour", "orchard", "observatory")
TOKEN = "bench-admin-token"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def train_sites(work: Path, steps: int) -> dict[str, dict[str, Any]]:
    from kiri_runtime.learning.adapters import train_adapter
    from kiri_runtime.learning.onnx_adapters import export_onnx_adapter
    from kiri_runtime.lora_layouts import LoraLayout
    from lm_adapters import RANK, TARGETS, lora_genai, site_data
    from lm_fixture import tiny_llama

    base = tiny_llama()
    layout = LoraLayout.load(lora_genai())
    assert layout is not None
    out: dict[str, dict[str, Any]] = {}
    for site in SITES:
        train, held_out = site_data(work / "data", site)
        t0 = time.perf_counter()
        result = train_adapter(
            base, train, work / site, rank=RANK, targets=TARGETS, steps=steps, threads=1, learning_rate=3e-3
        )
        seconds = time.perf_counter() - t0
        onnx_bytes = export_onnx_adapter(work / site, layout, work / f"{site}.onnx_adapter")
        out[site] = {
            "held_out": held_out,
            "adapter_bytes": result.adapter_bytes,
            "base_bytes": result.base_bytes,
            "fraction": result.fraction,
            "onnx_adapter_bytes": onnx_bytes,
            "train_s": seconds,
            "tokens": result.tokens,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
        }
    return out


def perplexities(work: Path, sites: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """matrix[adapter or "base"][text site] = held-out perplexity."""
    from kiri_runtime.learning.adapters import perplexity
    from lm_fixture import tiny_llama

    base = tiny_llama()
    matrix: dict[str, dict[str, float]] = {}
    for row in ("base", *SITES):
        adapter = None if row == "base" else work / row
        matrix[row] = {
            text: perplexity(base, sites[text]["held_out"], adapter, threads=1).perplexity for text in SITES
        }
    return matrix


def decode_cost(work: Path, blocks: int, tokens: int) -> dict[str, float]:
    """Greedy tokens/s of the plain build, the LoRA-ready build without and with an adapter (ABAB blocks)."""
    import onnxruntime_genai as og

    from lm_adapters import lora_genai
    from lm_fixture import tiny_genai

    def loader(path: Path) -> Any:
        cfg = og.Config(str(path))
        session = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        return og.Model(cfg)

    plain, ready = loader(tiny_genai()), loader(lora_genai())
    adapters = og.Adapters(ready)
    adapters.load(str(work / "harbour.onnx_adapter"), "harbour")
    ids = np.asarray(og.Tokenizer(plain).encode("The skipper"), dtype=np.int32)

    def run(model: Any, adapter: str | None) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        t0 = time.perf_counter()
        g = og.Generator(model, params)
        if adapter is not None:
            g.set_active_adapter(adapters, adapter)
        g.append_tokens(ids)
        made = 0
        while not g.is_done():
            g.generate_next_token()
            made += 1
        seconds = time.perf_counter() - t0
        del g
        return made / seconds

    cases = {
        "plain": (plain, None),
        "lora_ready_no_adapter": (ready, None),
        "lora_ready_adapter": (ready, "harbour"),
    }
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(blocks):
        for key, (model, adapter) in cases.items():
            rates[key].append(statistics.median(run(model, adapter) for _ in range(5)))
    return {k: statistics.median(v) for k, v in rates.items()}


async def _clients(port: int, duration: float, concurrency: int, n: int) -> dict[str, Any]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    done = dropped = tokens = 0
    failures: list[str] = []
    stop_at = time.perf_counter() + duration

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal done, dropped, tokens
        model = "assistant:harbour" if i % 2 == 0 else "assistant:orchard"
        body = {"model": model, "prompt": "The skipper", "max_tokens": n, "temperature": 0, "stream": True}
        while time.perf_counter() < stop_at:
            finish = None
            made = 0
            try:
                async with session.post(url, json=body) as reply:
                    if reply.status != 200:
                        failures.append(f"HTTP {reply.status}: {(await reply.text())[:200]}")
                        dropped += 1
                        continue
                    async for line in reply.content:
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            failures.append(str(event["error"])[:200])
                            break
                        choice = event["choices"][0]
                        made += 1 if choice.get("text") else 0
                        finish = choice.get("finish_reason") or finish
            except aiohttp.ClientError as e:
                failures.append(f"transport: {e}")
            if finish is None:
                dropped += 1
            else:
                done += 1
                tokens += made

    began = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    return {
        "completed": done,
        "dropped": dropped,
        "tokens_per_s": tokens / (time.perf_counter() - began),
        "failures": failures[:5],
    }


async def _swapper(port: int, files: list[Path], duration: float, every: float) -> list[dict[str, float]]:
    import aiohttp

    swaps: list[dict[str, float]] = []
    stop_at = time.perf_counter() + duration
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        i = 0
        while time.perf_counter() < stop_at - every:
            await asyncio.sleep(every)
            i += 1
            body = {"lora_name": "harbour", "lora_path": files[i % 2].as_uri(), "replace": True}
            t0 = time.perf_counter()
            async with session.post(
                f"http://127.0.0.1:{port}/v1/load_lora_adapter", json=body, headers=headers
            ) as r:
                answer = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"swap failed: {r.status} {answer}")
            swaps.append(
                {
                    "wall_ms": 1000 * (time.perf_counter() - t0),
                    "server_ms": float(answer["total_ms"]),
                    "load_ms": float(answer["load_ms"]),
                    "effect_ms": float(answer["fetch_ms"]) + float(answer["load_ms"]),
                }
            )
    return swaps


def swap_under_load(
    work: Path, duration: float, concurrency: int, n: int, every: float, rounds: int
) -> dict[str, Any]:
    from lm_adapters import lora_genai

    port = free_port()
    token = work / "admin-token"
    token.write_text(TOKEN)
    files = [work / "harbour.onnx_adapter", work / "observatory.onnx_adapter"]
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", str(lora_genai()), "--name", "assistant",
        "--port", str(port), "--host", "127.0.0.1", "--threads", "1", "--cache-dir", str(work / "cache"),
        "--adapter", f"harbour={files[0].as_uri()}", "--adapter", f"orchard={(work / 'orchard.onnx_adapter').as_uri()}",
        "--admin-token-file", str(token), "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/health/ready", 120, proc)

        async def phase(swapping: bool) -> tuple[dict[str, Any], list[dict[str, float]]]:
            clients = _clients(port, duration, concurrency, n)
            if not swapping:
                return await clients, []
            load, swaps = await asyncio.gather(clients, _swapper(port, files, duration, every))
            return load, swaps

        # Alternating phases (ABAB): the machine's other load falls on both kinds alike.
        quiet: list[dict[str, Any]] = []
        busy: list[dict[str, Any]] = []
        swaps: list[dict[str, float]] = []
        for _ in range(rounds):
            quiet.append(asyncio.run(phase(False))[0])
            load, done = asyncio.run(phase(True))
            busy.append(load)
            swaps += done
        idle_swaps = asyncio.run(_swapper(port, files, 10 * every + every, every))
    finally:
        stop(proc)
    wall = [s["wall_ms"] for s in swaps]
    server = [s["server_ms"] for s in swaps]

    def total(phases: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "completed": sum(p["completed"] for p in phases),
            "dropped": sum(p["dropped"] for p in phases),
            "tokens_per_s": statistics.median(p["tokens_per_s"] for p in phases),
            "failures": [f for p in phases for f in p["failures"]][:5],
        }

    no_swaps, swapping = total(quiet), total(busy)
    return {
        "no_swaps": no_swaps,
        "swapping": swapping,
        "swaps": len(swaps),
        "swap_load_ms_p50": statistics.median(s["load_ms"] for s in swaps),
        "swap_effect_ms_p50": statistics.median(s["effect_ms"] for s in swaps),
        "swap_effect_ms_max": max(s["effect_ms"] for s in swaps),
        "swap_wall_ms_p50": statistics.median(wall),
        "swap_wall_ms_max": max(wall),
        "swap_server_ms_p50": statistics.median(server),
        "swap_server_ms_max": max(server),
        "idle_swap_wall_ms_p50": statistics.median(s["wall_ms"] for s in idle_swaps),
        "idle_swap_server_ms_p50": statistics.median(s["server_ms"] for s in idle_swaps),
        "tokens_per_s_ratio": swapping["tokens_per_s"] / no_swaps["tokens_per_s"],
        "tokens_per_s_ratio_per_round": [
            b["tokens_per_s"] / q["tokens_per_s"] for q, b in zip(quiet, busy, strict=True)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per run of the decode-cost loop")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of phases: no swaps, swapping")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--every", type=float, default=0.5, help="seconds between swaps")
    ap.add_argument("--json")
    args = ap.parse_args()
    from lm_adapters import lora_genai
    from lm_fixture import tiny_genai

    with tempfile.TemporaryDirectory(prefix="kiri-bench-adapters-") as tmp:
        work = Path(tmp)
        sites = train_sites(work, args.steps)
        for site, info in sites.items():
            print(
                f"{site:12s} adapter {info['adapter_bytes']:6d} B / base {info['base_bytes']} B = "
                f"{100 * info['fraction']:.2f}%  onnx_adapter {info['onnx_adapter_bytes']} B  "
                f"loss {info['loss_before']:.2f} -> {info['loss_after']:.2f}  ({info['train_s']:.1f} s)",
                flush=True,
            )
        served = {"fp32": dir_bytes(lora_genai()), "int4": dir_bytes(tiny_genai(precision="int4"))}
        print(f"served model directory: fp32 {served['fp32']} B, int4 {served['int4']} B", flush=True)
        matrix = perplexities(work, sites)
        print("held-out perplexity (rows: adapter, columns: text)", flush=True)
        print(" " * 12 + "".join(f"{t:>13s}" for t in SITES))
        for row, cols in matrix.items():
            print(f"{row:12s}" + "".join(f"{cols[t]:13.3f}" for t in SITES))
        own = {s: matrix[s][s] / matrix["base"][s] for s in SITES}
        cross = {s: max(matrix[s][t] / matrix["base"][t] for t in SITES if t != s) for s in SITES}
        print("own-site ratio " + ", ".join(f"{s} {own[s]:.3f}" for s in SITES))
        print("worst other-site ratio " + ", ".join(f"{s} {cross[s]:.3f}" for s in SITES), flush=True)
        cost = decode_cost(work, args.blocks, args.decode_tokens)
        print(
            "decode tokens/s: "
            + ", ".join(f"{k} {v:.0f} ({v / cost['plain']:.3f}x)" for k, v in cost.items()),
            flush=True,
        )
        swaps = swap_under_load(work, args.duration, args.concurrency, args.tokens, args.every, args.rounds)
        print(
            f"swaps under load: {swaps['swaps']} swaps, wall p50 {swaps['swap_wall_ms_p50']:.1f} ms "
            f"(max {swaps['swap_wall_ms_max']:.1f}), server p50 {swaps['swap_server_ms_p50']:.1f} ms "
            f"(in effect after fetch+verify+load: p50 {swaps['swap_effect_ms_p50']:.1f}, max "
            f"{swaps['swap_effect_ms_max']:.1f}; loading alone {swaps['swap_load_ms_p50']:.2f}) "
            f"(max {swaps['swap_server_ms_max']:.1f}); idle: wall p50 {swaps['idle_swap_wall_ms_p50']:.1f} ms, "
            f"server p50 {swaps['idle_swap_server_ms_p50']:.1f} ms",
            flush=True,
        )
        print(
            f"requests: no swaps {swaps['no_swaps']['completed']} done / {swaps['no_swaps']['dropped']} dropped; "
            f"swapping {swaps['swapping']['completed']} done / {swaps['swapping']['dropped']} dropped; "
            f"tokens/s ratio swapping/no swaps {swaps['tokens_per_s_ratio']:.3f} (per round "
            + ", ".join(f"{r:.3f}" for r in swaps["tokens_per_s_ratio_per_round"])
            + ")",
            flush=True,
        )
        if args.json:
            report = {
                "sites": {s: {k: v for k, v in i.items() if k != "held_out"} for s, i in sites.items()},
                "served_bytes": served,
                "perplexity": matrix,
                "own_ratio": own,
                "worst_other_ratio": cross,
                "decode_tokens_per_s": cost,
                "swaps": swaps,
            }
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
