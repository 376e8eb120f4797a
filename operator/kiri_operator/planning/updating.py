"""The update policy: is a new revision worth a rollout now, later, or not at all?

Pure: `(policy, candidate, history, now) -> UpdateDecision`, no clock, no I/O. Three checks, cheapest
verdict first:

1. `minImprovement` (learned candidates: a learned revision, or a site's new adapters with a held-out
   measurement, `planning.adapting`): the held-out gain measured. A revision that does not
   improve enough never will, so it is deferred with no retry time; the next accepted round is a new candidate.
2. `minIntervalSeconds`: time since the last rollout started; deferred until the interval has passed.
3. `maxBytesPerDay`: for every site, the bytes its nodes downloaded in the last 24 hours plus what this
   revision would make them download (each node fetches its variant once; sizes from the compression
   manifest) must fit. Deferred until enough earlier downloads leave the 24-hour window, or for good when the
   revision alone is larger than a site's daily allowance.

User-made spec changes are not "learned": they skip the improvement check (the user decided), but still obey
the interval and the bandwidth budget, which protect the sites whatever the origin of a revision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from kiri_operator.api.scalars import format_time
from kiri_operator.api.specs import UpdatePolicy

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Candidate:
    revision: str
    bytes_per_site: Mapping[str, int]
    learned: bool = False
    improvement: float | None = None  # held-out accuracy gain (loss decrease for regression)
    round: int | None = None


@dataclass(frozen=True)
class Download:
    """Bytes a site's nodes fetched for one rollout, at the time that rollout started."""

    site: str
    bytes: int
    time: datetime


@dataclass(frozen=True)
class UpdateDecision:
    """Whether a new revision may start rolling out at all (`status.learning.update`). Not a rollout verdict
    (`planning.waves.Verdict`): it is decided before a rollout exists, and a deferral is not a failure."""

    allowed: bool
    reason: str
    retry_after_seconds: int | None = None


def site_bytes(
    variant_by_node: Mapping[str, str], site_by_node: Mapping[str, str], sizes: Mapping[str, int]
) -> dict[str, int]:
    """Bytes each site downloads: the size of every node's variant, summed per site.

    A node whose variant has no size in the manifest counts as 0 bytes: it will not download that revision.
    """
    out: dict[str, int] = {}
    for node, variant in variant_by_node.items():
        site = site_by_node.get(node, "")
        out[site] = out.get(site, 0) + int(sizes.get(variant, 0))
    return out


def _wait_for_room(downloads: Sequence[Download], now: datetime, needed: int, limit: int) -> int:
    """Seconds until downloads leaving the 24 h window free `needed` bytes under `limit`."""
    recent = sorted((d for d in downloads if now - d.time < DAY), key=lambda d: d.time)
    used = sum(d.bytes for d in recent)
    for d in recent:
        used -= d.bytes
        if used + needed <= limit:
            return max(0, math.ceil((d.time + DAY - now).total_seconds()))
    return 0


def decide(
    policy: UpdatePolicy | None,
    candidate: Candidate,
    *,
    now: datetime,
    last_rollout_at: datetime | None,
    downloads: Sequence[Download] = (),
) -> UpdateDecision:
    if policy is None:
        return UpdateDecision(True, "no updatePolicy")
    if candidate.learned and policy.min_improvement > 0:
        gain = candidate.improvement
        if gain is None:
            return UpdateDecision(False, "minImprovement: the round measured no held-out improvement")
        if gain < policy.min_improvement:
            return UpdateDecision(
                False, f"minImprovement: held-out gain {gain:+.4f} is below {policy.min_improvement:g}"
            )
    if last_rollout_at is not None and policy.min_interval_seconds > 0:
        elapsed = (now - last_rollout_at).total_seconds()
        if elapsed < policy.min_interval_seconds:
            left = math.ceil(policy.min_interval_seconds - elapsed)
            until = last_rollout_at + timedelta(seconds=policy.min_interval_seconds)
            # Absolute times, not "N s left": the reason lands in status and must not change every reconcile.
            return UpdateDecision(
                False,
                f"minIntervalSeconds: last rollout started {format_time(last_rollout_at)}, "
                f"the next may start at {format_time(until)}",
                retry_after_seconds=left,
            )
    limit = policy.max_bytes_per_day
    if limit is not None:
        waits = []
        for site, needed in sorted(candidate.bytes_per_site.items()):
            if needed <= 0:
                continue
            if needed > limit:
                return UpdateDecision(
                    False, f"maxBytesPerDay: site {site} needs {needed} bytes, more than its {limit} a day"
                )
            mine = [d for d in downloads if d.site == site]
            used = sum(d.bytes for d in mine if now - d.time < DAY)
            if used + needed > limit:
                waits.append((_wait_for_room(mine, now, needed, limit), site, used, needed))
        if waits:
            wait, site, used, needed = max(waits)
            return UpdateDecision(
                False,
                f"maxBytesPerDay: site {site} downloaded {used} bytes in 24h, {needed} more exceeds {limit}",
                retry_after_seconds=wait,
            )
    return UpdateDecision(True, "within updatePolicy")


@dataclass(frozen=True)
class SpecChangeGate:
    """The update policy's verdict on a revision the user's spec made, before its rollout starts."""

    decision: UpdateDecision
    bytes_per_site: Mapping[str, int]


def gate_spec_change(
    policy: UpdatePolicy | None,
    *,
    revision: str,
    stable_revision: str | None,
    rollout_revision: str | None,
    last_started_at: datetime | None,
    downloads: Sequence[Download],
    bytes_per_site: Mapping[str, int],
    now: datetime,
) -> SpecChangeGate | None:
    """None when there is nothing to gate: no policy, the first rollout (nothing runs yet), the stable revision
    itself, or a rollout of this revision that has already started (a gate never stops a wave midway)."""
    if (
        policy is None
        or stable_revision is None
        or revision == stable_revision
        or rollout_revision == revision
    ):
        return None
    candidate = Candidate(revision, bytes_per_site, learned=False)
    decision = decide(policy, candidate, now=now, last_rollout_at=last_started_at, downloads=downloads)
    return SpecChangeGate(decision, bytes_per_site)
