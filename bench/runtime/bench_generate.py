"""Language-model serving benchmark; every figure is a ratio against a baseline measured in this same run.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/runtime/bench_generate.py [--quick] [--json out.json]

The model (`--model tiny`, the default) is the tests' tiny trained LLaMA (hidden 128, 2 layers, vocab 512) as an
onnxruntime-genai fp32 directory (tests/lm_fixture.py `tiny_genai`): a decode step costs ~0.1 ms, so every
microsecond of server work shows. `--model bench` is bench_model.py's random-weight 41.7M LLaMA, its Q4_0 GGUF
transcoded (bench_generate_peer.py's `artifacts`): a decode step of milliseconds, like a small real model.

1. Overhead at concurrency 1: greedy `/v1/completions` of N tokens over HTTP (non-streamed) against a raw
   onnxruntime-genai greedy loop of the same prompt and N tokens in this process (tokenize, generator, prefill,
   N steps, detokenize). Both decode on the same pinned core (default (`--no-pin` to turn it off): the server process and the raw
   loop's thread on the last CPU, the HTTP client on the first), alternating in blocks (ABAB) so both see the
   same machine load. Two views of the overhead, each the median over blocks:
   - wall clock: the server's p50 minus the raw loop's p50 (the target: <= 2 ms per request, and that per
     generated token <= 3 % of the raw loop's per-token decode time);
   - CPU: the server process's CPU time per request (all threads, /proc/<pid>/task/*/schedstat) minus the raw
     loop's thread CPU time. On a shared, oversubscribed machine the wall-clock figure also carries the
     kernel's scheduling (the raw loop never sleeps, the server's threads hand off twice per request); the CPU
     figure is the work the server adds, whatever the load.
2. Load: closed-loop streaming clients at concurrency 1, 4 and 16, for each scheduling mode (`--lm-batching
   continuous`: every running request a row of one decode step, joining and leaving between steps; `cohort`:
   equal-length arrivals share one batched onnxruntime-genai generator; `none`: one generator per request,
   stepped in turn). Aggregate generated tokens/s against the same mode at concurrency 1, and TTFT p50/p99
   (request sent to first streamed token). Twice: every client the same prompt (equal lengths: the best case
   for cohorts), then `mixed`: client i sends MIXED[i % 4], four prompt lengths.

The server runs as its own process with one ONNX Runtime thread; the load generator is one asyncio process on
the same (shared, 2-core) machine, so absolute numbers move: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
# Four prompt lengths (2 to 46 tokens on the bench model's tokenizer): client i sends MIXED[i % 4].
MIXED = [
    "def ",
    "class Template(object):\n    x = 1",
    "import os\nimport sys\n\ndef main(argv):\n    return len(argv)\n",
    "def dedent(text):\n    lines = text.splitlines()\n    margin = None\n    for line in lines:\n"
    "        stripped = line.lstrip()\n        if stripped:\n            indent = len(line) - len(stripped)\n",
]
BLOCK = 40  # requests per side per block
MODELS = {
    "tiny": "tiny LLaMA (hidden 128, 2 layers, vocab 512), fp32",
    "bench": "bench_model.py's random-weight 41.7M LLaMA (hidden 512, 8 layers, vocab 16384), Q4_0 GGUF transcoded",
}


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

    def times(self, prompt: str, n: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
        """(per-request seconds, per-token decode seconds, per-request CPU seconds of this thread): tokenize,
        generator, prefill, n steps, detokenize."""
        og, totals, per_token, cpu = self.og, [], [], []
        for _ in range(rounds):
            cpu_start = time.thread_time()
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
            cpu.append(time.thread_time() - cpu_start)
            totals.append(end - start)
            per_token.append((end - first) / (n - 1))
        return totals, per_token, cpu


def process_cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of process `pid` (nanosecond counters, unlike utime's ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def pin(cpu: int | None) -> None:
    """Pin the calling thread (Linux: pid 0 is the calling thread) to `cpu`, or unpin it (None)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu} if cpu is not None else set(range(os.cpu_count() or 1)))


