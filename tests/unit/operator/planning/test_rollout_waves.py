"""The wave planner, driven through whole rollouts by a small simulated fleet.

The simulation is the planner's contract with the operator: it applies each plan's assignment, makes a
node's pod Ready ``ready_after`` seconds after it was moved (never, for a revision marked bad), and feeds the
state back, optionally through the status dict as a restarted operator would read it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from kiri_operator.api.statuses import RolloutStatus
from kiri_operator.conditions import Reason
from kiri_operator.observations import Measurement
from kiri_operator.planning import stepping
from kiri_operator.planning import waves as w
from kiri_operator.planning.stepping import AnalysisPolicy, EdgeNode, RolloutPolicy, Stage
from kiri_operator.planning.waves import Commands, NodePod, Observed
from kiri_operator.plans import Event

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def fleet(n: int, sites: int = 1, variant: str = "int8") -> list[EdgeNode]:
    return [
        EdgeNode(f"n{i:03d}", {"kiri.dev/site": f"site-{chr(97 + i % sites)}"}, True, variant)
        for i in range(n)
    ]


class Sim:
    """A fleet whose pods follow the plan's assignment."""

    def __init__(
        self,
        policy: RolloutPolicy,
        nodes: list[EdgeNode],
        stable: str = "r1",
        ready_after: float = 2,
        bad: frozenset[str] = frozenset(),
        failing: frozenset[str] = frozenset(),
        through_status: bool = False,
    ) -> None:
        self.policy = policy
        self.nodes = {n.name: n for n in nodes}
        self.now = T0
        self.assignment = {n.name: stable for n in nodes}
        self.moved_at = {n.name: T0 - timedelta(hours=1) for n in nodes}
        self.ready_after = ready_after
        self.bad = set(bad)
        self.failing = set(failing)
        self.through_status = through_status
        self.state = RolloutStatus(stable_revision=stable, update_revision=stable)
        self.update = stable
        self.commands = Commands()
        self.measure: Callable[[Sim], Measurement | None] = lambda sim: None
        self.plans: list[w.WavePlan] = []
        self.max_in_flight = 0
        self.variant_sizes: dict[str, int] = {}

    def set_online(self, name: str, online: bool) -> None:
        self.nodes[name] = dataclasses.replace(self.nodes[name], online=online)

    def pods(self) -> dict[str, NodePod]:
        pods = {}
        for name, rev in self.assignment.items():
            if not self.nodes[name].online:
                continue
            up = (self.now - self.moved_at[name]).total_seconds() >= self.ready_after
            pods[name] = NodePod(
                rev,
                ready=up and rev not in self.bad and rev not in self.failing,
                failed=rev in self.failing and up,
            )
        return pods

    def observed(self) -> Observed:
        return Observed(
            update_revision=self.update,
            nodes=list(self.nodes.values()),
            assignment=dict(self.assignment),
            pods=self.pods(),
            variant_sizes=self.variant_sizes,
            measurement=self.measure(self) if w.analysis_due(self.policy, self.state, self.now) else None,
            commands=self.commands,
        )

    def step(self, seconds: float = 1) -> w.WavePlan:
        state = RolloutStatus.model_validate(self.state.dump()) if self.through_status else self.state
        plan = w.plan_waves(self.policy, self.observed(), state, self.now)
        for name, rev in plan.assignment.items():
            if self.assignment.get(name) != rev:
                self.assignment[name] = rev
                self.moved_at[name] = self.now
        self.state = plan.state
        self.plans.append(plan)
        pods = self.pods()
        flying = [
            n for n, r in self.assignment.items() if r == self.update and n in pods and not pods[n].ready
        ]
        self.max_in_flight = max(self.max_in_flight, len(flying))
        self.now += timedelta(seconds=seconds)
        return plan

    def run_until(
        self, done: Callable[[w.WavePlan], bool], limit: int = 3000, seconds: float = 1
    ) -> w.WavePlan:
        for _ in range(limit):
            plan = self.step(seconds)
            if done(plan):
                return plan
        raise AssertionError(f"not done after {limit} steps: {self.plans[-1].verdict}")

    def on(self, revision: str) -> set[str]:
        return {n for n, r in self.assignment.items() if r == revision}

    def events(self, reason: str) -> list[Event]:
        return [e for p in self.plans for e in p.events if e.reason == reason]


