"""int8 (dynamic, static QDQ) and fp16 builds of an fp32 ONNX model, and the tuner that searches their options.

`build` makes one candidate configuration; `tuned_variant` tries the given options, then (when they miss the
gates) per-channel and reduced-range weights, then keeping the most output-sensitive nodes unquantized, and
keeps the fastest candidate that passes (searching.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.compressing import evaluating
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet
from kiri_runtime.compressing.searching import Context, Search
from kiri_runtime.manifests import Candidate, Variant, VariantSpec

DYNAMIC_OPS = ("MatMul", "Conv", "Gather", "Attention", "LSTM")
STATIC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Ops whose fp16 versions lose the most (reductions, exponentials): the fp16 tuner keeps these in fp32.
FP16_SENSITIVE_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Erf"]

KNOWN_OPTIONS = {
    "int8-dynamic": {"perChannel", "reduceRange", "weightType", "excludeNodes", "tune", "maxExclude"},
    "int8-static": {
        "perChannel",
        "reduceRange",
        "activationType",
        "weightType",
        "calibrationMethod",
        "calibrationSamples",
        "excludeNodes",
        "tune",
        "maxExclude",
    },
    "fp16": {"keepIoTypes", "opBlockList", "tune"},
}


def defaults(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The full option set a build uses, so the manifest records every choice, not just those given."""
    options = {k: v for k, v in options.items() if v is not None}  # the API sends unset options as null
    known = KNOWN_OPTIONS[method]
    unknown = sorted(set(options) - known)
    if unknown:
        raise CompressionError(f"{method}: unknown options {unknown}; known: {sorted(known)}")
    if method == "fp16":
        base: dict[str, Any] = {"keepIoTypes": True, "opBlockList": []}
    else:
        base = {"perChannel": False, "reduceRange": False, "weightType": "int8", "excludeNodes": []}
        if method == "int8-static":
            base |= {"activationType": "uint8", "calibrationMethod": "minmax", "calibrationSamples": 256}
    merged = base | {k: v for k, v in options.items() if k not in ("tune", "maxExclude")}
    for key in ("perChannel", "reduceRange", "keepIoTypes"):
        if key in merged and not isinstance(merged[key], bool):
            raise CompressionError(f"{method}: option {key} must be true or false, got {merged[key]!r}")
    for key in ("weightType", "activationType"):
        if key in merged and merged[key] not in ("int8", "uint8"):
            raise CompressionError(f"{method}: option {key} must be int8 or uint8, got {merged[key]!r}")
    if method == "int8-static" and merged["calibrationMethod"] not in ("minmax", "entropy", "percentile"):
        raise CompressionError("int8-static: calibrationMethod must be minmax, entropy or percentile")
    return merged


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # The quantizer logs a pre-processing hint on every call through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def gemm_to_matmul(src: Path, dst: Path) -> None:
    """Rewrite Gemm (what a Linear on 2-D input exports to) as MatMul + Add.

    ONNX Runtime's dynamic quantizer only handles MatMul, so without this an MLP would come out unquantized.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or node.input[1] not in inits
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        wname = f"{node.input[1]}_kiri_mm"
        model.graph.initializer.append(numpy_helper.from_array(weight, wname))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{node.output[0]}_kiri_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name or None))
        if has_bias:
            nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(dst))


def quantizable_nodes(path: Path, method: str) -> list[str]:
    import onnx

    ops = DYNAMIC_OPS if method == "int8-dynamic" else STATIC_OPS
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    # Only nodes with a constant weight: those are where int8 saves size and time.
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ops and n.op_type != "Gather" and any(i in inits for i in n.input)
    ]


class _Reader:
    def __init__(self, evalset: EvalSet, samples: int, batch: int = 16) -> None:
        self._feeds = [
            evalset.feeds(s, min(s + batch, samples)) for s in range(0, min(samples, len(evalset)), batch)
        ]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def build(
    method: str,
    options: dict[str, Any],
    src: Path,
    dst: Path,
    *,
    calibration: EvalSet | None = None,
    nodes_to_quantize: list[str] | None = None,
) -> None:
    """Write `dst` from the fp32 model at `src` (for int8, the Gemm-free rewrite) with these options."""
    try:
        if method == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(
                onnx.load(str(src)),
                keep_io_types=bool(options["keepIoTypes"]),
                op_block_list=list(options["opBlockList"]) or None,
            )
            onnx.save(model, str(dst))
            return
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        extra = {"MatMulConstBOnly": True}
        with _quiet_quantizer():
            if method == "int8-dynamic":
                quantize_dynamic(
                    str(src),
                    str(dst),
                    per_channel=bool(options["perChannel"]),
                    reduce_range=bool(options["reduceRange"]),
                    weight_type=qtype[options["weightType"]],
                    nodes_to_exclude=list(options["excludeNodes"]),
                    nodes_to_quantize=nodes_to_quantize,
                    op_types_to_quantize=list(DYNAMIC_OPS),
                    extra_options=extra,
                )
            elif method == "int8-static":
                if calibration is None:
                    raise CompressionError("int8-static needs calibration data (--eval-data)")
                calib = {
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[options["calibrationMethod"]]
                quantize_static(
                    str(src),
                    str(dst),
                    _Reader(calibration, int(options["calibrationSamples"])),
                    quant_format=QuantFormat.QDQ,
                    per_channel=bool(options["perChannel"]),
                    reduce_range=bool(options["reduceRange"]),
                    activation_type=qtype[options["activationType"]],
                    weight_type=qtype[options["weightType"]],
                    nodes_to_exclude=list(options["excludeNodes"]),
                    nodes_to_quantize=nodes_to_quantize,
                    op_types_to_quantize=list(STATIC_OPS),
                    calibrate_method=calib,
                    extra_options=extra,
                )
            else:
                raise CompressionError(f"unknown method {method!r}")
    except CompressionError:
        raise
    except Exception as e:
        raise CompressionError(
            f"{method} build failed ({type(e).__name__}): {str(e).strip()[:500]}"
        ) from None


# ---- tuning: the search over a method's options --------------------------------------------------------


def tuned_variant(ctx: Context, spec: VariantSpec) -> tuple[Variant, Path | None]:
    method = spec.method
    tune = bool(spec.options.get("tune", True))
    max_exclude = int(spec.options.get("maxExclude", 8))
    base = defaults(method, spec.options)
    src = ctx.fp32 if method == "fp16" else ctx.int8_src
    calib = ctx.evalset if method == "int8-static" else None
    search = Search(ctx, spec)

    def builder(opts: dict[str, Any]) -> Callable[[Path], None]:
        return lambda dst: build(method, opts, src, dst, calibration=calib)

    def attempt(opts: dict[str, Any]) -> Candidate:
        known = search.known(opts)
        if known is not None:
            return known
        if method == "int8-static":
            ctx.log(
                f"  calibrating {spec.name} on {min(len(ctx.evalset), int(opts['calibrationSamples']))} samples"
            )
        return search.attempt(opts, builder(opts))

    ctx.log(f"variant {spec.name}: {method}")
    first = attempt(base)
    extra: dict[str, Any] = {}
    if not first.passed and tune:
        ctx.log(f"variant {spec.name}: missed {', '.join(g.describe() for g in spec.gate)}; auto-tuning")
        if method == "fp16":
            attempt(base | {"opBlockList": sorted(set(base["opBlockList"]) | set(FP16_SENSITIVE_OPS))})
        else:
            for change in (
                {"perChannel": True},
                {"reduceRange": True},
                {"perChannel": True, "reduceRange": True},
            ):
                attempt(base | change)
            if not search.passed():
                best = search.best()
                ranked = _sensitivity(ctx, spec, best.options, calib)
                extra["sensitivity"] = ranked[:10]
                names = [r["node"] for r in ranked]
                k = 1
                while k <= min(max_exclude, len(names) - 1):
                    cand = attempt(
                        best.options
                        | {"excludeNodes": sorted(set(best.options["excludeNodes"]) | set(names[:k]))}
                    )
                    if cand.passed:
                        break
                    k *= 2
    return search.finish(extra)


def _sensitivity(
    ctx: Context, spec: VariantSpec, options: dict[str, Any], calib: EvalSet | None
) -> list[dict[str, Any]]:
    """Quantize one node at a time and measure how far the output moves: the most damaging nodes come first."""
    nodes = [n for n in quantizable_nodes(ctx.int8_src, spec.method) if n not in options["excludeNodes"]]
    ctx.log(f"  measuring sensitivity of {len(nodes)} nodes, one at a time")
    subset = EvalSet(ctx.evalset.names, [a[:64] for a in ctx.evalset.arrays])
    ref = [r[:64] for r in ctx.reference]
    out: list[dict[str, Any]] = []
    for i, node in enumerate(nodes, 1):
        path = ctx.scratch(f"{spec.name}-sens")
        try:
            build(spec.method, options, ctx.int8_src, path, calibration=calib, nodes_to_quantize=[node])
            got = evaluating.run(evaluating.session(path, threads=ctx.threads), subset)
        except CompressionError as e:
            ctx.log(f"  sensitivity of {node}: not measurable ({e}); left quantized")
            continue
        finally:
            path.unlink(missing_ok=True)
        fid = evaluating.fidelity(ref, got, classifier=ctx.classifier)
        out.append({"node": node, "cosineLoss": 1.0 - fid.cosine.mean, "maxAbsError": fid.max_abs_error})
        if i % 10 == 0:
            ctx.log(f"  sensitivity {i}/{len(nodes)}")
    out.sort(key=lambda r: (-r["cosineLoss"], -r["maxAbsError"], r["node"]))
    return out
