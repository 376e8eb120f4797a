"""The operator's clocks: its own, and its estimate of the API server's.

One :class:`Clock` per operator process. Every timestamp the operator writes (status, conditions, bakes,
history, Events) and every ``now`` a plan compares them with come from :meth:`Clock.now`, so a skew between
the operator's machine and the control plane shifts nothing the planner compares. Timestamps the control
plane sets itself (a Job's ``completionTime``, ``creationTimestamp``, a Lease's ``renewTime``) are on the
API server's clock: a decision that compares one with "now" uses :meth:`ServerClock.now`, the API server's
own ``Date`` header carried forward by the operator's monotonic clock, never the operator's wall clock.

``offset_seconds`` shifts the operator's clock: the fault e2e tests run the operator minutes ahead of and
behind the API server with it (``kiri operator --clock-offset-seconds``).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime


class Clock:
    """The operator's wall clock, optionally shifted (for fault tests)."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset = timedelta(seconds=offset_seconds)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


class ServerClock:
    """The API server's time, from the ``Date`` header of its last answer plus the monotonic time since.

    ``Date`` has whole seconds (RFC 9110), so the estimate can be up to a second early: 0.5 s is added to
    centre it. Before any answer it falls back to the operator's clock."""

    def __init__(self, fallback: Clock | None = None) -> None:
        self.fallback = fallback or Clock()
        self._lock = threading.Lock()
        self._seen: tuple[datetime, float] | None = None

    def saw(self, date_header: str | None) -> None:
        if not date_header:
            return
        try:
            server = parsedate_to_datetime(date_header)
        except (TypeError, ValueError):
            return
        if server.tzinfo is None:
            server = server.replace(tzinfo=UTC)
        with self._lock:
            self._seen = (server + timedelta(seconds=0.5), time.monotonic())

    def now(self) -> datetime:
        with self._lock:
            seen = self._seen
        if seen is None:
            return self.fallback.now()
        server, at = seen
        return server + timedelta(seconds=time.monotonic() - at)