def verdict_is(kind: str) -> Callable[[w.WavePlan], bool]:
    return lambda plan: plan.verdict.kind == kind


# --- stage arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "total", "expected"),
    [(10, 5, 1), (25, 4, 1), (25, 5, 2), (50, 3, 2), (33, 100, 33), (100, 7, 7), (1, 1000, 10), (99, 1, 1)],
)
def test_percent_rounds_up(percent: int, total: int, expected: int) -> None:
    assert Stage(percent=percent).count(total) == expected


def test_stage_needs_exactly_one_size() -> None:
    with pytest.raises(ValueError, match="exactly one of nodes or percent"):
        Stage()
    with pytest.raises(ValueError, match="exactly one of nodes or percent"):
        Stage(nodes=1, percent=50)
    with pytest.raises(ValueError, match="percent must be between"):
        Stage(percent=150)


def test_steps_are_cumulative_and_end_at_everyone() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=50)))
    steps = stepping.expand_steps(policy, fleet(10))
    assert [len(s.nodes) for s in steps] == [1, 5, 10]
    assert [len(s.added) for s in steps] == [1, 4, 5]
    # The implicit last stage reaches every node even when the spec stops short.
    assert steps[-1].stage.percent == 100
    assert steps[1].nodes[:1] == steps[0].nodes


def test_steps_that_add_nothing_are_dropped_unless_they_pause() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1), Stage(percent=10), Stage(percent=20, pause=True), Stage(percent=100))
    )
    steps = stepping.expand_steps(policy, fleet(3))
    # 10% and 20% of 3 nodes are both one node: the 10% step adds nothing and goes, the pause stays.
    assert [(s.stage_index, len(s.nodes)) for s in steps] == [(0, 1), (2, 1), (3, 3)]


def test_group_by_walks_site_by_site_through_every_stage() -> None:
    nodes = [*fleet(6, sites=2), EdgeNode("lonely", {}, True, "int8")]
    policy = RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100)), group_by="kiri.dev/site")
    steps = stepping.expand_steps(policy, nodes)
    assert [(s.group, len(s.added)) for s in steps] == [
        ("site-a", 1),
        ("site-a", 2),
        ("site-b", 1),
        ("site-b", 2),
        (None, 1),
    ]
    site_a = {n.name for n in nodes if n.labels.get("kiri.dev/site") == "site-a"}
    assert set(steps[1].nodes) == site_a
    assert steps[-1].added == ("lonely",)


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [(1, 10, 1), (3, 10, 3), ("25%", 10, 2), ("10%", 5, 1), ("0%", 5, 1), (0, 5, 1)],
)
def test_max_unavailable(value: int | str, size: int, expected: int) -> None:
    assert stepping.max_unavailable_count(value, size) == expected


def test_max_unavailable_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="maxUnavailable"):
        stepping.max_unavailable_count("lots", 10)


# --- whole rollouts -----------------------------------------------------------------------------------


def test_first_rollout_moves_everyone_and_becomes_stable() -> None:
    nodes = fleet(5)
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100, bake_seconds=60))), nodes)
    sim.state = RolloutStatus()
    sim.assignment = {}
    sim.update = "r1"
    first = sim.step()
    assert first.assignment == {n.name: "r1" for n in nodes}
    done = sim.run_until(verdict_is("Completed"))
    assert done.state.stable_revision == "r1"
    assert [h.outcome for h in done.state.history] == ["Promoted"]


