"""Leader election (kiri_operator.kube.leasing) with an injectable clock and an in-memory Lease API.

The fake API keeps one Lease with a resourceVersion and answers 409 to a stale update or a second create,
as the API server does; a switch makes it fail like an unreachable server for one caller (a partition)."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from kiri_operator.kube import Credentials, Kube, KubeError, http_client
from kiri_operator.kube.leasing import Elector, Timing
from kiri_operator.metrics import REGISTRY

TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now)


class FakeApi:
    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.writes: list[str] = []

    def client(self, who: str) -> Client:
        return Client(self, who)


class Client:
    """One replica's view of the API; `down` makes every call fail as a dropped connection."""

    def __init__(self, api: FakeApi, who: str) -> None:
        self.api, self.who, self.down = api, who, False

    def _check(self) -> None:
        if self.down:
            raise KubeError(0, "get", "/leases", "connection refused")

    def get(self, kind: str, namespace: str | None, name: str, *, timeout: float | None = None) -> Any:
        self._check()
        return copy.deepcopy(self.api.lease)

    def create(self, obj: dict[str, Any], *, fenced: bool = True, timeout: float | None = None) -> Any:
        self._check()
        assert fenced is False  # the Lease's own writes are never fenced
        if self.api.lease is not None:
            raise KubeError(409, "create", "/leases", "already exists")
        return self._store(obj)

    def replace(self, obj: dict[str, Any], *, fenced: bool = True, timeout: float | None = None) -> Any:
        self._check()
        assert fenced is False
        assert self.api.lease is not None
        if obj["metadata"].get("resourceVersion") != self.api.lease["metadata"]["resourceVersion"]:
            raise KubeError(409, "update", "/leases", "the object has been modified")
        return self._store(obj)

    def _store(self, obj: dict[str, Any]) -> Any:
        self.api.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.api.version)
        self.api.lease = stored
        self.api.writes.append(self.who)
        return stored


def pair(api: FakeApi, clock: Clock) -> tuple[Elector, Elector, Client, Client]:
    ca, cb = api.client("a"), api.client("b")
    a = Elector(ca, "kiri", "kiri-operator", "a", TIMING, clock=clock, wall=clock.wall)
    b = Elector(cb, "kiri", "kiri-operator", "b", TIMING, clock=clock, wall=clock.wall)
    return a, b, ca, cb


def test_the_first_candidate_creates_the_lease_and_the_second_stands_by() -> None:
    api, clock = FakeApi(), Clock()
    a, b, _, _ = pair(api, clock)
    assert a.step() is True
    assert b.step() is False
    assert api.lease is not None
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert spec["acquireTime"] == spec["renewTime"] == "2026-01-01T00:16:40.000000Z"
    assert (a.leading(), b.leading()) == (True, False)
    assert b.holder == "a"


def test_a_renewing_leader_keeps_the_lease_however_long_the_standby_waits() -> None:
    api, clock = FakeApi(), Clock()
    a, b, _, _ = pair(api, clock)
    a.step()
    for _ in range(60):  # two minutes of renews every retry period
        clock.now += TIMING.retry_period
        assert a.step() is True
        assert b.step() is False
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "a"
    assert api.lease["spec"]["leaseTransitions"] == 0


def test_a_standby_takes_a_dead_leaders_lease_only_after_the_lease_duration_it_measured_itself() -> None:
    api, clock = FakeApi(), Clock()
    a, b, _, _ = pair(api, clock)
    a.step()
    clock.now += 1
    b.step()  # b sees a's record at t=1001: its own clock for that record starts here
    # a dies (SIGKILL): no more renews. b may not take the Lease before 1001 + 15.
    clock.now = 1001 + 14.9
    assert b.step() is False
    clock.now = 1001 + 15
    assert b.step() is True
    assert api.lease is not None
    spec = api.lease["spec"]
    assert spec["holderIdentity"] == "b"
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"]


def test_a_standby_ignores_the_renew_time_written_by_another_clock() -> None:
    """A Lease renewed long ago by the holder's (skewed) wall clock is not expired for a standby that has
    just started watching it: the standby counts from when it first saw the record."""
    api, clock = FakeApi(), Clock()
    a, b, _, _ = pair(api, clock)
    a.wall = lambda: datetime(2000, 1, 1, tzinfo=UTC)  # a's wall clock is 26 years behind
    a.step()
    assert b.step() is False
    clock.now += 14
    assert b.step() is False


def test_a_leader_that_cannot_renew_stops_before_the_standby_may_take_over() -> None:
    api, clock = FakeApi(), Clock()
    a, b, ca, _ = pair(api, clock)
    a.step()
    renewed_at = clock.now
    clock.now += 0.5
    b.step()
    ca.down = True  # a is cut off from the API server, but alive
    stopped_at = took_at = None
    while took_at is None:
        clock.now += 0.5
        if a.step() is False and stopped_at is None:
            stopped_at = clock.now
        if b.step():
            took_at = clock.now
        assert not (a.leading() and b.leading()), f"two leaders at t={clock.now}"
    assert stopped_at == renewed_at + TIMING.renew_deadline
    assert took_at == renewed_at + 0.5 + TIMING.lease_duration
    assert took_at - stopped_at == TIMING.lease_duration - TIMING.renew_deadline + 0.5
    # Back online, a finds b's Lease and stands by.
    ca.down = False
    assert a.step() is False and a.remaining() == 0


