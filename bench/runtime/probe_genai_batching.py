"""What onnxruntime-genai 0.18 can batch on a CPU model, against Kiri's `decoding.SlotDecoder`, measured.

    PYTHONPATH=operator:runtime:tests .venv/bin/python bench/runtime/probe_genai_batching.py [--model bench|tiny]

1. `Generator` with a batch of prompts of different lengths (onnxruntime-genai left-pads them with the pad token):
   each row's logits against that prompt decoded alone.
2. `Engine` on the CPU model (no PagedAttention: its static scheduler): three requests of different lengths, a
   fourth submitted after two steps; the step at which each request gets its first token.
3. `SlotDecoder`: the same prompts prefilled together (right-padded) and decoded together, against alone.
4. Decode step cost, median wall time of 30 steps after a warm-up, one ONNX Runtime thread: B rows in one
   `SlotDecoder` step (prompts of four lengths), one batched `Generator` of B equal-length rows, and B
   one-row generators stepped in turn (what cohorts fall back to when lengths differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate_peer import PROMPTS, artifacts

ROOT = Path(__file__).resolve().parents[2]


def load(model_dir: Path) -> tuple[Any, Any, Any]:
    import onnxruntime_genai as og

    cfg = og.Config(str(model_dir))
    session = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(cfg)
    return og, model, og.Tokenizer(model)


def first_logits(og: Any, model: Any, prompts: list[list[int]], pad: int) -> np.ndarray:
    width = max(len(p) for p in prompts)
    batch = np.asarray([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int32)
    gp = og.GeneratorParams(model)
    gp.set_search_options(max_length=width + 4, do_sample=False, batch_size=len(prompts))
    g = og.Generator(model, gp)
    g.append_tokens(batch if len(prompts) > 1 else batch[0])
    return np.asarray(g.get_logits(), dtype=np.float32).reshape(len(prompts), -1)


def engine_admission(og: Any, model: Any, prompts: list[list[int]]) -> dict[str, Any]:
    engine = og.Engine(model)
    caps = engine.get_capabilities()
    buffer = engine.create_event_buffer(64)
    requests: list[Any] = []

    def submit(prompt: list[int]) -> None:
        r = engine.create_request()
        options = og.TurnOptions(r)
        options.set_max_generated_tokens(6)
        options.set_temperature(0.0)
        r.begin_turn(np.asarray(prompt, dtype=np.int32), options)
        requests.append(r)

    for p in prompts[:3]:
        submit(p)
    first: dict[int, int] = {}
    submitted = {0: 0, 1: 0, 2: 0}
    step = 0
    while engine.has_pending_requests() and step < 50:
        events = engine.run(buffer)
        step += 1
        for k in range(len(events)):
            i = next(j for j, r in enumerate(requests) if r == events[k].request)
            first.setdefault(i, step)
        if step == 2:
            submit(prompts[3])
            submitted[3] = step
    return {
        "configured_max_batch_size": caps.configured_max_batch_size,
        "first_token_step": {
            f"request {i} (submitted after step {submitted[i]})": s for i, s in first.items()
        },
    }


def step_costs(og: Any, model: Any, model_dir: Path, prompts: list[list[int]], rows: int) -> dict[str, float]:
    from kiri_runtime.decoding import SlotDecoder

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(30):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    decoder = SlotDecoder(model_dir, threads=1)
    mixed = [prompts[i % len(prompts)] for i in range(rows)]
    decoder.prefill(mixed, [len(p) + 64 for p in mixed])
    tokens = [5] * rows
    slot_ms = timed(lambda: decoder.step(tokens))

    def generator(batch: int) -> Any:
        gp = og.GeneratorParams(model)
        options: dict[str, Any] = {"max_length": 256, "do_sample": False}
        if batch > 1:
            options["batch_size"] = batch
        gp.set_search_options(**options)
        g = og.Generator(model, gp)
        ids = np.asarray([prompts[1]] * batch, dtype=np.int32)
        g.append_tokens(ids if batch > 1 else ids[0])
        return g

    batched = generator(rows)
    batched_ms = timed(batched.generate_next_token)
    singles = [generator(1) for _ in range(rows)]
    turns_ms = timed(lambda: [g.generate_next_token() for g in singles])
    return {
        "rows": rows,
        "slot_decoder_mixed_lengths_ms": slot_ms,
        "generator_batched_equal_lengths_ms": batched_ms,
        "generators_in_turn_ms": turns_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.model == "bench":
        _, model_dir = artifacts("bench", "Q4_0")
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from lm_fixture import tiny_genai

        model_dir = tiny_genai()
    from kiri_runtime.decoding import SlotDecoder

    og, model, tok = load(model_dir)
    prompts = [[int(t) for t in tok.encode(p)] for p in PROMPTS]
    pad = int(json.loads((model_dir / "genai_config.json").read_text())["model"].get("pad_token_id", 0))
    out: dict[str, Any] = {"model": args.model, "prompt_lengths": [len(p) for p in prompts]}

    alone = np.concatenate([first_logits(og, model, [p], pad) for p in prompts])
    padded = first_logits(og, model, prompts, pad)
    out["generator_left_padded_max_abs_logit_error"] = [float(x) for x in np.abs(padded - alone).max(axis=1)]
    out["engine_static_cpu"] = engine_admission(og, model, prompts)

    together = SlotDecoder(model_dir, threads=1)
    first = together.prefill(prompts, [len(p) + 8 for p in prompts])
    errors = [float(x) for x in np.abs(first - alone).max(axis=1)]
    singles = [SlotDecoder(model_dir, threads=1) for _ in prompts]
    tokens = [int(t) for t in alone.argmax(axis=1)]
    for single, p in zip(singles, prompts, strict=True):
        single.prefill([p], [len(p) + 8])
    expected = np.stack([s.step([t])[0] for s, t in zip(singles, tokens, strict=True)])
    step_errors = [float(x) for x in np.abs(together.step(tokens) - expected).max(axis=1)]
    out["slot_decoder_right_padded_max_abs_logit_error"] = {"prefill": errors, "first_step": step_errors}

    out["step_cost"] = [step_costs(og, model, model_dir, prompts, rows) for rows in (1, 4, 16)]
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
