"""Language-model serving benchmark; every figure is a ratio against a baseline measured in this same run.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/runtime/bench_generate.py [--quick] [--json out.json]

The model is the tests' tiny trained LLaMA (hidden 128, 2 layers, vocab 512) as an onnxruntime-genai fp32 directory
(tests/lm_fixture.py `tiny_genai`): a decode step costs ~0.1 ms, so every microsecond of server work shows.

1. Overhead at concurrency 1: greedy `/v1/completions` of N tokens over HTTP (non-streamed) against a raw
   onnxruntime-genai greedy loop of the same prompt and N tokens in this process (generator, prefill, N steps,
   detokenize). p50 difference per request, and that difference per generated token over the raw loop's
   per-token decode time. Targets: <= 2 ms per request, <= 3 % of a decode step.
2. Load: closed-loop streaming clients at concurrency 1, 4 and 16, for both scheduling modes (`--lm-batching
   cohort`: equal-length arrivals share one batched generator; `none`: one generator per request, stepped in
   turn). Aggregate generated tokens/s against the same mode at concurrency 1, and TTFT p50/p99 (request sent
   to first streamed token). Every client sends the same prompt (equal lengths: the best case for cohorts); a
   `mixed` run sends prompts of four lengths at concurrency 16 (cohorts then split by length).

The server runs as its own process with one ONNX Runtime thread; the load generator is one asyncio process on
the same (shared, 2-core) machine, so absolute numbers move: read the ratios.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import free_port, latencies, percentile, stop, wait_http

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "def "  # greedy on the tiny model never reaches <|im_end|>: every request generates exactly N tokens
MIXED = ["def ", "class Template", "import os\n", "    return"]


class RawLoop:
    """A plain onnxruntime-genai greedy loop on one thread: the baseline every server figure is compared with."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime_genai as og

        cfg = og.Config(str(model_dir))
        session = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.og = og
        self.model = og.Model(cfg)
        self.tok = og.Tokenizer(self.model)

    def times(self, prompt: str, n: int, rounds: int) -> tuple[list[float], list[float]]:
        """(per-request seconds, per-token decode seconds): tokenize, generator, prefill, n steps, detokenize."""
        og, totals, per_token = self.og, [], []
        for _ in range(rounds):
            start = time.perf_counter()
            ids = self.tok.encode(prompt)
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(ids) + n, do_sample=False)
            g = og.Generator(self.model, params)
            g.append_tokens(ids)
            stream = self.tok.create_stream()
            text = []
            g.generate_next_token()
            first = time.perf_counter()
            text.append(stream.decode(int(g.get_next_tokens()[0])))
            while not g.is_done():
                g.generate_next_token()
                text.append(stream.decode(int(g.get_next_tokens()[0])))
            end = time.perf_counter()
            totals.append(end - start)
            per_token.append((end - first) / (n - 1))
        return totals, per_token


def start_kiri(model_dir: Path, cache: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", str(model_dir), "--name", "lm",
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--cache-dir", str(cache),
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd)
    wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
    return proc, port


