"""Staged waves over edge nodes: which nodes run which revision, and what the rollout does next.

Pure: ``plan_waves(policy, observed, state, now) -> WavePlan``, no Kubernetes imports, no clock, no I/O.

A *stage* is one entry of ``spec.rollout.stages``. A *step* is one stage applied to one group of nodes
(``groupBy`` walks site by site, so each site goes through every stage before the next site starts; without
``groupBy`` the fleet is one group). A *wave* is the set of nodes moved together in one reconcile; a step
needs several waves when ``maxUnavailable`` or the bandwidth caps are smaller than the step.

Each step: move the step's nodes (cumulative per group) to the update revision, wait until every online one
is Ready (``progressDeadlineSeconds`` since the last progress, as a Deployment does), run the analysis,
bake, honour a stage ``pause``, then go to the next step. Any failure moves every node back to the stable
revision and remembers the failed revision, so a GitOps tool re-applying the same spec does not start the
same rollout again.

Level-based: the only memory is :class:`RolloutState` (persisted in ``status.rollout``) and the current
assignment (read back from the DaemonSets). The step's node set is recomputed from the node list each time
and nodes are taken in a fixed order, so an operator restarted mid-wave neither repeats nor skips a step.
Timestamps are kept at second precision, the precision of ``metav1.Time``, so a state read back from the API
equals the state that was written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

OfflinePolicy = Literal["Skip", "Wait", "Fail"]
VerdictKind = Literal["Progressing", "Holding", "Inconclusive", "Paused", "RolledBack", "Completed"]
MeasurementOutcome = Literal["Successful", "Failed", "Inconclusive", "Error"]
EventType = Literal["Normal", "Warning"]

HISTORY_LIMIT = 10
# Forgotten failed revisions beyond this are harmless: the newest ones are what GitOps re-applies.
ROLLED_BACK_LIMIT = 20

# Reasons, used in conditions, events and history entries.
REASON_STEP_PROGRESSING = "WaveProgressing"
REASON_WAITING_READY = "WaitingForReady"
REASON_ANALYSIS_RUNNING = "AnalysisRunning"
REASON_INCONCLUSIVE = "AnalysisInconclusive"
REASON_ANALYSIS_ERROR = "AnalysisError"
REASON_BAKING = "Baking"
REASON_PAUSED = "Paused"
REASON_STAGE_PAUSE = "StagePause"
REASON_OFFLINE_WAIT = "WaitingForOfflineNodes"
REASON_COMPLETED = "RolloutCompleted"
REASON_ROLLED_BACK_PODS = "PodsFailed"
REASON_ROLLED_BACK_DEADLINE = "ProgressDeadlineExceeded"
REASON_ROLLED_BACK_ANALYSIS = "AnalysisFailed"
REASON_ROLLED_BACK_ABORT = "Aborted"
REASON_ROLLED_BACK_OFFLINE = "NodeOffline"
REASON_ROLLED_BACK_MANUAL = "ManualRollback"
REASON_KNOWN_BAD = "RevisionRolledBack"
REASON_NO_NODES = "NoEligibleNodes"
REASON_INITIAL_FAILING = "InitialRolloutFailing"
REASON_BANDWIDTH = "BandwidthCapBelowVariantSize"


# --- inputs -------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class EdgeNode:
    """An eligible edge node. ``variant`` is the variant the update revision gives it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    online: bool = True
    variant: str = ""


@dataclass(frozen=True)
class NodePod:
    """The pod of the DaemonSet a node is assigned to, as observed on that node."""

    revision: str
    ready: bool
    # Crash-looping or otherwise terminally failing; never-Ready pods are caught by the progress deadline.
    failed: bool = False


@dataclass(frozen=True)
class Measurement:
    """One analysis measurement taken by ``analyzing`` for the update revision."""

    at: datetime
    outcome: MeasurementOutcome
    message: str = ""


@dataclass(frozen=True)
class Commands:
    """Manual commands read from annotations. Values are nonces: a command acts once per new value."""

    promote: str | None = None
    abort: str | None = None
    rollback: str | None = None


