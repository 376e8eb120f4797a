"""budgeting.sensitivities on a real (small, random) torch LLaMA: every unit is measured against the full model's
logits, and the model is given back exactly as it was."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from kiri_runtime.compressing.lm import budgeting

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_each_unit_saves_kl_against_the_full_model_even_when_the_reference_is_computed_lazily() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache: dict[tuple[int, ...], np.ndarray[Any, Any]] = {}

    def reference(
        ids: Sequence[int],
    ) -> np.ndarray[Any, Any]:  # as scoring.Reference.logits: first call computes
        if tuple(ids) not in cache:
            with torch.no_grad():
                cache[tuple(ids)] = model(torch.tensor([list(ids)])).logits[0].numpy()
        return cache[tuple(ids)]

    samples = [list(range(3, 40)), list(range(50, 90))]
    units = budgeting.sensitivities(model, reference, samples, fuse_qkv=True, tied=False)
    assert [u.name for u in units] == [
        "layers.0.attn.qkv_proj",
        "layers.0.attn.o_proj",
        "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj",
        "lm_head",
        "embedding",
    ]
    assert [u.weights for u in units] == [
        (64 + 32 + 32) * 64,
        64 * 64,
        128 * 64,
        128 * 64,
        64 * 128,
        96 * 64,
        96 * 64,
    ]
    assert all(u.sensitivity > 0 for u in units), units  # the reference was the full model, not a rounded one
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # given back exactly
