"""The Prometheus provider's failure handling, with Prometheus replaced by respx (failure injection only;
the real thing is tests/integration/analysis)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import respx

from kiri_operator import analyzing
from kiri_operator.analyzing import Substitutions

pytestmark = pytest.mark.timeout(10)

PROM = "http://prometheus.test:9090"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SUBS = Substitutions(revision="abc123", namespace="shop", variants=["int8", "fp16"])


@dataclass(frozen=True)
class Q:
    name: str = "errors"
    promql: str = 'sum(rate(kiri_requests_total{code=~"5..",revision="$revision",variant=~"$variant"}[1m]))'
    success_condition: str = "result < 0.05"
    interval: int = 10
    failure_limit: int = 0
    min_samples: int = 2


def matrix(*values: str | None) -> dict[str, object]:
    points = [[1000 + 10 * i, v] for i, v in enumerate(values) if v is not None]
    return {
        "status": "success",
        "data": {"resultType": "matrix", "result": [{"metric": {}, "values": points}]},
    }


async def run(query: Q = Q(), since: datetime = NOW - timedelta(seconds=60)) -> analyzing.Measurement:
    measurement, _ = await analyzing.measure(PROM, [query], SUBS, since, NOW)
    return measurement


@respx.mock
async def test_range_query_with_substitutions_and_window() -> None:
    route = respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(200, json=matrix("0", "0.01"))
    )
    m = await run()
    assert m.outcome == "Successful"
    params = route.calls.last.request.url.params
    assert (
        params["query"]
        == 'sum(rate(kiri_requests_total{code=~"5..",revision="abc123",variant=~"fp16|int8"}[1m]))'
    )
    # One interval after the wave became Ready, until now, one point per interval.
    assert float(params["start"]) == (NOW - timedelta(seconds=50)).timestamp()
    assert float(params["end"]) == NOW.timestamp()
    assert params["step"] == "10"


@respx.mock
async def test_a_window_shorter_than_an_interval_uses_an_instant_query() -> None:
    vector = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.5"]}]},
    }
    respx.get(f"{PROM}/api/v1/query").mock(return_value=httpx.Response(200, json=vector))
    m = await run(since=NOW - timedelta(seconds=3))
    assert m.outcome == "Failed"
    assert "1 failing" in m.message


@respx.mock
async def test_nan_points_are_not_samples() -> None:
    respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(200, json=matrix("NaN", "0", "NaN"))
    )
    m = await run()
    assert m.outcome == "Inconclusive"
    assert "too few samples" in m.message


@respx.mock
async def test_empty_answer_is_inconclusive() -> None:
    respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(
            200, json={"status": "success", "data": {"resultType": "matrix", "result": []}}
        )
    )
    assert (await run()).outcome == "Inconclusive"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            httpx.Response(
                400, json={"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}
            ),
            "bad_data: parse error",
        ),
        (httpx.Response(503, text="upstream down"), "HTTP 503, not JSON"),
        (httpx.ConnectError("connection refused"), "unreachable: ConnectError"),
        (httpx.ReadTimeout("timed out"), "unreachable: ReadTimeout"),
    ],
)
@respx.mock
async def test_prometheus_failures_are_errors_that_hold_not_rollbacks(
    response: object, expected: str
) -> None:
    route = respx.get(f"{PROM}/api/v1/query_range")
    if isinstance(response, Exception):
        route.mock(side_effect=response)
    else:
        route.mock(return_value=response)
    m = await run()
    assert m.outcome == "Error"
    assert expected in m.message


@respx.mock
async def test_several_series_are_an_error_naming_the_fix() -> None:
    two = {"status": "success", "data": {"resultType": "matrix", "result": [{"values": []}, {"values": []}]}}
    respx.get(f"{PROM}/api/v1/query_range").mock(return_value=httpx.Response(200, json=two))
    m = await run()
    assert m.outcome == "Error"
    assert "aggregate it to one" in m.message


@respx.mock
async def test_a_bad_condition_is_an_error_not_a_crash() -> None:
    respx.get(f"{PROM}/api/v1/query_range").mock(return_value=httpx.Response(200, json=matrix("0")))
    m = await run(Q(success_condition="result is fine"))
    assert m.outcome == "Error"
    assert "successCondition must be" in m.message


@respx.mock
async def test_one_failing_query_fails_the_analysis() -> None:
    respx.get(f"{PROM}/api/v1/query_range").mock(
        side_effect=[
            httpx.Response(200, json=matrix("0", "0")),
            httpx.Response(200, json=matrix("0.9", "0.8")),
        ]
    )
    measurement, found = await analyzing.measure(
        PROM, [Q(name="a"), Q(name="b")], SUBS, NOW - timedelta(minutes=1), NOW
    )
    assert [v.outcome for v in found] == ["Successful", "Failed"]
    assert measurement.outcome == "Failed"
    assert measurement.message.startswith("b:")


def _spec(**rollout: object) -> object:
    from kiri_operator.api.specs import ModelDeploymentSpec

    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "version": "1",
                "source": {"uri": "https://x.example/m.onnx", "sha256": "a" * 64},
            },
            "edge": {"variants": [{"name": "int8", "method": "int8-dynamic"}]},
            "rollout": {
                "stages": [{"nodes": 1}, {"percent": 100}],
                "analysis": {
                    "prometheus": {"address": PROM},
                    "queries": [
                        {
                            "name": "errors",
                            "query": 'up{revision="$revision"}',
                            "successCondition": "result >= 1",
                            "interval": 10,
                            "minSamples": 2,
                        }
                    ],
                },
                **rollout,
            },
        }
    )


@respx.mock
def test_measure_due_asks_prometheus_only_when_the_planner_says_so() -> None:
    from kiri_operator.api.statuses import RolloutStatus

    route = respx.get(f"{PROM}/api/v1/query_range").mock(
        return_value=httpx.Response(200, json=matrix("1", "1"))
    )
    spec = _spec()
    ready = NOW - timedelta(seconds=15)
    state = RolloutStatus(
        stable_revision="r1", update_revision="r2", step_started_at=ready, progress_at=ready, ready_at=ready
    )
    status = {"rollout": state.dump()}
    # warmup = minSamples x interval = 20 s; only 15 s since the wave became Ready.
    assert analyzing.measure_due(spec, "shop", status, NOW) is None  # type: ignore[arg-type]
    assert not route.called
    m = analyzing.measure_due(spec, "shop", status, NOW + timedelta(seconds=5))  # type: ignore[arg-type]
    assert m is not None and m.outcome == "Successful"
    assert route.calls.last.request.url.params["query"] == 'up{revision="r2"}'
    # Measured at that time: the next one is one interval later.
    measured = {"rollout": state.model_copy(update={"last_measured_at": NOW + timedelta(seconds=5)}).dump()}
    assert analyzing.measure_due(spec, "shop", measured, NOW + timedelta(seconds=10)) is None  # type: ignore[arg-type]
    assert analyzing.measure_due(spec, "shop", measured, NOW + timedelta(seconds=15)) is not None  # type: ignore[arg-type]
