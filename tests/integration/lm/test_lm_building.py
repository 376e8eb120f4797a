"""The model builder wrapper on the tiny LLaMA: fp32, int8 and int4 variants load in onnxruntime-genai and generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.building import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    from lm_fixture import tiny_llama

    return tiny_llama()


def generate(model_dir: Path, prompt: list[int], new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


def nbits(model_dir: Path) -> list[int]:
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return [
        next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
    ]


@pytest.mark.parametrize(("precision", "bits"), [("fp32", []), ("int8", [8] * 11), ("int4", [4] * 11)])
def test_a_variant_loads_in_onnxruntime_genai_and_generates(
    hf_dir: Path, tmp_path: Path, precision: str, bits: list[int]
) -> None:
    out = build(hf_dir, tmp_path / precision, precision, None, tmp_path / "cache")  # type: ignore[arg-type]
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert nbits(out) == bits  # 2 layers x (qkv fused, o, gate, up, down) + lm_head
    tokens = generate(out, [1, 40, 41, 42, 43], 8)
    assert len(tokens) == 8


def test_int4_with_int8_lm_head_puts_only_lm_head_at_8_bits(hf_dir: Path, tmp_path: Path) -> None:
    out = build(hf_dir, tmp_path / "v", "int4", {"int8LmHead": True, "fuseQkv": False}, tmp_path / "cache")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits.pop("/lm_head/MatMul_Q8") == 8
    assert set(bits.values()) == {4} and len(bits) == 14
    assert len(generate(out, [1, 40, 41], 4)) == 4


def test_hqq_int4_runs_in_onnxruntime_genai_with_float_zero_points(hf_dir: Path, tmp_path: Path) -> None:
    out = build(hf_dir, tmp_path / "hqq", "int4", {"algorithm": "hqq"}, tmp_path / "cache")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    zero_points = [n.input[3] for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(zero_points) == 11 and all(zero_points)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "llama"
    assert len(generate(out, [1, 40, 41], 4)) == 4


def test_a_builder_failure_is_one_line(hf_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in hf_dir.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    config["model_type"] = "no-such-model"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressionError) as raised:
        build(broken, tmp_path / "out", "int4", None, tmp_path / "cache")
    message = str(raised.value)
    assert message.startswith("model builder (int4) failed: ") and "\n" not in message
    assert "Traceback" not in message


def last_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]


def test_int4_stores_float16_scales_an_8_bit_embedding_and_no_rotary_tables(
    hf_dir: Path, tmp_path: Path
) -> None:
    """The compact int4 (the default) against the builder's own output (halfScales off, float embedding): float16
    scales cast once at load, the embedding in 8-bit blocks, cos/sin computed in the graph; it loads, generates,
    and its logits stay within float16 rounding of the scales of the float32-scale build."""
    compact = build(hf_dir, tmp_path / "compact", "int4", None, tmp_path / "cache")
    plain = build(
        hf_dir, tmp_path / "plain", "int4", {"halfScales": False, "embeddingBits": 32}, tmp_path / "cache"
    )
    graph = onnx.load(str(compact / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    scales = [n.input[2] for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(scales) == 11 and all(f"{s}_f16" in inits for s in scales)
    assert all(inits[f"{s}_f16"].data_type == onnx.TensorProto.FLOAT16 for s in scales)
    assert "cos_cache" not in inits and "sin_cache" not in inits
    assert "model.embed_tokens.weight" not in inits and "model.embed_tokens.weight_Q" in inits
    size = sum(p.stat().st_size for p in compact.iterdir())
    assert size < 0.6 * sum(p.stat().st_size for p in plain.iterdir())
    ids = [1, 40, 41, 42, 43, 44, 45, 46]
    a, b = last_logits(compact, ids), last_logits(plain, ids)
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75
    assert len(generate(compact, [1, 40, 41, 42, 43], 8)) == 8
