"""Clipping and noise, aggregation, and the privacy accountant."""

from __future__ import annotations

import itertools

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from kiri_runtime.learning import accounting, aggregating, privatizing
from kiri_runtime.learning.errors import LearningError


def test_clip_bounds_the_norm_of_all_tensors_together_and_keeps_small_updates() -> None:
    update = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 2.0, np.float32)}  # norm sqrt(36+36)
    clipped, norm = privatizing.clip(update, 1.0)
    assert norm == pytest.approx(np.sqrt(72))
    assert privatizing.global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"] / clipped["b"][0], 1.5)  # direction kept
    small, _ = privatizing.clip({"a": np.full(4, 0.1, np.float32)}, 1.0)
    np.testing.assert_allclose(small["a"], 0.1)
    with pytest.raises(LearningError):
        privatizing.clip(update, 0.0)


def test_noise_std_is_multiplier_times_clip_norm_and_seeded_noise_repeats() -> None:
    zero = {"w": np.zeros(200_000, np.float32)}
    noised, _ = privatizing.privatize(zero, 2.0, 0.5, privatizing.noise_rng(1))
    assert float(noised["w"].std()) == pytest.approx(1.0, rel=0.01)
    again, _ = privatizing.privatize(zero, 2.0, 0.5, privatizing.noise_rng(1))
    np.testing.assert_array_equal(noised["w"], again["w"])
    unseeded = [
        privatizing.privatize(zero, 2.0, 0.5, privatizing.noise_rng(None))[0]["w"][:4] for _ in range(2)
    ]
    assert not np.array_equal(*unseeded)


def test_fedavg_weights_by_samples() -> None:
    a, b = {"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 4.0], np.float32)}
    out = aggregating.fedavg([a, b], [30, 10])
    np.testing.assert_allclose(out["w"], [0.75, 1.0])


def test_trimmed_mean_ignores_an_outlier_that_drags_fedavg() -> None:
    honest = [{"w": np.array([1.0 + 0.1 * i], np.float32)} for i in range(4)]
    evil = {"w": np.array([1000.0], np.float32)}
    assert aggregating.fedavg([*honest, evil], [1] * 5)["w"][0] > 100
    trimmed = aggregating.trimmed_mean([*honest, evil], 0.2)["w"][0]
    # 5 updates, trim 0.2: one dropped from each end, the mean of 1.1, 1.2 and 1.3 is left.
    assert trimmed == pytest.approx(1.2, abs=1e-6)
    with pytest.raises(LearningError):
        aggregating.trimmed_mean(honest[:1], 0.6)


def test_apply_adds_the_scaled_update_and_refuses_unknown_names() -> None:
    w = {"w": np.ones(2, np.float32), "frozen": np.zeros(1, np.float32)}
    out = aggregating.apply(w, {"w": np.array([1.0, -1.0], np.float32)}, server_lr=0.5)
    np.testing.assert_allclose(out["w"], [1.5, 0.5])
    np.testing.assert_array_equal(out["frozen"], [0.0])
    with pytest.raises(LearningError, match="does not have"):
        aggregating.apply(w, {"nope": np.ones(1, np.float32)})


@pytest.mark.parametrize(("noise", "rounds", "delta"), [(1.0, 1, 1e-5), (1.1, 10, 1e-5), (4.0, 50, 1e-6)])
def test_epsilon_is_the_rdp_accountants(noise: float, rounds: int, delta: float) -> None:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), rounds))
    assert accounting.epsilon(noise, rounds, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-12)


def test_epsilon_grows_with_rounds_and_the_budget_counts_rounds() -> None:
    eps = [accounting.epsilon(2.0, n, 1e-5) for n in range(0, 6)]
    assert eps[0] == 0.0 and all(x < y for x, y in itertools.pairwise(eps))
    assert accounting.epsilon(0.0, 1, 1e-5) == float("inf")
    n = accounting.rounds_within(2.0, 1e-5, eps[3] + 1e-9)
    assert n == 3
    with pytest.raises(LearningError):
        accounting.epsilon(1.0, 1, 1.5)


def test_a_diverged_update_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(LearningError, match="training diverged"):
        privatizing.privatize({"w": np.array([np.nan, 1.0], np.float32)}, 1.0, 0.5, privatizing.noise_rng(0))
