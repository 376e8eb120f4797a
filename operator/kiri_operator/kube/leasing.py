"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's `leaderelection` does it.

Replicas of the operator all watch and fill their caches; only the one holding the Lease reconciles and
writes. The Lease says who holds it (`holderIdentity`), for how long it is good (`leaseDurationSeconds`)
and when it was last renewed (`renewTime`); `kubectl get lease` shows it.

The rules (the same as client-go's, so the timings mean what users expect):
- *Taking it.* A candidate GETs the Lease every `retry_period`. It may take it when it is unheld, or when
  its record (holder, renewTime, resourceVersion) has not changed for `lease_duration` **by the
  candidate's own clock since it first saw that record**: no comparison of timestamps written by another
  machine, so clock skew between nodes does not matter. The update carries the resourceVersion it read,
  so two candidates racing for it cannot both win (the second gets 409).
- *Keeping it.* The holder renews every `retry_period`. It counts itself the leader until
  `renew_deadline` after the *start* of its last successful renew (or acquire). A renew that fails, or
  an API server that does not answer, ends its leadership at that deadline, whatever happens next.
- *Fencing.* `renew_deadline < lease_duration`, and a candidate's clock starts when it *sees* a renew,
  which is after the holder *sent* it: so the holder has stopped counting itself the leader at least
  `lease_duration - renew_deadline` before anyone else may take the Lease. `remaining()` is what the
  client's write fence (`Kube.fence`) reads: every write is refused once it is 0, and no write waits for
  an answer longer than what is left.
- *Handing it over.* `release()` (on a clean shutdown) empties holderIdentity, so a standby takes over at
  its next try instead of waiting out the lease: a rolling upgrade does not pause reconciles.

The clock is injectable (`clock`, monotonic seconds; `wall`, the timestamps written for people), so the
election is unit-tested without sleeping; the API is any `LeaseApi` (the real `Kube`, or a fake).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kiri_operator.kinds import LEASE
from kiri_operator.kube.errors import KubeError

log = logging.getLogger(__name__)


class LeaseApi(Protocol):
    """What the elector needs of the API server (the methods of `Kube`)."""

    def get(
        self, kind: str, namespace: str | None, name: str, *, timeout: float | None = None
    ) -> dict[str, Any] | None: ...

    def create(
        self, obj: dict[str, Any], *, fenced: bool = True, timeout: float | None = None
    ) -> dict[str, Any]: ...

    def replace(
        self, obj: dict[str, Any], *, fenced: bool = True, timeout: float | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Timing:
    """client-go's defaults (kube-controller-manager's `--leader-elect-*` flags)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration, got "
                f"{self.retry_period} / {self.renew_deadline} / {self.lease_duration}"
            )


def micro_time(at: datetime) -> str:
    """A MicroTime as the API server writes it."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing or Timing()
        self.clock = clock
        self.wall = wall
        self._held_until: float | None = None
        self._record: tuple[Any, ...] | None = None
        self._record_seen_at = 0.0
        self.holder: str = ""
        """The holder as last read (for logs and metrics)."""
        self._released = False

    # -- what the rest of the operator reads ---------------------------------------------------------------
    def remaining(self) -> float:
        """Seconds this process may still act as the leader (0 when it is not the leader)."""
        if self._held_until is None:
            return 0.0
        return max(0.0, self._held_until - self.clock())

    def leading(self) -> bool:
        return self.remaining() > 0

    # -- one try ---------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One acquire-or-renew try (call every `retry_period`); whether this process leads afterwards."""
        if self._released:  # a try still running in a thread when the process shut down takes nothing
            return False
        started = self.clock()
        # An answer later than this would come after our leadership (or the retry) is over.
        timeout = max(0.5, min(self.timing.retry_period, self.remaining() or self.timing.retry_period))
        try:
            lease = self.api.get(LEASE.kind, self.namespace, self.name, timeout=timeout)
        except KubeError as exc:
            log.warning(
                "leader election: cannot read Lease %s/%s: %s", self.namespace, self.name, exc.message
            )
            return self.leading()
        seen = self.clock()
        if lease is None:
            return self._write(self._new_lease(), started, create=True, timeout=timeout)
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        self.holder = holder
        meta = lease.get("metadata") or {}
        record = (holder, spec.get("renewTime"), meta.get("resourceVersion"))
        if record != self._record:
            # The candidate's clock for this record starts now, when it sees it (never earlier).
            self._record, self._record_seen_at = record, seen
        duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
        if holder and holder != self.identity and seen < self._record_seen_at + duration:
            self._held_until = None  # someone else holds a live Lease
            return False
        now = micro_time(self.wall())
        new_spec = dict(spec)
        new_spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.timing.lease_duration),
            renewTime=now,
        )
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        body = {
            "apiVersion": LEASE.api_version,
            "kind": LEASE.kind,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": meta.get("resourceVersion"),
            },
            "spec": new_spec,
        }
        return self._write(body, started, create=False, timeout=timeout)

    def _new_lease(self) -> dict[str, Any]:
        now = micro_time(self.wall())
        return {
            "apiVersion": LEASE.api_version,
            "kind": LEASE.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.timing.lease_duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }

    def _write(self, body: dict[str, Any], started: float, *, create: bool, timeout: float) -> bool:
        if self._released:
            return False
        was = self.leading()
        try:
            if create:
                self.api.create(body, fenced=False, timeout=timeout)
            else:
                self.api.replace(body, fenced=False, timeout=timeout)
        except KubeError as exc:
            # 409: another replica wrote the Lease first (it took it, or renewed it): not ours.
            if exc.status == 409:
                self._held_until = None
                return False
            log.warning(
                "leader election: cannot write Lease %s/%s: %s", self.namespace, self.name, exc.message
            )
            return self.leading()
        # Counted from before the request was sent: a candidate sees this renew only after it happened.
        self._held_until = started + self.timing.renew_deadline
        self.holder = self.identity
        if not was:
            log.info("leader election: %s now holds Lease %s/%s", self.identity, self.namespace, self.name)
        return self.leading()

    def release(self) -> None:
        """Give the Lease up (a clean shutdown): a standby need not wait out the lease duration."""
        self._released = True
        if not self.leading():
            return
        self._held_until = None  # stop writing first, then say so
        try:
            lease = self.api.get(LEASE.kind, self.namespace, self.name, timeout=self.timing.retry_period)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            spec = dict(spec, holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time(self.wall()))
            self.api.replace(dict(lease, spec=spec), fenced=False, timeout=self.timing.retry_period)
            log.info("leader election: %s released Lease %s/%s", self.identity, self.namespace, self.name)
        except KubeError as exc:
            log.warning("leader election: could not release Lease %s/%s: %s", self.namespace, self.name, exc)
