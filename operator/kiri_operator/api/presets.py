"""Named rollout-analysis queries for language models: what each `analysis.queries[].preset` stands for.

Data and a pure expansion, kept apart from the schema (`specs`) that names them; docs/operations.md ("Rollout
analysis for language models") prints the same PromQL. The selectors use the target labels of the chart's
PodMonitor (`namespace`, `revision`, `component`); the metric names are the runtime's
(`runtime/kiri_runtime/metrics.py`, `collaborating.py`).
"""

from __future__ import annotations

from typing import Literal

AnalysisPreset = Literal["ttft-p95", "itl-p95", "error-ratio", "handoff-ratio"]
_SELECTOR = 'namespace="$namespace",revision="$revision",adapters=~"$adapters",component="edge"'
_STABLE_SELECTOR = (
    'namespace="$namespace",revision="$stableRevision",adapters=~"$stableAdapters",component="edge"'
)
# `adapters` (the pods' `kiri.dev/adapters`, the site's adapter revision): `.*` in a revision's rollout (every
# pod of the revision, with or without adapters), the wave's adapter revision in a site's adapter wave (its
# canary's pods), "" for the base model (a label Prometheus does not have matches "").
# Each preset's PromQL with {sel} for the revision's series and {w} for the rate window (docs/operations.md
# "Rollout analysis for language models"). Names as the runtime exports them (runtime/kiri_runtime/metrics.py).
PRESET_QUERIES: dict[str, str] = {
    "ttft-p95": "histogram_quantile(0.95, sum by (le) (rate(kiri:time_to_first_token_seconds_bucket{{{sel}}}[{w}])))",
    "itl-p95": "histogram_quantile(0.95, sum by (le) (rate(kiri:inter_token_latency_seconds_bucket{{{sel}}}[{w}])))",
    "error-ratio": '(sum(rate(kiri_requests_total{{{sel},code=~"5.."}}[{w}])) or vector(0))'
    " / sum(rate(kiri_requests_total{{{sel}}}[{w}]))",
    "handoff-ratio": '(sum(rate(kiri:collab_handoffs_total{{{sel},reason="uncertainty"}}[{w}])) or vector(0))'
    " / sum(rate(kiri:collab_tokens_total{{{sel}}}[{w}]))",
}
# `or vector(0)` in the ratios: a revision that never failed (never handed off) has no 5xx (no `uncertainty`)
# series at all, and an empty numerator would read as no data: an inconclusive wave that holds forever.
# The stable revision's value is floored at this before dividing, so a stable revision at 0 (no hand-offs)
# makes the ratio large, not infinite (an infinite point is no sample and would only hold the wave).
PRESET_FLOORS: dict[str, float] = {"ttft-p95": 0.001, "itl-p95": 0.001, "handoff-ratio": 0.001}


def preset_window(interval: int) -> str:
    """The rate window of a preset: two measurement intervals, at least one minute (four scrapes at 15 s)."""
    return f"{max(60, 2 * interval)}s"


def preset_promql(preset: str, interval: int, relative_to_stable: bool) -> str:
    """The PromQL a preset stands for; `$namespace`, `$revision` and `$stableRevision` are substituted
    (and `$adapters`, `$stableAdapters`) when it runs. Relative: the canary's value over the stable revision's, 1 when the stable
    revision has no data (the first rollout)."""
    w = preset_window(interval)
    canary = PRESET_QUERIES[preset].format(sel=_SELECTOR, w=w)
    if not relative_to_stable:
        return canary
    stable = PRESET_QUERIES[preset].format(sel=_STABLE_SELECTOR, w=w)
    return f"(({canary}) / clamp_min({stable}, {PRESET_FLOORS[preset]})) or (({canary}) * 0 + 1)"
