"""Analysis verdicts: samples, failures, minSamples and failureLimit."""

from __future__ import annotations

import math

import pytest

from kiri_operator.planning.verdicts import (
    QueryRule,
    combine,
    judge_query,
    parse_condition,
    query_error,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("text", "value", "holds"),
    [
        ("result >= 0.95", 0.95, True),
        ("result >= 0.95", 0.9, False),
        ("result<0.05", 0.01, True),
        ("  result  >  1e-3 ", 0.002, True),
        ("result == 0", 0.0, True),
        ("result != 0", 0.0, False),
        ("result <= -1.5", -2, True),
    ],
)
def test_conditions(text: str, value: float, holds: bool) -> None:
    assert parse_condition(text).holds(value) is holds


@pytest.mark.parametrize("text", ["result", "x > 1", "result >= abc", "__import__('os')", "result >= 1 or 1"])
def test_conditions_are_comparisons_not_code(text: str) -> None:
    with pytest.raises(ValueError, match="successCondition must be"):
        parse_condition(text)


RULE = QueryRule("error-ratio", parse_condition("result < 0.05"), failure_limit=1, min_samples=3)


def test_enough_good_samples_succeed() -> None:
    verdict = judge_query(RULE, [0.0, 0.01, 0.02])
    assert (verdict.outcome, verdict.samples, verdict.failures) == ("Successful", 3, 0)


def test_failures_beyond_the_limit_fail_even_with_few_samples() -> None:
    assert judge_query(RULE, [0.5]).outcome == "Inconclusive"  # one failure is within failureLimit 1
    verdict = judge_query(RULE, [0.5, 0.6])
    assert verdict.outcome == "Failed"
    assert "2 failing result < 0.05" in verdict.message


def test_points_without_data_are_not_samples() -> None:
    verdict = judge_query(RULE, [None, math.nan, 0.01, math.inf, None])
    assert verdict.outcome == "Inconclusive"
    assert verdict.samples == 1
    assert "too few samples" in verdict.message


def test_combine_failed_beats_error_beats_inconclusive() -> None:
    ok = judge_query(RULE, [0.0, 0.0, 0.0])
    few = judge_query(RULE, [])
    bad = judge_query(RULE, [1.0, 1.0])
    err = query_error("latency", "connection refused")
    assert combine([ok, few, bad, err])[0] == "Failed"
    assert combine([ok, few, err]) == ("Error", err.message)
    assert combine([ok, few])[0] == "Inconclusive"
    assert combine([ok, ok])[0] == "Successful"
