"""`kiri serve` against llama.cpp's server on the same model, the same 4-bit weights and the same prompts.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/runtime/bench_generate_peer.py [--model bench]
        [--quant Q4_0] [--threads 1] [--duration 6] [--repeats 2] [--json out.json]

One GGUF (tests/lm_fixture.py `tiny_gguf` of the HF checkpoint, weights in `--quant`) is served twice:
- llama.cpp: its native `llama-server` (continuous batching over `-np` slots; built from the llama-cpp-python
  sdist's vendored source, see docs/benchmarks.md) when `--llama-server` or $KIRI_LLAMA_SERVER names it, and
  llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, one request at a time; with
  `--interrupt_requests False`, else each new request cuts the running one short) from the
  bench-only venv ($KIRI_LLAMA_VENV, default ~/.cache/kiri/bench-venvs/llama) when it has the `[server]` extra;
- Kiri: the same GGUF transcoded (`kiri compress`'s transcoding: its 4-bit blocks carried into MatMulNBits,
  no re-quantization), served by `kiri serve` once per `--kiri-modes` entry (`--lm-batching`: `continuous`,
  the default, and `cohort`, onnxruntime-genai generators batched by equal prompt length, as the same-run
  baseline of the batching change).
Neither is a dependency of Kiri. Every server gets the same thread count (`--threads`) and the same streaming
closed-loop load (bench_generate.py's: greedy `/v1/completions`, N tokens, concurrency 1, 4, 16); client i
sends prompt i mod 4 of PROMPTS, whose lengths differ (2 to 46 tokens: mixed prompt lengths at every
concurrency). Servers take turns per concurrency level (A B C A B C ... `--repeats` times) so they see the same
machine load, and each figure is the median over repeats: aggregate tokens/s, per-request decode tokens/s
(tokens after the first over first-to-last event), TTFT p50/p99. Ratios are Kiri over each peer, and each
server's aggregate tokens/s over its own at concurrency 1 (the batching gain), within this run.

Models: `bench` is bench/compress/bench_model.py's random-weight 41.7M LLaMA (hidden 512, 8 layers, vocab
16384; a decode step of milliseconds, like a small real model); `tiny` is the tests' trained 2-layer LLaMA
(a step of ~0.1 ms: it measures the servers, not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import start_kiri, streaming_load
from loadgen import free_port, stop, wait_http

ROOT = Path(__file__).resolve().parents[2]
LLAMA_VENV = Path(os.environ.get("KIRI_LLAMA_VENV", Path.home() / ".cache/kiri/bench-venvs/llama"))
# Four lengths (on the bench model's tokenizer: 2, 9, 19 and 46 tokens), so rows of one batch always differ.
PROMPTS = [
    "def ",
    "class Template(object):\n    x = 1",
    "import os\nimport sys\n\ndef main(argv):\n    return len(argv)\n",
    "def dedent(text):\n    lines = text.splitlines()\n    margin = None\n    for line in lines:\n"
    "        stripped = line.lstrip()\n        if stripped:\n            indent = len(line) - len(stripped)\n",
]
CONCURRENCY = (1, 4, 16)


def artifacts(model: str, quant: str) -> tuple[Path, Path]:
    """(GGUF, Kiri model directory transcoded from it), built once and cached next to the checkpoint."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from kiri_runtime.compressing.lm import building, transcoding
    from lm_fixture import tiny_gguf, tiny_llama

    if model == "bench":
        from bench_model import bench_llama

        hf_dir = bench_llama()
    else:
        hf_dir = tiny_llama()
    home = hf_dir.parent / f"serve-peer-{hf_dir.name}-{quant}"
    gguf = tiny_gguf(hf_dir, home / f"model-{quant}.gguf", quant)
    kiri_dir = home / "kiri"
    stamp = kiri_dir / ".from"
    if not stamp.exists() or stamp.read_text() != (gguf.with_name(gguf.name + ".key")).read_text():
        shutil.rmtree(kiri_dir, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="kiri-peer-build-", dir=home) as tmp:
            precision, options = transcoding.plan_for({})
            out = building.build(hf_dir, Path(tmp) / "kiri", precision, options)  # type: ignore[arg-type]
            transcoding.transcode(gguf, out)
            out.rename(kiri_dir)
        stamp.write_text((gguf.with_name(gguf.name + ".key")).read_text())
    return gguf, kiri_dir


