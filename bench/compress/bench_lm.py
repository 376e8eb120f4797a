"""Causal-LM variants against the full model and against llama.cpp: size, fidelity, decode speed.

Baseline (measured in the same run): the full model in fp32 under HF transformers eager (greedy decode with
its KV cache, one thread), and the same full model as the reference for every fidelity figure (teacher-forced
next-token distributions: KL(full || variant) mean, top-1 agreement, perplexity ratio).

Kiri's side: `kiri compress`'s own building blocks (model builder int8/int4, GGUF transcoding), decoded by
onnxruntime-genai. llama.cpp's side: llama-cpp-python in a bench-only venv (never a dependency; see
bench/README or docs/benchmarks.md for the one-time build), on GGUFs of the same model: the fixture's own Q4_0
and Q4_1 files ("the same file") and llama.cpp's Q4_K_M quantized from the F32 GGUF ("from an HF source").
Both sides see the same token ids and one thread.

Sizes: a Kiri variant's bytes are its artifact as shipped (packing.pack: the tar through xz), with the plain tar
and the time to unpack the artifact beside them; a GGUF's bytes are the file, with what xz makes of it beside
(for context: llama.cpp loads the file as is). The budget rows (`--parts budget`) fit `maxBytes` = the Q4_K_M
GGUF's size with budgeting.py, calibrated on CALIB_MODULES (sensitivity and the fit's KL), never on the scored
samples.

    .venv/bin/python bench/compress/bench_lm.py [--threads 1] [--new-tokens 64] [--json out.json]
        [--parts builds,gguf,budget,llama] [--transcode-accuracy 4,1]
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

from kiri_runtime.compressing.lm import budgeting, building, scoring, transcoding, weighting  # noqa: E402
from kiri_runtime.compressing.lm.packing import XZ_PRESET, pack, unpack  # noqa: E402
from lm_fixture import tiny_gguf, tiny_llama  # noqa: E402

LLAMA_PY = (
    Path(os.environ.get("KIRI_LLAMA_VENV", Path.home() / ".cache/kiri/bench-venvs/llama")) / "bin/python"
)
PEER = Path(__file__).with_name("llama_cpp_peer.py")
# Held-out text: standard-library modules the fixture did not train on.
EVAL_MODULES = ("textwrap", "fractions", "shlex", "bisect")
CALIB_MODULES = (
    "calendar",
    "colorsys",
    "sched",
    "copy",
)  # the budget's calibration: other text than the scored
PARTS = ("builds", "gguf", "budget", "llama")


def eval_samples(
    hf_dir: Path, n: int, length: int, modules: tuple[str, ...] = EVAL_MODULES
) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    import importlib

    samples: list[list[int]] = []
    for name in modules:
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


def size_of(model_dir: Path) -> dict[str, float]:
    """The artifact as shipped (tar.xz), the plain tar, and the median time to unpack the artifact (3 runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, shipped = pack(model_dir, Path(tmp) / "m.tar.xz", compression="xz")
        _, tar = pack(model_dir, Path(tmp) / "m.tar")
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            unpack(Path(tmp) / "m.tar.xz", Path(tmp) / f"u{i}")
            times.append((time.perf_counter() - t0) * 1000)
    return {"bytes": shipped, "tar_bytes": tar, "unpack_ms": float(np.median(times))}


def xz_size(path: Path) -> int:
    import lzma

    return len(lzma.compress(path.read_bytes(), preset=XZ_PRESET))


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
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument(
        "--budget-bases", default="rtn,k_quant,imatrix", help="the int4 algorithms the budget rows start from"
    )
    parser.add_argument(
        "--transcode-accuracy",
        default=str(transcoding.ACCURACY_LEVEL),
        help="comma-separated MatMulNBits accuracy levels for the transcoded GGUF rows (4: int8 activations, 1: fp32)",
    )
    parser.add_argument(
        "--model",
        choices=("tiny", "bench"),
        default="tiny",
        help="tiny: the tests' trained fixture; bench: bench_model.py's random-weight 41.7M LLaMA (size/speed)",
    )
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; known: {PARTS}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)

    if args.model == "bench":
        from bench_model import bench_llama

        hf_dir = bench_llama()
    else:
        hf_dir = tiny_llama()
    samples = eval_samples(hf_dir, args.samples, args.length)
    calib = eval_samples(hf_dir, max(4, args.samples // 2), args.length, CALIB_MODULES)
    prompt = samples[0][:32]
    ref = scoring.Reference(hf_dir, threads=args.threads)
    imatrix = (ref.model, weighting.importance(ref.model, calib))  # calibration text, not the scored samples
    rows: list[dict[str, Any]] = []
    peer = LLAMA_PY.exists() and "llama" in parts
    with tempfile.TemporaryDirectory(prefix="kiri-bench-lm-") as tmp:
        work = Path(tmp)
        base = hf_eager_speed(hf_dir, prompt, args.new_tokens)
        fp32_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        rows.append({"name": "HF eager fp32 (baseline)", "bytes": fp32_bytes, "kl": 0.0, "top1": 1.0, **base})

        def kiri(name: str, model_dir: Path, source: str, **facts: Any) -> None:
            fid = scoring.fidelity(ref, model_dir, samples, threads=args.threads)
            speed = scoring.decode_speed(model_dir, prompt, args.new_tokens, threads=args.threads)
            rows.append(
                {
                    "name": name,
                    "source": source,
                    **size_of(model_dir),
                    "kl": fid.kl_mean,
                    "top1": fid.top1_agreement,
                    "ppl_ratio": fid.perplexity_ratio,
                    "ttft_ms": speed.ttft_ms,
                    "decode_tokens_per_s": speed.decode_tokens_per_s,
                    **facts,
                }
            )

        ggufs = {q: tiny_gguf(hf_dir, work / f"tiny-{q}.gguf", q) for q in ("F32", "Q4_0", "Q4_1")}
        q4km = work / "tiny-Q4_K_M.gguf"
        if LLAMA_PY.exists() and parts & {"llama", "budget"}:
            subprocess.run(
                [str(LLAMA_PY), str(PEER), "quantize", "--src", str(ggufs["F32"]), "--out", str(q4km),
                 "--ftype", "Q4_K_M"],
                check=True,
            )  # fmt: skip

        # "as built": the builder's own output (float32 scales, float32 embedding, stored rotary tables).
        as_built = {"halfScales": False, "embeddingBits": 32}
        builds: list[tuple[str, str, dict[str, Any]]] = [
            ("fp32", "Kiri fp32 (builder)", {}),
            ("int8", "Kiri int8 (compact)", {}),
            ("int4", "Kiri int4 as built (before)", as_built),
            ("int4", "Kiri int4 (compact: f16 sc, emb 8b)", {}),
            ("int4", "Kiri int4 (compact, emb 4b)", {"embeddingBits": 4}),
            ("int4", "Kiri int4 imatrix (compact, emb 8b)", {"algorithm": "imatrix"}),
            ("int4", "Kiri int4 imatrix (compact, emb 4b)", {"algorithm": "imatrix", "embeddingBits": 4}),
            (
                "int4",
                "Kiri int4 kq+lm8+mixed (best before)",
                {"algorithm": "k_quant", "int8LmHead": True, "int8Layers": "mixed"},
            ),
        ]
        for i, (precision, name, options) in enumerate(builds if "builds" in parts else []):
            out = building.build(hf_dir, work / f"b{i}", precision, options, imatrix=imatrix)  # type: ignore[arg-type]
            kiri(name, out, "hf")
        levels = [int(a) for a in args.transcode_accuracy.split(",")]
        for q in ("Q4_0", "Q4_1"):
            for level in levels if "gguf" in parts else []:
                precision, options = transcoding.plan_for({})
                out = building.build(hf_dir, work / f"t-{q}-{level}", precision, options)  # type: ignore[arg-type]
                transcoding.transcode(ggufs[q], out, accuracy_level=level)
                label = "" if levels == [transcoding.ACCURACY_LEVEL] else f" acc{level}"
                kiri(
                    f"Kiri {q} transcoded{label}",
                    out,
                    f"gguf {q}",
                    gguf_bytes=ggufs[q].stat().st_size,
                    accuracy_level=level,
                )

        if "budget" in parts and q4km.exists():
            budget = q4km.stat().st_size
            t0 = time.perf_counter()
            units = budgeting.sensitivities(ref.model, ref.logits, calib, fuse_qkv=True, tied=_tied(hf_dir))
            sens_s = time.perf_counter() - t0
            print(f"sensitivity of {len(units)} units on {len(calib)} calibration samples: {sens_s:.1f} s")
            bases = [(b, {} if b == "rtn" else {"algorithm": b}) for b in args.budget_bases.split(",")]
            for label, base_opts in bases:
                count = [0]

                def measure(
                    opts: dict[str, Any], label: str = label, count: list[int] = count
                ) -> tuple[int | None, float | None]:
                    count[0] += 1
                    out = building.build(
                        hf_dir, work / f"fit-{label}-{count[0]}", "int4", opts, imatrix=imatrix
                    )
                    fid = scoring.fidelity(ref, out, calib, threads=args.threads)
                    _, size = pack(out, work / f"fit-{label}-{count[0]}.tar.xz", compression="xz")
                    return size, fid.kl_mean

                t0 = time.perf_counter()
                chosen, tried = budgeting.fit(
                    units, base_opts, budget, measure, untied=not _tied(hf_dir), log=print
                )
                fit_s = time.perf_counter() - t0
                if chosen is None:
                    print(f"budget {budget} ({label}): nothing fits")
                    continue
                out = building.build(hf_dir, work / f"budget-{label}", "int4", chosen, imatrix=imatrix)
                kiri(
                    f"Kiri int4 {label} maxBytes=Q4_K_M",
                    out,
                    "hf",
                    options=chosen,
                    fits=[t.record() for t in tried],
                    fit_s=fit_s,
                )

        if peer:
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
                        "xz_bytes": xz_size(gguf),
                        "kl": fid.kl_mean,
                        "top1": fid.top1_agreement,
                        "ppl_ratio": fid.perplexity_ratio,
                        "ttft_ms": got["ttft_ms"],
                        "decode_tokens_per_s": got["decode_tokens_per_s"],
                    }
                )
        elif not LLAMA_PY.exists():
            print(f"(llama.cpp skipped: no bench venv at {LLAMA_PY.parent.parent})", file=sys.stderr)

    base_rate, base_bytes = rows[0]["decode_tokens_per_s"], rows[0]["bytes"]
    print(
        f"{args.model} LLaMA, {len(samples)} held-out samples x {args.length} tokens, {args.threads} thread(s), "
        f"{args.new_tokens} new tokens after a {len(prompt)}-token prompt"
    )
    print(
        f"{'variant':38} {'bytes':>11} {'tar|xz':>11} {'unpack ms':>9} {'vs fp32':>8} {'KL mean':>9} "
        f"{'top-1':>6} {'TTFT ms':>8} {'tok/s':>9} {'vs eager':>8}"
    )
    for r in rows:
        other = r.get("tar_bytes", r.get("xz_bytes", 0))
        print(
            f"{r['name']:38} {r['bytes']:>11,} {other:>11,} {r.get('unpack_ms', 0):>9.1f} "
            f"{base_bytes / r['bytes']:>7.2f}x {r['kl']:>9.5f} {r['top1']:>6.3f} "
            f"{r['ttft_ms']:>8.2f} {r['decode_tokens_per_s']:>9.1f} {r['decode_tokens_per_s'] / base_rate:>7.2f}x"
        )
    for r in rows:
        if "gguf_bytes" in r:
            print(f"{r['name']}: {r['bytes'] - r['gguf_bytes']:+,} bytes vs the GGUF ({r['gguf_bytes']:,})")
        if "fits" in r:
            print(f"{r['name']}: fit in {r['fit_s']:.1f} s, options {r['options']}")
            for f in r["fits"]:
                print(f"    {f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _tied(hf_dir: Path) -> bool:
    return bool(json.loads((hf_dir / "config.json").read_text()).get("tie_word_embeddings", False))


if __name__ == "__main__":
    main(sys.argv[1:])
