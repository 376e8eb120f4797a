"""imatrix scale search: 4-bit symmetric blocks whose scales minimise the activation-weighted rounding error."""

from __future__ import annotations

import numpy as np
import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import compacting, reblocking, weighting

pytestmark = pytest.mark.timeout(20)


def _weighted_error(w: np.ndarray, got: np.ndarray, imp: np.ndarray) -> float:
    return float((imp[None, :] * (w - got) ** 2).sum())


def test_the_search_never_does_worse_than_round_to_nearest_on_the_error_it_minimises() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 128)).astype(np.float32) * 0.02
    imp = rng.gamma(0.5, size=128)  # a few channels carry most of the input
    found = weighting.search_blocks(w, imp)
    assert (found.bits, found.block_size, found.zero_points) == (4, 32, None)
    assert found.q.shape == (64, 128) and int(found.q.max()) <= 15 and found.scales.shape == (64, 4)
    searched = reblocking.dequantize(found)
    rtn = reblocking.dequantize(compacting.rtn_blocks(w, 4))
    x = w.astype(np.float64).reshape(64, 4, 32)
    block_weight = (imp.reshape(4, 32)[None] * np.sqrt((x * x).mean(-1, keepdims=True) + x * x)).reshape(
        64, 128
    )
    assert float((block_weight * (w - searched) ** 2).sum()) < float((block_weight * (w - rtn) ** 2).sum())
    assert _weighted_error(w, searched, imp) < _weighted_error(w, rtn, imp)


def test_an_important_channel_is_rounded_closer_than_without_importance() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    imp = np.ones(32)
    imp[5] = 1000.0
    weighted = reblocking.dequantize(weighting.search_blocks(w, imp))
    plain = reblocking.dequantize(weighting.search_blocks(w, None))
    assert np.abs(weighted[:, 5] - w[:, 5]).mean() < 0.5 * np.abs(plain[:, 5] - w[:, 5]).mean()


def test_a_zero_block_stays_zero_and_k_must_be_whole_blocks() -> None:
    got = weighting.search_blocks(np.zeros((2, 32), dtype=np.float32), None)
    assert not reblocking.dequantize(got).any()
    with pytest.raises(CompressionError) as e:
        weighting.search_blocks(np.zeros((2, 48), dtype=np.float32), None)
    assert str(e.value) == "imatrix: K=48 is not a multiple of 32"
