"""Analysis gates against a real Prometheus scraping real `kiri serve` processes.

The verdicts come from the runtime's own `kiri_requests_total` as Prometheus evaluates it: nothing here
types in a metric value.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from kiri_operator import analyzing
from kiri_operator.analyzing import Substitutions
from kiri_operator.api.specs import AnalysisQuery
from kiri_operator.api.statuses import RolloutStatus
from kiri_operator.observations import Measurement
from kiri_operator.planning import stepping
from kiri_operator.planning import waves as w

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

INTERVAL = 2
# The error ratio of the update revision; `or vector(0)`: a revision with no 5xx has no 5xx series at all.
ERROR_RATIO = (
    '(sum(rate(kiri_requests_total{revision="$revision",variant=~"$variant",code=~"5.."}[4s])) or vector(0))'
    ' / sum(rate(kiri_requests_total{revision="$revision",variant=~"$variant"}[4s]))'
)


@dataclass(frozen=True)
class Query:
    name: str = "error-ratio"
    promql: str = ERROR_RATIO
    success_condition: str = "result < 0.1"
    interval: int = INTERVAL
    failure_limit: int = 1
    min_samples: int = 3


def measure(lab, revision: str, query: Query = Query(), adapters: str = ".*") -> tuple[Measurement, list]:  # type: ignore[no-untyped-def]
    # The wave "became Ready" when the load started; wait for three intervals of data after it.
    warmup = 3 * query.interval + 1
    since = datetime.fromtimestamp(lab.started, UTC)
    time.sleep(max(0.0, lab.started + warmup + 1 - time.time()))
    subs = Substitutions(revision=revision, namespace="default", variants=["int8"], adapters=adapters)
    return asyncio.run(analyzing.measure(lab.prometheus, [query], subs, since, datetime.now(UTC)))


def test_a_healthy_revision_passes(analysis_lab) -> None:  # type: ignore[no-untyped-def]
    m, found = measure(analysis_lab, "healthy")
    assert m.outcome == "Successful", m.message
    assert found[0].samples >= 3
    assert found[0].last_value == 0.0
    assert analysis_lab.revisions["healthy"].sent > 50


def test_a_revision_failing_half_its_requests_fails_the_gate(analysis_lab) -> None:  # type: ignore[no-untyped-def]
    m, found = measure(analysis_lab, "faulty")
    assert m.outcome == "Failed", m.message
    # --fail-ratio 0.5 seen through Prometheus: about half the requests are 500s.
    assert found[0].last_value is not None and 0.25 < found[0].last_value < 0.75
    assert found[0].failures >= 2


def test_a_revision_without_traffic_is_inconclusive(analysis_lab) -> None:  # type: ignore[no-untyped-def]
    m, found = measure(analysis_lab, "idle")
    assert m.outcome == "Inconclusive", m.message
    assert found[0].samples == 0
    assert "too few samples" in m.message


def test_more_samples_than_the_wave_has_had_is_inconclusive(analysis_lab) -> None:  # type: ignore[no-untyped-def]
    m, found = measure(analysis_lab, "healthy", Query(min_samples=1000))
    assert m.outcome == "Inconclusive"
    assert 0 < found[0].samples < 1000


def test_the_error_ratio_preset_reads_zero_for_a_revision_without_any_5xx_and_about_half_for_one_failing_half(
    analysis_lab,
) -> None:  # type: ignore[no-untyped-def]
    # The healthy revision has no 5xx series at all: the preset's numerator must read 0, not "no data".
    preset = AnalysisQuery.model_validate(
        {"name": "errors", "preset": "error-ratio", "successCondition": "result < 0.1", "interval": INTERVAL,
         "minSamples": 3}
    )  # fmt: skip
    m, found = measure(analysis_lab, "healthy", preset)  # type: ignore[arg-type]
    assert m.outcome == "Successful", m.message
    assert found[0].last_value == 0.0
    m, found = measure(analysis_lab, "faulty", preset)  # type: ignore[arg-type]
    assert m.outcome == "Failed", m.message
    assert found[0].last_value is not None and 0.25 < found[0].last_value < 0.75


def test_a_sites_adapter_wave_measures_the_pods_of_its_adapter_revision_and_a_revisions_wave_every_pod(
    analysis_lab,
) -> None:  # type: ignore[no-untyped-def]
    preset = AnalysisQuery.model_validate(
        {"name": "errors", "preset": "error-ratio", "successCondition": "result < 0.1", "interval": INTERVAL,
         "minSamples": 3}
    )  # fmt: skip
    # The faulty runtime serves adapter revision a2: the site's wave to a2 sees its 5xx and fails.
    m, found = measure(analysis_lab, "faulty", preset, adapters="a2")  # type: ignore[arg-type]
    assert m.outcome == "Failed", m.message
    assert found[0].last_value is not None and 0.25 < found[0].last_value < 0.75
    # A wave to another set of the same revision has no pod yet: no data, a hold, never a rollback.
    m, found = measure(analysis_lab, "faulty", preset, adapters="a3")  # type: ignore[arg-type]
    assert (m.outcome, found[0].samples) == ("Inconclusive", 0)
    # The base model's pods carry no adapters label, and "" selects them: healthy serves the base model.
    m, found = measure(analysis_lab, "healthy", preset, adapters="")  # type: ignore[arg-type]
    assert (m.outcome, found[0].last_value) == ("Successful", 0.0)
    m, found = measure(analysis_lab, "faulty", preset, adapters="")  # type: ignore[arg-type]
    assert (m.outcome, found[0].samples) == ("Inconclusive", 0)


def test_a_query_prometheus_rejects_holds_with_its_error(analysis_lab) -> None:  # type: ignore[no-untyped-def]
    m, _ = measure(analysis_lab, "healthy", Query(promql="sum(rate(kiri_requests_total[4s]"))
    assert m.outcome == "Error"
    assert "bad_data" in m.message


def test_the_planner_rolls_back_on_the_real_failed_gate_and_holds_on_the_inconclusive_one(
    analysis_lab,
) -> None:  # type: ignore[no-untyped-def]
    """The measurement from Prometheus drives the pure planner: faulty rolls back, idle holds."""
    policy = stepping.RolloutPolicy(
        stages=(stepping.Stage(nodes=1), stepping.Stage(percent=100)),
        analysis=stepping.AnalysisPolicy(interval_seconds=INTERVAL, warmup_seconds=3 * INTERVAL),
    )
    nodes = [stepping.EdgeNode(f"n{i}", {}, True, "int8") for i in range(3)]
    for revision, expected in (("faulty", "RolledBack"), ("idle", "Inconclusive")):
        ready_at = datetime.fromtimestamp(analysis_lab.started, UTC).replace(microsecond=0) + timedelta(
            seconds=1
        )
        state = RolloutStatus(
            stable_revision="stable",
            update_revision=revision,
            group=None,
            stage=0,
            step_started_at=ready_at,
            progress_at=ready_at,
            ready_at=ready_at,
        )
        m, _ = measure(analysis_lab, revision)
        observed = w.Observed(
            update_revision=revision,
            nodes=nodes,
            assignment={"n0": revision, "n1": "stable", "n2": "stable"},
            pods={
                "n0": w.NodePod(revision, True),
                "n1": w.NodePod("stable", True),
                "n2": w.NodePod("stable", True),
            },
            measurement=m,
        )
        assert w.analysis_due(policy, state, m.at)
        plan = w.plan_waves(policy, observed, state, m.at)
        assert plan.verdict.kind == expected, plan.verdict
        if expected == "RolledBack":
            assert set(plan.assignment.values()) == {"stable"}
        else:
            assert plan.assignment["n0"] == revision