def test_remaining_counts_from_the_start_of_the_last_successful_renew() -> None:
    api, clock = FakeApi(), Clock()
    a, _, _, _ = pair(api, clock)
    a.step()
    clock.now += 4
    assert a.remaining() == 6
    a.step()
    assert a.remaining() == 10


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win() -> None:
    api, clock = FakeApi(), Clock()
    a, b, ca, cb = pair(api, clock)
    c = Elector(api.client("c"), "kiri", "kiri-operator", "c", TIMING, clock=clock, wall=clock.wall)
    c.step()  # c holds it, then dies
    a.step()
    b.step()
    clock.now += TIMING.lease_duration
    # Both read the same expired record before either writes: interleave by hand.
    lease_seen = ca.get("Lease", "kiri", "kiri-operator")
    assert cb.get("Lease", "kiri", "kiri-operator") == lease_seen
    assert a.step() is True
    assert b.step() is False  # b reads a's fresh record now: a live holder
    stale = copy.deepcopy(lease_seen)
    stale["spec"]["holderIdentity"] = "b"
    with pytest.raises(KubeError) as err:
        cb.replace(stale, fenced=False)
    assert err.value.status == 409
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "a"


def test_a_lost_write_race_is_not_leadership() -> None:
    api, clock = FakeApi(), Clock()
    a, _, _, _ = pair(api, clock)

    class Racer(Client):
        def replace(self, obj: dict[str, Any], *, fenced: bool = True, timeout: float | None = None) -> Any:
            raise KubeError(409, "update", "/leases", "the object has been modified")

    a.step()
    clock.now += TIMING.lease_duration  # a's Lease; another replica renews... a's update conflicts
    a.api = Racer(api, "a")
    assert a.step() is False
    assert a.remaining() == 0


def test_release_lets_the_standby_take_over_at_its_next_try() -> None:
    api, clock = FakeApi(), Clock()
    a, b, _, _ = pair(api, clock)
    a.step()
    b.step()
    a.release()
    assert a.leading() is False
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == ""
    assert a.step() is False  # released for good: a try still running at shutdown takes nothing
    clock.now += TIMING.retry_period
    assert b.step() is True
    assert api.lease["spec"]["leaseTransitions"] == 0  # from nobody to b: not a take-over


def test_timings_that_would_allow_two_leaders_are_refused() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)
    with pytest.raises(ValueError):
        Timing(lease_duration=15, renew_deadline=10, retry_period=10)


@pytest.mark.parametrize("seed", range(20))
def test_random_partitions_and_deaths_never_make_two_leaders_at_once(seed: int) -> None:
    rng = random.Random(seed)
    api, clock = FakeApi(), Clock()
    clients = [api.client(n) for n in "abc"]
    electors = [
        Elector(c, "kiri", "kiri-operator", c.who, TIMING, clock=clock, wall=clock.wall) for c in clients
    ]
    dead: set[int] = set()
    led = 0
    for _ in range(3000):
        clock.now += rng.choice((0.1, 0.5, 1.0, 2.0))
        i = rng.randrange(3)
        if i in dead:
            if rng.random() < 0.05:
                # Restarted: a fresh process with a fresh identity and no memory.
                dead.discard(i)
                electors[i] = Elector(
                    clients[i], "kiri", "kiri-operator", f"{clients[i].who}{rng.random()}", TIMING,
                    clock=clock, wall=clock.wall,
                )  # fmt: skip
            continue
        clients[i].down = rng.random() < 0.3
        if rng.random() < 0.01:
            dead.add(i)
            continue
        electors[i].step()
        leading = [n for n, e in enumerate(electors) if n not in dead and e.leading()]
        assert len(leading) <= 1, f"seed {seed}: two leaders at t={clock.now}: {leading}"
        led += len(leading)
    assert led > 0  # the schedule did elect leaders


def fenced_kube(requests: list[httpx.Request]) -> Kube:
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"kind": "ConfigMap", "metadata": {"name": "a"}})

    creds = Credentials(server="https://api.test:6443", token="tok")
    return Kube(http_client(creds, transport=httpx.MockTransport(handler)))


def test_the_write_fence_refuses_writes_without_leadership_and_sends_nothing() -> None:
    requests: list[httpx.Request] = []
    kube = fenced_kube(requests)
    left = [0.0]
    kube.fence = lambda: left[0]
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}}
    before = REGISTRY.get_sample_value(
        "kiri_api_requests_total", {"verb": "apply", "resource": "configmaps", "code": "fenced"}
    )
    with pytest.raises(KubeError, match="not the leader"):
        kube.apply(cm)
    with pytest.raises(KubeError, match="not the leader"):
        kube.delete("ConfigMap", "ns", "a")
    assert requests == []
    after = REGISTRY.get_sample_value(
        "kiri_api_requests_total", {"verb": "apply", "resource": "configmaps", "code": "fenced"}
    )
    assert (after or 0) - (before or 0) == 1
    # Reads are not fenced (a standby fills its caches), nor are the Lease's own writes.
    assert kube.get("ConfigMap", "ns", "a") is not None
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "l", "namespace": "ns"},
    }
    kube.create(lease, fenced=False)
    assert [r.method for r in requests] == ["GET", "POST"]
    # With leadership left, writes go out, and none waits for an answer longer than what is left.
    left[0] = 3.0
    kube.apply(cm)
    assert requests[-1].method == "PATCH"
    assert requests[-1].extensions["timeout"]["read"] == 3.0