def test_stages_progress_with_readiness_and_bake() -> None:
    policy = RolloutPolicy(
        stages=(
            Stage(nodes=1, bake_seconds=30),
            Stage(percent=50, bake_seconds=30),
            Stage(percent=100, bake_seconds=30),
        ),
        max_unavailable="100%",
    )
    sim = Sim(policy, fleet(10))
    sim.update = "r2"
    plan = sim.step()
    assert plan.moved == ("n000",)
    assert plan.verdict.reason == Reason.WAITING_READY
    # Nothing more moves until the canary is Ready and has baked 30 s.
    sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    started = sim.now
    sim.run_until(lambda p: bool(p.moved))
    assert sim.on("r2") == {f"n{i:03d}" for i in range(5)}
    assert (sim.now - started).total_seconds() >= 30
    done = sim.run_until(verdict_is("Completed"))
    assert sim.on("r2") == set(sim.nodes)
    assert done.state.stable_revision == "r2"
    assert done.state.previous_stable_revision == "r1"
    # One Event per step boundary: each StepStarted names the step it follows, the last is RolloutCompleted.
    started = [e.message for e in sim.events("StepStarted")]
    assert [m.endswith(f"(step {i}/3 completed)") for i, m in enumerate(started)] == [False, True, True]
    assert [e.message.split(";")[0] for e in sim.events(Reason.COMPLETED)] == ["step 3/3 completed"]
    assert not sim.events("StepCompleted")
    # 3 bakes of 30 s plus 3 readiness waits of 2 s each: the planner itself adds nothing measurable.
    assert (sim.now - T0).total_seconds() <= 3 * 30 + 3 * 2 + 6


def test_baking_asks_to_be_woken_when_the_bake_ends() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=45), Stage(percent=100))), fleet(3))
    sim.update = "r2"
    plan = sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    assert plan.requeue_after is not None
    assert 40 <= plan.requeue_after <= 45


def test_bake_message_is_stable_across_reconciles() -> None:
    # Each status patch comes back as a watch event and a reconcile: a changing message would patch again.
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=45), Stage(percent=100))), fleet(3))
    sim.update = "r2"
    first = sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    later = [sim.step(seconds=3) for _ in range(5)]
    assert all(p.verdict == first.verdict for p in later)
    assert "baking until 2026-01-01T12:00:" in first.verdict.message


def test_group_by_finishes_one_site_before_touching_the_next() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1), Stage(percent=100)), group_by="kiri.dev/site", max_unavailable="100%"
    )
    sim = Sim(policy, fleet(9, sites=3))
    sim.update = "r2"
    site = {n: sim.nodes[n].labels["kiri.dev/site"] for n in sim.nodes}
    order: list[str] = []
    while sim.state.stable_revision != "r2":
        plan = sim.step()
        order.extend(site[n] for n in plan.moved)
        assert len(sim.plans) < 200
    assert order == sorted(order)
    assert order.count("site-a") == 3


def test_max_unavailable_limits_nodes_in_flight_within_a_wave() -> None:
    policy = RolloutPolicy(stages=(Stage(percent=100),), max_unavailable=3)
    sim = Sim(policy, fleet(20), ready_after=5)
    sim.update = "r2"
    sim.run_until(verdict_is("Completed"))
    assert sim.max_in_flight == 3


def test_max_unavailable_percent_is_of_the_wave() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=2), Stage(percent=100)), max_unavailable="50%")
    sim = Sim(policy, fleet(10), ready_after=5)
    sim.update = "r2"
    first = sim.step()
    assert len(first.moved) == 1  # 50% of a 2-node wave
    sim.run_until(lambda p: len(sim.on("r2")) > 2)
    assert len(sim.plans[-1].moved) == 4  # 50% of the 8 nodes the second wave adds


def test_max_concurrent_downloads_caps_the_fleet() -> None:
    policy = RolloutPolicy(stages=(Stage(percent=100),), max_unavailable="100%", max_concurrent_downloads=4)
    sim = Sim(policy, fleet(30), ready_after=3)
    sim.update = "r2"
    sim.run_until(verdict_is("Completed"))
    assert sim.max_in_flight == 4


def test_max_bytes_per_wave_uses_the_variant_sizes() -> None:
    nodes = [EdgeNode(f"g{i}", {}, True, "fp16") for i in range(4)] + [
        EdgeNode(f"c{i}", {}, True, "int8") for i in range(8)
    ]
    policy = RolloutPolicy(stages=(Stage(percent=100),), max_unavailable="100%", max_bytes_per_wave=1000)
    sim = Sim(policy, nodes, ready_after=3)
    sim.variant_sizes = {"fp16": 400, "int8": 250}
    sim.update = "r2"
    first = sim.step()
    sizes = [sim.variant_sizes[sim.nodes[n].variant] for n in first.moved]
    assert sum(sizes) <= 1000
    assert first.moved == ("c0", "c1", "c2", "c3")  # 4 x 250 = 1000 fits exactly; a 5th would not
    sim.run_until(verdict_is("Completed"))
    assert sim.on("r2") == set(sim.nodes)


