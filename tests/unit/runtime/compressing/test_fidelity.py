"""Fidelity metrics and gate verdicts on known arrays."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from kiri_runtime.compressing import evaluating
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import Gate


def test_identical_outputs_are_perfect() -> None:
    ref = [np.random.default_rng(0).standard_normal((10, 4))]
    fid = evaluating.fidelity(ref, [ref[0].copy()], classifier=True)
    assert fid.cosine.min == pytest.approx(1.0) and fid.max_abs_error == 0.0 and fid.top1_agreement == 1.0
    assert fid.samples == 10


def test_cosine_per_sample_and_top1_agreement() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    got = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.1]])
    fid = evaluating.fidelity([ref], [got], classifier=True)
    cos = [1.0, 0.0, 1.0, 1.0 / math.sqrt(1.01)]
    assert fid.cosine.mean == pytest.approx(np.mean(cos))
    assert fid.cosine.min == pytest.approx(0.0)
    assert fid.cosine.p5 == pytest.approx(np.percentile(cos, 5))
    assert fid.top1_agreement == pytest.approx(0.75)
    assert fid.max_abs_error == pytest.approx(1.0)


def test_multiple_outputs_are_compared_together_and_nan_fails() -> None:
    ref = [np.ones((3, 2)), np.ones((3, 2, 2))]
    got = [np.ones((3, 2)), np.full((3, 2, 2), np.nan)]
    fid = evaluating.fidelity(ref, got, classifier=False)
    assert fid.top1_agreement is None and fid.max_abs_error == sys.float_info.max and fid.cosine.min == -1.0
    results = evaluating.check_gates([Gate(metric="max-abs-error", op="<=", threshold=1.0)], fid)
    assert not results[0].passed
    with pytest.raises(CompressionError, match="shape"):
        evaluating.fidelity([np.ones((3, 2))], [np.ones((3, 3))], classifier=False)


def test_gates_and_margin() -> None:
    fid = evaluating.fidelity([np.array([[1.0, 0.0]] * 4)], [np.array([[1.0, 0.05]] * 4)], classifier=True)
    gates = [
        Gate(metric="cosine", stat="min", op=">=", threshold=0.99),
        Gate(metric="top1-agreement", op=">=", threshold=1.0),
        Gate(metric="max-abs-error", stat="max", op="<", threshold=0.01),
    ]
    results = evaluating.check_gates(gates, fid)
    assert [r.passed for r in results] == [True, True, False]
    assert results[2].value == pytest.approx(0.05)
    assert evaluating.margin(results) == pytest.approx(0.01 - 0.05)
    assert evaluating.margin(results[:2]) == pytest.approx(0.0)  # top1 exactly at its threshold


def test_evalset_split_keeps_both_sides_non_empty() -> None:
    es = evaluating.EvalSet(["x"], [np.arange(10).reshape(10, 1)])
    a, b = es.split(0.8)
    assert (len(a), len(b)) == (8, 2)
    tiny = evaluating.EvalSet(["x"], [np.arange(2).reshape(2, 1)])
    assert [len(p) for p in tiny.split(0.99)] == [1, 1]


def test_load_npz_rejects_mismatched_sample_axes(tmp_path: object) -> None:

    path = Path(str(tmp_path)) / "bad.npz"
    np.savez(path, a=np.zeros((3, 2)), b=np.zeros((4, 2)))
    with pytest.raises(CompressionError, match="same non-zero first"):
        evaluating.load_npz(path)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CompressionError, match="not a readable"):
        evaluating.load_npz(garbage)
