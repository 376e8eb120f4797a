"""The privacy accountant (Flower adds the noise and clips; its own tests cover that)."""

from __future__ import annotations

import itertools

import dp_accounting
import pytest
from dp_accounting import rdp

from kiri_runtime.learning import accounting
from kiri_runtime.learning.errors import LearningError


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