@dataclass(frozen=True)
class Observed:
    """What reconcile observed: nodes, assignment node -> revision, pods, variant sizes, analysis."""

    update_revision: str
    nodes: Sequence[EdgeNode]
    assignment: Mapping[str, str] = field(default_factory=dict)
    pods: Mapping[str, NodePod] = field(default_factory=dict)
    variant_sizes: Mapping[str, int] = field(default_factory=dict)
    measurement: Measurement | None = None
    commands: Commands = field(default_factory=Commands)

    @cached_property
    def online(self) -> frozenset[str]:
        # Looked up once per node per rule: a set keeps a 1,000-node plan linear.
        return frozenset(n.name for n in self.nodes if n.online)


# --- persisted state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEntry:
    revision: str
    outcome: Literal["Promoted", "RolledBack"]
    reason: str
    at: datetime
    message: str = ""


@dataclass(frozen=True)
class RolloutState:
    """The rollout's memory, persisted in status.rollout. Everything else is recomputed."""

    stable_revision: str | None = None
    update_revision: str | None = None
    previous_stable_revision: str | None = None
    # Position: the group and the stage index within it. A flat index would shift when nodes join or
    # leave a group and a no-op step disappears; (group, stage) does not.
    group: str | None = None
    stage: int = 0
    step_started_at: datetime | None = None
    progress_at: datetime | None = None
    ready_nodes: int = 0
    ready_at: datetime | None = None
    last_measured_at: datetime | None = None
    analysis_passed_at: datetime | None = None
    promoted: bool = False
    handled_promote: str | None = None
    handled_abort: str | None = None
    handled_rollback: str | None = None
    rolled_back_revisions: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    verdict: str = ""
    reason: str = ""
    message: str = ""

    @property
    def in_progress(self) -> bool:
        return (
            self.update_revision is not None
            and self.update_revision != self.stable_revision
            and self.update_revision not in self.rolled_back_revisions
        )


# --- outputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reason: str
    message: str


@dataclass(frozen=True)
class RolloutEvent:
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Step:
    """One stage over one group. ``nodes`` is cumulative over the groups before it and this group."""

    index: int
    group: str | None
    stage_index: int
    stage: Stage
    nodes: tuple[str, ...]
    added: tuple[str, ...]


@dataclass(frozen=True)
class WavePlan:
    assignment: dict[str, str]
    state: RolloutState
    verdict: Verdict
    events: tuple[RolloutEvent, ...]
    requeue_after: float | None
    moved: tuple[str, ...]
    steps: tuple[Step, ...]
    step: Step | None

    @property
    def step_label(self) -> str:
        """Human form of the position, e.g. ``2/4`` or ``site-a 2/4``."""
        if self.step is None:
            return ""
        return f"{self.step.index + 1}/{len(self.steps)}"


# --- step expansion -----------------------------------------------------------------------------------


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


def _find_step(steps: Sequence[Step], group: str | None, stage: int) -> Step | None:
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


# --- the planner --------------------------------------------------------------------------------------


def _second(now: datetime) -> datetime:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).replace(microsecond=0)


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else (now - then).total_seconds()


class _Builder:
    """Accumulates the plan's assignment, events and requeue while the planner walks the rules."""

    def __init__(self, observed: Observed, late: float = 0.0) -> None:
        # Timers are computed from `now` cut to the second; `late` is the cut-off part, taken off each
        # requeue so a bake ends when it ends, not up to a second later.
        self.late = late
        self.assignment = dict(observed.assignment)
        self.events: list[RolloutEvent] = []
        self.requeue: float | None = None
        self.moved: list[str] = []

    def event(self, type_: EventType, reason: str, message: str) -> None:
        self.events.append(RolloutEvent(type_, reason, message))

    def requeue_in(self, seconds: float) -> None:
        seconds = max(0.2, seconds - self.late)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)


def plan_waves(policy: RolloutPolicy, observed: Observed, state: RolloutState, now: datetime) -> WavePlan:
    """Decide the next assignment of nodes to revisions and the rollout's verdict."""
    exact = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
    now = _second(now)
    b = _Builder(observed, late=(exact - now).total_seconds())
    nodes = {n.name: n for n in observed.nodes}
    # Nodes that are no longer eligible are the operator's business (their DaemonSets drop them).
    b.assignment = {n: r for n, r in b.assignment.items() if n in nodes}
    steps = expand_steps(policy, observed.nodes)
    state = _accept_new_revision(state, observed, now, b)
    plan: WavePlan
    if state.stable_revision is None:
        plan = _initial_rollout(policy, observed, state, now, b, steps)
    elif not state.in_progress:
        plan = _steady(policy, observed, state, now, b, steps)
    else:
        plan = _progress(policy, observed, state, now, b, steps)
    return plan


