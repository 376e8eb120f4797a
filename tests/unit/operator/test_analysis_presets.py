"""Rollout analysis presets for language models (issue 22): a named query stands for one documented PromQL on
the update revision's edge pods, absolute or over the stable revision's value, and runs like a written one.
Prometheus is replaced by respx; the real one is tests/integration/analysis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from kiri_operator import analyzing
from kiri_operator.api.specs import AnalysisQuery, ModelDeploymentSpec
from kiri_operator.api.statuses import RolloutStatus

pytestmark = pytest.mark.timeout(10)

PROM = "http://prometheus.test:9090"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SEL = 'namespace="$namespace",revision="$revision",adapters=~"$adapters",component="edge"'
STABLE = 'namespace="$namespace",revision="$stableRevision",adapters=~"$stableAdapters",component="edge"'


def _query(**fields: Any) -> AnalysisQuery:
    return AnalysisQuery.model_validate({"name": "q", "successCondition": "result <= 1", **fields})


def _refusal(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        _query(**fields)
    return "; ".join(str(e["msg"]) for e in info.value.errors())


def test_each_preset_is_the_documented_promql_with_a_window_of_two_intervals_and_at_least_a_minute() -> None:
    assert _query(preset="ttft-p95").promql == (
        f"histogram_quantile(0.95, sum by (le) (rate(kiri:time_to_first_token_seconds_bucket{{{SEL}}}[60s])))"
    )
    assert _query(preset="itl-p95", interval=45).promql == (
        f"histogram_quantile(0.95, sum by (le) (rate(kiri:inter_token_latency_seconds_bucket{{{SEL}}}[90s])))"
    )
    assert _query(preset="error-ratio", interval=10).promql == (
        f'(sum(rate(kiri_requests_total{{{SEL},code=~"5.."}}[60s])) or vector(0))'
        f" / sum(rate(kiri_requests_total{{{SEL}}}[60s]))"
    )
    assert _query(preset="handoff-ratio").promql == (
        f'(sum(rate(kiri:collab_handoffs_total{{{SEL},reason="uncertainty"}}[60s])) or vector(0))'
        f" / sum(rate(kiri:collab_tokens_total{{{SEL}}}[60s]))"
    )


def test_a_relative_preset_divides_by_the_stable_revisions_floored_value_and_reads_1_without_one() -> None:
    canary = (
        f'(sum(rate(kiri:collab_handoffs_total{{{SEL},reason="uncertainty"}}[120s])) or vector(0))'
        f" / sum(rate(kiri:collab_tokens_total{{{SEL}}}[120s]))"
    )
    stable = canary.replace(SEL, STABLE)
    assert _query(preset="handoff-ratio", interval=60, relativeToStable=True).promql == (
        f"(({canary}) / clamp_min({stable}, 0.001)) or (({canary}) * 0 + 1)"
    )


def test_a_written_query_runs_as_written() -> None:
    assert _query(query='up{revision="$revision"}').promql == 'up{revision="$revision"}'


def test_a_query_sets_exactly_one_of_query_and_preset() -> None:
    expected = "Value error, analysis.queries[]: set exactly one of query or preset"
    assert _refusal() == expected
    assert _refusal(query="up", preset="ttft-p95") == expected


def test_relative_to_stable_is_refused_for_the_error_ratio_and_for_written_queries() -> None:
    expected = (
        "Value error, analysis.queries[].relativeToStable applies only to preset ttft-p95, itl-p95 or "
        "handoff-ratio (an error ratio is gated absolutely; a raw query can use $stableRevision itself)"
    )
    assert _refusal(preset="error-ratio", relativeToStable=True) == expected
    assert _refusal(query="up", relativeToStable=True) == expected


def test_an_unknown_preset_is_refused() -> None:
    assert _refusal(preset="ttft-p99").startswith("Input should be 'ttft-p95', 'itl-p95', 'error-ratio' or")


def test_stable_revision_is_substituted_and_is_not_confused_with_revision() -> None:
    subs = analyzing.Substitutions(revision="r2", namespace="shop", variants=["q4"], stable_revision="r1")
    assert subs.apply('a{revision="$revision"} / b{revision="$stableRevision"}') == (
        'a{revision="r2"} / b{revision="r1"}'
    )
    assert analyzing.Substitutions(revision="r2", namespace="shop").apply("$stableRevision") == ""


@respx.mock
def test_a_due_relative_preset_asks_prometheus_about_the_update_and_the_stable_revision() -> None:
    route = respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(
            200,
            json={
                "status": "success",
                "data": {
                    "resultType": "matrix",
                    "result": [{"metric": {}, "values": [[1, "1.1"], [2, "1.3"]]}],
                },
            },
        )
    )
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "smollm",
                "version": "1",
                "source": {"uri": "s3://models/smollm.tar", "format": "hf", "sha256": "a" * 64},
                "evalDataUri": "s3://eval/chat.jsonl",
            },
            "edge": {"variants": [{"name": "q4", "method": "int4"}], "collaboration": {"mode": "cascade"}},
            "rollout": {
                "stages": [{"nodes": 1}, {"percent": 100}],
                "analysis": {
                    "prometheus": {"address": PROM},
                    "queries": [
                        {
                            "name": "handoffs",
                            "preset": "handoff-ratio",
                            "relativeToStable": True,
                            "successCondition": "result <= 1.2",
                            "interval": 10,
                            "minSamples": 2,
                        }
                    ],
                },
            },
        }
    )
    ready = NOW - timedelta(seconds=30)
    state = RolloutStatus(
        stable_revision="r1", update_revision="r2", step_started_at=ready, progress_at=ready, ready_at=ready
    )
    m = analyzing.measure_due(spec, "shop", {"rollout": state.dump()}, NOW)
    assert m is not None and m.outcome == "Failed"
    sent = route.calls.last.request.url.params["query"]
    # A revision's wave: every pod of the revision, whatever adapters it serves.
    sel = 'namespace="shop",revision="r2",adapters=~".*",component="edge"'
    canary = (
        f'(sum(rate(kiri:collab_handoffs_total{{{sel},reason="uncertainty"}}[60s]))'
        f" or vector(0)) / sum(rate(kiri:collab_tokens_total{{{sel}}}[60s]))"
    )
    stable = canary.replace('revision="r2"', 'revision="r1"')
    assert sent == f"(({canary}) / clamp_min({stable}, 0.001)) or (({canary}) * 0 + 1)"


@respx.mock
def test_a_sites_adapter_wave_asks_prometheus_about_its_adapter_revision_and_the_sites_stable_one() -> None:
    route = respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(
            200,
            json={
                "status": "success",
                "data": {"resultType": "matrix", "result": [{"metric": {}, "values": [[1, "0.9"]]}]},
            },
        )
    )
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "smollm",
                "version": "1",
                "source": {"uri": "s3://models/smollm.tar", "format": "hf", "sha256": "a" * 64},
                "evalDataUri": "s3://eval/chat.jsonl",
            },
            "edge": {"variants": [{"name": "q4", "method": "int4"}]},
            "rollout": {
                "stages": [{"nodes": 1}, {"percent": 100}],
                "analysis": {
                    "prometheus": {"address": PROM},
                    "queries": [
                        {
                            "name": "ttft",
                            "preset": "ttft-p95",
                            "relativeToStable": True,
                            "successCondition": "result <= 1.2",
                            "interval": 10,
                        }
                    ],
                },
            },
        }
    )
    ready = NOW - timedelta(seconds=30)
    # Site a moves from the base model (no adapters) to adapter revision a2, on the settled revision r1.
    wave = RolloutStatus(
        stable_revision="base", update_revision="a2", step_started_at=ready, progress_at=ready, ready_at=ready
    )
    status = {
        "rollout": {"stableRevision": "r1", "updateRevision": "r1"},
        "edge": {"adapters": [{"site": "site-a", "revision": "base", "rollout": wave.dump()}]},
    }
    assert analyzing.measure_due(spec, "shop", status, NOW) is None
    found = analyzing.measure_sites_due(spec, "shop", status, NOW)
    assert list(found) == ["site-a"] and found["site-a"].outcome == "Successful"
    sent = route.calls.last.request.url.params["query"]
    canary = (
        "histogram_quantile(0.95, sum by (le) (rate(kiri:time_to_first_token_seconds_bucket"
        '{namespace="shop",revision="r1",adapters=~"a2",component="edge"}[60s])))'
    )
    stable = canary.replace('adapters=~"a2"', 'adapters=~""')  # the base model's pods carry no adapters
    assert sent == f"(({canary}) / clamp_min({stable}, 0.001)) or (({canary}) * 0 + 1)"
