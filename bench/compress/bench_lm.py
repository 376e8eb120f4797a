"""Causal-LM variants against the full model and against llama.cpp: size, fidelity, decode speed.

Baseline (measured in the same run): the full model in fp32 under HF transformers eager (greedy decode with
its KV cache, one thread), and the same full model as the reference for every fidelity figure (teacher-forced
next-token distributions: KL(full || variant) mean, top-1 agreement, perplexity ratio).

Kiri's side: `kiri compress`'s own building blocks (model builder int8/int4, GGUF transcoding), decoded by
onnxruntime-genai. llama.cpp's side: llama-cpp-python in a bench-only venv (never a dependency; see
bench/README or docs/benchmarks.md for the one-time build), on GGUFs of the same model: the fixture's own Q4_0
and Q4_1 files ("the same file") and llama.cpp's Q4_K_M quantized from the F32 GGUF ("from an HF source").
Both sides see the same token ids and one thread.

    .venv/bin/python bench/compress/bench_lm.py [--threads 1] [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixture that trains the tiny model

from kiri_runtime.compressing.lm import building, scoring, transcoding  # noqa: E402
from kiri_runtime.compressing.lm.packing import pack  # noqa: E402
from lm_fixture import tiny_gguf, tiny_llama  # noqa: E402

LLAMA_PY = (
    Path(os.environ.get("KIRI_LLAMA_VENV", Path.home() / ".cache/kiri/bench-venvs/llama")) / "bin/python"
)
PEER = Path(__file__).with_name("llama_cpp_peer.py")
# Held-out text: standard-library modules the fixture did not train on.
EVAL_MODULES = ("textwrap", "fractions", "shlex", "bisect")


def eval_samples(hf_dir: Path, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    import importlib

    samples: list[list[int]] = []
    for name in EVAL_MODULES:
        text = Path(importlib.import_module(name).__file__ or "").read_text()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - length, length * 3):
            samples.append(list(ids[start : start + length]))
            if len(samples) >= n:
                return samples
    return samples


def hf_eager_speed(hf_dir: Path, prompt: list[int], new_tokens: int, rounds: int = 3) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    ttfts, rates = [], []
    with torch.no_grad():
        for r in range(rounds + 1):
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
            if r:
                ttfts.append((t1 - t0) * 1000)
                rates.append((new_tokens - 1) / (t2 - t1))
    return {"ttft_ms": float(np.median(ttfts)), "decode_tokens_per_s": float(np.median(rates))}


def size_of(model_dir: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        _, size = pack(model_dir, Path(tmp) / "m.tar")
    return size


def llama_cpp(gguf: Path, job: dict[str, Any], work: Path) -> dict[str, Any]:
    job_file, out = work / f"{gguf.stem}.job.json", work / f"{gguf.stem}.npz"
    job_file.write_text(json.dumps(job))
    subprocess.run(
        [str(LLAMA_PY), str(PEER), "run", "--gguf", str(gguf), "--job", str(job_file), "--out", str(out)],
        check=True,
    )
    data = np.load(out)
    return {
        "logits": [data[f"logits_{i}"] for i in range(len(job["samples"]))],
        "ttft_ms": float(data["ttft_ms"]),
        "decode_tokens_per_s": float(data["decode_tokens_per_s"]),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--model",
        choices=("tiny", "bench"),
        default="tiny",
        help="tiny: the tests' trained fixture; bench: bench_model.py's random-weight 41.7M LLaMA (size/speed)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    if args.model == "bench":
        from bench_model import bench_llama

        hf_dir = bench_llama()
    else:
        hf_dir = tiny_llama()
    samples = eval_samples(hf_dir, args.samples, args.length)
    prompt = samples[0][:32]
    ref = scoring.Reference(hf_dir, threads=args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiri-bench-lm-") as tmp:
        work = Path(tmp)
        base = hf_eager_speed(hf_dir, prompt, args.new_tokens)
        fp32_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        rows.append({"name": "HF eager fp32 (baseline)", "bytes": fp32_bytes, "kl": 0.0, "top1": 1.0, **base})

        def kiri(name: str, model_dir: Path, source: str) -> None:
            fid = scoring.fidelity(ref, model_dir, samples, threads=args.threads)
            speed = scoring.decode_speed(model_dir, prompt, args.new_tokens, threads=args.threads)
            rows.append(
                {
                    "name": name,
                    "source": source,
                    "bytes": size_of(model_dir),
                    "kl": fid.kl_mean,
                    "top1": fid.top1_agreement,
                    "ppl_ratio": fid.perplexity_ratio,
                    "ttft_ms": speed.ttft_ms,
                    "decode_tokens_per_s": speed.decode_tokens_per_s,
                }
            )

        # "as built": the builder's own output (float32 scales, float32 embedding, stored rotary tables).
        as_built = {"halfScales": False, "embeddingBits": 32}
        builds: list[tuple[str, str, dict[str, Any]]] = [
            ("fp32", "Kiri fp32 (builder)", {}),
            ("int8", "Kiri int8 (compact)", {}),
            ("int4", "Kiri int4 as built (before)", as_built),
            ("int4", "Kiri int4 (compact: f16 sc, emb 8b)", {}),
            ("int4", "Kiri int4 (compact, emb 4b)", {"embeddingBits": 4}),
        ]
        for i, (precision, name, options) in enumerate(builds):
            out = building.build(hf_dir, work / f"b{i}", precision, options)  # type: ignore[arg-type]
            kiri(name, out, "hf")
        ggufs = {q: tiny_gguf(hf_dir, work / f"tiny-{q}.gguf", q) for q in ("F32", "Q4_0", "Q4_1")}
        for q, label, mins_form in (
            ("Q4_0", "", True),
            ("Q4_1", "", True),
            ("Q4_1", " float zp (before)", False),
        ):
            precision, options = transcoding.plan_for({})
            out = building.build(hf_dir, work / f"t-{q}-{mins_form}", precision, options)  # type: ignore[arg-type]
            transcoding.transcode(ggufs[q], out, mins_form=mins_form)
            kiri(f"Kiri {q} transcoded{label}", out, f"gguf {q}")

        if LLAMA_PY.exists():
            q4km = work / "tiny-Q4_K_M.gguf"
            subprocess.run(
                [
                    str(LLAMA_PY),
                    str(PEER),
                    "quantize",
                    "--src",
                    str(ggufs["F32"]),
                    "--out",
                    str(q4km),
                    "--ftype",
                    "Q4_K_M",
                ],
                check=True,
            )
            job = {
                "prompt": prompt,
                "new_tokens": args.new_tokens,
                "samples": samples,
                "threads": args.threads,
            }
            for name, gguf in (("Q4_0", ggufs["Q4_0"]), ("Q4_1", ggufs["Q4_1"]), ("Q4_K_M", q4km)):
                got = llama_cpp(gguf, job, work)
                tally = scoring.Tally()
                for ids, logits in zip(samples, got["logits"], strict=True):
                    tally.add(ref.logits(ids), logits, ids)
                fid = tally.result()
                rows.append(
                    {
                        "name": f"llama.cpp {name}",
                        "source": f"gguf {name}",
                        "bytes": gguf.stat().st_size,
                        "kl": fid.kl_mean,
                        "top1": fid.top1_agreement,
                        "ppl_ratio": fid.perplexity_ratio,
                        "ttft_ms": got["ttft_ms"],
                        "decode_tokens_per_s": got["decode_tokens_per_s"],
                    }
                )
        else:
            print(f"(llama.cpp skipped: no bench venv at {LLAMA_PY.parent.parent})", file=sys.stderr)

    base_rate, base_bytes = rows[0]["decode_tokens_per_s"], rows[0]["bytes"]
    print(
        f"{args.model} LLaMA, {len(samples)} held-out samples x {args.length} tokens, {args.threads} thread(s), "
        f"{args.new_tokens} new tokens after a {len(prompt)}-token prompt"
    )
    print(
        f"{'variant':36} {'bytes':>10} {'vs fp32':>8} {'KL mean':>9} {'top-1':>6} {'TTFT ms':>8} {'tok/s':>9} {'vs eager':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:36} {r['bytes']:>10,} {base_bytes / r['bytes']:>7.2f}x {r['kl']:>9.5f} {r['top1']:>6.3f} "
            f"{r['ttft_ms']:>8.2f} {r['decode_tokens_per_s']:>9.1f} {r['decode_tokens_per_s'] / base_rate:>7.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