def _accept_new_revision(state: RolloutState, observed: Observed, now: datetime, b: _Builder) -> RolloutState:
    """Start a rollout when the spec's revision is new; a remembered failed revision is not retried."""
    update = observed.update_revision
    if state.update_revision == update:
        return state
    if update in state.rolled_back_revisions:
        # The same bad spec applied again (GitOps sync): stay rolled back, say so once.
        b.event(
            "Warning", REASON_KNOWN_BAD, f"revision {update} was rolled back before; not rolling it out again"
        )
        return replace(state, update_revision=update)
    if state.update_revision is not None and state.in_progress:
        b.event(
            "Normal",
            "RolloutSuperseded",
            f"revision {state.update_revision} superseded by {update} before it completed",
        )
    if update == state.stable_revision:
        return replace(state, update_revision=update)
    b.event("Normal", "RolloutStarted", f"rolling out revision {update} (stable: {state.stable_revision})")
    first = RolloutState(
        stable_revision=state.stable_revision,
        previous_stable_revision=state.previous_stable_revision,
        update_revision=update,
        step_started_at=None,
        handled_promote=observed.commands.promote,
        handled_abort=observed.commands.abort,
        handled_rollback=observed.commands.rollback,
        rolled_back_revisions=state.rolled_back_revisions,
        history=state.history,
    )
    return first


def _online(observed: Observed, name: str) -> bool:
    return name in observed.online


def _pod_ready(observed: Observed, name: str, revision: str) -> bool:
    pod = observed.pods.get(name)
    return pod is not None and pod.revision == revision and pod.ready


def _in_flight(observed: Observed, assignment: Mapping[str, str], revision: str) -> list[str]:
    """Nodes moved to ``revision`` that are online and not Ready yet: downloading or starting."""
    return [
        n
        for n, r in assignment.items()
        if r == revision and _online(observed, n) and not _pod_ready(observed, n, revision)
    ]


def _move(
    policy: RolloutPolicy,
    observed: Observed,
    b: _Builder,
    candidates: Sequence[str],
    revision: str,
    unavailable_cap: int | None,
) -> list[str]:
    """Move candidates (in order) to ``revision`` within maxUnavailable and the bandwidth caps."""
    nodes = {n.name: n for n in observed.nodes}
    flying = _in_flight(observed, b.assignment, revision)
    caps = [c for c in (unavailable_cap, policy.max_concurrent_downloads) if c is not None]
    slots = min(caps) - len(flying) if caps else len(candidates)
    bytes_used = sum(observed.variant_sizes.get(nodes[n].variant, 0) for n in flying if n in nodes)
    moved: list[str] = []
    for name in candidates:
        if slots <= 0:
            break
        size = observed.variant_sizes.get(nodes[name].variant, 0)
        cap = policy.max_bytes_per_wave
        if cap is not None and bytes_used + size > cap:
            if flying or moved:
                break
            # One variant larger than the cap: moving it alone is the best the cap allows; say so.
            b.event(
                "Warning",
                REASON_BANDWIDTH,
                f"variant {nodes[name].variant} ({size} bytes) exceeds maxBytesPerWave ({cap}); moving one node at a time",
            )
        b.assignment[name] = revision
        moved.append(name)
        bytes_used += size
        slots -= 1
    b.moved.extend(moved)
    return moved


def _finish(
    b: _Builder,
    state: RolloutState,
    verdict: Verdict,
    steps: tuple[Step, ...],
    step: Step | None,
) -> WavePlan:
    if (state.verdict, state.reason) != (verdict.kind, verdict.reason) and verdict.kind in (
        "Paused",
        "Inconclusive",
    ):
        b.event("Normal" if verdict.kind == "Paused" else "Warning", verdict.reason, verdict.message)
    state = replace(state, verdict=verdict.kind, reason=verdict.reason, message=verdict.message)
    return WavePlan(
        assignment=b.assignment,
        state=state,
        verdict=verdict,
        events=tuple(b.events),
        requeue_after=b.requeue,
        moved=tuple(b.moved),
        steps=steps,
        step=step,
    )


