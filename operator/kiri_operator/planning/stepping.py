"""The rollout policy and its steps: ``spec.rollout`` in the wave planner's terms, and the order it walks.

Pure arithmetic, no state. A *stage* is one entry of ``spec.rollout.stages``. A *group* is the nodes that
share a ``groupBy`` label value (without ``groupBy`` the fleet is one group). A *step* is one stage applied
to one group: ``groupBy`` walks site by site, so each site goes through every stage before the next site
starts. Node counts are cumulative, per group, and nodes are taken in name order, so the steps recomputed
from the node list on every reconcile are the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kiri_operator.api.specs import OfflinePolicy, RolloutSpec


@dataclass(frozen=True)
class Stage:
    """One entry of spec.rollout.stages. ``nodes`` and ``percent`` are cumulative, per group."""

    nodes: int | None = None
    percent: float | None = None
    bake_seconds: float = 0.0
    pause: bool = False

    def __post_init__(self) -> None:
        if (self.nodes is None) == (self.percent is None):
            raise ValueError("a stage needs exactly one of nodes or percent")
        if self.nodes is not None and self.nodes < 0:
            raise ValueError(f"stage nodes must be >= 0 (got {self.nodes})")
        if self.percent is not None and not 0 <= self.percent <= 100:
            raise ValueError(f"stage percent must be between 0 and 100 (got {self.percent})")
        if self.bake_seconds < 0:
            raise ValueError(f"stage bakeSeconds must be >= 0 (got {self.bake_seconds})")

    def count(self, total: int) -> int:
        """Cumulative node count of this stage in a group of ``total`` nodes."""
        if self.nodes is not None:
            return min(self.nodes, total)
        assert self.percent is not None
        # Round up: 10% of 5 nodes is one node, never zero; a non-zero stage always moves something.
        return min(total, math.ceil(self.percent * total / 100 - 1e-9))


@dataclass(frozen=True)
class AnalysisPolicy:
    """The timing part of spec.rollout.analysis; the queries and their verdicts live in ``analyzing`` and
    ``planning.verdicts``. Each measurement covers the whole time since the wave became Ready (a range
    query), so failures and samples accumulate in Prometheus, not in status.
    """

    interval_seconds: float = 30.0
    # No verdict before minSamples intervals could have produced a sample each.
    warmup_seconds: float = 30.0


@dataclass(frozen=True)
class RolloutPolicy:
    stages: tuple[Stage, ...] = ()
    group_by: str | None = None
    max_unavailable: int | str = "25%"
    offline_nodes: OfflinePolicy = "Skip"
    progress_deadline_seconds: float = 600.0
    analysis: AnalysisPolicy | None = None
    max_concurrent_downloads: int | None = None
    max_bytes_per_wave: int | None = None
    paused: bool = False


def policy_of(rollout: RolloutSpec) -> RolloutPolicy:
    """``spec.rollout`` as the wave planner reads it."""
    analysis = None
    if rollout.analysis is not None and rollout.analysis.queries:
        queries = rollout.analysis.queries
        analysis = AnalysisPolicy(
            interval_seconds=float(min(q.interval for q in queries)),
            # The first verdict waits until every query could have its minSamples.
            warmup_seconds=float(max(q.min_samples * q.interval for q in queries)),
        )
    bandwidth = rollout.bandwidth
    return RolloutPolicy(
        stages=tuple(
            Stage(nodes=s.nodes, percent=s.percent, bake_seconds=float(s.bake_seconds), pause=s.pause)
            for s in rollout.stages
        ),
        group_by=rollout.group_by,
        max_unavailable=rollout.max_unavailable,
        offline_nodes=rollout.offline_nodes,
        progress_deadline_seconds=float(rollout.progress_deadline_seconds),
        analysis=analysis,
        max_concurrent_downloads=bandwidth.max_concurrent_downloads if bandwidth else None,
        max_bytes_per_wave=bandwidth.max_bytes_per_wave if bandwidth else None,
        paused=rollout.paused,
    )


@dataclass(frozen=True)
class EdgeNode:
    """An eligible edge node. ``variant`` is the variant the update revision gives it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    online: bool = True
    variant: str = ""


@dataclass(frozen=True)
class Step:
    """One stage over one group. ``nodes`` is cumulative over the groups before it and this group."""

    index: int
    group: str | None
    stage_index: int
    stage: Stage
    nodes: tuple[str, ...]
    added: tuple[str, ...]


def _group_key(group: str | None) -> tuple[bool, str]:
    # Nodes without the groupBy label go last, as their own group.
    return (group is None, group or "")


def effective_stages(stages: Sequence[Stage]) -> tuple[Stage, ...]:
    """The stages with an implicit final 100% stage when the spec's last one stops short."""
    if not stages:
        return (Stage(percent=100),)
    last = stages[-1]
    if last.percent == 100:
        return tuple(stages)
    return (*stages, Stage(percent=100))


def groups_of(policy: RolloutPolicy, nodes: Sequence[EdgeNode]) -> list[tuple[str | None, list[str]]]:
    """Groups in walk order, each with its node names in walk order."""
    by_group: dict[str | None, list[str]] = {}
    for node in nodes:
        group = node.labels.get(policy.group_by) if policy.group_by else None
        by_group.setdefault(group, []).append(node.name)
    return [(g, sorted(names)) for g, names in sorted(by_group.items(), key=lambda kv: _group_key(kv[0]))]


def expand_steps(policy: RolloutPolicy, nodes: Sequence[EdgeNode]) -> tuple[Step, ...]:
    """Every step of the rollout in order. Steps that add no node and do not pause are dropped."""
    stages = effective_stages(policy.stages)
    steps: list[Step] = []
    done: tuple[str, ...] = ()
    for group, names in groups_of(policy, nodes):
        previous = 0
        for stage_index, stage in enumerate(stages):
            count = max(previous, stage.count(len(names)))
            if count == previous and not stage.pause:
                continue
            added = tuple(names[previous:count])
            steps.append(
                Step(
                    index=len(steps),
                    group=group,
                    stage_index=stage_index,
                    stage=stage,
                    nodes=done + tuple(names[:count]),
                    added=added,
                )
            )
            previous = count
        done = done + tuple(names)
    return tuple(steps)


def find_step(steps: Sequence[Step], group: str | None, stage: int) -> Step | None:
    """The step at (group, stage), or the first one after it when that step no longer exists."""
    key = (*_group_key(group), stage)
    for step in steps:
        if (*_group_key(step.group), step.stage_index) >= key:
            return step
    return None


def max_unavailable_count(value: int | str, wave_size: int) -> int:
    """maxUnavailable within a wave: an int, or a percentage of the step's nodes rounded down, at least 1."""
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(
                f"maxUnavailable must be an integer or a percentage such as '25%' (got {value!r})"
            )
        count = math.floor(float(text[:-1]) * wave_size / 100)
    else:
        count = value
    # Zero would never move anything; a rollout that cannot progress is worse than one node at a time.
    return max(1, count)
