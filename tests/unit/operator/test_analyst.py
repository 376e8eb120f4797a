"""Measurements off the reconcile worker: the reconcile that finds one due starts it and returns at once;
its end queues the ModelDeployment; the next reconcile gets it, once; a stale one is dropped."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiri_operator.analyzing import Analyst, Due
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.observations import Measurement

pytestmark = pytest.mark.timeout(20)

KEY = ("shop", "resnet")
READY = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
NOW = READY + timedelta(minutes=5)
SPEC = ModelDeploymentSpec.model_validate(
    {
        "model": {"name": "m", "version": "1", "source": {"uri": "https://x/m.onnx", "sha256": "ab" * 32}},
        "edge": {"variants": [{"name": "int8", "method": "int8-dynamic"}]},
        "rollout": {
            "stages": [{"nodes": 1}, {"percent": 100}],
            "analysis": {
                "prometheus": {"address": "http://prometheus-operated.monitoring.svc:9090"},
                "queries": [{"name": "errors", "query": "up", "successCondition": "result < 1"}],
            },
        },
    }
)


def _status(revision: str = "rev2", last_measured: datetime | None = None) -> dict[str, Any]:
    rollout: dict[str, Any] = {
        "stableRevision": "rev1",
        "updateRevision": revision,
        "stage": 0,
        "readyAt": READY.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if last_measured is not None:
        rollout["lastMeasuredAt"] = last_measured.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"rollout": rollout}


class Gate:
    """A measurement that ends when the test says so, recording what it was asked."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked: list[Due] = []
        self.done = threading.Event()
        self.queued: list[tuple[str, str]] = []

    def take(self, d: Due, now: datetime) -> Measurement:
        self.asked.append(d)
        assert self.release.wait(10)
        return Measurement(at=now, outcome="Successful", message="errors: 0 < 1")

    def on_done(self, key: tuple[str, str]) -> None:
        self.queued.append(key)
        self.done.set()


def test_a_due_measurement_is_taken_off_the_worker_and_handed_over_once_it_ends() -> None:
    gate = Gate()
    analyst = Analyst(gate.on_done, take=gate.take)
    try:
        assert analyst.take(KEY, SPEC, _status(), NOW) == (None, True)  # started, the reconcile goes on
        assert analyst.take(KEY, SPEC, _status(), NOW) == (None, True)  # still measuring: not started twice
        gate.release.set()
        assert gate.done.wait(5)
        assert gate.queued == [KEY]
        measurement, measuring = analyst.take(KEY, SPEC, _status(), NOW + timedelta(seconds=1))
        assert measuring is False and measurement is not None
        assert (measurement.at, measurement.outcome) == (NOW, "Successful")
        assert len(gate.asked) == 1 and gate.asked[0].substitutions.revision == "rev2"
    finally:
        analyst.close()


def test_a_result_for_a_turn_no_longer_due_is_dropped() -> None:
    gate = Gate()
    analyst = Analyst(gate.on_done, take=gate.take)
    try:
        assert analyst.take(KEY, SPEC, _status("rev2"), NOW) == (None, True)
        gate.release.set()
        assert gate.done.wait(5)
        # Meanwhile the revision changed: its wave needs its own measurement, started now.
        assert analyst.take(KEY, SPEC, _status("rev3"), NOW) == (None, True)
        deadline = time.monotonic() + 5
        while len(gate.asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [d.substitutions.revision for d in gate.asked] == ["rev2", "rev3"]
    finally:
        analyst.close()


def test_nothing_is_asked_when_no_measurement_is_due() -> None:
    gate = Gate()
    analyst = Analyst(gate.on_done, take=gate.take)
    try:
        # Measured a second ago: the next is one interval away.
        assert analyst.take(KEY, SPEC, _status(last_measured=NOW - timedelta(seconds=1)), NOW) == (
            None,
            False,
        )
        assert gate.asked == []
    finally:
        analyst.close()


def _site_status() -> dict[str, Any]:
    """The revision settled on rev1; site a's adapter wave (adapters a1 -> a2) Ready since READY."""
    wave = {
        "stableRevision": "a1",
        "updateRevision": "a2",
        "stage": 0,
        "readyAt": READY.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return {
        "rollout": {"stableRevision": "rev1", "updateRevision": "rev1"},
        "edge": {"adapters": [{"site": "site-a", "revision": "a1", "rollout": wave}]},
    }


def test_a_sites_adapter_wave_gets_its_own_measurement_beside_the_revisions_and_handed_over_once() -> None:
    gate = Gate()
    analyst = Analyst(gate.on_done, take=gate.take)
    try:
        assert analyst.take(KEY, SPEC, _site_status(), NOW) == (None, False)  # no revision wave in flight
        assert analyst.take_sites(KEY, SPEC, _site_status(), NOW) == ({}, frozenset({"site-a"}))
        assert analyst.take_sites(KEY, SPEC, _site_status(), NOW) == ({}, frozenset({"site-a"}))
        gate.release.set()
        assert gate.done.wait(5)
        assert gate.queued == [KEY]
        found, measuring = analyst.take_sites(KEY, SPEC, _site_status(), NOW + timedelta(seconds=1))
        assert measuring == frozenset()
        assert list(found) == ["site-a"] and (found["site-a"].at, found["site-a"].outcome) == (
            NOW,
            "Successful",
        )
        assert len(gate.asked) == 1
        subs = gate.asked[0].substitutions
        assert (subs.revision, subs.stable_revision, subs.adapters, subs.stable_adapters) == (
            "rev1",
            "rev1",
            "a2",
            "a1",
        )
    finally:
        analyst.close()