def _initial_rollout(
    policy: RolloutPolicy,
    observed: Observed,
    state: RolloutState,
    now: datetime,
    b: _Builder,
    steps: tuple[Step, ...],
) -> WavePlan:
    """No stable revision yet: nothing to protect and nothing to roll back to, so no stages or gates.

    Bandwidth caps still apply: the downloads are just as real on the first rollout.
    """
    update = observed.update_revision
    if state.step_started_at is None:
        state = replace(state, step_started_at=now, progress_at=now)
    names = [n for _, group in groups_of(policy, observed.nodes) for n in group]
    pending = [n for n in names if b.assignment.get(n) != update]
    offline = [n for n in pending if not _online(observed, n)]
    # Offline nodes cannot pull anything now; pointing their assignment at the revision costs nothing.
    for n in offline:
        b.assignment[n] = update
    _move(policy, observed, b, [n for n in pending if n not in offline], update, None)
    state = _track_progress(state, observed, b, update, now)
    online = [n for n in names if _online(observed, n)]
    failed = [
        n for n in online if (p := observed.pods.get(n)) is not None and p.revision == update and p.failed
    ]
    ready = [n for n in online if _pod_ready(observed, n, update)]
    if len(ready) == len(online) and all(b.assignment.get(n) == update for n in names):
        b.event("Normal", REASON_COMPLETED, f"revision {update} is on all {len(names)} edge nodes")
        state = _complete(state, update, now)
        return _finish(
            b, state, Verdict("Completed", REASON_COMPLETED, f"revision {update} is stable"), steps, None
        )
    if failed or _age(now, state.progress_at) > policy.progress_deadline_seconds:
        # Nothing to roll back to: hold and report; the next spec change starts over.
        what = f"{len(failed)} pods failing" if failed else "no progress within progressDeadlineSeconds"
        return _finish(
            b,
            state,
            Verdict("Holding", REASON_INITIAL_FAILING, f"first rollout of {update}: {what}"),
            steps,
            None,
        )
    b.requeue_in(policy.progress_deadline_seconds - _age(now, state.progress_at) + 1)
    return _finish(
        b,
        state,
        Verdict(
            "Progressing", REASON_WAITING_READY, f"{len(ready)}/{len(online)} online nodes Ready on {update}"
        ),
        steps,
        None,
    )


def _complete(state: RolloutState, revision: str, now: datetime) -> RolloutState:
    entry = HistoryEntry(revision=revision, outcome="Promoted", reason=REASON_COMPLETED, at=now)
    previous = state.stable_revision if state.stable_revision != revision else state.previous_stable_revision
    return replace(
        _reset_position(state),
        stable_revision=revision,
        previous_stable_revision=previous,
        history=(*state.history, entry)[-HISTORY_LIMIT:],
    )


def _reset_position(state: RolloutState) -> RolloutState:
    return replace(
        state,
        group=None,
        stage=0,
        step_started_at=None,
        progress_at=None,
        ready_nodes=0,
        ready_at=None,
        last_measured_at=None,
        analysis_passed_at=None,
        promoted=False,
    )


def _track_progress(
    state: RolloutState, observed: Observed, b: _Builder, revision: str, now: datetime
) -> RolloutState:
    """Progress = a node moved or one more node Ready on the revision, as a Deployment counts it."""
    ready = sum(1 for n, r in b.assignment.items() if r == revision and _pod_ready(observed, n, revision))
    if b.moved or ready > state.ready_nodes:
        return replace(state, progress_at=now, ready_nodes=ready)
    return replace(state, ready_nodes=ready)


