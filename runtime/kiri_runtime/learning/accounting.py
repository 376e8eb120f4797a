"""Privacy accounting with Google's `dp-accounting` RDP accountant.

Each round a site takes part in is one Gaussian mechanism with noise multiplier z on its clipped update.
A site's epsilon after k rounds is the RDP accountant's epsilon for k self-composed Gaussian mechanisms at the
given delta, converted with the accountant's optimal order. No amplification by sampling is claimed: sites
are chosen by the operator, not Poisson-sampled, and claiming it without true random sampling would understate
epsilon. The round's reported epsilon is the largest over sites.
"""

from __future__ import annotations

import logging
import math

from kiri_runtime.learning.errors import LearningError


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    if not 0 < delta < 1:
        raise LearningError(f"DP delta must be in (0, 1), got {delta}")
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting import rdp

    # absl logs a warning per RDP order that fails to converge for small z; the accountant drops those orders.
    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    )
    return float(accountant.get_epsilon(delta))


def rounds_within(noise_multiplier: float, delta: float, target_epsilon: float, limit: int = 10000) -> int:
    """How many rounds one site can take part in before its epsilon exceeds the target."""
    lo, hi = 0, limit
    if epsilon(noise_multiplier, 1, delta) > target_epsilon:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon(noise_multiplier, mid, delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo
