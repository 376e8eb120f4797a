"""Status → Prometheus series (kiri_operator.metering), read back through the real exposition format."""

from __future__ import annotations

import uuid

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiri_operator import metering
from kiri_operator.metrics import REGISTRY


def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one MD, from the text the /metrics endpoint serves."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in family.samples:
            if s.labels.get("modeldeployment") == name and not s.name.endswith("_created"):
                out[(("__name__", s.name), *sorted(s.labels.items()))] = s.value
    return out


def value(name: str, metric: str, **labels: str) -> float | None:
    want = {"__name__": metric, "modeldeployment": name, "namespace": "shop", **labels}
    for key, v in samples(name).items():
        if dict(key) == want:
            return v
    return None


def history(*entries: tuple[str, str, str]) -> list[dict[str, str]]:
    return [
        {
            "revision": rev,
            "modelVersion": "1",
            "outcome": outcome,
            "reason": reason,
            "time": f"2026-01-01T00:0{i}:00Z",
        }
        for i, (rev, outcome, reason) in enumerate(entries)
    ]


def test_phase_is_one_hot_and_follows_the_status() -> None:
    name = f"md-{uuid.uuid4().hex[:6]}"
    metering.meter("shop", name, {"phase": "Progressing", "edge": {"stageIndex": 2}})
    assert value(name, "kiri_modeldeployment_phase", phase="Progressing") == 1
    assert value(name, "kiri_modeldeployment_phase", phase="Healthy") == 0
    assert value(name, "kiri_rollout_stage") == 2
    metering.meter("shop", name, {"phase": "Healthy"})
    assert value(name, "kiri_modeldeployment_phase", phase="Progressing") == 0
    assert value(name, "kiri_modeldeployment_phase", phase="Healthy") == 1
    assert value(name, "kiri_rollout_stage") == 0


def test_variant_states_replace_stale_series() -> None:
    name = f"md-{uuid.uuid4().hex[:6]}"
    metering.meter("shop", name, {"variants": [{"name": "int8", "state": "Compressing"}]})
    assert value(name, "kiri_variants", variant="int8", state="Compressing") == 1
    metering.meter("shop", name, {"variants": [{"name": "int8", "state": "Rejected"}, {"name": "fp16"}]})
    assert value(name, "kiri_variants", variant="int8", state="Compressing") is None
    assert value(name, "kiri_variants", variant="int8", state="Rejected") == 1
    assert value(name, "kiri_variants", variant="fp16", state="Pending") == 1


def test_rollbacks_count_new_history_entries_once_and_not_on_first_look() -> None:
    name = f"md-{uuid.uuid4().hex[:6]}"
    # First look (operator start): a rollback already in the history is not counted again.
    metering.meter("shop", name, {"history": history(("a", "RolledBack", "CanaryNotReady"))})
    assert value(name, "kiri_rollbacks_total", reason="CanaryNotReady") is None
    later = history(
        ("a", "RolledBack", "CanaryNotReady"), ("b", "Promoted", ""), ("c", "RolledBack", "AnalysisFailed")
    )
    metering.meter("shop", name, {"history": later})
    metering.meter("shop", name, {"history": later})  # the same status again: no double count
    assert value(name, "kiri_rollbacks_total", reason="AnalysisFailed") == 1
    assert value(name, "kiri_rollbacks_total", reason="CanaryNotReady") is None


def test_forget_drops_every_series() -> None:
    name = f"md-{uuid.uuid4().hex[:6]}"
    metering.meter("shop", name, {"phase": "Healthy", "variants": [{"name": "int8", "state": "Verified"}]})
    metering.meter("shop", name, {"phase": "RolledBack", "history": history(("x", "RolledBack", "Deadline"))})
    assert samples(name)
    metering.forget("shop", name)
    assert samples(name) == {}
    metering.forget("shop", name)  # idempotent
