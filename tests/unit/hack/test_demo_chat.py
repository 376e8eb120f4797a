"""The tokens-by-tier table of `make demo`'s generative act (hack/demo_lm.py): read from the edge runtime's own
metrics exposition and checked against the answers' `usage.kiri`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import generate_latest

from kiri_runtime.metrics import CollabMetrics, RuntimeMetrics

SCRIPT = Path(__file__).resolve().parents[3] / "hack" / "demo_lm.py"


@pytest.fixture(scope="module")
def demo_lm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiri_hack_demo_lm", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def table(headers: list[str], rows: list[list[object]]) -> str:
    return "\n".join("|".join(str(c) for c in r) for r in [headers, *rows])


def exposition() -> str:
    """What an edge `kiri serve` answers on /metrics after answers of two models (the runtime's own counters)."""
    collab = CollabMetrics(RuntimeMetrics())
    collab.tokens.labels("chat", "edge").inc(37)
    collab.tokens.labels("chat", "cloud").inc(11)
    collab.tokens.labels("chat", "edge").inc(5)
    collab.tokens.labels("other", "edge").inc(1000)
    collab.requests.labels("chat", "cascade").inc(3)
    return generate_latest(collab.runtime.registry).decode()


def test_the_tokens_of_one_model_are_read_per_tier_from_the_runtime_exposition(demo_lm: ModuleType) -> None:
    text = exposition()
    assert "kiri:collab_tokens_created{" in text  # the exposition the parser must see past
    assert demo_lm.collab_tokens(text, "chat") == {"edge": 42.0, "cloud": 11.0}
    assert demo_lm.collab_tokens(text, "other") == {"edge": 1000.0}
    assert demo_lm.collab_tokens(text, "absent") == {}


def test_answers_totals_sum_each_tier_over_the_usage_reports(demo_lm: ModuleType) -> None:
    reports = [
        {"mode": "cascade", "edge_tokens": 24, "cloud_tokens": 0},
        {"mode": "cascade", "edge_tokens": 6, "cloud_tokens": 18},
        {"mode": "cloud-only", "edge_tokens": 0, "cloud_tokens": 24},
    ]
    assert demo_lm.tier_totals(reports) == {"edge": 30, "cloud": 42}


def test_the_table_agrees_with_metrics_that_match_and_names_a_tier_that_does_not(demo_lm: ModuleType) -> None:
    text, problems = demo_lm.tokens_by_tier_table(
        {"edge": 42, "cloud": 11}, {"edge": 42.0, "cloud": 11.0}, table
    )
    assert problems == []
    assert text.splitlines() == [
        "TIER|TOKENS (usage.kiri)|TOKENS (edge /metrics)|SHARE",
        "edge|42|42|79 %",
        "cloud|11|11|21 %",
        "total|53|53|100 %",
    ]
    _, problems = demo_lm.tokens_by_tier_table({"edge": 42, "cloud": 11}, {"edge": 42.0}, table)
    assert problems == ["cloud: the answers say 11 tokens, /metrics 0"]