def test_a_variant_bigger_than_the_byte_cap_moves_alone_and_says_so() -> None:
    policy = RolloutPolicy(stages=(Stage(percent=100),), max_unavailable="100%", max_bytes_per_wave=100)
    sim = Sim(policy, fleet(3), ready_after=3)
    sim.variant_sizes = {"int8": 500}
    sim.update = "r2"
    sim.run_until(verdict_is("Completed"))
    assert sim.max_in_flight == 1
    assert sim.events(Reason.BANDWIDTH)


# --- rollbacks ----------------------------------------------------------------------------------------


def test_never_ready_canary_rolls_back_at_the_progress_deadline() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100)), progress_deadline_seconds=20)
    sim = Sim(policy, fleet(5), bad=frozenset({"r2"}))
    sim.update = "r2"
    plan = sim.run_until(verdict_is("RolledBack"))
    assert plan.verdict.reason == Reason.ROLLED_BACK_DEADLINE
    assert 20 <= (sim.now - T0).total_seconds() <= 23
    assert sim.on("r1") == set(sim.nodes)
    assert plan.state.rolled_back_revisions == ("r2",)
    assert plan.state.history[-1].outcome == "RolledBack"
    assert [e.type for e in plan.events if e.reason == "RolledBack"] == ["Warning"]


def test_failing_pods_roll_back_at_once() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=2), Stage(percent=100))), fleet(5), failing=frozenset({"r2"}))
    sim.update = "r2"
    plan = sim.run_until(verdict_is("RolledBack"))
    assert plan.verdict.reason == Reason.ROLLED_BACK_PODS
    assert (sim.now - T0).total_seconds() <= 4


def test_the_same_spec_applied_again_does_not_roll_out_again_but_a_new_one_does() -> None:
    sim = Sim(
        RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100)), progress_deadline_seconds=5),
        fleet(4),
        bad=frozenset({"r2"}),
    )
    sim.update = "r2"
    sim.run_until(verdict_is("RolledBack"))
    for _ in range(30):  # GitOps keeps syncing the same spec
        plan = sim.step()
        assert plan.moved == ()
        assert plan.verdict.kind == "RolledBack"
    assert sim.on("r1") == set(sim.nodes)
    sim.update = "r3"
    plan = sim.step()
    assert plan.moved == ("n000",)
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r3"
    # Going back to the bad revision later is refused too, with one event saying why.
    sim.update = "r2"
    sim.run_until(lambda p: True, limit=5)
    assert sim.on("r3") == set(sim.nodes)
    assert len(sim.events(Reason.KNOWN_BAD)) == 1


def test_failed_analysis_rolls_back_and_inconclusive_holds() -> None:
    analysis = AnalysisPolicy(interval_seconds=10, warmup_seconds=10)
    policy = RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=5), Stage(percent=100)), analysis=analysis)
    sim = Sim(policy, fleet(4))
    sim.update = "r2"
    outcomes = iter(["Inconclusive", "Inconclusive", "Failed"])
    taken: list[datetime] = []

    def measure(s: Sim) -> Measurement:
        taken.append(s.now)
        return Measurement(s.now, next(outcomes), "error ratio")  # type: ignore[arg-type]

    sim.measure = measure
    plan = sim.run_until(lambda p: p.verdict.kind == "Inconclusive")
    assert plan.verdict.reason == Reason.INCONCLUSIVE
    ready_at = plan.state.ready_at
    assert ready_at is not None
    assert (taken[0] - ready_at).total_seconds() == 10
    # Held, not rolled back, and no further nodes move while inconclusive.
    plan = sim.run_until(verdict_is("RolledBack"))
    assert plan.verdict.reason == Reason.ROLLED_BACK_ANALYSIS
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(taken)] == [10, 10]
    assert all(not p.moved for p in sim.plans[1:-1])
    assert sim.on("r1") == set(sim.nodes)