def pin_process(pid: int, cpus: set[int]) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def start_kiri(
    model_dir: Path,
    cache: Path,
    *extra: str,
    cpu: int | None = None,
    checkout: Path | None = None,
    threads: int = 1,
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", str(model_dir), "--name", "lm",
        "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads), "--cache-dir", str(cache),
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    affinity = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    env = None
    if checkout is not None:
        env = {**os.environ, "PYTHONPATH": f"{checkout / 'operator'}:{checkout / 'runtime'}"}
    proc = subprocess.Popen(cmd, preexec_fn=affinity, env=env)
    wait_http(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
    return proc, port


async def _streaming_load(
    port: int, prompts: list[str], n: int, concurrency: int, duration: float, model: str = "lm"
) -> dict[str, Any]:
    """Closed-loop streaming clients. Tokens come from the final usage chunk, or (a server that sends none) one
    per event with text; a request's decode rate is its tokens after the first over first-to-last event."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    ttfts: list[float] = []
    decode_rates: list[float] = []
    tokens = 0
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        body = {
            "model": model,
            "prompt": prompts[index % len(prompts)],
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            first = last = None
            events, used = 0, None
            async with session.post(url, json=body) as reply:
                if reply.status != 200:
                    errors += 1
                    await reply.read()
                    continue
                async for line in reply.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event["choices"] and event["choices"][0].get("text"):
                        last = time.perf_counter()
                        events += 1
                        if first is None:
                            first = last
                    if event.get("usage"):
                        used = event["usage"]["completion_tokens"]
            made = used if used is not None else events
            tokens += made
            if first is not None and last is not None:
                ttfts.append(first - start)
                if made > 1 and last > first:
                    decode_rates.append((made - 1) / (last - first))

    began = time.perf_counter()
    # A new connection per request, for every server alike: llama-server closes a connection after a streamed
    # answer, and a request written to it then fails.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "tokens_per_s": tokens / elapsed,
        "requests": len(ttfts),
        "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else float("nan"),
        "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3 if ttfts else float("nan"),
        "decode_tokens_per_s_p50": statistics.median(decode_rates) if decode_rates else float("nan"),
        "errors": errors,
    }


def streaming_load(
    port: int, prompts: list[str], n: int, concurrency: int, duration: float, model: str = "lm"
) -> dict[str, Any]:
    return asyncio.run(_streaming_load(port, prompts, n, concurrency, duration, model))


def overhead(
    raw: RawLoop,
    servers: dict[str, tuple[int, int]],
    n: int,
    blocks: int,
    cpus: tuple[int, int] | None,
    block: int = BLOCK,
) -> dict[str, dict[str, Any]]:
    """The raw loop and each server (label: (port, pid)) in alternating blocks of BLOCK requests (ABAB...),
    medians over blocks of each server's difference to the raw loop's block just before it."""
    body = json.dumps({"model": "lm", "prompt": PROMPT, "max_tokens": n, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    client_cpu, decode_cpu = cpus if cpus is not None else (None, None)
    pin(client_cpu)
    for port, _ in servers.values():
        latencies(port, "/v1/completions", body, headers, 0, warmup=min(20, block))
    raw_p50s, steps, raw_cpus = [], [], []
    seen: dict[str, dict[str, list[float]]] = {
        k: {"p50": [], "diff": [], "cpu": [], "cpu_diff": []} for k in servers
    }
    for _ in range(blocks):
        for label, (port, pid) in servers.items():
            pin(decode_cpu)
            raw_totals, raw_tokens, raw_cpu = raw.times(PROMPT, n, block)
            pin(client_cpu)
            raw_p50s.append(statistics.median(raw_totals))
            steps.append(statistics.median(raw_tokens))
            raw_cpus.append(statistics.median(raw_cpu))
            cpu_before = process_cpu_s(pid)
            served = latencies(port, "/v1/completions", body, headers, block, warmup=0)
            cpu = (process_cpu_s(pid) - cpu_before) / block
            got = seen[label]
            got["p50"].append(statistics.median(served))
            got["diff"].append(got["p50"][-1] - raw_p50s[-1])
            got["cpu"].append(cpu)
            got["cpu_diff"].append(cpu - raw_cpus[-1])
    pin(None)
    step, raw_cpu_med = statistics.median(steps), statistics.median(raw_cpus)
    out = {}
    for label, got in seen.items():
        over, cpu_over = statistics.median(got["diff"]), statistics.median(got["cpu_diff"])
        out[label] = {
            "raw_p50_ms": statistics.median(raw_p50s) * 1e3,
            "raw_step_us": step * 1e6,
            "c1_p50_ms": statistics.median(got["p50"]) * 1e3,
            "overhead_p50_ms": over * 1e3,
            "overhead_per_token_vs_step": over / n / step,
            "raw_cpu_ms": raw_cpu_med * 1e3,
            "server_cpu_ms": statistics.median(got["cpu"]) * 1e3,
            "cpu_overhead_ms": cpu_over * 1e3,
            "cpu_overhead_vs_raw": cpu_over / raw_cpu_med,
            "blocks": blocks,
        }
    return out


def report_overhead(label: str, res: dict[str, Any], n: int) -> None:
    print(
        f"[{label}] c=1: raw loop p50 {res['raw_p50_ms']:.2f} ms ({res['raw_step_us']:.0f} us/token), "
        f"HTTP p50 {res['c1_p50_ms']:.2f} ms: overhead {res['overhead_p50_ms']:.2f} ms per request, "
        f"{res['overhead_p50_ms'] / n * 1e3:.1f} us per token = "
        f"{100 * res['overhead_per_token_vs_step']:.1f} % of a decode step; CPU per request raw "
        f"{res['raw_cpu_ms']:.2f} ms, server {res['server_cpu_ms']:.2f} ms (+{res['cpu_overhead_ms']:.2f} "
        f"ms = {100 * res['cpu_overhead_vs_raw']:.1f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter load runs")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="tiny",
        help="tiny: a ~0.1 ms decode step; bench: milliseconds",
    )
    parser.add_argument("--block", type=int, default=BLOCK, help="requests per side per overhead block")
    parser.add_argument(
        "--modes", default="continuous,cohort", help="--lm-batching modes to run, comma-separated"
    )
    parser.add_argument("--no-load", action="store_true", help="only the overhead at concurrency 1")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the decoding and the client to CPUs"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a worktree of main): its server is measured in the same blocks, as `MODE (baseline)`",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from lm_fixture import tiny_genai

    if args.model == "bench":
        from bench_generate_peer import artifacts

        _, model_dir = artifacts("bench", "Q4_0")
    else:
        model_dir = tiny_genai()
    n = args.tokens
    blocks = 4 if args.quick else 12
    duration = 3.0 if args.quick else 8.0
    ncpu = os.cpu_count() or 1
    cpus = None if args.no_pin or ncpu < 2 else (0, ncpu - 1)
    out: dict[str, Any] = {
        "model": MODELS[args.model],
        "tokens": n,
        "pinning": None if cpus is None else {"client_cpu": cpus[0], "decode_cpu": cpus[1]},
        "load_average_before": os.getloadavg()[0],
    }
    modes = args.modes.split(",")

    raw = RawLoop(model_dir)
    raw.times(PROMPT, n, 20)  # warm-up
    with tempfile.TemporaryDirectory(prefix="kiri-bench-generate-") as tmp:
        for mode in modes:
            procs: dict[str, subprocess.Popen[bytes]] = {}
            servers: dict[str, tuple[int, int]] = {}
            checkouts = {mode: None} | ({f"{mode} (baseline)": args.baseline} if args.baseline else {})
            try:
                for label, checkout in checkouts.items():
                    proc, port = start_kiri(
                        model_dir,
                        Path(tmp) / f"{mode}-{len(procs)}",
                        "--lm-batching",
                        mode,
                        "--max-num-seqs",
                        "16",
                        cpu=None if cpus is None else cpus[1],
                        checkout=checkout,
                    )
                    procs[label], servers[label] = proc, (port, proc.pid)
                results = overhead(raw, servers, n, blocks, cpus, args.block)
                for label, res in results.items():
                    report_overhead(label, res, n)
                    out[label] = res
                if not args.no_load:
                    proc = procs[mode]
                    pin_process(proc.pid, set(range(ncpu)))
                    load_runs(out[mode], servers[mode][0], mode, n, duration)
            finally:
                for proc in procs.values():
                    stop(proc)
    out["load_average_after"] = os.getloadavg()[0]
    for a, b in (("continuous", "cohort"), ("cohort", "none"), ("continuous", "none")):
        if args.no_load or not {a, b} <= set(modes):
            continue
        for key in ("c4", "c16", "mixed_c4", "mixed_c16"):
            ratio = out[a][key]["tokens_per_s"] / out[b][key]["tokens_per_s"]
            print(f"{a} vs {b} at {key}: {ratio:.2f}x tokens/s")
            out[f"{a}_vs_{b}_{key}"] = ratio
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def load_runs(res: dict[str, Any], port: int, mode: str, n: int, duration: float) -> None:
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
    base = None
    for c in (1, 4, 16):
        mixed = streaming_load(port, MIXED, n, c, duration)
        base = base or mixed["tokens_per_s"]
        mixed["vs_c1"] = mixed["tokens_per_s"] / base
        res[f"mixed_c{c}"] = mixed
        print(
            f"[{mode}] c={c:2d} mixed prompt lengths: {mixed['tokens_per_s']:8.0f} tok/s ({mixed['vs_c1']:.2f}x "
            f"mixed c=1), TTFT p50 {mixed['ttft_p50_ms']:.1f} ms p99 {mixed['ttft_p99_ms']:.1f} ms, "
            f"{mixed['requests']} requests, {mixed['errors']} errors"
        )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
