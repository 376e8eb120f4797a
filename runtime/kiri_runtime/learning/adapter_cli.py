"""`kiri train-adapter`: train a LoRA adapter on a site's text, on the site (the `perSite` policy: nothing leaves
it but the metrics printed), and write it in the form `kiri serve` loads. Flower's ClientApp calls the same
function (`adapters.train_adapter`) for the `federated` policy. Nothing heavy is imported until the handler runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# adapters.DEFAULT_TARGETS and MAX_FRACTION, spelled here so that `kiri --help` imports no numpy (operator image).
DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_FRACTION = 0.01


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    t = subparsers.add_parser(
        "train-adapter",
        help="train a LoRA adapter for a causal LM on a site's text (JSON Lines) and export it for kiri serve",
        description="Train a LoRA adapter (peft) on a site's text; the adapter is at most --max-fraction of the "
        "base model's bytes. With --serve-model, also write the .onnx_adapter that `kiri serve` loads.",
    )
    t.add_argument(
        "--base", required=True, type=Path, help="the base model: a Hugging Face checkpoint directory"
    )
    t.add_argument(
        "--data", required=True, type=Path, help='JSON Lines: {"text": ...} or {"messages": [...]} per line'
    )
    t.add_argument("--out", required=True, type=Path, help="directory for the adapter (peft layout)")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=int, help="LoRA alpha (default: 2 x rank)")
    t.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated projection names")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--learning-rate", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--seed", type=int, default=0, help="seeds the order of the training windows")
    t.add_argument("--a-seed", type=int, default=0, help="seeds every lora_A (one value across a federation)")
    t.add_argument("--freeze-a", action="store_true", help="FFA-LoRA: train lora_B only")
    t.add_argument("--init", type=Path, help="an adapter directory to start from (a round's global adapter)")
    t.add_argument(
        "--max-fraction", type=float, default=MAX_FRACTION, help="adapter bytes / base bytes bound"
    )
    t.add_argument(
        "--held-out", type=Path, help="JSON Lines scored after training: base vs adapter perplexity"
    )
    t.add_argument(
        "--serve-model", type=Path, help="the LoRA-ready onnxruntime-genai model directory kiri serve serves"
    )
    t.add_argument(
        "--onnx-adapter", type=Path, help="where the .onnx_adapter goes (default: OUT/adapter.onnx_adapter)"
    )
    t.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    t.set_defaults(handler=_train_adapter)


def _train_adapter(args: argparse.Namespace) -> int:
    from kiri_runtime.learning.errors import LearningError

    try:
        print(json.dumps(_run(args), indent=1))
    except LearningError as e:
        print(f"kiri train-adapter: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from kiri_runtime.learning.adapters import perplexity, read_weights, train_adapter
    from kiri_runtime.learning.errors import LearningError
    from kiri_runtime.learning.onnx_adapters import export_onnx_adapter
    from kiri_runtime.lora_layouts import LayoutError, LoraLayout

    layout = None
    if args.serve_model is not None:
        try:
            layout = LoraLayout.load(args.serve_model)
        except LayoutError as e:
            raise LearningError(str(e)) from None
        if layout is None:
            raise LearningError(
                f"{args.serve_model} is not LoRA-ready (no lora.json): build it with adapters"
            )
    result = train_adapter(
        args.base,
        args.data,
        args.out,
        rank=args.rank,
        steps=args.steps,
        seed=args.seed,
        alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        a_seed=args.a_seed,
        freeze_a=args.freeze_a,
        init=read_weights(args.init) if args.init else None,
        max_fraction=args.max_fraction,
        threads=args.threads,
    )
    report: dict[str, Any] = {
        "adapter": str(result.adapter_dir),
        "sha256": result.sha256,
        "adapterBytes": result.adapter_bytes,
        "baseBytes": result.base_bytes,
        "fraction": round(result.fraction, 6),
        "tokens": result.tokens,
        "steps": result.steps,
        "lossBefore": round(result.loss_before, 4),
        "lossAfter": round(result.loss_after, 4),
        **result.settings,
    }
    if args.held_out is not None:
        base = perplexity(args.base, args.held_out, seq_len=args.seq_len, threads=args.threads)
        adapted = perplexity(args.base, args.held_out, args.out, seq_len=args.seq_len, threads=args.threads)
        report["heldOut"] = {"base": round(base.perplexity, 4), "adapter": round(adapted.perplexity, 4)}
    if layout is not None:
        target = args.onnx_adapter or args.out / "adapter.onnx_adapter"
        report["onnxAdapter"] = str(target)
        report["onnxAdapterBytes"] = export_onnx_adapter(args.out, layout, target)
    return report