def test_analysis_success_leads_to_bake_then_next_step() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1, bake_seconds=20), Stage(percent=100)),
        analysis=AnalysisPolicy(interval_seconds=5, warmup_seconds=15),
    )
    sim = Sim(policy, fleet(4))
    sim.update = "r2"
    sim.measure = lambda s: Measurement(s.now, "Successful", "ok")
    sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    passed = sim.state.analysis_passed_at
    assert passed is not None and sim.state.ready_at is not None
    assert (passed - sim.state.ready_at).total_seconds() == 15
    sim.run_until(lambda p: len(p.moved) > 0)
    assert (sim.now - passed).total_seconds() >= 20


def test_a_measurement_from_before_the_wave_was_ready_is_ignored() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100)), analysis=AnalysisPolicy(10, 10))
    sim = Sim(policy, fleet(2))
    sim.update = "r2"
    sim.measure = lambda s: Measurement(T0 - timedelta(minutes=5), "Failed", "old")
    for _ in range(30):
        assert sim.step().verdict.kind != "RolledBack"


def test_offline_fail_rolls_back() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1), Stage(percent=100)), offline_nodes="Fail"), fleet(4))
    sim.set_online("n002", False)
    sim.update = "r2"
    plan = sim.run_until(verdict_is("RolledBack"))
    assert plan.verdict.reason == Reason.ROLLED_BACK_OFFLINE
    assert "n002" in plan.verdict.message


def test_offline_wait_holds_until_the_node_is_back() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1), Stage(percent=100)), offline_nodes="Wait", max_unavailable="100%"
    )
    sim = Sim(policy, fleet(4))
    sim.set_online("n002", False)
    sim.update = "r2"
    plan = sim.run_until(lambda p: p.verdict.reason == Reason.OFFLINE_WAIT)
    for _ in range(100):  # far beyond any deadline: waiting is not a failure
        plan = sim.step()
    assert plan.verdict.kind == "Holding"
    assert "n002" not in sim.on("r2")
    sim.set_online("n002", True)
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r2"


def test_offline_skip_continues_and_the_node_catches_up_to_the_promoted_revision() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=2), Stage(percent=100)), max_unavailable="100%")
    sim = Sim(policy, fleet(6))
    sim.set_online("n001", False)  # in the canary wave
    sim.update = "r2"
    sim.run_until(lambda p: len(sim.on("r2")) > 2)
    assert "n001" not in sim.on("r2")
    sim.set_online("n001", True)  # back mid-rollout: its wave has passed, so it catches up
    sim.run_until(lambda p: "n001" in sim.on("r2"))
    sim.set_online("n005", False)
    done = sim.run_until(verdict_is("Completed"))
    assert done.state.stable_revision == "r2"
    sim.set_online("n005", True)  # back after the rollout: converges to r2
    sim.run_until(lambda p: sim.on("r2") == set(sim.nodes))


def test_a_node_offline_during_a_rollback_comes_back_to_the_stable_revision() -> None:
    policy = RolloutPolicy(stages=(Stage(nodes=2), Stage(percent=100)), progress_deadline_seconds=10)
    sim = Sim(policy, fleet(5), bad=frozenset({"r2"}))
    sim.update = "r2"
    sim.step()
    sim.set_online("n000", False)  # went offline while assigned the bad revision
    sim.run_until(verdict_is("RolledBack"))
    assert sim.assignment["n000"] == "r1"
    sim.set_online("n000", True)
    sim.run_until(lambda p: True, limit=10)
    assert sim.assignment["n000"] == "r1"


def test_a_new_spec_supersedes_a_rollout_in_progress() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=2, bake_seconds=60), Stage(percent=100))), fleet(5))
    sim.update = "r2"
    sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    sim.update = "r3"
    plan = sim.step()
    assert not sim.on("r2")
    assert sim.events("RolloutSuperseded")
    assert set(plan.moved) <= sim.on("r3")
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r3"


# --- manual control -----------------------------------------------------------------------------------


def test_paused_spec_moves_nothing_and_resumes() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1), Stage(percent=100)), paused=True, progress_deadline_seconds=5
    )
    sim = Sim(policy, fleet(4))
    sim.update = "r2"
    for _ in range(20):
        plan = sim.step()
        assert plan.verdict.kind == "Paused"
    assert not sim.on("r2")
    sim.policy = dataclasses.replace(policy, paused=False)
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r2"


