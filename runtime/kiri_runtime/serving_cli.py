"""Argument parsing for `kiri serve`. The operator builds pod args from these flag names: keep them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def _ratio(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{raw} is not within [0, 1]")
    return value


def _sha256(raw: str) -> str:
    from kiri_runtime.fetching import normalize_sha256

    try:
        value = normalize_sha256(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value is None:
        raise argparse.ArgumentTypeError("empty sha256")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw} must be >= 1")
    return value


def _adapter(raw: str) -> Any:
    """`NAME=URI`, or vLLM's JSON form `{"name": ..., "uri"|"path": ..., "sha256": ...}`."""
    import json

    from kiri_runtime.adapters import BadAdapter, check_name
    from kiri_runtime.fetching import normalize_sha256
    from kiri_runtime.serving import AdapterSpec

    try:
        if raw.lstrip().startswith("{"):
            data = json.loads(raw)
            name, uri, sha = data["name"], data.get("uri") or data["path"], data.get("sha256") or ""
        else:
            name, sep, uri = raw.partition("=")
            sha = ""
            if not sep or not uri:
                raise ValueError("expected NAME=URI")
        if not all(isinstance(v, str) for v in (name, uri, sha)):
            raise ValueError("name, uri and sha256 are strings")
        return AdapterSpec(check_name(name), uri, normalize_sha256(sha) or "")
    except BadAdapter as e:
        raise argparse.ArgumentTypeError(e.message) from None
    except (ValueError, KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{raw[:80]!r}: {e}") from None


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    sub = subparsers.add_parser(
        "serve",
        help="serve an ONNX model over the Open Inference Protocol v2, or a language model (OpenAI API)",
        description="Fetch, verify and serve an ONNX model over OIP v2 REST, with metrics and cloud fallback; "
        "a language model (onnxruntime-genai) also over the OpenAI API and KServe's generate extension.",
    )
    sub.add_argument(
        "--model-uri",
        required=True,
        help="file://, http(s):// or s3:// URI of the .onnx file or of a packed language model (.tar or .tar.xz); "
        "or a local onnxruntime-genai model directory",
    )
    sub.add_argument("--name", required=True, help="model name in the /v2/models/{name} routes")
    sub.add_argument(
        "--sha256", type=_sha256, help="expected digest; the model is not served unless it matches"
    )
    sub.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    sub.add_argument("--port", type=int, default=8080)
    sub.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    sub.add_argument("--model-version", default="1")
    sub.add_argument(
        "--variant", default="", help="variant label for kiri_model_info (e.g. int8, fp16, full)"
    )
    sub.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("KIRI_CACHE_DIR", "/var/cache/kiri"))
    )
    sub.add_argument(
        "--revisions-kept", type=_positive, default=2, help="verified revisions kept in the cache"
    )
    sub.add_argument("--fallback-url", help="base URL of the cloud OIP v2 runtime")
    sub.add_argument("--fallback-timeout", type=float, default=10.0, help="seconds per cloud request")
    sub.add_argument(
        "--confidence-threshold", type=_ratio, default=None, help="forward if top-1 prob is lower"
    )
    sub.add_argument(
        "--queue-limit", type=int, default=0, help="in-flight requests before overload (0: none)"
    )
    sub.add_argument("--batching", action="store_true", help="adaptive micro-batching (dynamic batch models)")
    sub.add_argument("--max-batch-size", type=_positive, default=32)
    sub.add_argument("--max-wait-ms", type=float, default=2.0)
    sub.add_argument("--max-body-bytes", type=_positive, default=64 * 1024 * 1024, help="413 above this")
    sub.add_argument(
        "--max-inflight-body-bytes",
        type=_positive,
        default=256 * 1024 * 1024,
        help="request body bytes held at once by all requests; over it a request answers 429 with "
        "Retry-After (raised to --max-body-bytes if lower)",
    )
    sub.add_argument(
        "--decode-offload-bytes",
        type=_positive,
        default=256 * 1024,
        help="bodies from this size decode off the event loop (JSON in a worker process)",
    )
    sub.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds for a request body to arrive (else 408)"
    )
    sub.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of the ModelDeployment, keys its pins in the shared node cache "
        "(default: $POD_NAMESPACE)",
    )
    sub.add_argument(
        "--max-num-seqs", type=_positive, default=16, help="language models: requests decoded at once"
    )
    sub.add_argument(
        "--lm-batching",
        choices=["continuous", "cohort", "none"],
        default="continuous",
        help="language models: every running request one row of a batch that requests join and leave between "
        "decode steps (default; onnxruntime-genai CPU decoders with GroupQueryAttention, else cohort), arrivals "
        "with equal prompt lengths and sampling options batched into one onnxruntime-genai generator, or none",
    )
    sub.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="language models: where they decode; cuda needs onnxruntime-genai's CUDA build (the kiri-runtime-cuda "
        "image) on a GPU node and serves a pack built for CUDA (`kiri compress --gpu-pack fp16`)",
    )
    collab = sub.add_argument_group(
        "edge-cloud collaboration (language models; the cloud tier is --fallback-url)"
    )
    collab.add_argument(
        "--collaboration",
        choices=["edge-only", "cloud-only", "speculative", "cascade"],
        default="edge-only",
        help="how this edge works with the cloud tier per token (a request may choose another: "
        'body field kiri: {"collaboration": ...})',
    )
    collab.add_argument("--cloud-model", help="the model's name at the cloud tier (default: --name)")
    collab.add_argument(
        "--cascade-metric",
        choices=["margin", "top1", "entropy"],
        default="margin",
        help="cascade uncertainty: 1 - (top-1 minus runner-up probability), 1 - top-1 probability, or the "
        "next-token entropy in nats",
    )
    collab.add_argument(
        "--cascade-threshold", type=float, default=0.7, help="cascade: hand off above this uncertainty"
    )
    collab.add_argument(
        "--cascade-window", type=_positive, default=1, help="cascade: tokens the uncertainty is averaged over"
    )
    collab.add_argument(
        "--cascade-cloud-tokens",
        type=int,
        default=0,
        help="cascade: tokens the cloud produces per hand-off before the edge resumes (0: the rest)",
    )
    collab.add_argument(
        "--cascade-check",
        choices=["off", "handoffs", "full"],
        default="full",
        help="cascade: what the cloud checks of the edge's tokens: nothing (they stream as made), the edge's "
        "tokens since the last check, in each hand-off's call, or that and the answer's tail at its end "
        "(full: every token checked)",
    )
    collab.add_argument(
        "--speculative-k", type=int, default=0, help="speculative: draft tokens per round (0: adaptive)"
    )
    collab.add_argument(
        "--speculative-max-k", type=_positive, default=12, help="speculative: the adaptive k's upper bound"
    )
    lora = sub.add_argument_group("LoRA adapters (language models built LoRA-ready)")
    lora.add_argument(
        "--adapter",
        type=_adapter,
        action="append",
        default=[],
        metavar="NAME=URI",
        help="an adapter (.onnx_adapter) loaded before the server is ready, requested as MODEL:NAME; repeatable; "
        'or JSON {"name": ..., "uri": ..., "sha256": ...} to verify its digest',
    )
    lora.add_argument(
        "--default-adapter", help="the adapter a bare model name gets (one of --adapter; default: none)"
    )
    lora.add_argument(
        "--admin-token-file",
        type=Path,
        help="bearer token of the admin routes (/v1/load_lora_adapter, ...); default $KIRI_ADMIN_TOKEN, "
        "without either they are off",
    )
    lora.add_argument(
        "--adapter-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose files /v1/load_lora_adapter may load by file:// URI or path (repeatable); the "
        "directories of the --adapter files always are; any other local file is refused (400)",
    )
    sub.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to drain on SIGTERM")
    test_aids = sub.add_argument_group("test aids (never set these in production)")
    test_aids.add_argument(
        "--fail-ratio", type=_ratio, default=0.0, help="share of infer requests answered 500"
    )
    test_aids.add_argument("--fail-seed", type=int, default=0, help="seed of the --fail-ratio draws")
    test_aids.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="added latency per infer request (language models: per decode step)",
    )
    sub.add_argument("--log-level", default="INFO")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from kiri_runtime import redaction
    from kiri_runtime.collaborations import CollabConfig
    from kiri_runtime.dataplane import BatchingConfig
    from kiri_runtime.serving import ServeConfig, serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redaction.install()  # httpx logs full URLs; presigned ones carry credentials
    names = [spec.name for spec in args.adapter]
    if len(set(names)) != len(names):
        print("kiri serve: error: --adapter names one adapter twice", file=sys.stderr)
        return 2
    if args.default_adapter is not None and args.default_adapter not in names:
        print(
            f"kiri serve: error: --default-adapter {args.default_adapter} is none of the --adapter names",
            file=sys.stderr,
        )
        return 2
    config = ServeConfig(
        model_uri=args.model_uri,
        name=args.name,
        sha256=args.sha256,
        host=args.host,
        port=args.port,
        threads=args.threads,
        fallback_url=args.fallback_url,
        fallback_timeout_s=args.fallback_timeout,
        confidence_threshold=args.confidence_threshold,
        queue_limit=args.queue_limit,
        cache_dir=args.cache_dir,
        revisions_kept=args.revisions_kept,
        batching=BatchingConfig(args.batching, args.max_batch_size, args.max_wait_ms),
        max_body_bytes=args.max_body_bytes,
        max_inflight_body_bytes=args.max_inflight_body_bytes,
        decode_offload_bytes=args.decode_offload_bytes,
        body_timeout_s=args.body_timeout,
        namespace=args.namespace,
        fail_ratio=args.fail_ratio,
        fail_seed=args.fail_seed,
        delay_ms=args.delay_ms,
        model_version=args.model_version,
        variant=args.variant,
        shutdown_grace_s=args.shutdown_grace,
        max_num_seqs=args.max_num_seqs,
        lm_batching=args.lm_batching,
        device=args.device,
        adapters=tuple(args.adapter),
        default_adapter=args.default_adapter,
        admin_token_file=args.admin_token_file,
        adapter_roots=tuple(args.adapter_root),
        collaboration=CollabConfig(
            mode=args.collaboration,
            cloud_model=args.cloud_model,
            cascade_metric=args.cascade_metric,
            cascade_threshold=args.cascade_threshold,
            cascade_window=args.cascade_window,
            cascade_cloud_tokens=max(0, args.cascade_cloud_tokens),
            cascade_check=args.cascade_check,
            speculative_k=max(0, args.speculative_k),
            speculative_max_k=args.speculative_max_k,
        ),
    )
    asyncio.run(serve(config))
    return 0