def start_llama_server(
    binary: Path,
    gguf: Path,
    threads: int,
    slots: int,
    ctx: int,
    cache_prompt: bool = False,
    extra: tuple[str, ...] = (),
) -> tuple[Any, int]:
    """llama.cpp's server with `slots` continuous-batching slots of `ctx` positions each. Its prompt cache (a
    slot reuses the KV of the prompt it served last) is off unless `cache_prompt`: every client here repeats
    one prompt, which would let llama.cpp skip prefills that Kiri, which has no prefix cache, does."""
    port = free_port()
    cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
        "-tb", str(threads), "-np", str(slots), "-c", str(ctx * slots), "--cont-batching", "--no-webui",
        "--log-disable", "-a", "lm", "--cache-prompt" if cache_prompt else "--no-cache-prompt", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    return proc, port


def start_llama_python(gguf: Path, threads: int, ctx: int) -> tuple[Any, int]:
    port = free_port()
    cmd = [
        str(LLAMA_VENV / "bin/python"), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "lm",
        "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
        str(threads), "--n_ctx", str(ctx), "--interrupt_requests", "False",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc=proc)
    return proc, port


def has_python_server() -> bool:
    python = LLAMA_VENV / "bin/python"
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
    parser.add_argument(
        "--quant", default="Q4_0", help="GGUF weight type both servers use (Q4_0, Q4_1, Q8_0)"
    )
    parser.add_argument("--threads", type=int, default=1, help="compute threads per server")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per load run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, default=os.environ.get("KIRI_LLAMA_SERVER"))
    parser.add_argument("--no-python-peer", action="store_true", help="skip llama-cpp-python's server")
    parser.add_argument(
        "--llama-args",
        default="",
        help="more llama-server arguments, space-separated (e.g. --no-repack where its AMX repacking dies "
        "with SIGILL, as on the 2-core VM of docs/benchmarks.md)",
    )
    parser.add_argument(
        "--llama-cache-prompt",
        action="store_true",
        help="leave llama-server's prompt cache on (default: off)",
    )
    parser.add_argument(
        "--kiri-modes", default="continuous,cohort", help="Kiri --lm-batching modes to serve, comma-separated"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    gguf, kiri_dir = artifacts(args.model, args.quant)
    ctx = 512
    slots = max(CONCURRENCY)
    out: dict[str, Any] = {
        "model": args.model,
        "quant": args.quant,
        "threads": args.threads,
        "tokens": args.tokens,
        "gguf_bytes": gguf.stat().st_size,
        "llama_cache_prompt": args.llama_cache_prompt,
        "llama_args": args.llama_args,
        "load_average_before": os.getloadavg()[0],
    }
    servers: dict[str, tuple[Any, int]] = {}
    with tempfile.TemporaryDirectory(prefix="kiri-bench-peer-") as tmp:
        try:
            kiri_names = []
            for mode in args.kiri_modes.split(","):
                name = "kiri" if mode == "continuous" else f"kiri-{mode}"
                kiri_names.append(name)
                servers[name] = start_kiri(
                    kiri_dir,
                    Path(tmp) / name,
                    "--lm-batching",
                    mode,
                    "--max-num-seqs",
                    str(slots),
                    threads=args.threads,
                )
            if args.llama_server is not None and Path(args.llama_server).exists():
                servers["llama-server"] = start_llama_server(
                    Path(args.llama_server),
                    gguf,
                    args.threads,
                    slots,
                    ctx,
                    args.llama_cache_prompt,
                    tuple(args.llama_args.split()),
                )
            if not args.no_python_peer and has_python_server():
                servers["llama-cpp-python"] = start_llama_python(gguf, args.threads, ctx)
            if len(servers) == len(kiri_names):
                raise SystemExit("no llama.cpp peer: pass --llama-server or install llama-cpp-python[server]")
            for port in (p for _, p in servers.values()):  # warm-up
                streaming_load(port, PROMPTS, args.tokens, 1, 1.0)
            runs: dict[str, dict[int, list[dict[str, Any]]]] = {
                k: {c: [] for c in CONCURRENCY} for k in servers
            }
            for c in CONCURRENCY:
                for _ in range(args.repeats):
                    for name, (_, port) in servers.items():
                        if name == "llama-cpp-python" and c > 1 and runs[name][c]:
                            continue  # serves one request at a time: one repeat is enough to show it
                        got = streaming_load(port, PROMPTS, args.tokens, c, args.duration)
                        runs[name][c].append(got)
                        print(
                            f"{name:17} c={c:2d}: {got['tokens_per_s']:7.1f} tok/s, decode "
                            f"{got['decode_tokens_per_s_p50']:6.1f} tok/s per request, TTFT p50 "
                            f"{got['ttft_p50_ms']:7.1f} ms p99 {got['ttft_p99_ms']:7.1f} ms, "
                            f"{got['requests']} requests, {got['errors']} errors",
                            flush=True,
                        )
        finally:
            for proc, _ in servers.values():
                stop(proc)
    keys = ("tokens_per_s", "decode_tokens_per_s_p50", "ttft_p50_ms", "ttft_p99_ms")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_c in runs.items():
        summary[name] = {
            f"c{c}": {k: statistics.median(r[k] for r in rs) for k in keys} for c, rs in by_c.items() if rs
        }
    out["servers"] = summary
    out["load_average_after"] = os.getloadavg()[0]
    print(f"\n{args.model} LLaMA, {args.quant}, {args.threads} thread(s), {args.tokens} tokens, medians:")
    print(f"{'server':17} {'c':>3} {'tok/s':>8} {'decode/req':>10} {'TTFT p50':>9} {'TTFT p99':>9}")
    for name, by_c in summary.items():
        for c, f in by_c.items():
            print(
                f"{name:17} {c[1:]:>3} {f['tokens_per_s']:8.1f} {f['decode_tokens_per_s_p50']:10.1f} "
                f"{f['ttft_p50_ms']:9.1f} {f['ttft_p99_ms']:9.1f}"
            )
    for name, by_c in summary.items():
        gains = {c: f["tokens_per_s"] / by_c["c1"]["tokens_per_s"] for c, f in by_c.items() if "c1" in by_c}
        out.setdefault("vs_c1", {})[name] = gains
        print(
            f"{name}: aggregate tokens/s vs its c=1: " + ", ".join(f"{c}: {g:.2f}x" for c, g in gains.items())
        )
    base = "kiri" if "kiri" in summary else kiri_names[0]
    for peer in (p for p in summary if p != base):
        for c in summary[peer]:
            k, q = summary[base][c], summary[peer][c]
            ratio = k["tokens_per_s"] / q["tokens_per_s"]
            out.setdefault(f"{base}_vs", {}).setdefault(peer, {})[c] = {
                "tokens_per_s": ratio,
                "decode_per_request": k["decode_tokens_per_s_p50"] / q["decode_tokens_per_s_p50"],
                "ttft_p50": k["ttft_p50_ms"] / q["ttft_p50_ms"],
                "ttft_p99": k["ttft_p99_ms"] / q["ttft_p99_ms"],
            }
            print(
                f"{base} vs {peer} at c={c[1:]}: {ratio:.2f}x tokens/s, decode per request "
                f"{k['decode_tokens_per_s_p50'] / q['decode_tokens_per_s_p50']:.2f}x, TTFT p50 "
                f"{k['ttft_p50_ms'] / q['ttft_p50_ms']:.2f}x p99 {k['ttft_p99_ms'] / q['ttft_p99_ms']:.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
