"""GGUF blocks as MatMulNBits blocks: decoded weights equal gguf-py's dequantisation, and onnxruntime's MatMulNBits
computes A @ W with them."""

from __future__ import annotations

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from onnx import TensorProto, helper, numpy_helper

from kiri_runtime.compressing.lm import reblocking
from kiri_runtime.compressing.lm.reblocking import NBits

ROWS, K = 64, 512


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, K)).astype(np.float32)


def raw_blocks(qtype: str, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes of `qtype`: gguf-py's quantizer where it has one, else random K-quant blocks (any bytes
    are valid blocks) with small f16 super-scales."""
    t = GGMLQuantizationType[qtype]
    if qtype in ("Q4_0", "Q4_1", "Q8_0"):
        return np.asarray(gguf.quants.quantize(weights(seed), t))
    block, size = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (ROWS * K // block, size), dtype=np.uint8)
    scales = (rng.random((blocks.shape[0], 1)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        blocks[:, 0:2] = scales
        blocks[:, 2:4] = (rng.random((blocks.shape[0], 1)) * 0.01).astype(np.float16).view(np.uint8)
    else:  # Q6_K: d is the last two bytes
        blocks[:, -2:] = scales
    return blocks.reshape(ROWS, -1)


def matmul_nbits(w: NBits, a: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    """One com.microsoft::MatMulNBits node holding `w`, run by onnxruntime's CPU provider."""
    n, k = w.shape
    inits = [numpy_helper.from_array(reblocking.pack_b(w), "B"), numpy_helper.from_array(w.scales, "S")]
    names = ["A", "B", "S"]
    zp = reblocking.pack_zero_points(w)
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        names.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        names,
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=w.bits,
        block_size=w.block_size,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"A": a})[0])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K"])
def test_integer_zero_point_types_decode_to_gguf_py_values_bit_for_bit(qtype: str) -> None:
    raw = raw_blocks(qtype)
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
    assert np.array_equal(reblocking.dequantize(reblocking.decode(raw, qtype)), expected)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K"])
def test_float_zero_point_types_decode_to_gguf_py_values_within_float_rounding(qtype: str) -> None:
    raw = raw_blocks(qtype)
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
    got = reblocking.dequantize(reblocking.decode(raw, qtype))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 4 * np.finfo(np.float32).eps * scale


@pytest.mark.parametrize(
    ("qtype", "bits", "block", "zero_points"),
    [
        ("Q4_0", 4, 32, None),
        ("Q8_0", 8, 32, None),
        ("Q4_1", 4, 32, "float32"),
        ("Q4_K", 4, 32, "float32"),
        ("Q6_K", 8, 16, "uint8"),
    ],
)
def test_each_carried_type_has_its_matmulnbits_layout(
    qtype: str, bits: int, block: int, zero_points: str | None
) -> None:
    w = reblocking.decode(raw_blocks(qtype), qtype)
    assert (w.bits, w.block_size) == (bits, block)
    assert w.q.shape == (ROWS, K) and int(w.q.max()) < 2**bits
    assert w.scales.shape == (ROWS, K // block) and w.scales.dtype == np.float32
    assert (None if w.zero_points is None else str(w.zero_points.dtype)) == zero_points
    assert reblocking.pack_b(w).shape == (ROWS, K // block, block * bits // 8)


@pytest.mark.parametrize("qtype", reblocking.CARRIED)
def test_onnxruntime_matmulnbits_with_the_transcoded_blocks_computes_a_times_the_gguf_weights(
    qtype: str,
) -> None:
    raw = raw_blocks(qtype)
    w_ref = gguf.quants.dequantize(raw, GGMLQuantizationType[qtype])
    a = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    expected = a @ w_ref.T
    got = matmul_nbits(reblocking.decode(raw, qtype), a)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_four_bit_values_pack_low_nibble_first() -> None:
    q = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    w = NBits(4, 32, q, np.ones((1, 1), np.float32), None)
    packed = reblocking.pack_b(w)
    assert packed.shape == (1, 1, 16)
    assert packed[0, 0, 0] == 0x10 and packed[0, 0, 7] == 0xFE and packed[0, 0, 8] == 0x10


def test_integer_four_bit_zero_points_pack_two_blocks_a_byte_and_pad_an_odd_count() -> None:
    zp = np.array([[1, 2, 3]], dtype=np.uint8)
    w = NBits(4, 32, np.zeros((1, 96), np.uint8), np.ones((1, 3), np.float32), zp)
    assert reblocking.pack_zero_points(w).tolist() == [[0x21, 0x03]]  # type: ignore[union-attr]


def test_a_constant_block_becomes_q_zero_with_the_constant_as_scale_times_minus_one() -> None:
    block = np.full((1, 32), 0.5, dtype=np.float32)
    raw = np.asarray(gguf.quants.quantize(block, GGMLQuantizationType.Q4_1))
    w = reblocking.decode(raw, "Q4_1")
    assert np.array_equal(reblocking.dequantize(w), gguf.quants.dequantize(raw, GGMLQuantizationType.Q4_1))
    assert int(w.q.max()) == 0


def test_q4_k_scales_and_mins_unpack_as_gguf_py_does() -> None:
    packed = np.random.default_rng(3).integers(0, 256, (7, 12), dtype=np.uint8)
    sc, mins = reblocking.q4k_scale_min(packed)
    ref_sc, ref_mins = gguf.quants.Q4_K.get_scale_min(packed)
    assert np.array_equal(sc, ref_sc) and np.array_equal(mins, ref_mins)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermuting_blocks_gives_the_hugging_face_row_order_back() -> None:
    hf = weights(5)[:64]
    raw = np.asarray(gguf.quants.quantize(permute(hf, 4), GGMLQuantizationType.Q8_0))
    w = reblocking.take_rows(reblocking.decode(raw, "Q8_0"), reblocking.llama_unpermute(64, 4))
    expected = np.asarray(gguf.quants.quantize(hf, GGMLQuantizationType.Q8_0))
    assert np.array_equal(
        reblocking.dequantize(w), gguf.quants.dequantize(expected, GGMLQuantizationType.Q8_0)
    )


def test_a_type_without_an_affine_block_form_is_refused() -> None:
    with pytest.raises(ValueError, match="Q5_0 blocks cannot be carried"):
        reblocking.decode(np.zeros((1, 22), np.uint8), "Q5_0")
