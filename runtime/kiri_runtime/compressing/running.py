"""One `kiri compress` run: source → verified fp32 ONNX → variants (tuned until they pass their gates) → manifest.

This is the orchestration of tensor models (`--format hf|gguf`, causal language models, go to
`lm/running.py`); the variants are built by `quantizing.tuned_variant` and
`distilling.distilled_variant`, both of which keep the fastest candidate that passes (searching.py).
Everything is built in a scratch directory inside the output directory and moved into place at the end; the
manifest is written last and atomically, so a failed run never leaves a manifest that claims success.
"""

from __future__ import annotations

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
from kiri_runtime.compressing.searching import Context, size
from kiri_runtime.manifests import Baseline, EvalData, Manifest, ModelInfo, Variant, VariantSpec

MODEL_FILE = "model.onnx"
LM_FORMATS = ("hf", "gguf")  # causal language models: compressing/lm/running.py


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
    decode_tokens: int = 64  # causal LMs: new tokens of the decode-speed measurement
    gpu_pack: str | None = None  # causal LMs: "fp16": the full model for GPU nodes too (lm/running.py)


class Progress:
    def __init__(self, stream: Any = None) -> None:
        self._t0 = time.monotonic()
        self._stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[kiri compress {time.monotonic() - self._t0:7.1f}s] {msg}", file=self._stream, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def run(req: Request, log: Callable[[str], None] | None = None) -> Manifest:
    log = log or Progress()
    stale = req.out / manifests.MANIFEST_FILE
    if stale.exists():
        stale.unlink()  # a manifest from an earlier run must not outlive a run that fails, even on bad input
    _seed_everything(req.seed)
    if req.format in LM_FORMATS or (req.format is None and req.source.lower().endswith(".gguf")):
        from kiri_runtime.compressing.lm.running import run_lm

        return run_lm(req, req.format or "gguf", log)
    fmt = exporting.detect_format(req.source, req.format)
    if req.gpu_pack:
        raise CompressionError(
            "--gpu-pack is for language models (hf or gguf sources), not ONNX or torch ones"
        )
    if not req.variants:
        raise CompressionError("no variants requested: give --variant or --variants-json")
    specs.resolve(req.variants, req.gates, classifier=None)  # syntax and impossible gates, before any work
    for v in req.variants:
        if v.name == Path(MODEL_FILE).stem:
            raise CompressionError(f"variant name {v.name!r} is reserved for the full model")
        if v.method == "distilled":
            # A source with no PyTorch module to copy gets the default student (distilling.mlp_student).
            distilling.defaults(v.options)
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
    ctx = Context(
        work=work,
        fp32=fp32,
        int8_src=int8_src,
        evalset=evalset,
        reference=reference,
        classifier=classifier,
        log=log,
        torch_model=torch_model,
        output_names=output_names,
        threads=req.threads,
        latency_rounds=req.latency_rounds,
        seed=req.seed,
        atol=req.atol,
        rtol=req.rtol,
    )
    (base_ms,) = evaluating.latencies([fp32], evalset, threads=req.threads, rounds=req.latency_rounds)
    log(f"fp32 baseline: {size(fp32)} bytes, p50 {base_ms:.3f} ms (batch 1, {req.threads} thread(s))")
    built: list[Variant] = []
    files: dict[str, Path] = {}
    path: Path | None
    for spec in variants:
        if spec.method == "distilled":
            variant, path = distilling.distilled_variant(ctx, spec, raw_eval, raw_train)
        else:
            variant, path = quantizing.tuned_variant(ctx, spec)
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
            size_bytes=size(req.out / MODEL_FILE),
            inputs=input_names,
            outputs=output_names,
            export_max_abs_error=export_err,
        ),
        baseline=Baseline(p50_latency_ms=round(base_ms, 4), size_bytes=size(req.out / MODEL_FILE)),
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
