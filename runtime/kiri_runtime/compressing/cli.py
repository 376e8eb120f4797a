"""`kiri compress`: the argument parser. Imports nothing heavy; the handler loads the pipeline lazily."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
variants:
  --variant int8-dynamic                              method alone (name = method)
  --variant name=int8pc,method=int8-dynamic,perChannel=true
  --variants-json FILE|JSON                           [{name, method, options, gate: [{metric, stat, op, threshold}]}]
methods: int8-dynamic, int8-static, fp16, distilled (see docs/manifest.md for options)
  causal language models (--format hf|gguf): int4, int8, fp16
    --variant int4  --variant name=q4,method=int4,blockSize=16,greedyTokens=32,tuneAll=true
gates:
  --gate 'cosine.min>=0.99'                           every variant without its own gate
  --gate 'int8pc:top1-agreement>=0.97'                one variant
  metrics: cosine (stat mean|min|p5), top1-agreement, max-abs-error
  language models: kl.mean, top1-agreement.mean, perplexity.ratio, greedy-match.mean (N = option greedyTokens,
    default 16), e.g. 'kl.mean<=0.1' 'q4:greedy-match.mean>=0.9'. Defaults: int8 kl.mean<=0.01,top1-agreement.mean>=0.97;
    int4 kl.mean<=0.1,top1-agreement.mean>=0.88; fp16 kl.mean<=0.001,top1-agreement.mean>=0.99
exit status: 0 done (read `accepted` per variant), 2 bad input or failed check, 3 with --strict when a variant
is rejected.
"""


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    sub = subparsers.add_parser(
        "compress",
        help="export, verify and compress a model into gated variants plus a manifest",
        description="Export a model to ONNX, verify it against PyTorch, build compressed variants, gate their "
        "fidelity (auto-tuning int8 on a miss) and write DIR/manifest.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
        "--source", required=True, help="model URI (path, file://, http(s)://) or pkg.mod:fn factory"
    )
    sub.add_argument(
        "--format",
        choices=["onnx", "torch-export", "torchscript", "factory", "hf", "gguf"],
        help="default: by suffix (.gguf: gguf); hf: a Hugging Face checkpoint directory or a tar of one",
    )
    sub.add_argument("--out", required=True, type=Path, help="output directory")
    sub.add_argument("--variant", action="append", default=[], metavar="SPEC", help="a variant (repeatable)")
    sub.add_argument(
        "--variants-json", action="append", default=[], metavar="FILE|JSON", help="a list of variants"
    )
    sub.add_argument("--gate", action="append", default=[], metavar="[VARIANT:]METRIC[.STAT]OPVALUE")
    sub.add_argument(
        "--eval-data",
        help=".npz with one array per model input (sample axis first); language models: .jsonl of "
        '{"text": ...} or {"messages": [...]} per line',
    )
    sub.add_argument("--eval-sha256", help="expected sha256 of the eval data")
    sub.add_argument("--train-data", help="unlabeled .npz for distillation (default: 80%% of the eval data)")
    sub.add_argument("--sha256", help="expected sha256 of the source (of --state-dict for a factory)")
    sub.add_argument("--state-dict", help="state dict URI for a factory source")
    sub.add_argument("--factory-kwargs", help="JSON object of keyword arguments for the factory")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for measurements")
    sub.add_argument("--atol", type=float, default=1e-4, help="export check: absolute tolerance")
    sub.add_argument(
        "--rtol", type=float, default=1e-3, help="export check: tolerance relative to max |output|"
    )
    sub.add_argument("--latency-rounds", type=int, default=60)
    sub.add_argument("--task", choices=["auto", "classifier", "other"], default="auto")
    sub.add_argument("--model-name")
    sub.add_argument("--model-version")
    sub.add_argument(
        "--decode-tokens",
        type=int,
        default=64,
        help="language models: new tokens when measuring decode speed",
    )
    sub.add_argument(
        "--gpu-pack",
        choices=["fp16"],
        help="language models: also build the full model for GPU nodes (fp16, onnxruntime-genai's CUDA graph), "
        "checked against the verified fp32 build and published beside it (the manifest's model.gpuPack)",
    )
    sub.add_argument("--strict", action="store_true", help="exit 3 when any variant is rejected")
    sub.set_defaults(handler=handle)


def register_checkpoint(subparsers: argparse._SubParsersAction[Any]) -> None:
    sub = subparsers.add_parser(
        "checkpoint",
        help="fetch, check and unpack a Hugging Face checkpoint for another server (vLLM)",
        description="Fetch the hf source (a tar at a path, file://, http(s):// or s3://, or a checkpoint "
        "directory), refuse it unless its sha256 matches, check it (architecture, tokenizer, safetensors) "
        "and unpack it under OUT, with OUT/model linked to the checkpoint directory. The init container of "
        "a vLLM cloud tier runs it.",
    )
    sub.add_argument("--source", required=True, help="the hf source URI")
    sub.add_argument("--sha256", required=True, help="expected sha256 of the source")
    sub.add_argument("--out", required=True, type=Path, help="directory (a volume) to unpack into")
    sub.set_defaults(handler=handle_checkpoint)


def handle_checkpoint(args: argparse.Namespace) -> int:
    from kiri_runtime.compressing.errors import CompressionError
    from kiri_runtime.compressing.lm.checkpointing import place_checkpoint

    try:
        link = place_checkpoint(args.source, args.sha256, args.out)
    except CompressionError as e:
        print(f"kiri checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"{link} -> {link.readlink()}")
    return 0


def handle(args: argparse.Namespace) -> int:
    from kiri_runtime.compressing import exporting, running, specs
    from kiri_runtime.compressing.errors import CompressionError

    try:
        variants = [specs.parse_variant(v) for v in args.variant]
        for text in args.variants_json:
            variants.extend(specs.parse_variants_json(text))
        req = running.Request(
            source=args.source,
            format=args.format,
            out=args.out,
            variants=variants,
            gates=list(args.gate),
            eval_data=args.eval_data,
            eval_sha256=args.eval_sha256,
            train_data=args.train_data,
            sha256=args.sha256,
            state_dict=args.state_dict,
            factory_kwargs=exporting.parse_kwargs(args.factory_kwargs),
            seed=args.seed,
            threads=args.threads,
            atol=args.atol,
            rtol=args.rtol,
            model_name=args.model_name,
            model_version=args.model_version,
            latency_rounds=args.latency_rounds,
            task=args.task,
            decode_tokens=args.decode_tokens,
            gpu_pack=args.gpu_pack,
        )
        manifest = running.run(req)
    except CompressionError as e:
        print(f"kiri compress: error: {e}", file=sys.stderr)
        return 2
    rejected = [v.name for v in manifest.variants if not v.accepted]
    for v in manifest.variants:
        print(f"{v.name}\t{'accepted' if v.accepted else 'rejected'}\t{v.reason}")
    return 3 if args.strict and rejected else 0
