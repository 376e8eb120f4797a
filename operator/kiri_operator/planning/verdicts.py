"""Analysis verdicts: from the points a PromQL query returned to Successful, Failed or Inconclusive.

Pure. ``analyzing`` runs each query as a range query over the time since the wave became Ready, one point
per ``interval``, so one evaluation sees every measurement of the wave and nothing needs counting in status:

- a point with no value (empty result, NaN, +-Inf) is not a sample: too little traffic says nothing;
- a sample failing ``successCondition`` is a failure; more than ``failureLimit`` failures fail the query;
- fewer than ``minSamples`` samples (and not failed) is inconclusive: the wave holds, it does not roll back;
- otherwise the query succeeds. The analysis fails if any query fails, is inconclusive if any query is
  inconclusive or errored, and succeeds when all succeed.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kiri_operator.observations import Outcome

_CONDITION = re.compile(
    r"^\s*result\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<num>[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?)\s*$"
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class SuccessCondition:
    """A query's ``successCondition``, ``result <op> <number>``: a comparison, never evaluated code."""

    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"result {self.op} {self.threshold:g}"


def parse_condition(text: str) -> SuccessCondition:
    match = _CONDITION.match(text)
    if match is None:
        raise ValueError(
            f"successCondition must be 'result <op> <number>' with op one of >= <= == != > < (got {text!r})"
        )
    return SuccessCondition(match["op"], float(match["num"]))


@dataclass(frozen=True)
class QueryRule:
    name: str
    condition: SuccessCondition
    failure_limit: int = 0
    min_samples: int = 1


@dataclass(frozen=True)
class QueryVerdict:
    """One query's judgement, with the counts behind it. Not a rollout verdict (`waves.Verdict`): its
    outcome is evidence the wave planner weighs (Failed rolls back, Inconclusive and Error hold), one level
    below the rollout's own Progressing/Holding/RolledBack."""

    name: str
    outcome: Outcome
    samples: int
    failures: int
    last_value: float | None
    message: str


def is_sample(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def judge_query(rule: QueryRule, values: Sequence[float | None]) -> QueryVerdict:
    """Judge one query from its points, oldest first (``None`` where the query returned nothing)."""
    samples = [v for v in values if is_sample(v)]
    failures = [v for v in samples if v is not None and not rule.condition.holds(v)]
    last = samples[-1] if samples else None
    shown = "none" if last is None else f"{last:.4g}"
    facts = (
        f"{len(samples)} samples (minSamples {rule.min_samples}), {len(failures)} failing "
        f"{rule.condition} (failureLimit {rule.failure_limit}), last {shown}"
    )
    if len(failures) > rule.failure_limit:
        return QueryVerdict(rule.name, "Failed", len(samples), len(failures), last, f"{rule.name}: {facts}")
    if len(samples) < rule.min_samples:
        return QueryVerdict(
            rule.name,
            "Inconclusive",
            len(samples),
            len(failures),
            last,
            f"{rule.name}: too few samples: {facts}",
        )
    return QueryVerdict(rule.name, "Successful", len(samples), len(failures), last, f"{rule.name}: {facts}")


def query_error(name: str, error: str) -> QueryVerdict:
    return QueryVerdict(name, "Error", 0, 0, None, f"{name}: {error}")


def combine(verdicts: Sequence[QueryVerdict]) -> tuple[Outcome, str]:
    """One outcome for the analysis; the message lists the queries that decided it."""
    if not verdicts:
        return "Successful", "no queries"
    # A failure decides even when another query errored; an error, like too few samples, only holds.
    order: tuple[Outcome, ...] = ("Failed", "Error", "Inconclusive")
    for outcome in order:
        deciding = [v for v in verdicts if v.outcome == outcome]
        if deciding:
            return outcome, "; ".join(v.message for v in deciding)
    return "Successful", "; ".join(v.message for v in verdicts)
