"""The check a GPU machine runs for the cloud tier's CUDA path (`cloud.runtime.device: cuda`, docs/operations.md
"The cloud tier of a language model"): the full model's fp16 CUDA pack served by `kiri serve --device cuda`
against the fp32 pack served on CPU, in the same run.

    PYTHONPATH=operator:runtime:tests python bench/gpu/check_cuda.py [--prompts 16] [--new-tokens 64]

Needs onnxruntime-genai's CUDA build (`onnxruntime-genai-cuda`, the runtime-cuda image's) and a GPU. The packs
are the tests' tiny LLaMA (tests/lm_fixture.py): its fp32 onnxruntime-genai build, and the fp16 CUDA build that
`kiri compress --gpu-pack fp16` makes, built here with the same builder call. Prints, per tier: greedy answers
equal to the fp32 CPU answers (fp16 rounding may flip a near tie: the common prefix is printed too), decode
tokens/s at concurrency 1 and 8, and the ratio GPU / CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "collab"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_collab import common_prefix, held_out_ids, kiri_serve, run_all, stop  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import onnxruntime_genai as og

    from kiri_runtime.compressing.lm.building import build
    from lm_fixture import tiny_genai, tiny_llama

    if not og.is_cuda_available():
        raise SystemExit("this onnxruntime-genai has no usable CUDA provider: install onnxruntime-genai-cuda")
    cpu_dir = tiny_genai()
    tok = og.Tokenizer(og.Model(str(cpu_dir)))
    prompts = [p[:-1] for p in held_out_ids(tok, args.prompts, 16, 150)]
    bodies = [{"model": "lm", "prompt": p, "max_tokens": args.new_tokens, "temperature": 0} for p in prompts]
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kiri-check-cuda-") as tmp:
        work = Path(tmp)
        gpu_dir = build(tiny_llama(), work / "gpu", "fp16", {}, work / "cache", execution_provider="cuda")
        answers: dict[str, list[str]] = {}
        for tier, model_dir, extra in (
            ("cpu-fp32", cpu_dir, ()),
            ("cuda-fp16", gpu_dir, ("--device", "cuda")),
        ):
            proc, port = kiri_serve(model_dir, work / f"serve-{tier}", *extra)
            try:
                asyncio.run(run_all(port, bodies[:1], 1))  # warm up
                for concurrency in (1, 8):
                    start = time.perf_counter()
                    got = asyncio.run(run_all(port, bodies, concurrency))
                    elapsed = time.perf_counter() - start
                    tokens = sum(a["usage"]["completion_tokens"] for _, a in got)
                    result.setdefault(tier, {})[f"tokens_per_s_c{concurrency}"] = tokens / elapsed
                    answers[tier] = [a["choices"][0]["text"] for _, a in got]
            finally:
                stop(proc)
    ref, fp16 = answers["cpu-fp32"], answers["cuda-fp16"]
    result["cuda-fp16"]["answers_equal"] = sum(a == b for a, b in zip(fp16, ref, strict=True)) / len(ref)
    result["cuda-fp16"]["common_prefix"] = statistics.mean(
        common_prefix(a, b) / max(1, len(b)) for a, b in zip(fp16, ref, strict=True)
    )
    for c in (1, 8):
        key = f"tokens_per_s_c{c}"
        result["cuda-fp16"][f"ratio_vs_cpu_c{c}"] = result["cuda-fp16"][key] / result["cpu-fp32"][key]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