def _steady(
    policy: RolloutPolicy,
    observed: Observed,
    state: RolloutState,
    now: datetime,
    b: _Builder,
    steps: tuple[Step, ...],
) -> WavePlan:
    """No rollout in progress: every node converges to the stable revision (nodes that come back online
    included), within the bandwidth caps. A manual rollback goes to the previous stable revision."""
    assert state.stable_revision is not None
    cmd = observed.commands
    if cmd.rollback is not None and cmd.rollback != state.handled_rollback:
        state = replace(state, handled_rollback=cmd.rollback)
        previous = state.previous_stable_revision
        if previous is not None:
            return _rollback(
                observed,
                replace(state, stable_revision=previous, previous_stable_revision=None),
                now,
                b,
                steps,
                REASON_ROLLED_BACK_MANUAL,
                f"manual rollback from {state.stable_revision} to {previous}",
                failed_revision=state.stable_revision,
            )
        b.event("Warning", REASON_ROLLED_BACK_MANUAL, "no previous stable revision to roll back to")
    state = replace(
        state,
        handled_promote=cmd.promote or state.handled_promote,
        handled_abort=cmd.abort or state.handled_abort,
    )
    stable = state.stable_revision
    assert stable is not None
    names = [n for _, group in groups_of(policy, observed.nodes) for n in group]
    pending = [n for n in names if b.assignment.get(n) != stable]
    for n in pending:
        current = b.assignment.get(n)
        # Offline and new nodes cost nothing to point at stable; nodes on a revision that never became
        # stable still hold stable's artifact (the cache pins N-1), so they go back without a download.
        unvalidated = current in state.rolled_back_revisions or current == state.update_revision
        if not _online(observed, n) or current is None or unvalidated:
            b.assignment[n] = stable
    _move(policy, observed, b, [n for n in pending if b.assignment.get(n) != stable], stable, None)
    if state.update_revision in state.rolled_back_revisions and state.update_revision != stable:
        verdict = Verdict(
            "RolledBack",
            state.reason if state.verdict == "RolledBack" else REASON_KNOWN_BAD,
            state.message
            if state.verdict == "RolledBack"
            else f"revision {state.update_revision} was rolled back; running {stable}",
        )
    else:
        verdict = Verdict("Completed", REASON_COMPLETED, f"revision {stable} is stable")
    if _in_flight(observed, b.assignment, stable) or b.moved:
        b.requeue_in(10)
    return _finish(b, state, verdict, steps, None)


def _rollback(
    observed: Observed,
    state: RolloutState,
    now: datetime,
    b: _Builder,
    steps: tuple[Step, ...],
    reason: str,
    message: str,
    failed_revision: str | None = None,
) -> WavePlan:
    """Every node back to the stable revision at once: its DaemonSet and cached artifact are still there,
    so no download gates apply, and a slow rollback would keep a bad revision serving."""
    assert state.stable_revision is not None
    bad = failed_revision or state.update_revision
    assert bad is not None
    stable = state.stable_revision
    for n in [n.name for n in observed.nodes]:
        b.assignment[n] = stable
    entry = HistoryEntry(revision=bad, outcome="RolledBack", reason=reason, at=now, message=message)
    b.event("Warning", "RolledBack", f"{reason}: {message}; every node back to revision {stable}")
    remembered = (*(r for r in state.rolled_back_revisions if r != bad), bad)
    state = replace(
        _reset_position(state),
        rolled_back_revisions=remembered[-ROLLED_BACK_LIMIT:],
        history=(*state.history, entry)[-HISTORY_LIMIT:],
    )
    b.requeue_in(10)
    return _finish(b, state, Verdict("RolledBack", reason, message), steps, None)


