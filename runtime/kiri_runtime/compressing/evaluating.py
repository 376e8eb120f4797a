"""Eval data, ONNX Runtime sessions, fidelity against the full model, latency and gate verdicts."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import CosineStats, Fidelity, Gate, GateResult

if TYPE_CHECKING:
    import onnxruntime as ort

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass
class EvalSet:
    """One array per model input; the first axis is the sample axis."""

    names: list[str]
    arrays: list[np.ndarray[Any, Any]]
    synthetic: bool = False

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def feeds(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray[Any, Any]]:
        return {n: a[start:stop] for n, a in zip(self.names, self.arrays, strict=True)}

    def split(self, fraction: float) -> tuple[EvalSet, EvalSet]:
        cut = max(1, min(len(self) - 1, round(len(self) * fraction)))
        return (
            EvalSet(self.names, [a[:cut] for a in self.arrays], self.synthetic),
            EvalSet(self.names, [a[cut:] for a in self.arrays], self.synthetic),
        )


def load_npz(path: Path, *, what: str = "eval data") -> EvalSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            arrays = [np.asarray(data[n]) for n in names]
    except Exception as e:
        raise CompressionError(f"{what} {path}: not a readable .npz file ({e})") from None
    if not names:
        raise CompressionError(f"{what} {path}: the .npz holds no arrays")
    sizes = {n: a.shape[0] if a.ndim else 0 for n, a in zip(names, arrays, strict=True)}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise CompressionError(
            f"{what} {path}: every array needs the same non-zero first (sample) axis, got {sizes}"
        )
    return EvalSet(names, arrays)


def session(path: str | Path, *, threads: int = 1) -> ort.InferenceSession:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        msg = str(e)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg or "not a registered" in msg:
            raise CompressionError(f"unsupported op in {Path(path).name}: {msg.strip()}") from None
        raise CompressionError(f"ONNX Runtime cannot load {Path(path).name}: {msg.strip()}") from None


def bind(evalset: EvalSet, sess: ort.InferenceSession) -> EvalSet:
    """Match eval arrays to the model's inputs by name (or by position for arr_0, arr_1...) and check shapes."""
    inputs = sess.get_inputs()
    want = [i.name for i in inputs]
    if set(want) <= set(evalset.names):
        order = [evalset.names.index(n) for n in want]
    elif len(evalset.names) == len(want) and all(n == f"arr_{k}" for k, n in enumerate(evalset.names)):
        order = list(range(len(want)))
    else:
        raise CompressionError(f"eval data arrays {evalset.names} do not match the model inputs {want}")
    arrays: list[np.ndarray[Any, Any]] = []
    for inp, k in zip(inputs, order, strict=True):
        a = evalset.arrays[k]
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise CompressionError(f"model input {inp.name!r} has unsupported type {inp.type}")
        if np.issubdtype(dtype, np.floating) != np.issubdtype(a.dtype, np.floating):
            raise CompressionError(f"eval data {inp.name!r} has dtype {a.dtype}, the model wants {inp.type}")
        shape = list(inp.shape)
        if a.ndim != len(shape):
            raise CompressionError(
                f"eval data {inp.name!r} has shape {list(a.shape)} (rank {a.ndim}); the model wants {shape}"
            )
        for axis, (got, dim) in enumerate(zip(a.shape, shape, strict=True)):
            if axis > 0 and isinstance(dim, int) and dim != got:
                raise CompressionError(
                    f"eval data {inp.name!r} has shape {list(a.shape)}; the model wants {shape} (axis {axis})"
                )
        arrays.append(a.astype(dtype, copy=False))
    return EvalSet(want, arrays, evalset.synthetic)