def test_stage_pause_waits_for_promote() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, pause=True), Stage(percent=100))), fleet(4))
    sim.update = "r2"
    sim.run_until(lambda p: p.verdict.reason == Reason.STAGE_PAUSE)
    for _ in range(50):
        assert sim.step().verdict.kind == "Paused"
    assert sim.on("r2") == {"n000"}
    sim.commands = Commands(promote="2026-01-01T12:01:00Z")
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r2"


def test_promote_skips_bake_and_analysis_of_this_wave_only() -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1, bake_seconds=600), Stage(percent=50, bake_seconds=600), Stage(percent=100)),
        analysis=AnalysisPolicy(interval_seconds=600, warmup_seconds=600),
    )
    sim = Sim(policy, fleet(4))
    sim.update = "r2"
    sim.run_until(lambda p: p.verdict.reason == Reason.ANALYSIS_RUNNING)
    sim.commands = Commands(promote="nonce-1")
    sim.run_until(lambda p: len(sim.on("r2")) == 2, limit=5)
    assert sim.events("Promoted")
    # The same annotation value seen again does nothing: the next wave waits for its own analysis.
    for _ in range(20):
        sim.step()
    assert len(sim.on("r2")) == 2
    assert len(sim.events("Promoted")) == 1


def test_abort_rolls_back_now_and_only_once() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=600), Stage(percent=100))), fleet(4))
    sim.update = "r2"
    sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    sim.commands = Commands(abort="nonce-1")
    plan = sim.step()
    assert plan.verdict.kind == "RolledBack"
    assert plan.verdict.reason == Reason.ROLLED_BACK_ABORT
    assert sim.on("r1") == set(sim.nodes)
    # A later rollout is not aborted by the same, already handled annotation.
    sim.update = "r3"
    assert sim.run_until(verdict_is("Completed")).state.stable_revision == "r3"


def test_manual_rollback_returns_to_the_previous_stable_revision() -> None:
    sim = Sim(RolloutPolicy(), fleet(3))
    sim.update = "r2"
    sim.run_until(verdict_is("Completed"))
    sim.commands = Commands(rollback="nonce-1")
    plan = sim.step()
    assert plan.verdict.kind == "RolledBack"
    assert sim.on("r1") == set(sim.nodes)
    assert plan.state.rolled_back_revisions == ("r2",)
    for _ in range(10):
        assert sim.step().moved == ()


# --- restarts -----------------------------------------------------------------------------------------


def test_state_survives_the_status_round_trip() -> None:
    sim = Sim(
        RolloutPolicy(
            stages=(Stage(nodes=1, bake_seconds=30), Stage(percent=100)), analysis=AnalysisPolicy(5, 5)
        ),
        fleet(4),
    )
    sim.update = "r2"
    sim.measure = lambda s: Measurement(s.now, "Successful", "ok")
    for _ in range(12):
        sim.step()
        assert RolloutStatus.model_validate(sim.state.dump()) == sim.state
    assert RolloutStatus.model_validate({}) == RolloutStatus()


def test_a_stored_status_rollout_reads_back_to_the_same_dict() -> None:
    # As the operator wrote it before status.rollout was typed: the steady state must compare equal.
    stored = {
        "stableRevision": "r2",
        "updateRevision": "r3",
        "previousStableRevision": "r1",
        "group": "site-a",
        "stage": 1,
        "stepStartedAt": "2026-01-01T12:00:05Z",
        "progressAt": "2026-01-01T12:00:07Z",
        "readyNodes": 2,
        "readyAt": "2026-01-01T12:00:09Z",
        "promoted": False,
        "handledPromote": "p1",
        "rolledBackRevisions": ["r0"],
        "history": [
            {
                "revision": "r0",
                "outcome": "RolledBack",
                "reason": "PodsFailed",
                "at": "2026-01-01T11:00:00Z",
                "message": "x",
            },
            {
                "revision": "r2",
                "outcome": "Promoted",
                "reason": "RolloutCompleted",
                "at": "2026-01-01T11:30:00Z",
            },
        ],
        "verdict": "Progressing",
        "reason": "Baking",
        "message": "step 2/4: baking until 2026-01-01T12:00:39Z",
        "stableVariants": {"n001": "fp16"},
    }
    assert RolloutStatus.model_validate(stored).dump() == stored