def _progress(
    policy: RolloutPolicy,
    observed: Observed,
    state: RolloutState,
    now: datetime,
    b: _Builder,
    steps: tuple[Step, ...],
) -> WavePlan:
    stable = state.stable_revision
    update = observed.update_revision
    assert stable is not None
    cmd = observed.commands

    if cmd.abort is not None and cmd.abort != state.handled_abort:
        state = replace(state, handled_abort=cmd.abort)
        return _rollback(observed, state, now, b, steps, REASON_ROLLED_BACK_ABORT, "aborted by user")
    if cmd.rollback is not None and cmd.rollback != state.handled_rollback:
        state = replace(state, handled_rollback=cmd.rollback)
        return _rollback(observed, state, now, b, steps, REASON_ROLLED_BACK_ABORT, "rolled back by user")

    if not steps:
        # No eligible edge nodes: the revision is trivially everywhere it can be.
        state = _complete(state, update, now)
        return _finish(b, state, Verdict("Completed", REASON_NO_NODES, "no eligible edge nodes"), steps, None)

    step = steps[0] if state.step_started_at is None else _find_step(steps, state.group, state.stage)
    if step is None:
        b.event("Normal", REASON_COMPLETED, f"revision {update} rolled out to all steps")
        state = _complete(state, update, now)
        return _steady(policy, observed, state, now, b, steps)
    if (step.group, step.stage_index) != (state.group, state.stage) or state.step_started_at is None:
        state = _enter_step(state, step, now)
        b.event("Normal", "StepStarted", _step_text(step, steps, update))

    if cmd.promote is not None and cmd.promote != state.handled_promote:
        state = replace(state, handled_promote=cmd.promote, promoted=True)
        b.event(
            "Normal",
            "Promoted",
            f"step {step.index + 1}/{len(steps)} promoted by user: bake and analysis skipped",
        )

    # A new node starts on stable, and a node on neither revision (a superseded rollout) has never been
    # validated: back to stable now. If their step has been reached, the wave below moves them on.
    for node in observed.nodes:
        if b.assignment.get(node.name) not in (stable, update):
            b.assignment[node.name] = stable

    failed = [
        n
        for n, r in b.assignment.items()
        if r == update and (p := observed.pods.get(n)) is not None and p.revision == update and p.failed
    ]
    if failed:
        return _rollback(
            observed,
            state,
            now,
            b,
            steps,
            REASON_ROLLED_BACK_PODS,
            f"pods of revision {update} failing on {', '.join(sorted(failed)[:5])}",
        )

    pending = [n for n in step.nodes if b.assignment.get(n) != update]
    offline_pending = [n for n in pending if not _online(observed, n)]
    if offline_pending and policy.offline_nodes == "Fail":
        return _rollback(
            observed,
            state,
            now,
            b,
            steps,
            REASON_ROLLED_BACK_OFFLINE,
            f"offline when their wave came: {', '.join(offline_pending[:5])} (offlineNodes: Fail)",
        )

    paused = policy.paused
    if not paused:
        cap = max_unavailable_count(policy.max_unavailable, max(1, len(step.added)))
        _move(policy, observed, b, [n for n in pending if n not in offline_pending], update, cap)
    state = _track_progress(state, observed, b, update, now)

    online_set = [n for n in step.nodes if _online(observed, n)]
    not_ready = [n for n in online_set if not _pod_ready(observed, n, update)]
    if paused:
        # Paused freezes forward motion and the clocks that measure it, not the failure detectors above.
        state = replace(state, progress_at=now)
        return _finish(b, state, Verdict("Paused", REASON_PAUSED, "spec.rollout.paused is true"), steps, step)

    if not_ready:
        waited = _age(now, state.progress_at)
        if waited > policy.progress_deadline_seconds:
            return _rollback(
                observed,
                state,
                now,
                b,
                steps,
                REASON_ROLLED_BACK_DEADLINE,
                f"{len(not_ready)} nodes not Ready on {update} after {int(waited)}s "
                f"(progressDeadlineSeconds {policy.progress_deadline_seconds:g}): {', '.join(not_ready[:5])}",
            )
        b.requeue_in(policy.progress_deadline_seconds - waited + 1)
        moved = sum(1 for n in step.nodes if b.assignment.get(n) == update)
        return _finish(
            b,
            replace(state, ready_at=None),
            Verdict(
                "Progressing",
                REASON_WAITING_READY,
                f"step {step.index + 1}/{len(steps)}: {moved}/{len(step.nodes)} nodes moved, "
                f"{len(online_set) - len(not_ready)}/{len(online_set)} online nodes Ready",
            ),
            steps,
            step,
        )

    if offline_pending and policy.offline_nodes == "Wait":
        return _finish(
            b,
            state,
            Verdict(
                "Holding",
                REASON_OFFLINE_WAIT,
                f"waiting for offline nodes {', '.join(offline_pending[:5])} (offlineNodes: Wait)",
            ),
            steps,
            step,
        )

    if state.ready_at is None:
        state = replace(state, ready_at=now)

    if not state.promoted and policy.analysis is not None and state.analysis_passed_at is None:
        outcome = _analysis(policy.analysis, observed, state, now, b, step, steps)
        if isinstance(outcome, WavePlan):
            return outcome
        state = outcome
        if state.analysis_passed_at is None:
            raise AssertionError("analysis returned without a verdict")

    if not state.promoted:
        baked_from = state.analysis_passed_at or state.ready_at
        left = step.stage.bake_seconds - _age(now, baked_from)
        if left > 0:
            b.requeue_in(left)
            return _finish(
                b,
                state,
                Verdict(
                    "Progressing",
                    REASON_BAKING,
                    # An end time, not a countdown: the message must not change between reconciles, or
                    # each status patch's own watch event causes another patch (one a second per bake).
                    f"step {step.index + 1}/{len(steps)}: baking until "
                    f"{_ts((baked_from or now) + timedelta(seconds=step.stage.bake_seconds))}",
                ),
                steps,
                step,
            )
        if step.stage.pause:
            return _finish(
                b,
                state,
                Verdict(
                    "Paused",
                    REASON_STAGE_PAUSE,
                    f"step {step.index + 1}/{len(steps)} done; waiting for promote (kiri promote)",
                ),
                steps,
                step,
            )

    # Step done: the next one starts in this same reconcile so no interval is lost between waves. One
    # Event says both (the completed step and the started one): Events are API writes, and at fleet
    # scale they were most of the operator's writes.
    done = f"step {step.index + 1}/{len(steps)} completed"
    following = next((s for s in steps if s.index == step.index + 1), None)
    if following is None:
        b.event(
            "Normal",
            REASON_COMPLETED,
            f"{done}; revision {update} rolled out to all {len(observed.nodes)} edge nodes",
        )
        state = _complete(state, update, now)
        return _steady(policy, observed, state, now, b, steps)
    state = _enter_step(state, following, now)
    b.event("Normal", "StepStarted", f"{_step_text(following, steps, update)} ({done})")
    return _progress(policy, observed, state, now, b, steps)


