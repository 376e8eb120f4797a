"""llama.cpp as the bench's peer, run inside the bench-only venv that has llama-cpp-python (never a dependency
of Kiri). It takes token ids, not text, so both sides see exactly the same tokens.

    python llama_cpp_peer.py quantize --src model-f32.gguf --out model-q4_k_m.gguf --ftype Q4_K_M
    python llama_cpp_peer.py run --gguf model.gguf --job job.json --out result.npz

job.json: {"prompt": [ids], "new_tokens": N, "samples": [[ids], ...], "threads": T}
result.npz: ttft_ms, decode_tokens_per_s, new_tokens, logits_<i> ([len(sample), vocab] per sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18}


def quantize(src: Path, out: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


def run(gguf: Path, job: dict, out: Path) -> None:
    from llama_cpp import Llama

    threads = int(job.get("threads", 1))
    llm = Llama(
        model_path=str(gguf),
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
        seed=0,
    )
    result: dict[str, np.ndarray] = {}
    for i, sample in enumerate(job["samples"]):
        llm.reset()
        llm.eval(sample)
        result[f"logits_{i}"] = np.array(llm.scores[: len(sample)], dtype=np.float32)
    # Speed: greedy decode after the prompt, timed like the Kiri side (first token, then the rest).
    prompt, new = job["prompt"], int(job["new_tokens"])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    first = time.perf_counter()
    produced = 1
    while produced < new:
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced += 1
    end = time.perf_counter()
    result["ttft_ms"] = np.array((first - start) * 1000.0)
    result["decode_tokens_per_s"] = np.array((produced - 1) / (end - first) if produced > 1 else 0.0)
    result["new_tokens"] = np.array(produced)
    np.savez(out, **result)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--src", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--ftype", choices=sorted(FTYPES), required=True)
    r = sub.add_parser("run")
    r.add_argument("--gguf", type=Path, required=True)
    r.add_argument("--job", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "quantize":
        quantize(args.src, args.out, args.ftype)
    else:
        run(args.gguf, json.loads(args.job.read_text()), args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