@pytest.mark.parametrize("seed", range(6))
def test_restart_mid_wave_neither_repeats_nor_skips_a_wave(seed: int) -> None:
    """A restarted operator only has status and the cluster: the run through status matches the direct run."""
    policy = RolloutPolicy(
        stages=(
            Stage(nodes=1, bake_seconds=7),
            Stage(percent=40, bake_seconds=5),
            Stage(percent=100, bake_seconds=3),
        ),
        group_by="kiri.dev/site",
        max_unavailable=2,
        analysis=AnalysisPolicy(4, 4),
    )
    runs = []
    for through_status in (False, True):
        sim = Sim(policy, fleet(12 + seed, sites=2), ready_after=1 + seed % 3, through_status=through_status)
        sim.update = "r2"
        sim.measure = lambda s: Measurement(s.now, "Successful", "ok")
        sim.run_until(verdict_is("Completed"))
        runs.append([(p.moved, p.verdict, p.step_label) for p in sim.plans])
        assert len(sim.events("StepStarted")) == len(sim.plans[-1].steps)
    assert runs[0] == runs[1]


def test_no_writes_in_the_steady_state() -> None:
    sim = Sim(RolloutPolicy(), fleet(5))
    for _ in range(5):
        plan = sim.step()
        assert plan.moved == ()
        assert plan.events == ()
        assert plan.assignment == {n: "r1" for n in sim.nodes}


def test_no_eligible_nodes_completes_at_once() -> None:
    sim = Sim(RolloutPolicy(), [])
    sim.update = "r2"
    assert sim.step().verdict.kind == "Completed"


def test_timers_count_the_part_of_a_second_that_status_cannot_hold() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=10), Stage(percent=100))), fleet(3))
    sim.update = "r2"
    plan = sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    assert plan.requeue_after is not None
    # The same plan 0.7 s into a second: the wake-up comes 0.7 s sooner, not a second late.
    late = w.plan_waves(
        sim.policy,
        sim.observed(),
        sim.plans[-2].state,
        sim.now - timedelta(seconds=1) + timedelta(milliseconds=700),
    )
    assert late.requeue_after is not None
    assert late.requeue_after == pytest.approx(plan.requeue_after - 0.7, abs=0.01)


def test_manual_rollback_after_an_abort_goes_one_stable_revision_further_back() -> None:
    sim = Sim(RolloutPolicy(stages=(Stage(nodes=1, bake_seconds=600), Stage(percent=100))), fleet(3))
    sim.update = "r2"
    sim.run_until(verdict_is("Completed"), limit=5000)
    sim.update = "r3"
    sim.run_until(lambda p: p.verdict.reason == Reason.BAKING)
    sim.commands = Commands(abort="a1")
    assert sim.step().verdict.reason == Reason.ROLLED_BACK_ABORT
    assert sim.on("r2") == set(sim.nodes)
    sim.commands = Commands(abort="a1", rollback="b1")
    plan = sim.step()
    assert plan.verdict.reason == Reason.ROLLED_BACK_MANUAL
    assert sim.on("r1") == set(sim.nodes)
    assert set(plan.state.rolled_back_revisions) == {"r2", "r3"}


# --- a site cut off, a flapping node (issue 19) -------------------------------------------------------


def site_policy(offline: str) -> RolloutPolicy:
    return RolloutPolicy(
        stages=(Stage(nodes=1, bake_seconds=5), Stage(percent=100, bake_seconds=5)),
        group_by="kiri.dev/site",
        max_unavailable="100%",
        offline_nodes=offline,  # type: ignore[arg-type]
    )


def cut_off(sim: Sim, nodes: list[str], online: bool) -> None:
    for name in nodes:
        sim.set_online(name, online)
        if online:
            # A node back from a cut-off has its pods marked not Ready (the node lifecycle controller did),
            # and they take `ready_after` to be Ready again.
            sim.moved_at[name] = sim.now


