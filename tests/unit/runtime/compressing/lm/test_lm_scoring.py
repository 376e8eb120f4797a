"""The fidelity arithmetic of language-model variants, on synthetic logits with exact expected values."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.scoring import Tally, greedy_prefix, match_share

LN2, LN3 = math.log(2), math.log(3)
IDS = [0, 1, 0]  # two predicted positions; targets 1 then 0
FULL = np.array([[LN2, 0.0], [0.0, LN3], [5.0, 5.0]], dtype=np.float32)  # p = (2/3, 1/3), (1/4, 3/4)
VARIANT = np.array([[0.0, LN2], [0.0, LN3], [-9.0, 9.0]], dtype=np.float32)  # q = (1/3, 2/3), (1/4, 3/4)


def test_kl_top1_and_perplexity_ratio_over_the_predicted_positions() -> None:
    tally = Tally()
    tally.add(FULL, VARIANT, IDS)
    fid = tally.result()
    # KL(p||q) at position 0: 2/3 ln 2 - 1/3 ln 2 = ln 2 / 3; position 1: 0. The last row predicts nothing.
    assert fid.kl_mean == pytest.approx(LN2 / 6, rel=1e-6)
    assert fid.top1_agreement == 0.5
    # NLL full: ln 3, ln 4; variant: ln 1.5, ln 4 -> ratio exp((ln 1.5 - ln 3) / 2) = sqrt(1/2).
    assert fid.perplexity_ratio == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert fid.positions == 2 and fid.samples == 1 and fid.greedy_match is None


def test_identical_logits_score_zero_kl_full_agreement_and_ratio_one() -> None:
    tally = Tally()
    tally.add(FULL, FULL, IDS)
    tally.add(FULL[:2], FULL[:2], [1, 1])
    fid = tally.result(greedy_match=1.0, greedy_tokens=16)
    assert fid.kl_mean == pytest.approx(0.0, abs=1e-12)
    assert fid.top1_agreement == 1.0
    assert fid.perplexity_ratio == pytest.approx(1.0, abs=1e-12)
    assert (fid.positions, fid.samples, fid.greedy_match, fid.greedy_tokens) == (3, 2, 1.0, 16)


def test_positions_weigh_the_same_across_samples_of_different_lengths() -> None:
    tally = Tally()
    tally.add(FULL, VARIANT, IDS)  # KL ln2/3 over 2 positions
    tally.add(FULL[:2], FULL[:2], [1, 1])  # KL 0 over 1 position
    assert tally.result().kl_mean == pytest.approx(LN2 / 9, rel=1e-6)


def test_a_variant_with_nan_logits_scores_the_largest_float_not_nan() -> None:
    broken = VARIANT.copy()
    broken[0, 0] = np.nan
    tally = Tally()
    tally.add(FULL, broken, IDS)
    fid = tally.result()
    assert fid.kl_mean == sys.float_info.max
    assert fid.perplexity_ratio == sys.float_info.max


def test_mismatched_logits_shapes_are_an_error() -> None:
    with pytest.raises(CompressionError, match="do not match"):
        Tally().add(FULL, VARIANT[:, :1], IDS)


def test_an_empty_tally_is_an_error() -> None:
    with pytest.raises(CompressionError, match="no predicted positions"):
        Tally().result()


def test_greedy_prefix_is_the_first_half_capped_by_the_context() -> None:
    assert greedy_prefix(40, 16, 512) == 20
    assert greedy_prefix(41, 16, 512) == 20
    assert greedy_prefix(3, 16, 512) == 1
    assert greedy_prefix(500, 16, 100) == 84


def test_greedy_match_is_the_share_of_equal_positions() -> None:
    assert match_share([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert match_share([1, 2], [1, 2]) == 1.0
    with pytest.raises(ValueError):
        match_share([1, 2], [1])
