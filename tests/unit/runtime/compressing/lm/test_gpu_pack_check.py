"""The GPU pack's check (compressing/lm/running.half_weights_error): the fp16 CUDA build cannot run on the Job's
CPU, so its weights are compared with the verified fp32 build's. Two one-node graphs written here stand for the
builds: the check passes fp16 rounding and refuses a missing, reshaped or changed weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.running import half_weights_error

RNG = np.random.default_rng(7)
W = RNG.normal(0, 0.05, (64, 32)).astype(np.float32)
NORM = RNG.normal(1, 0.01, (32,)).astype(np.float32)


def build(d: Path, weights: dict[str, np.ndarray], dtype: int) -> Path:
    d.mkdir()
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    x = helper.make_tensor_value_info("x", dtype, [1, 64])
    y = helper.make_tensor_value_info("y", dtype, [1, 32])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "proj"], ["y"])], "g", [x], [y], inits)
    onnx.save(helper.make_model(graph), str(d / "model.onnx"))
    return d


@pytest.fixture
def full(tmp_path: Path) -> Path:
    return build(tmp_path / "fp32", {"proj": W, "norm": NORM}, TensorProto.FLOAT)


def test_an_fp16_build_of_the_same_weights_passes_with_its_rounding_error(full: Path, tmp_path: Path) -> None:
    half = build(
        tmp_path / "fp16",
        {"proj": W.astype(np.float16), "norm": NORM.astype(np.float16)},
        TensorProto.FLOAT16,
    )
    error = half_weights_error(full, half)
    expected = max(float(np.abs(w.astype(np.float16).astype(np.float64) - w).max()) for w in (W, NORM))
    assert error == expected and 0 < error < 2**-11


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"proj": W.astype(np.float16)}, "weight norm is missing: the export is wrong"),
        (
            {"proj": W.T.copy().astype(np.float16), "norm": NORM.astype(np.float16)},
            "weight proj is shaped (32, 64), not (64, 32)",
        ),
        (
            {"proj": (W + np.float32(0.001)).astype(np.float16), "norm": NORM.astype(np.float16)},
            "weight proj differs from the fp32 build's by",
        ),
    ],
)
def test_a_missing_reshaped_or_changed_weight_is_a_wrong_export(
    full: Path, tmp_path: Path, weights: dict[str, np.ndarray], message: str
) -> None:
    half = build(tmp_path / "fp16", weights, TensorProto.FLOAT16)
    with pytest.raises(
        CompressionError, match="the fp16 CUDA build's " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        half_weights_error(full, half)


def test_a_gpu_pack_asked_of_an_onnx_source_is_refused_before_any_work(full: Path, tmp_path: Path) -> None:
    from kiri_runtime.compressing.running import Request, run
    from kiri_runtime.manifests import VariantSpec

    req = Request(
        source=str(full / "model.onnx"),
        out=tmp_path / "out",
        variants=[VariantSpec(name="q8", method="int8-dynamic")],
        gpu_pack="fp16",
    )
    with pytest.raises(CompressionError, match="--gpu-pack is for language models"):
        run(req, log=lambda _: None)
    assert not (tmp_path / "out").exists()
