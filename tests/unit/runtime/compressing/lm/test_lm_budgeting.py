"""Size-budgeted mixed precision: which units go to 8 bits for an allowance, and fitting a real byte budget on
builds (faked here: sizes and KL computed from the choice)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kiri_runtime.compressing.lm import budgeting
from kiri_runtime.compressing.lm.budgeting import Unit

pytestmark = pytest.mark.timeout(20)

# 64 weights cost 32 raw bytes more at 8 bits ((34 - 18) / 32 bytes per weight).
UNITS = [
    Unit("embedding", 64, 0.004),  # 0.000125 per byte
    Unit("layers.0.attn.qkv_proj", 64, 0.010),  # 0.0003125 per byte
    Unit("layers.0.mlp.down_proj", 128, 0.012),  # 0.0001875 per byte
    Unit("lm_head", 32, 0.008),  # 0.0005 per byte
    Unit("layers.0.mlp.up_proj", 64, 0.0),  # never worth a byte
]


def test_an_upgrade_costs_sixteen_bytes_per_block_of_32_weights() -> None:
    assert Unit("lm_head", 32 * 1000, 0.1).cost == 16_000


def test_choose_takes_most_loss_per_byte_first_and_returns_model_order() -> None:
    assert budgeting.choose(UNITS, 0) == []
    assert budgeting.choose(UNITS, 16) == ["lm_head"]
    assert budgeting.choose(UNITS, 47) == ["lm_head"]  # qkv (32 bytes) does not fit beside it
    assert budgeting.choose(UNITS, 48) == ["layers.0.attn.qkv_proj", "lm_head"]
    assert budgeting.choose(UNITS, 80) == ["embedding", "layers.0.attn.qkv_proj", "lm_head"]  # down skipped
    assert budgeting.choose(UNITS, 10_000) == [
        "embedding",
        "layers.0.attn.qkv_proj",
        "layers.0.mlp.down_proj",
        "lm_head",
    ]  # a unit that loses nothing at 4 bits is never bought


def test_options_of_a_choice_name_the_int8_tensors_and_the_embedding_width() -> None:
    base = {"algorithm": "k_quant", "int8Tensors": ["layers.9.mlp.up_proj"]}
    assert budgeting.options_for(base, ["embedding", "lm_head"], untied=True) == {
        "algorithm": "k_quant",
        "int8Tensors": ["lm_head"],
        "embeddingBits": 8,
    }
    assert budgeting.options_for(base, ["lm_head"], untied=True)["embeddingBits"] == 4
    assert "embeddingBits" not in budgeting.options_for(base, [], untied=False)


class Builds:
    """Packed size = 1000 + 0.6 x raw upgrade bytes (8-bit blocks compress); KL = 0.05 - the bought sensitivity."""

    def __init__(self, ratio: float = 0.6) -> None:
        self.built: list[dict[str, Any]] = []
        self.ratio = ratio

    def __call__(self, options: dict[str, Any]) -> tuple[int | None, float | None]:
        self.built.append(options)
        chosen = set(options["int8Tensors"]) | ({"embedding"} if options.get("embeddingBits") == 8 else set())
        bought = [u for u in UNITS if u.name in chosen]
        size = 1000 + round(self.ratio * sum(u.cost for u in bought))
        return size, 0.05 - sum(u.sensitivity for u in bought)


def test_fit_finds_the_largest_choice_whose_packed_size_is_within_the_budget() -> None:
    builds = Builds()
    options, tried = budgeting.fit(UNITS, {}, 1040, builds, untied=True)
    # raw 48 bytes (qkv + lm_head) pack to 1029; + embedding (raw 80) would pack to 1048 > 1040
    assert options == {"int8Tensors": ["layers.0.attn.qkv_proj", "lm_head"], "embeddingBits": 4}
    # 0 bytes -> 1000; allowance 40 / 0.97 buys lm_head (1010, ratio 0.625); 40 / 0.625 = 64 adds qkv (1029,
    # ratio 0.604); 40 / 0.604 = 66 buys nothing more: done in 3 builds
    assert [(t.size_bytes, t.options["int8Tensors"], t.kl_mean) for t in tried] == [
        (1000, [], pytest.approx(0.05)),
        (1010, ["lm_head"], pytest.approx(0.042)),
        (1029, ["layers.0.attn.qkv_proj", "lm_head"], pytest.approx(0.032)),
    ]
    assert tried[0].record() == {
        "int8Tensors": [],
        "embeddingBits": 4,
        "allowanceBytes": 0,
        "sizeBytes": 1000,
        "klMean": 0.05,
    }


def test_fit_steps_back_when_a_choice_packs_over_the_budget() -> None:
    builds = Builds(ratio=1.0)  # upgrades that do not compress at all: the first guess (0.97) overshoots
    options, tried = budgeting.fit(UNITS, {}, 1047, builds, untied=True)
    assert [(t.size_bytes, t.options["int8Tensors"]) for t in tried] == [
        (1000, []),
        (1048, ["layers.0.attn.qkv_proj", "lm_head"]),  # 47 / 0.97 = 48.5 raw bytes buys 48: one byte over
        (1016, ["lm_head"]),
    ]
    assert options == {"int8Tensors": ["lm_head"], "embeddingBits": 4}


def test_fit_gives_nothing_when_even_all_four_bit_is_over_the_budget() -> None:
    builds = Builds()
    options, tried = budgeting.fit(UNITS, {}, 999, builds, untied=True)
    assert options is None and [t.size_bytes for t in tried] == [1000] and len(builds.built) == 1


def test_fake_int4_rounds_to_symmetric_blocks_of_32() -> None:
    w = np.linspace(-1.0, 0.5, 64, dtype=np.float32).reshape(1, 64)
    got = budgeting.fake_int4(w)
    assert got.shape == (1, 64) and got.dtype == np.float32
    for block in (got[0, :32], got[0, 32:]):
        levels = np.unique(block)
        assert len(levels) <= 16
    assert got[0, 0] == pytest.approx(-1.0, abs=1e-3)  # the block's largest magnitude is kept (Q4_0's -8 d)
    assert float(np.abs(got - w).max()) <= (1.0 / 8) / 2 + 1e-3
