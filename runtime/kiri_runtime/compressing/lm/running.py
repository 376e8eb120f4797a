"""One `kiri compress --format hf|gguf` run: source -> full model -> variants (tuned until they pass) -> manifest.

The reference is the source checkpoint under HF transformers (fp32, eager). The full model is the
onnxruntime-genai fp32 build of the same checkpoint, checked against the reference before anything else (an
export that disagrees with PyTorch stops the run), packed as `DIR/model.tar`: the manifest's `model.uri`, what
the cloud tier serves. Each variant is built and tuned (tuning.py), gated against the reference, packed as
`DIR/<name>.tar.xz` (one artifact, one sha256: an xz-compressed tar, packing.py; a candidate's size is that file's,
so auto-tune and `maxBytes` compare what the edge downloads) and measured for decode speed. A GGUF source whose quantized
blocks can be carried over is transcoded first, and that candidate is gated like any other.

As in the tensor pipeline, everything is built in `DIR/.kiri-compress-*`, moved into place at the end, and the
manifest is written last and atomically: a failed run leaves no manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from kiri_runtime import manifests
from kiri_runtime.compressing import exporting, specs
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import evaldata, scoring, tuning
from kiri_runtime.lora_layouts import LoraLayout
from kiri_runtime.manifests import (
    LORA_LAYOUT_KEY,
    Baseline,
    Decode,
    EvalData,
    GpuPack,
    Latency,
    Manifest,
    ModelInfo,
    Variant,
    VariantSpec,
)


class Request(Protocol):
    """What this pipeline reads of `compressing.running.Request` (which dispatches here; no import back)."""

    source: str
    out: Path
    variants: list[VariantSpec]
    gates: list[str]
    eval_data: str | None
    eval_sha256: str | None
    sha256: str | None
    seed: int
    threads: int
    model_name: str | None
    model_version: str | None
    decode_tokens: int
    gpu_pack: str | None


MODEL_TAR = "model.tar"
GPU_TAR = "model-fp16-cuda.tar"  # the full model for GPU nodes (--gpu-pack fp16), beside MODEL_TAR
VARIANT_COMPRESSION = "xz"  # packing.py: what the edge downloads; the fp32 full model stays a plain tar
MAX_EVAL_TOKENS = 1024
# The full model must reproduce the reference: an fp32 build that does not is a wrong graph, not a variant.
FULL_MAX_KL = 1e-4
FULL_MIN_TOP1 = 0.99
_FP16_ON_CPU = " (the builder's fp16 models do not decode on onnxruntime-genai 0.18's CPU provider: fp16 is for GPU nodes)"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_request(req: Request, fmt: str) -> list[VariantSpec]:
    """Everything that can be refused before any work: methods, options, gates, eval data."""
    if not req.variants:
        raise CompressionError("no variants requested: give --variant or --variants-json")
    variants = specs.resolve(req.variants, req.gates, classifier=None, lm=True)
    for v in variants:
        if v.name == Path(MODEL_TAR).stem:
            raise CompressionError(f"variant name {v.name!r} is reserved for the full model")
        for key in ("tune", "tuneAll"):
            if v.options.get(key) is not None and not isinstance(v.options[key], bool):
                raise CompressionError(f"variant {v.name}: option {key} must be true or false")
        budget = v.options.get("maxBytes")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise CompressionError(f"variant {v.name}: option maxBytes must be a positive number of bytes")
        specs.greedy_tokens(v)
    if not req.eval_data:
        raise CompressionError(
            f'a {fmt} source needs --eval-data: JSON Lines of {{"text": ...}} or {{"messages": [...]}} '
            "to measure the variants' fidelity on"
        )
    if req.decode_tokens < 2:
        raise CompressionError("--decode-tokens must be at least 2")
    return variants


def run_lm(req: Request, fmt: str, log: Callable[[str], None]) -> Manifest:
    """The pipeline for causal LMs (the caller has removed any stale manifest)."""
    variants = check_request(req, fmt)
    req.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".kiri-compress-", dir=req.out))
    try:
        return _run(req, fmt, variants, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    req: Request, fmt: str, variants: list[VariantSpec], work: Path, log: Callable[[str], None]
) -> Manifest:
    from kiri_runtime.compressing.lm import building, packing, sources

    log(f"loading {fmt} source")
    src = sources.load_source(req.source, fmt, work / "source", sha256=req.sha256)
    log(f"source: {src.architecture}, {src.size_bytes} bytes, sha256 {src.sha256[:12]}")
    data_path, eval_sha = exporting.fetch(
        req.eval_data or "", work, expected_sha256=req.eval_sha256, what="eval data"
    )
    max_tokens = min(_max_positions(src.hf_dir), MAX_EVAL_TOKENS)
    samples = evaldata.read_eval(data_path, src.hf_dir, max_tokens)
    log(f"eval data: {len(samples)} samples, {sum(len(s) - 1 for s in samples)} predicted positions")
    cache = work / "builder-cache"
    log("building the full model (onnxruntime-genai model builder, fp32)")
    full_dir = building.build(src.hf_dir, work / "model", "fp32", {}, cache=cache)
    max_tokens = min(scoring.context_length(full_dir), max_tokens)
    samples = [s[:max_tokens] for s in samples]
    ref = scoring.Reference(src.hf_dir, threads=req.threads)
    full = scoring.fidelity(ref, full_dir, samples, threads=req.threads)
    if full.kl_mean > FULL_MAX_KL or full.top1_agreement < FULL_MIN_TOP1:
        raise CompressionError(
            f"the fp32 ONNX model disagrees with HF transformers on the eval data (kl.mean {full.kl_mean:.3g}, "
            f"top1-agreement {full.top1_agreement:.4f}): the export is wrong"
        )
    log(f"full model verified: kl.mean {full.kl_mean:.2e}, top1-agreement {full.top1_agreement:.4f}")
    prompt = samples[0][: scoring.greedy_prefix(len(samples[0]), req.decode_tokens, max_tokens)]
    base = scoring.decode_speed(full_dir, prompt, req.decode_tokens, threads=req.threads)
    log(f"fp32: {base.decode_tokens_per_s:.1f} tok/s, TTFT {base.ttft_ms:.2f} ms")
    full_tar = work / MODEL_TAR
    full_sha, full_size = packing.pack(full_dir, full_tar)
    gpu: tuple[GpuPack, Path] | None = None
    if req.gpu_pack:
        gpu = _gpu_pack(src.hf_dir, full_dir, work, cache, log)
    shutil.rmtree(full_dir, ignore_errors=True)

    built: list[Variant] = []
    tars: dict[str, Path] = {}
    for spec in variants:
        variant, tar = _variant(req, spec, src, ref, samples, prompt, base, full_size, work, cache, log)
        log(f"variant {variant.name}: {'ACCEPTED' if variant.accepted else 'REJECTED'} ({variant.reason})")
        built.append(variant)
        if tar is not None:
            tars[variant.name] = tar
    for tar in tars.values():
        os.replace(tar, req.out / tar.name)
    os.replace(full_tar, req.out / MODEL_TAR)
    if gpu is not None:
        os.replace(gpu[1], req.out / gpu[0].uri)
    manifest = Manifest(
        model=ModelInfo(
            name=req.model_name,
            version=req.model_version,
            source_uri=req.source,
            source_sha256=src.sha256,
            format="gguf" if fmt == "gguf" else "hf",
            uri=MODEL_TAR,
            onnx_sha256=full_sha,
            size_bytes=full_size,
            kind="causal-lm",
            architecture=src.architecture,
            export_max_abs_error=None,
            gpu_pack=gpu[0] if gpu is not None else None,
        ),
        baseline=Baseline(
            p50_latency_ms=round(1000.0 / base.decode_tokens_per_s, 4),
            size_bytes=full_size,
            decode=Decode(**dataclasses.asdict(base)),
        ),
        seed=req.seed,
        eval_data=EvalData(uri=req.eval_data, sha256=eval_sha, samples=len(samples)),
        variants=built,
    )
    manifests.dump(manifest, req.out)
    log(f"wrote {req.out / manifests.MANIFEST_FILE}")
    return manifest


def _gpu_pack(
    hf_dir: Path, full_dir: Path, work: Path, cache: Path, log: Callable[[str], None]
) -> tuple[GpuPack, Path]:
    """The full model for GPU nodes: the builder's fp16 CUDA graph, packed as GPU_TAR. This machine has no GPU
    to run it on, so it is checked where it can be: every weight of the verified fp32 build is in it, same
    name and shape, equal to fp16 rounding (a wrong export shows up as a missing or different weight)."""
    from kiri_runtime.compressing.lm import building, packing

    log("building the full model for GPU nodes (model builder, fp16, CUDA)")
    gpu_dir = building.build(hf_dir, work / "model-gpu", "fp16", {}, cache=cache, execution_provider="cuda")
    error = half_weights_error(full_dir, gpu_dir)
    log(f"fp16 CUDA build carries the fp32 weights: max abs error {error:.3g}")
    tar = work / GPU_TAR
    sha, size = packing.pack(gpu_dir, tar)
    shutil.rmtree(gpu_dir, ignore_errors=True)
    return GpuPack(uri=GPU_TAR, sha256=sha, size_bytes=size, max_abs_weight_error=error), tar


def half_weights_error(full_dir: Path, half_dir: Path) -> float:
    """The largest difference between a float32 weight of `full_dir` and the same weight of the fp16 build
    `half_dir`; CompressionError when one is missing, reshaped, or further off than fp16 rounding."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def weights(d: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(d / "model.onnx")).graph
        return {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    full, half = weights(full_dir), weights(half_dir)
    worst = 0.0
    for name, w in full.items():
        if w.dtype != np.float32:
            continue
        h = half.get(name)
        if h is None or h.shape != w.shape:
            got = "missing" if h is None else f"shaped {h.shape}, not {w.shape}"
            raise CompressionError(f"the fp16 CUDA build's weight {name} is {got}: the export is wrong")
        diff = np.abs(h.astype(np.float64) - w.astype(np.float64))
        # fp16 keeps 11 significant bits (half an ulp: 2^-11 relative); below 2^-14 it is subnormal (6e-8 steps).
        if np.any(diff > np.abs(w.astype(np.float64)) * 2.0**-11 + 6e-8):
            raise CompressionError(
                f"the fp16 CUDA build's weight {name} differs from the fp32 build's by {diff.max():.3g}, more "
                "than fp16 rounding: the export is wrong"
            )
        worst = max(worst, float(diff.max()))
    return worst


FOUR_BIT_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
EIGHT_BIT_TYPES = frozenset({"Q8_0", "Q6_K"})  # Q6_K is carried as 8-bit blocks of 16


def transcode_plan(spec: VariantSpec, src: Any) -> tuple[str, list[dict[str, Any]]] | None:
    """A GGUF whose quantized blocks fit this method is carried over before anything is re-quantized: int4 when
    it has 4-bit projections, int8 when all its carried projections are 8-bit. (precision to build, candidates).

    Two transcoded candidates, same bytes: MatMulNBits at accuracy level 4 (int8 activations, fast), then at 1
    (float32: the GGUF's own function, about half the decode speed at 41.7M parameters) for a gate that the
    activations' rounding misses, before the ladder re-quantizes anything. An `accuracyLevel` the variant
    gives is the one candidate's."""
    if src.format != "gguf" or src.gguf_path is None or spec.method not in ("int4", "int8"):
        return None
    from kiri_runtime.compressing.lm import transcoding

    types = set(transcoding.carried(src.gguf_tensor_types).values())
    fits = bool(types & FOUR_BIT_TYPES) if spec.method == "int4" else bool(types) and types <= EIGHT_BIT_TYPES
    if not fits:
        return None
    precision, options = transcoding.plan_for(src.gguf_tensor_types)
    planned = {**dict(options), "transcode": True}
    given = spec.options.get("accuracyLevel")
    if given is not None:
        return precision, [{**planned, "accuracyLevel": given}]
    exact = {**planned, "accuracyLevel": transcoding.EXACT_ACCURACY_LEVEL}
    return precision, [planned, exact]


def _variant(
    req: Request,
    spec: VariantSpec,
    src: Any,
    ref: scoring.Reference,
    samples: Sequence[Sequence[int]],
    prompt: Sequence[int],
    base: scoring.DecodeSpeed,
    full_size: int,
    work: Path,
    cache: Path,
    log: Callable[[str], None],
) -> tuple[Variant, Path | None]:
    from kiri_runtime.compressing.lm import building, packing

    n_greedy = specs.greedy_tokens(spec)
    plan = transcode_plan(spec, src)
    counter = [0]
    built: dict[str, tuning.Outcome] = {}
    imatrix: list[dict[str, Any]] = []  # weighting.importance, measured once when a candidate needs it

    def attempt(options: dict[str, Any]) -> tuning.Outcome:
        key = repr(sorted(options.items()))
        if key not in built:  # the budget's fitting builds may be tried again by the search
            built[key] = _attempt(options)
        return built[key]

    def _attempt(options: dict[str, Any]) -> tuning.Outcome:
        counter[0] += 1
        out = work / f"{spec.name}-{counter[0]}"
        extra: dict[str, Any] = {}
        opts = {k: v for k, v in options.items() if k != "transcode"}
        precision = plan[0] if plan is not None and options.get("transcode") else spec.method
        weighted = None
        if opts.get("algorithm") == "imatrix":
            if not imatrix:
                from kiri_runtime.compressing.lm import weighting

                log(f"  {spec.name}: measuring activation importance on the eval data (imatrix)")
                imatrix.append(weighting.importance(ref.model, samples))
            weighted = (ref.model, imatrix[0])
        building.build(src.hf_dir, out, precision, opts, cache=cache, imatrix=weighted)  # type: ignore[arg-type]
        if options.get("transcode"):
            from kiri_runtime.compressing.lm import transcoding

            level = opts.get("accuracyLevel", transcoding.ACCURACY_LEVEL)
            t = transcoding.transcode(src.gguf_path, out, accuracy_level=level)
            extra["transcoded"] = {
                "tensors": t.tensors,
                "byType": dict(t.by_type),
                "requantized": list(t.requantized),
                "ggufTypes": _type_counts(src.gguf_tensor_types),
            }
        try:
            fid = scoring.fidelity(ref, out, samples, n_greedy, threads=req.threads)
        except CompressionError as e:
            raise CompressionError(f"{e}{_FP16_ON_CPU if spec.method == 'fp16' else ''}") from None
        sha, size = packing.pack(out, _artifact(out), compression=VARIANT_COMPRESSION)
        extra["artifact"] = {"sha256": sha, "unpackedBytes": dir_size(out)}
        return tuning.Outcome(path=out, fidelity=fid, size_bytes=size, extra=extra)

    first = plan[1] if plan is not None else []
    budget_record: dict[str, Any] = {}

    def budgeted() -> dict[str, Any] | None:
        chosen, record = _budget(spec, src, ref, samples, attempt, log)
        budget_record.update(record)
        return chosen

    with_budget = (
        spec.options.get("maxBytes") is not None
        and spec.method == "int4"
        and spec.options.get("tune") is not False
    )
    candidates = tuning.rungs(
        spec, first, tied_embeddings=_tied(src.hf_dir), budgeted=budgeted if with_budget else None
    )
    result = tuning.search(spec, candidates, attempt, log=log)
    for outcome in built.values():  # the search's and the budget's fitting builds
        if outcome.path is not None and outcome.path != result.path:
            shutil.rmtree(outcome.path, ignore_errors=True)
            _artifact(outcome.path).unlink(missing_ok=True)
    chosen = result.chosen
    extra = {k: v for k, v in chosen.outcome.extra.items() if k != "artifact"}
    if budget_record:
        extra["budget"] = budget_record

    def rejected(reason: str) -> tuple[Variant, None]:
        variant = Variant(
            name=spec.name,
            method=spec.method,
            options=chosen.candidate.options,
            size_bytes=chosen.candidate.size_bytes,
            gate=chosen.gates,
            accepted=False,
            reason=reason,
            search=result.search(),
            extra=extra,
            generative=chosen.candidate.generative,
        )
        return variant, None

    if result.path is None:
        return rejected(tuning.reason(result))
    built_tar = _artifact(result.path)
    try:
        speed = scoring.decode_speed(result.path, prompt, req.decode_tokens, threads=req.threads)
    except CompressionError as e:
        shutil.rmtree(result.path, ignore_errors=True)
        built_tar.unlink(missing_ok=True)
        why = f"{e}{_FP16_ON_CPU if spec.method == 'fp16' else ''}"
        return rejected(f"rejected: passed its gates but cannot decode: {why}")
    artifact = chosen.outcome.extra["artifact"]
    tar = work / f"{spec.name}{packing.SUFFIXES[VARIANT_COMPRESSION]}"
    os.replace(built_tar, tar)
    sha, size = artifact["sha256"], tar.stat().st_size
    extra["artifact"] = {"compression": VARIANT_COMPRESSION, "unpackedBytes": artifact["unpackedBytes"]}
    layout = LoraLayout.load(result.path)
    if layout is not None:
        # Where this variant takes adapters: the operator hands it to learning rounds, which export each
        # learned adapter for it (learning/adapter_rounds.py) without reading the artifact.
        extra[LORA_LAYOUT_KEY] = layout.to_json()
    shutil.rmtree(result.path, ignore_errors=True)
    ms = 1000.0 / speed.decode_tokens_per_s
    return (
        Variant(
            name=spec.name,
            method=spec.method,
            options=chosen.candidate.options,
            uri=tar.name,
            sha256=sha,
            size_bytes=size,
            size_ratio_vs_fp32=round(size / full_size, 4),
            latency=Latency(
                p50_ms=round(ms, 4),
                ratio_vs_fp32=round(base.decode_tokens_per_s / speed.decode_tokens_per_s, 4),
            ),
            gate=chosen.gates,
            accepted=True,
            reason=tuning.reason(result),
            search=result.search(),
            extra=extra,
            generative=chosen.candidate.generative,
            decode=Decode(**dataclasses.asdict(speed)),
        ),
        tar,
    )


def _budget(
    spec: VariantSpec,
    src: Any,
    ref: scoring.Reference,
    samples: Sequence[Sequence[int]],
    attempt: tuning.Attempt,
    log: Callable[[str], None],
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The budget's candidate (budgeting.py) and what finding it measured and built, for the manifest."""
    from kiri_runtime.compressing.lm import budgeting, building

    max_bytes = int(spec.options["maxBytes"])
    base = tuning.build_options(spec.options)
    resolved = building.resolve("int4", base)
    tied = _tied(src.hf_dir)
    log(f"  {spec.name}: measuring each projection's 4-bit sensitivity for maxBytes {max_bytes}")
    units = budgeting.sensitivities(
        ref.model, ref.logits, samples, fuse_qkv=bool(resolved["fuseQkv"]), tied=tied
    )

    def measure(options: dict[str, Any]) -> tuple[int | None, float | None]:
        try:
            out = attempt(options)
        except CompressionError:
            return None, None
        return out.size_bytes, out.fidelity.kl_mean if out.fidelity is not None else None

    chosen, tried = budgeting.fit(units, base, max_bytes, measure, untied=not tied, log=log)
    record = {
        "maxBytes": max_bytes,
        "sensitivity": {u.name: u.sensitivity for u in units},
        "fits": [t.record() for t in tried],
        "chosen": chosen.get("int8Tensors") if chosen is not None else None,
    }
    return chosen, record


def _artifact(candidate_dir: Path) -> Path:
    """Where a candidate's packed artifact is written: beside its directory, named after it."""
    from kiri_runtime.compressing.lm import packing

    return candidate_dir.with_name(candidate_dir.name + packing.SUFFIXES[VARIANT_COMPRESSION])


def _max_positions(hf_dir: Path) -> int:
    try:
        cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        return int(cfg.get("max_position_embeddings") or MAX_EVAL_TOKENS)
    except (OSError, ValueError, TypeError, AttributeError):
        return MAX_EVAL_TOKENS


def _tied(hf_dir: Path) -> bool:
    """Whether the checkpoint ties embeddings and lm_head (unknown counts as tied: no rung is skipped)."""
    try:
        cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(cfg.get("tie_word_embeddings", True)) if isinstance(cfg, dict) else True


def _type_counts(types: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in dict(types).values():
        counts[str(t)] = counts.get(str(t), 0) + 1
    return dict(sorted(counts.items()))
