"""The candidate search every variant runs: the fastest passing candidate ships, else the best miss is reported."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet
from kiri_runtime.compressing.searching import Context, Search, score, short
from kiri_runtime.manifests import Candidate, CosineStats, Fidelity, Gate, Latency, VariantSpec

GATE = Gate(metric="cosine", stat="min", op=">=", threshold=0.99)


def _identity(path: Path, scale: float = 1.0) -> Path:
    """y = x * scale: scale 1 is the fp32 model itself, anything else moves its output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [4], [scale, 1.0, 1.0, 1.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "g", [x], [y], [s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _context(tmp_path: Path) -> Context:
    fp32 = _identity(tmp_path / "model.onnx")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    return Context(
        work=tmp_path,
        fp32=fp32,
        int8_src=fp32,
        evalset=EvalSet(["x"], [x]),
        reference=[x],
        classifier=False,
        log=lambda _: None,
        torch_model=None,
        output_names=["y"],
        latency_rounds=20,
    )


def _fidelity(cos_min: float) -> Fidelity:
    return Fidelity(cosine=CosineStats(mean=cos_min, min=cos_min, p5=cos_min), max_abs_error=0.1, samples=8)


def _candidate(search: Search, name: str, cos_min: float, ratio: float) -> tuple[Candidate, Path]:
    path = shutil.copyfile(search.ctx.fp32, search.ctx.work / f"{name}.onnx")
    cand = Candidate(
        options={"name": name},
        fidelity=_fidelity(cos_min),
        latency=Latency(p50_ms=ratio, ratio_vs_fp32=ratio),
        size_bytes=path.stat().st_size,
        passed=cos_min >= GATE.threshold,
    )
    search.tried.append((cand, path))
    return cand, path


def _spec() -> VariantSpec:
    return VariantSpec(name="int8", method="int8-dynamic", gate=[GATE])


def test_the_fastest_passing_candidate_ships_and_every_other_file_is_deleted(tmp_path: Path) -> None:
    search = Search(_context(tmp_path), _spec())
    _, missed = _candidate(search, "missed", 0.9, 0.5)
    _, slow = _candidate(search, "slow", 0.999, 1.5)
    fast_cand, fast = _candidate(search, "fast", 0.995, 0.9)
    variant, path = search.finish({"k": 1})
    assert path == fast and fast.is_file() and not missed.exists() and not slow.exists()
    assert variant.accepted and variant.options == {"name": "fast"} and variant.uri == "int8.onnx"
    assert variant.sha256 == hashlib.sha256(fast.read_bytes()).hexdigest()
    assert variant.size_ratio_vs_fp32 == 1.0 and variant.fidelity == fast_cand.fidelity
    assert (
        variant.reason
        == "passed cosine.min>=0.99 (0.995) after auto-tune (3 candidates, fastest passing chosen)"
    )
    assert [c.options["name"] for c in variant.search] == ["missed", "slow", "fast"]
    assert variant.extra == {"k": 1}
    assert variant.latency is not None and variant.latency.ratio_vs_fp32 > 0


def test_a_first_candidate_that_passes_is_taken_as_given(tmp_path: Path) -> None:
    search = Search(_context(tmp_path), _spec())
    _candidate(search, "given", 0.995, 1.0)
    variant, path = search.finish({})
    assert path is not None and variant.reason == "passed cosine.min>=0.99 (0.995) as given"


def test_with_no_passing_candidate_the_best_miss_is_reported_and_nothing_ships(tmp_path: Path) -> None:
    search = Search(_context(tmp_path), _spec())
    _, worse = _candidate(search, "worse", 0.5, 0.1)
    best_cand, best = _candidate(search, "best", 0.98, 2.0)
    assert not search.passed() and search.best() is best_cand
    variant, path = search.finish({})
    assert path is None and not worse.exists() and not best.exists()
    assert not variant.accepted and variant.uri is None and variant.sha256 is None
    assert variant.options == {"name": "best"} and variant.latency == best_cand.latency
    assert variant.reason == (
        "rejected: no candidate passed; best seen cosine.min>=0.99 (0.98) with options {'name': 'best'}"
    )


def test_a_build_that_fails_is_a_failed_candidate_and_is_remembered(tmp_path: Path) -> None:
    search = Search(_context(tmp_path), _spec())

    def broken(dst: Path) -> None:
        raise CompressionError("no MatMul to quantize")

    cand = search.attempt({"perChannel": True}, broken)
    assert (cand.passed, cand.error, cand.fidelity) == (False, "no MatMul to quantize", None)
    assert search.known({"perChannel": True}) is cand and search.known({"perChannel": False}) is None
    assert score(search.spec, cand) == -np.inf
    variant, path = search.finish({})
    assert path is None
    assert variant.reason == "rejected: no candidate could be built (no MatMul to quantize)"


def test_an_attempt_is_built_into_a_scratch_file_and_judged_against_the_reference(tmp_path: Path) -> None:
    search = Search(_context(tmp_path), _spec())
    built: list[Path] = []

    def build(scale: float) -> Any:
        def write(dst: Path) -> None:
            built.append(_identity(dst, scale))

        return write

    same = search.attempt({"scale": 1.0}, build(1.0))
    moved = search.attempt({"scale": -1.0}, build(-1.0))
    assert [p.name for p in built] == ["int8-1.onnx", "int8-2.onnx"]
    assert same.passed and same.fidelity is not None and same.fidelity.cosine.min == pytest.approx(1.0)
    assert not moved.passed and moved.fidelity is not None and moved.fidelity.cosine.min < 0.99
    assert same.size_bytes == built[0].stat().st_size and same.latency is not None
    variant, path = search.finish({})
    assert path == built[0] and not built[1].exists() and variant.reason.endswith("as given")


def test_short_options_count_long_node_lists() -> None:
    assert short({"excludeNodes": ["a", "b", "c", "d"], "perChannel": True}) == (
        "{'excludeNodes': '[4 nodes]', 'perChannel': True}"
    )
    assert short({"excludeNodes": ["a"]}) == "{'excludeNodes': ['a']}"
