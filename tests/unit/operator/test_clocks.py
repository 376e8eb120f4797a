"""The operator's clock seam (issue 19, clock skew): one shifted clock for what the operator writes, and
the API server's time from its Date headers for what the control plane wrote."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from kiri_operator.clocks import Clock, ServerClock
from kiri_operator.kube import Kube


def test_a_shifted_clock_runs_that_far_from_the_machines() -> None:
    ahead, behind = Clock(600), Clock(-600)
    now = datetime.now(UTC)
    assert ahead.now() - now == pytest.approx(timedelta(seconds=600), abs=timedelta(seconds=1))
    assert now - behind.now() == pytest.approx(timedelta(seconds=600), abs=timedelta(seconds=1))


def test_the_server_clock_follows_the_date_header_by_the_monotonic_clock_not_the_operators() -> None:
    server = ServerClock(Clock(3600))  # the operator's own clock an hour ahead changes nothing below
    assert abs((server.now() - datetime.now(UTC)).total_seconds() - 3600) < 1  # no answer yet: fallback
    server.saw("Thu, 01 Jan 2026 12:00:00 GMT")
    first = server.now()
    assert datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC) <= first < datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
    time.sleep(0.2)
    assert 0.15 < (server.now() - first).total_seconds() < 1.0
    server.saw("not a date")  # ignored, as is a missing header
    server.saw(None)
    assert server.now() - first < timedelta(seconds=1)


def test_the_kube_client_reads_the_api_servers_date_and_stamps_events_with_the_operators_clock() -> None:
    sent: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        import json

        if request.method == "POST":
            sent.append(json.loads(request.content))
        return httpx.Response(200, json={}, headers={"Date": "Thu, 01 Jan 2026 12:00:00 GMT"})

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="https://api")
    kube = Kube(http, clock=Clock(-600))
    kube.get("ConfigMap", "ns", "x")
    assert kube.server_clock.now().date() == datetime(2026, 1, 1, tzinfo=UTC).date()
    from kiri_operator.plans import Event

    kube.event({"metadata": {"name": "md", "namespace": "ns", "uid": "u"}}, Event("Normal", "R", "m"))
    stamp = datetime.fromisoformat(str(sent[0]["firstTimestamp"]).replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - stamp).total_seconds() - 600) < 2
