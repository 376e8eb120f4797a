"""One `kiri compress` run: source → verified fp32 ONNX → variants (tuned until they pass their gates) → manifest.

Everything is built in a scratch directory inside the output directory and moved into place at the end; the
manifest is written last and atomically, so a failed run never leaves a manifest that claims success.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime import manifests
from kiri_runtime.compressing import distilling, evaluating, exporting, quantizing, specs
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet
from kiri_runtime.manifests import (
    Baseline,
    Candidate,
    EvalData,
    Latency,
    Manifest,
    ModelInfo,
    Variant,
    VariantSpec,
)

MODEL_FILE = "model.onnx"


@dataclass
class Request:
    source: str
    out: Path
    variants: list[VariantSpec]
    format: str | None = None
    gates: list[str] = field(default_factory=list)
    eval_data: str | None = None
    eval_sha256: str | None = None
    train_data: str | None = None
    sha256: str | None = None
    state_dict: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threads: int = 1
    atol: float = 1e-4
    rtol: float = 1e-3
    model_name: str | None = None
    model_version: str | None = None
    synthetic_samples: int = 64
    latency_rounds: int = 60
    task: str = "auto"  # auto | classifier | other


class Progress:
    def __init__(self, stream: Any = None) -> None:
        self._t0 = time.monotonic()
        self._stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[kiri compress {time.monotonic() - self._t0:7.1f}s] {msg}", file=self._stream, flush=True)


@dataclass
class _Context:
    req: Request
    work: Path
    fp32: Path
    int8_src: Path  # the fp32 model with Gemm rewritten as MatMul, what the int8 builds start from
    evalset: EvalSet
    reference: list[np.ndarray[Any, Any]]
    classifier: bool
    log: Callable[[str], None]
    torch_model: exporting.TorchModel | None
    input_names: list[str]
    output_names: list[str]
    counter: int = 0

    def scratch(self, stem: str) -> Path:
        self.counter += 1
        return self.work / f"{stem}-{self.counter}.onnx"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def _size(path: Path) -> int:
    return path.stat().st_size


def _measure(ctx: _Context, path: Path, rounds: int) -> Latency:
    base, var = evaluating.latencies([ctx.fp32, path], ctx.evalset, threads=ctx.req.threads, rounds=rounds)
    return Latency(p50_ms=round(var, 4), ratio_vs_fp32=round(var / base, 4))


def _try(
    ctx: _Context, spec: VariantSpec, options: dict[str, Any], build: Callable[[Path], None]
) -> tuple[Candidate, Path | None]:
    path = ctx.scratch(spec.name)
    try:
        build(path)
        sess = evaluating.session(path, threads=ctx.req.threads)
        fid = evaluating.fidelity(ctx.reference, evaluating.run(sess, ctx.evalset), classifier=ctx.classifier)
    except CompressionError as e:
        ctx.log(f"  {spec.name} {options}: failed: {e}")
        return Candidate(options=options, passed=False, error=str(e)), None
    results = evaluating.check_gates(spec.gate, fid)
    passed = all(r.passed for r in results)
    lat = _measure(ctx, path, max(20, ctx.req.latency_rounds // 2))
    ctx.log(
        f"  {spec.name} {_short(options)}: cosine min {fid.cosine.min:.5f} mean {fid.cosine.mean:.5f}, "
        f"latency x{lat.ratio_vs_fp32:.2f} vs fp32, {'PASS' if passed else 'miss'}"
    )
    return Candidate(options=options, fidelity=fid, latency=lat, size_bytes=_size(path), passed=passed), path


def _short(options: dict[str, Any]) -> str:
    shown = {
        k: (f"[{len(v)} nodes]" if k == "excludeNodes" and len(v) > 3 else v) for k, v in options.items()
    }
    return str(shown)


def _score(ctx: _Context, spec: VariantSpec, cand: Candidate) -> float:
    if cand.fidelity is None:
        return -math.inf
    return evaluating.margin(evaluating.check_gates(spec.gate, cand.fidelity))


def _quantized_variant(ctx: _Context, spec: VariantSpec) -> tuple[Variant, Path | None]:
    method = spec.method
    tune = bool(spec.options.get("tune", True))
    max_exclude = int(spec.options.get("maxExclude", 8))
    base = quantizing.defaults(method, spec.options)
    src = ctx.fp32 if method == "fp16" else ctx.int8_src
    calib = ctx.evalset if method == "int8-static" else None

    def builder(opts: dict[str, Any]) -> Callable[[Path], None]:
        return lambda dst: quantizing.build(method, opts, src, dst, calibration=calib)

    tried: list[tuple[Candidate, Path | None]] = []
    seen: list[dict[str, Any]] = []

    def attempt(opts: dict[str, Any]) -> Candidate:
        if opts in seen:
            return next(c for c, _ in tried if c.options == opts)
        seen.append(opts)
        if method == "int8-static":
            ctx.log(
                f"  calibrating {spec.name} on {min(len(ctx.evalset), int(opts['calibrationSamples']))} samples"
            )
        cand, path = _try(ctx, spec, opts, builder(opts))
        tried.append((cand, path))
        return cand

    ctx.log(f"variant {spec.name}: {method}")
    first = attempt(base)
    extra: dict[str, Any] = {}
    if not first.passed and tune:
        ctx.log(f"variant {spec.name}: missed {', '.join(g.describe() for g in spec.gate)}; auto-tuning")
        if method == "fp16":
            attempt(
                base | {"opBlockList": sorted(set(base["opBlockList"]) | set(quantizing.FP16_SENSITIVE_OPS))}
            )
        else:
            for change in (
                {"perChannel": True},
                {"reduceRange": True},
                {"perChannel": True, "reduceRange": True},
            ):
                attempt(base | change)
            if not any(c.passed for c, _ in tried):
                best = max((c for c, _ in tried), key=lambda c: _score(ctx, spec, c))
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
    passing = [(c, p) for c, p in tried if c.passed and p is not None]
    path: Path | None
    if passing:
        chosen, path = min(passing, key=lambda cp: cp[0].latency.ratio_vs_fp32 if cp[0].latency else math.inf)
    else:
        chosen, path = max(tried, key=lambda cp: _score(ctx, spec, cp[0]))
    for _, p in tried:
        if p is not None and p != path:
            p.unlink(missing_ok=True)
    return _finish(
        ctx, spec, chosen, path if passing else None, tried=[c for c, _ in tried], extra=extra
    ), path if passing else None


def _sensitivity(
    ctx: _Context, spec: VariantSpec, options: dict[str, Any], calib: EvalSet | None
) -> list[dict[str, Any]]:
    """Quantize one node at a time and measure how far the output moves: the most damaging nodes come first."""
    nodes = [
        n for n in quantizing.quantizable_nodes(ctx.int8_src, spec.method) if n not in options["excludeNodes"]
    ]
    ctx.log(f"  measuring sensitivity of {len(nodes)} nodes, one at a time")
    subset = EvalSet(ctx.evalset.names, [a[:64] for a in ctx.evalset.arrays])
    ref = [r[:64] for r in ctx.reference]
    out: list[dict[str, Any]] = []
    for i, node in enumerate(nodes, 1):
        path = ctx.scratch(f"{spec.name}-sens")
        try:
            quantizing.build(
                spec.method, options, ctx.int8_src, path, calibration=calib, nodes_to_quantize=[node]
            )
            got = evaluating.run(evaluating.session(path, threads=ctx.req.threads), subset)
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


def _finish(
    ctx: _Context,
    spec: VariantSpec,
    chosen: Candidate,
    path: Path | None,
    *,
    tried: list[Candidate],
    extra: dict[str, Any],
) -> Variant:
    gates = evaluating.check_gates(spec.gate, chosen.fidelity) if chosen.fidelity else []
    described = ", ".join(
        f"{g.describe()} ({g.value:.5g})" if g.value is not None else g.describe() for g in gates
    )
    if path is not None:
        latency = _measure(ctx, path, ctx.req.latency_rounds)
        how = (
            "as given"
            if chosen is tried[0]
            else f"after auto-tune ({len(tried)} candidates, fastest passing chosen)"
        )
        reason = f"passed {described} {how}"
        fp32_size = _size(ctx.fp32)
        return Variant(
            name=spec.name,
            method=spec.method,
            options=chosen.options,
            uri=f"{spec.name}.onnx",
            sha256=exporting.sha256_file(path),
            size_bytes=_size(path),
            size_ratio_vs_fp32=round(_size(path) / fp32_size, 4),
            fidelity=chosen.fidelity,
            latency=latency,
            gate=gates,
            accepted=True,
            reason=reason,
            search=tried,
            extra=extra,
        )
    if chosen.fidelity is None:
        reason = f"rejected: no candidate could be built ({chosen.error})"
    else:
        reason = f"rejected: no candidate passed; best seen {described} with options {_short(chosen.options)}"
    return Variant(
        name=spec.name,
        method=spec.method,
        options=chosen.options,
        size_bytes=chosen.size_bytes,
        fidelity=chosen.fidelity,
        latency=chosen.latency,
        gate=gates,
        accepted=False,
        reason=reason,
        search=tried,
        extra=extra,
    )


def _distilled_variant(
    ctx: _Context, spec: VariantSpec, raw_eval: EvalSet | None, raw_train: EvalSet | None
) -> tuple[Variant, Path | None]:
    import torch

    opts = distilling.defaults(spec.options)
    ctx.log(f"variant {spec.name}: distilled")
    torch.manual_seed(ctx.req.seed)
    torch.set_num_threads(max(1, ctx.req.threads))
    if raw_train is not None:
        train_all = evaluating.bind(raw_train, evaluating.session(ctx.fp32))
        train_set, val_set = train_all.split(0.9)
        report_set, report_ref = ctx.evalset, ctx.reference
        label_src, held_out = raw_train, False
    else:
        train_set, val_set = ctx.evalset.split(0.8)
        cut = len(train_set)
        report_set, report_ref = val_set, [r[cut:] for r in ctx.reference]
        label_src, held_out = raw_eval, True  # type: ignore[assignment]
    labels = None
    if opts.get("labels"):
        if label_src is None or opts["labels"] not in label_src.names:
            raise CompressionError(
                f"distilled: labels array {opts['labels']!r} not found in the training data"
            )
        labels = label_src.arrays[label_src.names.index(opts["labels"])][: len(train_set)]
    teacher = evaluating.session(ctx.fp32, threads=ctx.req.threads)
    t_train = evaluating.run(teacher, train_set)
    t_val = evaluating.run(teacher, val_set)
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in train_set.arrays)
    info: dict[str, Any]
    if opts.get("student"):
        torch.manual_seed(ctx.req.seed)
        student = exporting.load_factory(str(opts["student"]))(**dict(opts.get("studentKwargs") or {}))
        if not isinstance(student, torch.nn.Module):
            raise CompressionError(
                f"distilled: student factory returned {type(student).__name__}, not a Module"
            )
        info = {"student": opts["student"]}
    else:
        if ctx.torch_model is None or not ctx.torch_model.rebuildable:
            raise CompressionError(
                "distilled: this source cannot be copied; give options.student (a factory)"
            )
        student, info = distilling.reduced_copy(
            ctx.torch_model.module,
            width=float(opts["width"]),
            depth=float(opts["depth"]),
            example=example,
            student_width=opts.get("studentWidth"),
            student_depth=opts.get("studentDepth"),
        )
    ctx.log(
        f"  training student ({distilling.student_params(student)} parameters) on {len(train_set)} samples"
    )
    training = distilling.train(
        student,
        train_set,
        t_train,
        val_set,
        t_val,
        classifier=ctx.classifier,
        options=opts,
        labels=labels,
        seed=ctx.req.seed,
        progress=ctx.log,
        teacher=lambda arrays: evaluating.run(teacher, EvalSet(train_set.names, arrays)),
    )
    ctx.log("  exporting student")
    student_model = exporting.TorchModel(student, None, rebuildable=True)
    fp32_student = ctx.work / f"{spec.name}-student-fp32.onnx"
    exporting.export(student_model, train_set, fp32_student, output_names=ctx.output_names)
    exported = evaluating.run(evaluating.session(fp32_student), report_set)
    exporting.verify(student_model, report_set, exported, atol=ctx.req.atol, rtol=ctx.req.rtol)
    paths: list[tuple[dict[str, Any], Path]] = []
    if opts["quantize"] == "int8-dynamic":
        mm = ctx.work / f"{spec.name}-student-mm.onnx"
        quantizing.gemm_to_matmul(fp32_student, mm)
        q = ctx.work / f"{spec.name}-student-int8.onnx"
        q_opts = quantizing.defaults(
            "int8-dynamic", {"perChannel": opts["perChannel"], "reduceRange": opts["reduceRange"]}
        )
        quantizing.build("int8-dynamic", q_opts, mm, q)
        paths.append((opts | {"quantize": "int8-dynamic"}, q))
    paths.append((opts | {"quantize": None}, fp32_student))
    tried: list[tuple[Candidate, Path]] = []
    for options, path in paths:
        fid = evaluating.fidelity(
            report_ref,
            evaluating.run(evaluating.session(path, threads=ctx.req.threads), report_set),
            classifier=ctx.classifier,
        )
        passed = all(r.passed for r in evaluating.check_gates(spec.gate, fid))
        lat = _measure(ctx, path, max(20, ctx.req.latency_rounds // 2))
        tried.append(
            (
                Candidate(options=options, fidelity=fid, latency=lat, size_bytes=_size(path), passed=passed),
                path,
            )
        )
        ctx.log(
            f"  student {'int8' if options['quantize'] else 'fp32'}: fidelity {fid.top1_agreement if ctx.classifier else fid.cosine.mean}, latency x{lat.ratio_vs_fp32:.2f}, {'PASS' if passed else 'miss'}"
        )
    passing = [cp for cp in tried if cp[0].passed]
    chosen, path = (
        min(passing, key=lambda cp: cp[0].latency.ratio_vs_fp32 if cp[0].latency else math.inf)
        if passing
        else max(tried, key=lambda cp: _score(ctx, spec, cp[0]))
    )
    final = ctx.work / f"{spec.name}-chosen.onnx"
    shutil.copyfile(path, final)
    teacher_params = (
        distilling.student_params(ctx.torch_model.module) if ctx.torch_model is not None else None
    )
    extra = {
        "studentParameters": distilling.student_params(student),
        "teacherParameters": teacher_params,
        "architecture": info,
        "training": {k: v for k, v in training.items() if k != "history"} | {"trainSamples": len(train_set)},
        "fidelitySet": "held-out 20% of the eval data"
        if held_out
        else "the eval data (training used --train-data)",
    }
    variant = _finish(ctx, spec, chosen, final if passing else None, tried=[c for c, _ in tried], extra=extra)
    return variant, final if passing else None


def run(req: Request, log: Callable[[str], None] | None = None) -> Manifest:
    log = log or Progress()
    stale = req.out / manifests.MANIFEST_FILE
    if stale.exists():
        stale.unlink()  # a manifest from an earlier run must not outlive a run that fails, even on bad input
    _seed_everything(req.seed)
    fmt = exporting.detect_format(req.source, req.format)
    if not req.variants:
        raise CompressionError("no variants requested: give --variant or --variants-json")
    specs.resolve(req.variants, req.gates, classifier=None)  # syntax and impossible gates, before any work
    for v in req.variants:
        if v.name == Path(MODEL_FILE).stem:
            raise CompressionError(f"variant name {v.name!r} is reserved for the full model")
        if v.method == "distilled":
            opts = distilling.defaults(v.options)
            if not opts.get("student") and fmt != "factory":
                raise CompressionError(
                    f"variant {v.name}: distilling a {fmt} source needs options.student (a student factory); "
                    "reduced copies are made from factory sources"
                )
        else:
            quantizing.defaults(v.method, v.options)
    if fmt != "onnx" and not req.eval_data:
        raise CompressionError(
            f"a {fmt} source needs --eval-data: the export is checked against eager PyTorch on it"
        )
    req.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".kiri-compress-", dir=req.out))
    try:
        return _run(req, fmt, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(req: Request, fmt: str, work: Path, log: Callable[[str], None]) -> Manifest:
    torch_model = None
    if fmt == "factory":
        local = None
        digest = ""
        if req.state_dict:
            local, digest = exporting.fetch(
                req.state_dict, work, expected_sha256=req.sha256, what="state dict"
            )
        elif req.sha256:
            raise CompressionError(
                "--sha256 with a factory source verifies the --state-dict, and none was given"
            )
    else:
        local, digest = exporting.fetch(req.source, work, expected_sha256=req.sha256)
    raw_eval = raw_train = None
    eval_sha = None
    if req.eval_data:
        data_path, eval_sha = exporting.fetch(
            req.eval_data, work, expected_sha256=req.eval_sha256, what="eval data"
        )
        raw_eval = evaluating.load_npz(data_path)
        log(f"eval data: {len(raw_eval)} samples, arrays {raw_eval.names}")
    if req.train_data:
        data_path, _ = exporting.fetch(req.train_data, work, expected_sha256=None, what="train data")
        raw_train = evaluating.load_npz(data_path, what="train data")
    fp32 = work / MODEL_FILE
    export_err = None
    if fmt == "onnx":
        assert local is not None
        log(f"checking ONNX model {local.name}")
        exporting.check_onnx(local)
        exporting.copy_model(local, fp32)
        sess = evaluating.session(fp32, threads=req.threads)
        evalset = (
            evaluating.bind(raw_eval, sess)
            if raw_eval
            else evaluating.synthesize(sess, samples=req.synthetic_samples, seed=req.seed)
        )
        if raw_eval is None:
            log(f"no --eval-data: fidelity is measured on {req.synthetic_samples} random inputs")
        reference = evaluating.run(sess, evalset)
    else:
        assert raw_eval is not None
        log(f"loading {fmt} source")
        torch_model = exporting.load_torch(
            fmt,
            local,
            factory=req.source if fmt == "factory" else None,
            factory_kwargs=req.factory_kwargs,
            seed=req.seed,
        )
        if fmt == "factory" and local is None:
            log("no --state-dict: using the factory's own (seeded) weights")
            digest = _module_digest(torch_model.module)
        names = [n for n in raw_eval.names if n != "labels"]
        inputs = EvalSet(names, [raw_eval.arrays[raw_eval.names.index(n)] for n in names])
        log("exporting to ONNX (torch.export + dynamo exporter, dynamic batch)")
        exporting.export(torch_model, inputs, fp32)
        exporting.check_onnx(fp32)
        sess = evaluating.session(fp32, threads=req.threads)
        evalset = evaluating.bind(inputs, sess)
        reference = evaluating.run(sess, evalset)
        log(f"verifying the ONNX model against eager PyTorch on {len(evalset)} samples")
        export_err = exporting.verify(torch_model, evalset, reference, atol=req.atol, rtol=req.rtol)
        log(f"export verified: max abs error {export_err:.3g}")
    classifier = evaluating.is_classifier(reference) if req.task == "auto" else req.task == "classifier"
    variants = specs.resolve(req.variants, req.gates, classifier=classifier)
    input_names, output_names = exporting.onnx_io(fp32)
    int8_src = work / "model-matmul.onnx"
    quantizing.gemm_to_matmul(fp32, int8_src)
    ctx = _Context(
        req, work, fp32, int8_src, evalset, reference, classifier, log, torch_model, input_names, output_names
    )
    (base_ms,) = evaluating.latencies([fp32], evalset, threads=req.threads, rounds=req.latency_rounds)
    log(f"fp32 baseline: {_size(fp32)} bytes, p50 {base_ms:.3f} ms (batch 1, {req.threads} thread(s))")
    built: list[Variant] = []
    files: dict[str, Path] = {}
    path: Path | None
    for spec in variants:
        if spec.method == "distilled":
            variant, path = _distilled_variant(ctx, spec, raw_eval, raw_train)
        else:
            variant, path = _quantized_variant(ctx, spec)
        log(f"variant {variant.name}: {'ACCEPTED' if variant.accepted else 'REJECTED'} ({variant.reason})")
        built.append(variant)
        if path is not None:
            files[variant.name] = path
    for name, path in files.items():
        os.replace(path, req.out / f"{name}.onnx")
    os.replace(fp32, req.out / MODEL_FILE)
    manifest = Manifest(
        model=ModelInfo(
            name=req.model_name,
            version=req.model_version,
            source_uri=req.source,
            source_sha256=digest,
            format=fmt,
            uri=MODEL_FILE,
            onnx_sha256=exporting.sha256_file(req.out / MODEL_FILE),
            size_bytes=_size(req.out / MODEL_FILE),
            inputs=input_names,
            outputs=output_names,
            export_max_abs_error=export_err,
        ),
        baseline=Baseline(p50_latency_ms=round(base_ms, 4), size_bytes=_size(req.out / MODEL_FILE)),
        seed=req.seed,
        eval_data=EvalData(
            uri=req.eval_data, sha256=eval_sha, samples=len(evalset), synthetic=evalset.synthetic
        ),
        variants=built,
    )
    manifests.dump(manifest, req.out)
    log(f"wrote {req.out / manifests.MANIFEST_FILE}")
    return manifest


def _module_digest(module: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
