"""Staged waves over edge nodes: which nodes run which revision, and what the rollout does next.

Pure: ``plan_waves(policy, observed, state, now) -> WavePlan``, no Kubernetes imports, no clock, no I/O.

Stages, groups and steps are :mod:`kiri_operator.planning.stepping`'s: a *step* is one stage applied to one
group of nodes. A *wave* is the set of nodes moved together in one reconcile; a step needs several waves
when ``maxUnavailable`` or the bandwidth caps are smaller than the step. A *gate* is one condition a step
must meet before the next step starts.

Each step passes its gates in order: the manual commands, no failed pods, the offline policy, moving the
step's nodes (cumulative per group) to the update revision, every online one Ready
(``progressDeadlineSeconds`` since the last progress, as a Deployment does), the analysis, the bake, a
stage ``pause``, then advance to the next step. A gate either passes or ends the plan with a verdict. Any
failure moves every node back to the stable revision and remembers the failed revision, so a GitOps tool
re-applying the same spec does not start the same rollout again.

One plan is one :class:`_Rollout`, Argo Rollouts' rolloutContext: the policy, what was observed, ``now``,
the steps, and the accumulated assignment, events and requeue, with one method per gate. A step that
passes every gate advances, and the loop runs the next step's gates in the same reconcile, so no interval
is lost between waves.

Level-based: the only memory is the rollout status (:class:`~kiri_operator.api.statuses.RolloutStatus`,
persisted in ``status.rollout``) and the current assignment (read back from the DaemonSets). The step's
node set is recomputed from the node list each time and nodes are taken in a fixed order, so an operator
restarted mid-wave neither repeats nor skips a step. Timestamps are kept at second precision, the
precision of ``metav1.Time``, so a state read back from the API equals the state that was written.

Why one module: nearly all of it is :class:`_Rollout`, one class whose gate methods
share one accumulator and one state; the policy and step arithmetic already live in ``stepping``, and
cutting the class in two would make each half reach into the other's state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from kiri_operator.api.scalars import format_time
from kiri_operator.api.statuses import RolloutHistoryEntry, RolloutStatus, RolloutVerdict
from kiri_operator.conditions import Reason, not_ready_note
from kiri_operator.observations import Measurement
from kiri_operator.planning.stepping import (
    EdgeNode,
    RolloutPolicy,
    Step,
    expand_steps,
    find_step,
    groups_of,
    max_unavailable_count,
)
from kiri_operator.plans import Event

HISTORY_LIMIT = 10
# Forgotten failed revisions beyond this are harmless: the newest ones are what GitOps re-applies.
ROLLED_BACK_LIMIT = 20


# --- inputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePod:
    """The pod of the DaemonSet a node is assigned to, as observed on that node."""

    revision: str
    ready: bool
    # Crash-looping or otherwise terminally failing; never-Ready pods are caught by the progress deadline.
    failed: bool = False
    reason: str = ""


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
    measuring: bool = False
    """A due measurement is being taken elsewhere; its end brings the next reconcile."""
    commands: Commands = field(default_factory=Commands)

    @cached_property
    def online(self) -> frozenset[str]:
        # Looked up once per node per rule: a set keeps a 1,000-node plan linear.
        return frozenset(n.name for n in self.nodes if n.online)


# --- outputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The rollout's verdict: ``kind`` is the one verdict enum, from here to ``status.rollout.verdict``."""

    kind: RolloutVerdict
    reason: str
    message: str


@dataclass(frozen=True)
class WavePlan:
    assignment: dict[str, str]
    state: RolloutStatus
    verdict: Verdict
    events: tuple[Event, ...]
    requeue_after: float | None
    moved: tuple[str, ...]
    steps: tuple[Step, ...]
    step: Step | None

    @property
    def step_label(self) -> str:
        """Human form of the position, e.g. ``2/4``."""
        if self.step is None:
            return ""
        return f"{self.step.index + 1}/{len(self.steps)}"


# --- the planner --------------------------------------------------------------------------------------


def _second(now: datetime) -> datetime:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).replace(microsecond=0)