def _enter_step(state: RolloutState, step: Step, now: datetime) -> RolloutState:
    return replace(
        state,
        group=step.group,
        stage=step.stage_index,
        step_started_at=now,
        progress_at=now,
        ready_at=None,
        last_measured_at=None,
        analysis_passed_at=None,
        promoted=False,
    )


def _step_text(step: Step, steps: Sequence[Step], revision: str) -> str:
    where = f" of group {step.group}" if step.group is not None else ""
    return (
        f"step {step.index + 1}/{len(steps)}{where} (stage {step.stage_index + 1}): "
        f"{len(step.nodes)} nodes on revision {revision}, {len(step.added)} new"
    )


def analysis_due(policy: RolloutPolicy, state: RolloutState, now: datetime) -> bool:
    """Whether the operator should take a measurement now (it then passes it in ``Observed.measurement``).

    The first one comes one interval after the wave became Ready, so the metrics describe the new pods.
    """
    if policy.analysis is None or not state.in_progress or state.ready_at is None:
        return False
    if state.analysis_passed_at is not None or state.promoted or policy.paused:
        return False
    now = _second(now)
    if state.last_measured_at is None:
        return _age(now, state.ready_at) >= policy.analysis.warmup_seconds
    return _age(now, state.last_measured_at) >= policy.analysis.interval_seconds


def analysis_window(state: RolloutState, now: datetime) -> float:
    """Seconds of metrics the next measurement should cover: since the wave became Ready."""
    if state.ready_at is None:
        return 0.0
    return max(1.0, _age(_second(now), state.ready_at))


def _analysis(
    analysis: AnalysisPolicy,
    observed: Observed,
    state: RolloutState,
    now: datetime,
    b: _Builder,
    step: Step,
    steps: tuple[Step, ...],
) -> RolloutState | WavePlan:
    """Apply the newest measurement: Failed rolls back, Inconclusive holds, Successful lets the step bake."""
    m = observed.measurement
    label = f"step {step.index + 1}/{len(steps)}"
    assert state.ready_at is not None
    # A measurement taken before this wave was Ready describes the previous wave: ignore it.
    if m is not None and _second(m.at) >= state.ready_at:
        at = _second(m.at)
        state = replace(state, last_measured_at=at)
        if m.outcome == "Failed":
            return _rollback(
                observed,
                state,
                now,
                b,
                steps,
                REASON_ROLLED_BACK_ANALYSIS,
                f"{label}: analysis failed: {m.message}",
            )
        if m.outcome == "Successful":
            b.event("Normal", "AnalysisPassed", f"{label}: analysis passed: {m.message}")
            return replace(state, analysis_passed_at=now)
        # Too few samples (or no answer) says nothing about the revision: hold, never roll back.
        reason = REASON_INCONCLUSIVE if m.outcome == "Inconclusive" else REASON_ANALYSIS_ERROR
        b.requeue_in(analysis.interval_seconds)
        return _finish(b, state, Verdict("Inconclusive", reason, f"{label}: {m.message}"), steps, step)
    if state.last_measured_at is None:
        b.requeue_in(analysis.warmup_seconds - _age(now, state.ready_at))
    else:
        b.requeue_in(analysis.interval_seconds - _age(now, state.last_measured_at))
    if state.verdict == "Inconclusive" and state.last_measured_at is not None:
        # Keep saying inconclusive until a measurement says otherwise.
        return _finish(b, state, Verdict("Inconclusive", state.reason, state.message), steps, step)
    return _finish(
        b,
        state,
        Verdict("Progressing", REASON_ANALYSIS_RUNNING, f"{label}: analysis running"),
        steps,
        step,
    )