def test_a_site_cut_off_after_its_wave_moved_holds_with_offline_wait_and_never_promotes_unseen_nodes() -> (
    None
):
    sim = Sim(site_policy("Wait"), fleet(6, sites=2))
    site_b = ["n001", "n003", "n005"]
    sim.update = "r2"
    # The last step (site-b, 100 %) has just moved site-b's nodes; none of their pods is Ready yet.
    sim.run_until(lambda p: p.step_label == "4/4" and bool(p.moved))
    cut_off(sim, site_b, online=False)
    for _ in range(200):  # far beyond any bake or deadline: waiting for nodes is not a failure
        plan = sim.step()
        assert plan.verdict.kind == "Holding" and plan.verdict.reason == Reason.OFFLINE_WAIT, plan.verdict
        assert plan.step_label == "4/4"
    assert plan.state.stable_revision == "r1"
    assert "n001" in plan.verdict.message
    cut_off(sim, site_b, online=True)
    done = sim.run_until(verdict_is("Completed"))
    assert done.state.stable_revision == "r2" and sim.on("r2") == set(sim.nodes)
    # No step lost or doubled: one StepStarted per step, one Promoted entry.
    assert len(sim.events("StepStarted")) == 4
    assert [h.outcome for h in done.state.history] == ["Promoted"]


def test_a_site_cut_off_mid_bake_holds_the_wave_with_offline_wait_until_it_is_back() -> None:
    sim = Sim(site_policy("Wait"), fleet(6, sites=2))
    sim.update = "r2"
    sim.run_until(lambda p: p.step_label == "4/4" and p.verdict.reason == Reason.BAKING)
    cut_off(sim, ["n001", "n003", "n005"], online=False)
    for _ in range(50):
        plan = sim.step()
        assert plan.verdict.reason == Reason.OFFLINE_WAIT, plan.verdict
    cut_off(sim, ["n001", "n003", "n005"], online=True)
    done = sim.run_until(verdict_is("Completed"))
    assert len(sim.events("StepStarted")) == 4
    assert [h.outcome for h in done.state.history] == ["Promoted"]


def test_a_site_cut_off_mid_wave_with_offline_skip_is_deferred_and_catches_up_when_back() -> None:
    sim = Sim(site_policy("Skip"), fleet(6, sites=2))
    site_b = ["n001", "n003", "n005"]
    sim.update = "r2"
    sim.run_until(lambda p: p.step_label == "3/4" and bool(p.moved))
    cut_off(sim, site_b, online=False)
    done = sim.run_until(verdict_is("Completed"))
    assert done.state.stable_revision == "r2"
    assert len(sim.events("StepStarted")) == 4
    cut_off(sim, site_b, online=True)
    sim.run_until(lambda p: sim.on("r2") == set(sim.nodes) and p.verdict.kind == "Completed")
    assert [h.outcome for h in sim.plans[-1].state.history] == ["Promoted"]


@pytest.mark.parametrize("offline", ["Skip", "Wait"])
def test_a_node_flapping_every_few_seconds_neither_stalls_the_rollout_nor_restarts_its_bakes(
    offline: str,
) -> None:
    policy = RolloutPolicy(
        stages=(Stage(nodes=1, bake_seconds=20), Stage(percent=100, bake_seconds=20)),
        max_unavailable="100%",
        offline_nodes=offline,  # type: ignore[arg-type]
    )
    sim = Sim(policy, fleet(5))
    sim.update = "r2"
    flapper = "n000"  # the canary: in every step
    period = 6  # 3 s offline, 3 s online, and 2 s of each return its pod is not Ready yet
    for i in itertools.count():
        if i % period == 0:
            cut_off(sim, [flapper], online=False)
        elif i % period == period // 2:
            cut_off(sim, [flapper], online=True)
        plan = sim.step()
        assert plan.verdict.kind not in ("RolledBack", "Failed"), plan.verdict
        if plan.verdict.kind == "Completed":
            break
        # Two bakes of 20 s and the waits for the flapper: bounded, not forever.
        assert i < 200, f"stalled: {plan.verdict}"
    assert sim.plans[-1].state.stable_revision == "r2"
    assert len(sim.events("StepStarted")) == 2
    assert [h.outcome for h in sim.plans[-1].state.history] == ["Promoted"]
    assert len(sim.plans[-1].state.dump()) < 20  # the state is a fixed set of fields: nothing accumulates
