"""Which models the continuous-batching decoder takes, and its sampler (decoding.py). The decoder's forward passes
against onnxruntime-genai's are in tests/integration/runtime/test_runtime_decoding.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from kiri_runtime.decoding import prefill_groups, sample, unsupported

LOGITS = np.array([0.0, 3.0, 2.5, -1.0, 1.0], dtype=np.float32)


def test_top_k_of_one_and_a_tiny_top_p_always_take_the_most_likely_token() -> None:
    rng = np.random.default_rng(0)
    assert {sample(LOGITS, 1.0, 1.0, 1, rng) for _ in range(50)} == {1}
    assert {sample(LOGITS, 1.0, 1e-6, 0, rng) for _ in range(50)} == {1}


def test_top_k_draws_only_among_the_k_most_likely_tokens_and_reaches_each() -> None:
    rng = np.random.default_rng(1)
    assert {sample(LOGITS, 5.0, 1.0, 3, rng) for _ in range(400)} == {1, 2, 4}


def test_top_p_keeps_the_smallest_set_whose_probability_reaches_it() -> None:
    probs = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
    top2 = float(np.sort(probs)[-2:].sum())  # tokens 1 and 2
    rng = np.random.default_rng(2)
    assert {sample(LOGITS, 1.0, top2 - 1e-3, 0, rng) for _ in range(400)} == {1, 2}


def test_the_same_seed_draws_the_same_tokens() -> None:
    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sample(LOGITS, 2.0, 0.95, 0, rng) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_frequencies_follow_the_softmax_at_the_temperature() -> None:
    rng = np.random.default_rng(3)
    n = 20000
    counts = np.bincount([sample(LOGITS, 2.0, 1.0, 0, rng) for _ in range(n)], minlength=5) / n
    scaled = LOGITS / 2.0
    want = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
    assert np.abs(counts - want).max() < 0.015


def _model_dir(tmp_path: Path, op: str = "GroupQueryAttention", **over: Any) -> Path:
    decoder: dict[str, Any] = {
        "filename": "model.onnx",
        "session_options": {"provider_options": []},
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
    }
    decoder.update(over.pop("decoder", {}))
    config = {
        "model": {"decoder": decoder, **over.pop("model", {})},
        "search": {"past_present_share_buffer": True},
    }
    config["search"].update(over.pop("search", {}))
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    node = helper.make_node(op, ["x"], ["y"], domain="com.microsoft" if op != "Identity" else "")
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), str(tmp_path / "model.onnx"))
    return tmp_path


def test_a_cpu_decoder_with_group_query_attention_and_a_shared_kv_buffer_is_taken(tmp_path: Path) -> None:
    assert unsupported(_model_dir(tmp_path)) is None


def test_models_the_decoder_cannot_batch_say_why(tmp_path: Path) -> None:
    cases = {
        "a": ({"op": "Identity"}, "no GroupQueryAttention"),
        "b": ({"search": {"past_present_share_buffer": False}}, "past and present KV buffers are not shared"),
        "c": ({"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}}, "other than the CPU"),
        "d": ({"decoder": {"inputs": {"input_ids": "i", "position_ids": "p"}}}, "decoder inputs"),
        "e": ({"model": {"vision": {"filename": "v.onnx"}}}, "not a plain decoder"),
    }
    for name, (over, reason) in cases.items():
        d = tmp_path / name
        d.mkdir()
        got = unsupported(_model_dir(d, **over))
        assert got is not None and reason in got, (name, got)
    assert "unreadable genai_config.json" in (unsupported(tmp_path / "missing") or "")


def test_prefills_are_grouped_shortest_first_and_one_long_prompt_does_not_pad_the_short_ones() -> None:
    assert prefill_groups([5, 3, 4, 5]) == [[1, 2, 0, 3]]
    assert prefill_groups([2, 2, 400, 3, 2]) == [[0, 1, 4, 3], [2]]
    assert prefill_groups([10, 20, 40, 80]) == [[0, 1], [2, 3]]  # 40 padded of 120: within half
    assert prefill_groups([]) == []