def synthesize(sess: ort.InferenceSession, *, samples: int, seed: int) -> EvalSet:
    """Random inputs from the model signature, for ONNX sources given without eval data."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    arrays: list[np.ndarray[Any, Any]] = []
    for inp in sess.get_inputs():
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            raise CompressionError(f"input {inp.name!r} ({inp.type}) cannot be synthesized; give --eval-data")
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape[1:]]
        names.append(inp.name)
        arrays.append(rng.standard_normal((samples, *dims)).astype(dtype))
    return EvalSet(names, arrays, synthetic=True)


def run(sess: ort.InferenceSession, evalset: EvalSet, *, batch: int = 64) -> list[np.ndarray[Any, Any]]:
    """All outputs over the whole eval set, in float64 so metrics do not lose precision."""
    chunks: list[list[np.ndarray[Any, Any]]] = []
    for start in range(0, len(evalset), batch):
        outs = sess.run(None, evalset.feeds(start, start + batch))
        chunks.append([np.asarray(o) for o in outs])
    return [np.concatenate([c[k] for c in chunks]).astype(np.float64) for k in range(len(chunks[0]))]


def is_classifier(outputs: Sequence[np.ndarray[Any, Any]]) -> bool:
    return outputs[0].ndim == 2 and outputs[0].shape[1] >= 2


def fidelity(
    reference: Sequence[np.ndarray[Any, Any]], candidate: Sequence[np.ndarray[Any, Any]], *, classifier: bool
) -> Fidelity:
    n = reference[0].shape[0]
    ref = np.concatenate([r.reshape(n, -1) for r in reference], axis=1)
    got = np.concatenate([c.reshape(n, -1).astype(np.float64) for c in candidate], axis=1)
    if ref.shape != got.shape:
        raise CompressionError(f"variant output shape {got.shape} differs from the full model's {ref.shape}")
    dot = (ref * got).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.where(
        norms > 0, dot / np.maximum(norms, 1e-300), np.where(np.abs(ref - got).max(axis=1) == 0, 1.0, 0.0)
    )
    # A sample whose output holds NaN or inf is as wrong as it gets; JSON has no inf, so the error is capped.
    broken = ~np.isfinite(got).all(axis=1)
    cos = np.where(broken, -1.0, np.nan_to_num(cos, nan=-1.0))
    top1 = None
    if classifier:
        top1 = float((reference[0].argmax(axis=1) == candidate[0].argmax(axis=1)).mean())
    err = float(np.abs(ref - got).max()) if not broken.any() else sys.float_info.max
    return Fidelity(
        cosine=CosineStats(mean=float(cos.mean()), min=float(cos.min()), p5=float(np.percentile(cos, 5))),
        top1_agreement=top1,
        max_abs_error=err,
        samples=n,
    )


def gate_value(gate: Gate, fid: Fidelity) -> float | None:
    if gate.metric == "cosine":
        return float(getattr(fid.cosine, "max" if gate.stat == "max" else gate.stat, fid.cosine.mean))
    if gate.metric == "top1-agreement":
        return fid.top1_agreement
    return fid.max_abs_error


def _compare(value: float, op: str, threshold: float) -> bool:
    return {
        ">=": value >= threshold,
        ">": value > threshold,
        "<=": value <= threshold,
        "<": value < threshold,
    }[op]


def check_gates(gates: Sequence[Gate], fid: Fidelity) -> list[GateResult]:
    results = []
    for g in gates:
        value = gate_value(g, fid)
        passed = value is not None and math.isfinite(value) and _compare(value, g.op, g.threshold)
        results.append(GateResult(**g.model_dump(), value=value, passed=passed))
    return results


def margin(results: Sequence[GateResult]) -> float:
    """The worst gate's distance past its threshold (positive: passing). Used to rank failing candidates."""
    worst = math.inf
    for r in results:
        if r.value is None or not math.isfinite(r.value):
            return -math.inf
        d = r.value - r.threshold if r.op in (">=", ">") else r.threshold - r.value
        worst = min(worst, d)
    return worst


def latencies(
    paths: Sequence[str | Path], evalset: EvalSet, *, threads: int = 1, rounds: int = 60, warmup: int = 5
) -> list[float]:
    """p50 milliseconds of single-sample inference for each model, measured interleaved.

    Interleaving round by round means load from other processes hits every model alike, so the ratios between
    them hold even on a busy machine.
    """
    sessions = [session(p, threads=threads) for p in paths]
    n = len(evalset)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(warmup + rounds):
        feeds = evalset.feeds(r % n, r % n + 1)
        for k, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) * 1000.0)
    return [float(np.median(t)) for t in times]
