"""Kiri's variant options for language models map to onnxruntime-genai model builder options; bad values are one
clear error line."""

from __future__ import annotations

from typing import Any

import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import building

UNTIED = {"num_hidden_layers": 4, "tie_word_embeddings": False}
TIED = {"num_hidden_layers": 4, "tie_word_embeddings": True}


def test_int4_defaults_are_block_32_symmetric_accuracy_4_rtn() -> None:
    assert building.resolve("int4", None) == {
        "accuracyLevel": 4,
        "algorithm": "rtn",
        "blockSize": 32,
        "embeddingBits": 8,
        "fuseQkv": True,
        "halfScales": True,
        "int8Embeddings": False,
        "int8LmHead": False,
        "int8Layers": "none",
        "int8Tensors": [],
        "symmetric": True,
    }


def test_int4_defaults_become_the_builder_extra_options() -> None:
    options = building.resolve("int4", None)
    assert building._extra_options("int4", options, UNTIED) == [
        "block_size=32",
        "accuracy_level=4",
        "is_symmetric=true",
        "algo_config=default",
        "op_types_to_quantize=MatMul",
    ]


def test_asymmetric_int4_of_a_tied_model_turns_embedding_sharing_off_so_the_graph_loads() -> None:
    options = building.resolve("int4", {"symmetric": False})
    assert building._extra_options("int4", options, TIED)[-1] == "shared_embeddings=false"
    assert (
        building._extra_options("int4", building.resolve("int4", None), TIED)[-1] == "shared_embeddings=true"
    )


def test_int8_of_a_tied_model_quantizes_matmuls_only_and_does_not_share_the_table() -> None:
    extra = building._extra_options("int8", building.resolve("int8", None), TIED)
    assert "op_types_to_quantize=MatMul" in extra and extra[-1] == "shared_embeddings=false"


def test_k_quant_and_block_size_pass_through_and_fuse_qkv_false_splits_q_k_v() -> None:
    options = building.resolve("int4", {"algorithm": "k_quant", "blockSize": 128, "fuseQkv": False})
    extra = building._extra_options("int4", options, UNTIED)
    assert extra[0] == "fuse_qkv=false" and "block_size=128" in extra and "algo_config=k_quant" in extra


def test_int8_lm_head_and_first_last_layers_become_per_node_int8_overrides() -> None:
    options = building.resolve("int4", {"int8LmHead": True, "int8Layers": "first-last"})
    target = building._target_options("int4", options, UNTIED)
    assert target is not None
    names = [o["match"]["name"] for o in target["quant_config"]["weights"]["overrides"]]
    assert {o["type"] for o in target["quant_config"]["weights"]["overrides"]} == {"int8"}
    assert names[0] == "/lm_head/MatMul"
    assert names[1:] == [
        f"/model/layers.{i}/{p}/MatMul"
        for i in (0, 3)
        for p in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
    ]


def test_mixed_layers_follow_the_builders_llama_cpp_choice() -> None:
    options = building.resolve("int4", {"int8Layers": "mixed"})
    names = building._upgraded(options, {"num_hidden_layers": 16})
    layers = sorted({int(n.split("/")[2].split(".")[1]) for n in names})
    assert layers == [0, 1, 4, 7, 10, 13, 14, 15]
    assert all(n.endswith(("qkv_proj/MatMul", "down_proj/MatMul")) for n in names)


def test_int8_tensors_become_per_node_int8_overrides_once_each() -> None:
    options = building.resolve(
        "int4",
        {"int8Tensors": ["layers.3.mlp.down_proj", "lm_head", "layers.0.attn.qkv_proj"], "int8LmHead": True},
    )
    target = building._target_options("int4", options, UNTIED)
    assert target is not None
    assert [o["match"]["name"] for o in target["quant_config"]["weights"]["overrides"]] == [
        "/lm_head/MatMul",
        "/model/layers.3/mlp/down_proj/MatMul",
        "/model/layers.0/attn/qkv_proj/MatMul",
    ]


def test_no_int8_nodes_means_no_structured_builder_config() -> None:
    assert building._target_options("int4", building.resolve("int4", None), UNTIED) is None


@pytest.mark.parametrize(
    ("precision", "options", "message"),
    [
        ("int4", {"blockSize": 48}, "int4: blockSize must be one of 16, 32, 64, 128, 256, got 48"),
        ("int4", {"accuracyLevel": 5}, "int4: accuracyLevel must be one of 0, 1, 2, 3, 4, got 5"),
        ("int4", {"symmetric": "yes"}, "int4: symmetric must be true or false, got 'yes'"),
        (
            "int4",
            {"algorithm": "gptq"},
            "int4: algorithm must be one of rtn, k_quant, hqq, imatrix, got 'gptq'",
        ),
        ("int8", {"algorithm": "hqq"}, "int8: algorithm must be one of rtn, k_quant, got 'hqq'"),
        ("int4", {"int8Layers": "all"}, "int4: int8Layers must be one of none, first-last, mixed, got 'all'"),
        ("int4", {"blockSize": True}, "int4: blockSize must be one of 16, 32, 64, 128, 256, got True"),
        ("int8", {"int8LmHead": True}, "int8: unknown options ['int8LmHead']"),
        (
            "int4",
            {"int8Tensors": ["layers.0.mlp.down", "lm_head"]},
            "int4: int8Tensors has unknown names ['layers.0.mlp.down']; expected lm_head or layers.N.attn|mlp.<proj>",
        ),
        (
            "int4",
            {"int8Tensors": "lm_head"},
            "int4: int8Tensors must be a list of tensor names, got 'lm_head'",
        ),
        ("fp32", {"blockSize": 32}, "fp32: unknown options ['blockSize']"),
        ("int3", {}, "unknown precision 'int3'; known: fp32, fp16, int8, int4"),
    ],
)
def test_bad_options_are_one_clear_line(precision: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(CompressionError) as raised:
        building.resolve(precision, options)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_unset_options_sent_as_null_take_their_defaults() -> None:
    assert building.resolve("int4", {"blockSize": None})["blockSize"] == 32


def test_the_builders_failure_is_its_last_error_line() -> None:
    output = (
        "Valid precision + execution provider combinations are: ...\n"
        "Traceback (most recent call last):\n"
        '  File "builder.py", line 1, in <module>\n'
        "ValueError: shared_embeddings=true requires a model that ties its input and output embeddings\n"
    )
    assert building.builder_error(output) == (
        "ValueError: shared_embeddings=true requires a model that ties its input and output embeddings"
    )
    assert building.builder_error("Killed\n") == "Killed"
    assert building.builder_error("") == "no output"


def test_a_directory_without_config_json_is_refused_before_the_builder_runs(tmp_path: Any) -> None:
    with pytest.raises(
        CompressionError, match=r"has no config\.json: not a Hugging Face checkpoint directory"
    ):
        building.build(tmp_path, tmp_path / "out", "int4")


def test_embedding_bits_and_half_scales_are_checked() -> None:
    assert building.resolve("int8", {"embeddingBits": 4, "halfScales": False})["embeddingBits"] == 4
    with pytest.raises(CompressionError, match="embeddingBits must be one of 4, 8, 32"):
        building.resolve("int4", {"embeddingBits": 16})
    with pytest.raises(CompressionError, match="halfScales must be true or false"):
        building.resolve("int4", {"halfScales": 1})