async def _streaming_load(
    port: int, prompts: list[str], n: int, concurrency: int, duration: float
) -> dict[str, Any]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        body = {
            "model": "lm",
            "prompt": prompts[index % len(prompts)],
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            first = None
            async with session.post(url, json=body) as reply:
                if reply.status != 200:
                    errors += 1
                    await reply.read()
                    continue
                async for line in reply.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if first is None and event["choices"] and event["choices"][0]["text"]:
                        first = time.perf_counter()
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            if first is not None:
                ttfts.append(first - start)

    began = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "tokens_per_s": tokens / elapsed,
        "requests": len(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3,
        "errors": errors,
    }


def streaming_load(
    port: int, prompts: list[str], n: int, concurrency: int, duration: float
) -> dict[str, Any]:
    return asyncio.run(_streaming_load(port, prompts, n, concurrency, duration))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter load runs")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from lm_fixture import tiny_genai

    model_dir = tiny_genai()
    n = args.tokens
    rounds = 120 if args.quick else 400
    duration = 3.0 if args.quick else 8.0
    out: dict[str, Any] = {"model": "tiny LLaMA (hidden 128, 2 layers, vocab 512), fp32", "tokens": n}

    raw = RawLoop(model_dir)
    raw.times(PROMPT, n, 20)  # warm-up
    with tempfile.TemporaryDirectory(prefix="kiri-bench-generate-") as tmp:
        for mode in ("cohort", "none"):
            proc, port = start_kiri(
                model_dir, Path(tmp) / mode, "--lm-batching", mode, "--max-num-seqs", "16"
            )
            try:
                body = json.dumps(
                    {"model": "lm", "prompt": PROMPT, "max_tokens": n, "temperature": 0}
                ).encode()
                headers = {"Content-Type": "application/json"}
                latencies(port, "/v1/completions", body, headers, 0, warmup=20)
                # Raw loop and server alternate in short rounds, so both see the same machine load (it is
                # shared); the overhead is the median over rounds of the difference of their p50s.
                diffs, raw_p50s, server_p50s, steps = [], [], [], []
                for _ in range(rounds // 40):
                    raw_totals, raw_tokens = raw.times(PROMPT, n, 40)
                    served = latencies(port, "/v1/completions", body, headers, 40, warmup=0)
                    raw_p50s.append(statistics.median(raw_totals))
                    server_p50s.append(statistics.median(served))
                    steps.append(statistics.median(raw_tokens))
                    diffs.append(server_p50s[-1] - raw_p50s[-1])
                over, step = statistics.median(diffs), statistics.median(steps)
                raw_p50, p50 = statistics.median(raw_p50s), statistics.median(server_p50s)
                res: dict[str, Any] = {
                    "raw_p50_ms": raw_p50 * 1e3,
                    "raw_step_us": step * 1e6,
                    "c1_p50_ms": p50 * 1e3,
                    "overhead_p50_ms": over * 1e3,
                    "overhead_per_token_vs_step": over / n / step,
                }
                print(
                    f"[{mode}] c=1: raw loop p50 {raw_p50 * 1e3:.2f} ms ({step * 1e6:.0f} us/token), HTTP p50 "
                    f"{p50 * 1e3:.2f} ms: overhead {over * 1e3:.2f} ms per request, {over / n * 1e6:.1f} us per "
                    f"token = {100 * over / n / step:.1f} % of a decode step"
                )
                base = None
                for c in (1, 4, 16):
                    load = streaming_load(port, [PROMPT], n, c, duration)
                    base = base or load["tokens_per_s"]
                    load["vs_c1"] = load["tokens_per_s"] / base
                    res[f"c{c}"] = load
                    print(
                        f"[{mode}] c={c:2d}: {load['tokens_per_s']:8.0f} tok/s ({load['vs_c1']:.2f}x c=1), "
                        f"TTFT p50 {load['ttft_p50_ms']:.1f} ms p99 {load['ttft_p99_ms']:.1f} ms, "
                        f"{load['requests']} requests, {load['errors']} errors"
                    )
                mixed = streaming_load(port, MIXED, n, 16, duration)
                mixed["vs_c1"] = mixed["tokens_per_s"] / (base or 1.0)
                res["c16_mixed"] = mixed
                print(
                    f"[{mode}] c=16 mixed prompt lengths: {mixed['tokens_per_s']:8.0f} tok/s "
                    f"({mixed['vs_c1']:.2f}x c=1), TTFT p50 {mixed['ttft_p50_ms']:.1f} ms p99 {mixed['ttft_p99_ms']:.1f} ms"
                )
                out[mode] = res
            finally:
                stop(proc)
    for c in (4, 16):
        ratio = out["cohort"][f"c{c}"]["tokens_per_s"] / out["none"][f"c{c}"]["tokens_per_s"]
        print(f"cohort vs none at c={c}: {ratio:.2f}x tokens/s")
        out[f"cohort_vs_none_c{c}"] = ratio
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