def _age(now: datetime, then: datetime | None) -> float:
    return 0.0 if then is None else (now - then).total_seconds()


def plan_waves(policy: RolloutPolicy, observed: Observed, state: RolloutStatus, now: datetime) -> WavePlan:
    """Decide the next assignment of nodes to revisions and the rollout's verdict."""
    return _Rollout(policy, observed, state, now).plan()


def analysis_due(policy: RolloutPolicy, state: RolloutStatus, now: datetime) -> bool:
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


Gate = Callable[[], WavePlan | None]
"""One gate of a step: None when it passes, the plan when it ends this one."""


class _Rollout:
    """One plan: its inputs, the step it is at, and what it has decided so far (the accumulator)."""

    def __init__(
        self, policy: RolloutPolicy, observed: Observed, state: RolloutStatus, now: datetime
    ) -> None:
        exact = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        self.policy = policy
        self.observed = observed
        self.now = _second(now)
        # Timers are computed from `now` cut to the second; `late` is the cut-off part, taken off each
        # requeue so a bake ends when it ends, not up to a second later.
        self.late = (exact - self.now).total_seconds()
        self.nodes = {n.name: n for n in observed.nodes}
        self.steps = expand_steps(policy, observed.nodes)
        self.state = state
        self.update_revision = observed.update_revision
        # The step whose gates run, and what its offline gate found.
        self.step: Step | None = None
        self.pending: list[str] = []
        self.offline_pending: list[str] = []
        # The accumulator. Nodes that are no longer eligible are the operator's business (their
        # DaemonSets drop them).
        self.assignment = {n: r for n, r in observed.assignment.items() if n in self.nodes}
        self.events: list[Event] = []
        self.requeue: float | None = None
        self.moved: list[str] = []

    # --- the walk ---

    def plan(self) -> WavePlan:
        self.accept_new_revision()
        if self.state.stable_revision is None:
            return self.initial_rollout()
        if not self.state.in_progress:
            return self.steady()
        return self.progress()

    def progress(self) -> WavePlan:
        """The gates of the step in progress, in order. A step that passes them all advances, and its
        successor's gates run in the same reconcile; the last one's advance ends the rollout."""
        gates: tuple[Gate, ...] = (
            self.commands,
            self.position,
            self.promote,
            self.failed_pods,
            self.offline,
            self.move,
            self.ready,
            self.analysis,
            self.bake,
            self.pause,
            self.advance,
        )
        while True:
            for gate in gates:
                plan = gate()
                if plan is not None:
                    return plan

    # --- the gates ---

    def commands(self) -> WavePlan | None:
        """Abort and rollback act at once, whatever the step is doing."""
        cmd = self.observed.commands
        if cmd.abort is not None and cmd.abort != self.state.handled_abort:
            self.set(handled_abort=cmd.abort)
            return self.rollback(Reason.ROLLED_BACK_ABORT, "aborted by user")
        if cmd.rollback is not None and cmd.rollback != self.state.handled_rollback:
            self.set(handled_rollback=cmd.rollback)
            return self.rollback(Reason.ROLLED_BACK_ABORT, "rolled back by user")
        return None

    def position(self) -> WavePlan | None:
        """Find the step in progress (entering it when it is new); past the last one, the rollout is done.
        Nodes on neither revision go back to stable."""
        update, state = self.update_revision, self.state
        if not self.steps:
            # No eligible edge nodes: the revision is trivially everywhere it can be.
            self.complete(update)
            return self.finish(Verdict("Completed", Reason.NO_NODES, "no eligible edge nodes"))
        step = (
            self.steps[0]
            if state.step_started_at is None
            else find_step(self.steps, state.group, state.stage)
        )
        if step is None:
            self.event("Normal", Reason.COMPLETED, f"revision {update} rolled out to all steps")
            self.complete(update)
            return self.steady()
        if (step.group, step.stage_index) != (state.group, state.stage) or state.step_started_at is None:
            self.enter(step)
            self.event("Normal", Reason.STEP_STARTED, self.step_text(step))
        self.step = step
        # A new node starts on stable, and a node on neither revision (a superseded rollout) has never been
        # validated: back to stable now. If their step has been reached, the wave below moves them on.
        stable = state.stable_revision
        assert stable is not None
        for node in self.observed.nodes:
            if self.assignment.get(node.name) not in (stable, update):
                self.assignment[node.name] = stable
        return None

    def promote(self) -> WavePlan | None:
        """A new promote skips this step's bake and analysis (entering a step clears it)."""
        cmd = self.observed.commands
        if cmd.promote is not None and cmd.promote != self.state.handled_promote:
            self.set(handled_promote=cmd.promote, promoted=True)
            self.event(
                "Normal",
                Reason.PROMOTED,
                f"step {self.label} promoted by user: bake and analysis skipped",
            )
        return None

    def failed_pods(self) -> WavePlan | None:
        update = self.update_revision
        pods = self.observed.pods
        failed = [
            n
            for n, r in self.assignment.items()
            if r == update and (p := pods.get(n)) is not None and p.revision == update and p.failed
        ]
        if failed:
            return self.rollback(
                Reason.ROLLED_BACK_PODS,
                f"pods of revision {update} failing on {', '.join(sorted(failed)[:5])}",
            )
        return None

    def offline(self) -> WavePlan | None:
        """The step's nodes not moved yet, and which of them are offline: ``offlineNodes: Fail`` rolls back."""
        self.pending = [n for n in self.current.nodes if self.assignment.get(n) != self.update_revision]
        self.offline_pending = [n for n in self.pending if not self.online(n)]
        if self.offline_pending and self.policy.offline_nodes == "Fail":
            return self.rollback(
                Reason.ROLLED_BACK_OFFLINE,
                f"offline when their wave came: {', '.join(self.offline_pending[:5])} (offlineNodes: Fail)",
            )
        return None

    def move(self) -> WavePlan | None:
        """The next wave of the step's online nodes, within maxUnavailable; ``paused`` moves nothing."""
        if not self.policy.paused:
            cap = max_unavailable_count(self.policy.max_unavailable, max(1, len(self.current.added)))
            online = [n for n in self.pending if n not in self.offline_pending]
            self.move_nodes(online, self.update_revision, cap)
        self.track_progress(self.update_revision)
        if self.policy.paused:
            # Paused freezes forward motion and the clocks that measure it, not the failure detectors above.
            self.set(progress_at=self.now)
            return self.finish(Verdict("Paused", Reason.PAUSED, "spec.rollout.paused is true"), self.current)
        return None

    def ready(self) -> WavePlan | None:
        """Every online node of the step Ready (within the progress deadline), and with ``offlineNodes:
        Wait`` every node of the step online; then the step is Ready and its analysis and bake clocks start
        (once per step: a pod not Ready later holds the advance, not the clocks)."""
        step, update = self.current, self.update_revision
        online = [n for n in step.nodes if self.online(n)]
        not_ready = [n for n in online if not self.pod_ready(n, update)]
        if not_ready:
            deadline = self.policy.progress_deadline_seconds
            waited = _age(self.now, self.state.progress_at)
            if waited > deadline:
                return self.rollback(
                    Reason.ROLLED_BACK_DEADLINE,
                    f"{len(not_ready)} nodes not Ready on {update} after {int(waited)}s "
                    f"(progressDeadlineSeconds {deadline:g}): {', '.join(not_ready[:5])}",
                )
            self.requeue_in(deadline - waited + 1)
            moved = sum(1 for n in step.nodes if self.assignment.get(n) == update)
            # `ready_at` stays once set: the bake counts from when the step was first Ready, and the step
            # still advances only with every online node Ready. Restarting the bake here let a node that
            # flaps faster than the bake (its pod not Ready for a moment after each return) hold the
            # rollout forever, each return counting as progress against the deadline.
            return self.finish(
                Verdict(
                    "Progressing",
                    Reason.WAITING_READY,
                    f"step {self.label}: {moved}/{len(step.nodes)} nodes moved, "
                    f"{len(online) - len(not_ready)}/{len(online)} online nodes Ready"
                    + self.not_ready_note(not_ready, update),
                ),
                step,
            )
        # Every offline node of the step, moved or not: a node cut off after its wave moved it was never
        # seen Ready, and one cut off mid-bake is not seen now. `Wait` holds for them; `Skip` defers them.
        unseen = [n for n in step.nodes if not self.online(n)]
        if unseen and self.policy.offline_nodes == "Wait":
            waiting = ", ".join(unseen[:5])
            return self.finish(
                Verdict(
                    "Holding",
                    Reason.OFFLINE_WAIT,
                    f"waiting for offline nodes {waiting} (offlineNodes: Wait)",
                ),
                step,
            )
        if self.state.ready_at is None:
            self.set(ready_at=self.now)
        return None

    def analysis(self) -> WavePlan | None:
        """Apply the newest measurement: Failed rolls back, Inconclusive holds, Successful lets the step bake."""
        analysis, state = self.policy.analysis, self.state
        if state.promoted or analysis is None or state.analysis_passed_at is not None:
            return None
        m = self.observed.measurement
        label = f"step {self.label}"
        assert state.ready_at is not None
        # A measurement taken before this wave was Ready describes the previous wave: ignore it.
        if m is not None and _second(m.at) >= state.ready_at:
            self.set(last_measured_at=_second(m.at))
            if m.outcome == "Failed":
                return self.rollback(Reason.ROLLED_BACK_ANALYSIS, f"{label}: analysis failed: {m.message}")
            if m.outcome == "Successful":
                self.event("Normal", Reason.ANALYSIS_PASSED, f"{label}: analysis passed: {m.message}")
                self.set(analysis_passed_at=self.now)
                return None
            # Too few samples (or no answer) says nothing about the revision: hold, never roll back.
            reason = Reason.INCONCLUSIVE if m.outcome == "Inconclusive" else Reason.ANALYSIS_ERROR
            self.requeue_in(analysis.interval_seconds)
            return self.finish(Verdict("Inconclusive", reason, f"{label}: {m.message}"), self.current)
        if self.observed.measuring:
            # The analyst queues this ModelDeployment when the measurement ends; this is a safety net only.
            self.requeue_in(analysis.interval_seconds)
        elif state.last_measured_at is None:
            self.requeue_in(analysis.warmup_seconds - _age(self.now, state.ready_at))
        else:
            self.requeue_in(analysis.interval_seconds - _age(self.now, state.last_measured_at))
        if state.verdict == "Inconclusive" and state.last_measured_at is not None:
            # Keep saying inconclusive until a measurement says otherwise.
            return self.finish(Verdict("Inconclusive", state.reason, state.message), self.current)
        return self.finish(
            Verdict("Progressing", Reason.ANALYSIS_RUNNING, f"{label}: analysis running"), self.current
        )

    def bake(self) -> WavePlan | None:
        """``bakeSeconds`` from when the analysis passed (or the step became Ready); promote skips it."""
        state, step = self.state, self.current
        if state.promoted:
            return None
        baked_from = state.analysis_passed_at or state.ready_at
        left = step.stage.bake_seconds - _age(self.now, baked_from)
        if left <= 0:
            return None
        self.requeue_in(left)
        until = (baked_from or self.now) + timedelta(seconds=step.stage.bake_seconds)
        # An end time, not a countdown: the message must not change between reconciles, or each status
        # patch's own watch event causes another patch (one a second per bake).
        return self.finish(
            Verdict("Progressing", Reason.BAKING, f"step {self.label}: baking until {format_time(until)}"),
            step,
        )

    def pause(self) -> WavePlan | None:
        """A stage with ``pause`` waits for a promote."""
        if self.state.promoted or not self.current.stage.pause:
            return None
        return self.finish(
            Verdict(
                "Paused", Reason.STAGE_PAUSE, f"step {self.label} done; waiting for promote (kiri promote)"
            ),
            self.current,
        )

    def advance(self) -> WavePlan | None:
        """Step done: enter the next one (its gates run next, in this same reconcile), or the rollout is.

        One Event says both the completed step and the started one: Events are API writes, and at fleet
        scale they were most of the operator's writes."""
        step, update = self.current, self.update_revision
        done = f"step {self.label} completed"
        following = next((s for s in self.steps if s.index == step.index + 1), None)
        if following is None:
            self.event(
                "Normal",
                Reason.COMPLETED,
                f"{done}; revision {update} rolled out to all {len(self.observed.nodes)} edge nodes",
            )
            self.complete(update)
            return self.steady()
        self.enter(following)
        self.event("Normal", Reason.STEP_STARTED, f"{self.step_text(following)} ({done})")
        return None

    # --- outside a rollout ---

    def accept_new_revision(self) -> None:
        """Start a rollout when the spec's revision is new; a remembered failed revision is not retried."""
        state, update = self.state, self.update_revision
        if state.update_revision == update:
            return
        if update in state.rolled_back_revisions:
            # The same bad spec applied again (GitOps sync): stay rolled back, say so once.
            self.event(
                "Warning",
                Reason.KNOWN_BAD,
                f"revision {update} was rolled back before; not rolling it out again",
            )
            self.set(update_revision=update)
            return
        if state.update_revision is not None and state.in_progress:
            self.event(
                "Normal",
                Reason.ROLLOUT_SUPERSEDED,
                f"revision {state.update_revision} superseded by {update} before it completed",
            )
        if update == state.stable_revision:
            self.set(update_revision=update)
            return
        self.event(
            "Normal",
            Reason.ROLLOUT_STARTED,
            f"rolling out revision {update} (stable: {state.stable_revision})",
        )
        cmd = self.observed.commands
        self.state = RolloutStatus(
            stable_revision=state.stable_revision,
            previous_stable_revision=state.previous_stable_revision,
            update_revision=update,
            handled_promote=cmd.promote,
            handled_abort=cmd.abort,
            handled_rollback=cmd.rollback,
            rolled_back_revisions=state.rolled_back_revisions,
            history=state.history,
        )

    def initial_rollout(self) -> WavePlan:
        """No stable revision yet: nothing to protect and nothing to roll back to, so no stages or gates.

        Bandwidth caps still apply: the downloads are just as real on the first rollout.
        """
        update, now = self.update_revision, self.now
        if self.state.step_started_at is None:
            self.set(step_started_at=now, progress_at=now)
        names = [n for _, group in groups_of(self.policy, self.observed.nodes) for n in group]
        pending = [n for n in names if self.assignment.get(n) != update]
        offline = [n for n in pending if not self.online(n)]
        # Offline nodes cannot pull anything now; pointing their assignment at the revision costs nothing.
        for n in offline:
            self.assignment[n] = update
        self.move_nodes([n for n in pending if n not in offline], update, None)
        self.track_progress(update)
        online = [n for n in names if self.online(n)]
        pods = self.observed.pods
        failed = [n for n in online if (p := pods.get(n)) is not None and p.revision == update and p.failed]
        ready = [n for n in online if self.pod_ready(n, update)]
        if len(ready) == len(online) and all(self.assignment.get(n) == update for n in names):
            self.event("Normal", Reason.COMPLETED, f"revision {update} is on all {len(names)} edge nodes")
            self.complete(update)
            return self.finish(Verdict("Completed", Reason.COMPLETED, f"revision {update} is stable"))
        deadline = self.policy.progress_deadline_seconds
        if failed or _age(now, self.state.progress_at) > deadline:
            # Nothing to roll back to: hold and report; the next spec change starts over.
            what = f"{len(failed)} pods failing" if failed else "no progress within progressDeadlineSeconds"
            return self.finish(
                Verdict("Holding", Reason.INITIAL_FAILING, f"first rollout of {update}: {what}")
            )
        self.requeue_in(deadline - _age(now, self.state.progress_at) + 1)
        return self.finish(
            Verdict(
                "Progressing",
                Reason.WAITING_READY,
                f"{len(ready)}/{len(online)} online nodes Ready on {update}"
                + self.not_ready_note([n for n in online if not self.pod_ready(n, update)], update),
            )
        )

    def steady(self) -> WavePlan:
        """No rollout in progress: every node converges to the stable revision (nodes that come back online
        included), within the bandwidth caps. A manual rollback goes to the previous stable revision."""
        cmd = self.observed.commands
        if cmd.rollback is not None and cmd.rollback != self.state.handled_rollback:
            self.set(handled_rollback=cmd.rollback)
            current, previous = self.state.stable_revision, self.state.previous_stable_revision
            if previous is not None:
                self.set(stable_revision=previous, previous_stable_revision=None)
                return self.rollback(
                    Reason.ROLLED_BACK_MANUAL,
                    f"manual rollback from {current} to {previous}",
                    failed_revision=current,
                )
            self.event("Warning", Reason.ROLLED_BACK_MANUAL, "no previous stable revision to roll back to")
        state = self.state
        self.set(
            handled_promote=cmd.promote or state.handled_promote,
            handled_abort=cmd.abort or state.handled_abort,
        )
        stable = state.stable_revision
        assert stable is not None
        names = [n for _, group in groups_of(self.policy, self.observed.nodes) for n in group]
        pending = [n for n in names if self.assignment.get(n) != stable]
        for n in pending:
            current = self.assignment.get(n)
            # Offline and new nodes cost nothing to point at stable; nodes on a revision that never became
            # stable still hold stable's artifact (the cache pins N-1), so they go back without a download.
            unvalidated = current in state.rolled_back_revisions or current == state.update_revision
            if not self.online(n) or current is None or unvalidated:
                self.assignment[n] = stable
        self.move_nodes([n for n in pending if self.assignment.get(n) != stable], stable, None)
        if state.update_revision in state.rolled_back_revisions and state.update_revision != stable:
            told = state.verdict == "RolledBack"
            verdict = Verdict(
                "RolledBack",
                state.reason if told else Reason.KNOWN_BAD,
                state.message
                if told
                else f"revision {state.update_revision} was rolled back; running {stable}",
            )
        else:
            verdict = Verdict("Completed", Reason.COMPLETED, f"revision {stable} is stable")
        if self.in_flight(stable) or self.moved:
            self.requeue_in(10)
        return self.finish(verdict)

    def rollback(self, reason: str, message: str, failed_revision: str | None = None) -> WavePlan:
        """Every node back to the stable revision at once: its DaemonSet and cached artifact are still
        there, so no download gates apply, and a slow rollback would keep a bad revision serving."""
        state = self.state
        bad = failed_revision or state.update_revision
        stable = state.stable_revision
        assert bad is not None and stable is not None
        for node in self.observed.nodes:
            self.assignment[node.name] = stable
        entry = RolloutHistoryEntry(
            revision=bad, outcome="RolledBack", reason=reason, at=self.now, message=message
        )
        self.event(
            "Warning", Reason.ROLLED_BACK, f"{reason}: {message}; every node back to revision {stable}"
        )
        remembered = (*(r for r in state.rolled_back_revisions if r != bad), bad)
        self.reset_position()
        self.set(
            rolled_back_revisions=remembered[-ROLLED_BACK_LIMIT:],
            history=(*state.history, entry)[-HISTORY_LIMIT:],
        )
        self.requeue_in(10)
        return self.finish(Verdict("RolledBack", reason, message))

    # --- state ---

    def set(self, **changes: Any) -> None:
        self.state = self.state.model_copy(update=changes)

    def enter(self, step: Step) -> None:
        self.set(
            group=step.group,
            stage=step.stage_index,
            step_started_at=self.now,
            progress_at=self.now,
            ready_at=None,
            last_measured_at=None,
            analysis_passed_at=None,
            promoted=False,
        )

    def complete(self, revision: str) -> None:
        state = self.state
        entry = RolloutHistoryEntry(
            revision=revision, outcome="Promoted", reason=Reason.COMPLETED, at=self.now
        )
        previous = (
            state.stable_revision if state.stable_revision != revision else state.previous_stable_revision
        )
        self.reset_position()
        self.set(
            stable_revision=revision,
            previous_stable_revision=previous,
            history=(*state.history, entry)[-HISTORY_LIMIT:],
        )

    def reset_position(self) -> None:
        self.set(
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

    def track_progress(self, revision: str) -> None:
        """Progress = a node moved or one more node Ready on the revision, as a Deployment counts it."""
        ready = sum(1 for n, r in self.assignment.items() if r == revision and self.pod_ready(n, revision))
        if self.moved or ready > self.state.ready_nodes:
            self.set(progress_at=self.now, ready_nodes=ready)
        else:
            self.set(ready_nodes=ready)

    # --- the accumulator ---

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def requeue_in(self, seconds: float) -> None:
        seconds = max(0.2, seconds - self.late)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def move_nodes(self, candidates: Sequence[str], revision: str, unavailable_cap: int | None) -> None:
        """Move candidates (in order) to ``revision`` within maxUnavailable and the bandwidth caps."""
        sizes, nodes = self.observed.variant_sizes, self.nodes
        flying = self.in_flight(revision)
        caps = [c for c in (unavailable_cap, self.policy.max_concurrent_downloads) if c is not None]
        slots = min(caps) - len(flying) if caps else len(candidates)
        bytes_used = sum(sizes.get(nodes[n].variant, 0) for n in flying if n in nodes)
        moved: list[str] = []
        for name in candidates:
            if slots <= 0:
                break
            size = sizes.get(nodes[name].variant, 0)
            cap = self.policy.max_bytes_per_wave
            if cap is not None and bytes_used + size > cap:
                if flying or moved:
                    break
                # One variant larger than the cap: moving it alone is the best the cap allows; say so.
                self.event(
                    "Warning",
                    Reason.BANDWIDTH,
                    f"variant {nodes[name].variant} ({size} bytes) exceeds maxBytesPerWave ({cap}); moving one node at a time",
                )
            self.assignment[name] = revision
            moved.append(name)
            bytes_used += size
            slots -= 1
        self.moved.extend(moved)

    def finish(self, verdict: Verdict, step: Step | None = None) -> WavePlan:
        state = self.state
        if (state.verdict, state.reason) != (verdict.kind, verdict.reason) and verdict.kind in (
            "Paused",
            "Inconclusive",
        ):
            self.event("Normal" if verdict.kind == "Paused" else "Warning", verdict.reason, verdict.message)
        self.set(verdict=verdict.kind, reason=verdict.reason, message=verdict.message)
        return WavePlan(
            assignment=self.assignment,
            state=self.state,
            verdict=verdict,
            events=tuple(self.events),
            requeue_after=self.requeue,
            moved=tuple(self.moved),
            steps=self.steps,
            step=step,
        )

    # --- reading ---

    @property
    def current(self) -> Step:
        assert self.step is not None
        return self.step

    @property
    def label(self) -> str:
        return f"{self.current.index + 1}/{len(self.steps)}"

    def step_text(self, step: Step) -> str:
        where = f" of group {step.group}" if step.group is not None else ""
        return (
            f"step {step.index + 1}/{len(self.steps)}{where} (stage {step.stage_index + 1}): "
            f"{len(step.nodes)} nodes on revision {self.update_revision}, {len(step.added)} new"
        )

    def online(self, name: str) -> bool:
        return name in self.observed.online

    def not_ready_note(self, nodes: Sequence[str], revision: str) -> str:
        """ "; N pods not ready: <reason>" for the reason most of these nodes' pods of `revision` give, so
        the condition says why a wave waits, not only that it does; "" when no pod says."""
        return not_ready_note(
            p.reason for n in nodes if (p := self.observed.pods.get(n)) is not None and p.revision == revision
        )

    def pod_ready(self, name: str, revision: str) -> bool:
        pod = self.observed.pods.get(name)
        return pod is not None and pod.revision == revision and pod.ready

    def in_flight(self, revision: str) -> list[str]:
        """Nodes moved to ``revision`` that are online and not Ready yet: downloading or starting."""
        return [
            n
            for n, r in self.assignment.items()
            if r == revision and self.online(n) and not self.pod_ready(n, revision)
        ]