def nodes_per_revision(assignment: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for revision in assignment.values():
        counts[revision] = counts.get(revision, 0) + 1
    return dict(sorted(counts.items()))


def time_in_step(state: RolloutState, now: datetime) -> float:
    return _age(_second(now), state.step_started_at)


# --- status (de)serialisation -------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return None if value is None else _second(value).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return _second(value)
    return _second(datetime.fromisoformat(str(value).replace("Z", "+00:00")))


def state_to_status(state: RolloutState) -> dict[str, Any]:
    """The camelCase dict stored in status.rollout (nulls dropped, like the API's dump)."""
    raw: dict[str, Any] = {
        "stableRevision": state.stable_revision,
        "updateRevision": state.update_revision,
        "previousStableRevision": state.previous_stable_revision,
        "group": state.group,
        "stage": state.stage,
        "stepStartedAt": _ts(state.step_started_at),
        "progressAt": _ts(state.progress_at),
        "readyNodes": state.ready_nodes,
        "readyAt": _ts(state.ready_at),
        "lastMeasuredAt": _ts(state.last_measured_at),
        "analysisPassedAt": _ts(state.analysis_passed_at),
        "promoted": state.promoted,
        "handledPromote": state.handled_promote,
        "handledAbort": state.handled_abort,
        "handledRollback": state.handled_rollback,
        "rolledBackRevisions": list(state.rolled_back_revisions),
        "history": [
            {
                "revision": h.revision,
                "outcome": h.outcome,
                "reason": h.reason,
                "at": _ts(h.at),
                **({"message": h.message} if h.message else {}),
            }
            for h in state.history
        ],
        "verdict": state.verdict,
        "reason": state.reason,
        "message": state.message,
    }
    return {k: v for k, v in raw.items() if v is not None}


def state_from_status(raw: Mapping[str, Any] | None) -> RolloutState:
    """Read status.rollout back; a missing or empty one is a fresh state."""
    if not raw:
        return RolloutState()
    history = tuple(
        HistoryEntry(
            revision=str(h["revision"]),
            outcome="RolledBack" if h.get("outcome") == "RolledBack" else "Promoted",
            reason=str(h.get("reason", "")),
            at=_parse_ts(h.get("at")) or datetime.fromtimestamp(0, UTC),
            message=str(h.get("message", "")),
        )
        for h in raw.get("history") or []
    )
    return RolloutState(
        stable_revision=raw.get("stableRevision"),
        update_revision=raw.get("updateRevision"),
        previous_stable_revision=raw.get("previousStableRevision"),
        group=raw.get("group"),
        stage=int(raw.get("stage") or 0),
        step_started_at=_parse_ts(raw.get("stepStartedAt")),
        progress_at=_parse_ts(raw.get("progressAt")),
        ready_nodes=int(raw.get("readyNodes") or 0),
        ready_at=_parse_ts(raw.get("readyAt")),
        last_measured_at=_parse_ts(raw.get("lastMeasuredAt")),
        analysis_passed_at=_parse_ts(raw.get("analysisPassedAt")),
        promoted=bool(raw.get("promoted")),
        handled_promote=raw.get("handledPromote"),
        handled_abort=raw.get("handledAbort"),
        handled_rollback=raw.get("handledRollback"),
        rolled_back_revisions=tuple(raw.get("rolledBackRevisions") or ()),
        history=history,
        verdict=str(raw.get("verdict") or ""),
        reason=str(raw.get("reason") or ""),
        message=str(raw.get("message") or ""),
    )
