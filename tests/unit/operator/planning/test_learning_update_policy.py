"""The update policy (planning/updating.py): minImprovement, minIntervalSeconds, maxBytesPerDay per site."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kiri_operator.api.specs import UpdatePolicy
from kiri_operator.planning.updating import Candidate, Download, decide, site_bytes

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
POLICY = UpdatePolicy(min_interval_seconds=3600, max_bytes_per_day=1000, min_improvement=0.01)


def _learned(gain: float | None, **bytes_: int) -> Candidate:
    return Candidate("rev-b", bytes_ or {"a": 100}, learned=True, improvement=gain, round=3)


def test_no_policy_allows_everything() -> None:
    assert decide(None, _learned(-1.0), now=NOW, last_rollout_at=NOW).allowed


def test_site_bytes_sums_each_nodes_variant_per_site() -> None:
    nodes = {"a-0": "int8", "a-1": "fp16", "b-0": "int8", "c-0": "gone"}
    sites = {"a-0": "a", "a-1": "a", "b-0": "b", "c-0": "c"}
    assert site_bytes(nodes, sites, {"int8": 300, "fp16": 500}) == {"a": 800, "b": 300, "c": 0}


@pytest.mark.parametrize(
    ("gain", "allowed", "reason"),
    [
        (0.05, True, "within updatePolicy"),
        (0.01, True, "within updatePolicy"),
        (0.005, False, "minImprovement: held-out gain +0.0050 is below 0.01"),
        (-0.02, False, "minImprovement: held-out gain -0.0200 is below 0.01"),
        (None, False, "minImprovement: the round measured no held-out improvement"),
    ],
)
def test_min_improvement_applies_to_learned_revisions(gain: float | None, allowed: bool, reason: str) -> None:
    verdict = decide(POLICY, _learned(gain), now=NOW, last_rollout_at=None)
    assert (verdict.allowed, verdict.reason, verdict.retry_after_seconds) == (allowed, reason, None)


def test_user_revisions_skip_the_improvement_check_but_not_the_interval() -> None:
    user = Candidate("rev-u", {"a": 10})
    assert decide(POLICY, user, now=NOW, last_rollout_at=None).allowed
    verdict = decide(POLICY, user, now=NOW, last_rollout_at=NOW - timedelta(seconds=600))
    assert not verdict.allowed and verdict.retry_after_seconds == 3000


def test_min_interval_defers_with_the_time_left_and_then_allows() -> None:
    verdict = decide(POLICY, _learned(0.1), now=NOW, last_rollout_at=NOW - timedelta(seconds=3599))
    assert verdict == type(verdict)(
        False,
        "minIntervalSeconds: last rollout started 2026-01-02T11:00:01Z, the next may start at 2026-01-02T12:00:01Z",
        1,
    )
    assert decide(POLICY, _learned(0.1), now=NOW, last_rollout_at=NOW - timedelta(seconds=3600)).allowed


def test_max_bytes_per_day_defers_until_old_downloads_leave_the_window() -> None:
    downloads = [
        Download("a", 500, NOW - timedelta(hours=20)),
        Download("a", 300, NOW - timedelta(hours=2)),
        Download("b", 900, NOW - timedelta(hours=30)),  # outside the window
    ]
    verdict = decide(POLICY, _learned(0.1, a=400, b=900), now=NOW, last_rollout_at=None, downloads=downloads)
    assert not verdict.allowed
    assert verdict.reason == "maxBytesPerDay: site a downloaded 800 bytes in 24h, 400 more exceeds 1000"
    # The 500-byte download 20h ago leaves the window in 4h; then 300 + 400 fits.
    assert verdict.retry_after_seconds == 4 * 3600
    later = NOW + timedelta(hours=4)
    assert decide(
        POLICY, _learned(0.1, a=400, b=900), now=later, last_rollout_at=None, downloads=downloads
    ).allowed


def test_a_revision_larger_than_the_daily_allowance_is_deferred_for_good() -> None:
    verdict = decide(POLICY, _learned(0.1, a=1001), now=NOW, last_rollout_at=None)
    assert not verdict.allowed and verdict.retry_after_seconds is None
    assert "more than its 1000 a day" in verdict.reason
