"""A coalescing work queue (controller-runtime's workqueue, in asyncio).

Many events about one ModelDeployment collapse into one pending reconcile; one key is never reconciled
by two workers at once; a key that changes while it is being reconciled runs again right after. A key whose
reconcile failed comes back after an exponential backoff with jitter (per key, reset by a success), as
controller-runtime's rate limiter does: a fixed delay hammers an API server that is down, and keys that
failed together would otherwise retry together.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kiri_operator import metrics

K = TypeVar("K")

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class Retry:
    """What a handler returns when its reconcile failed: come back after the key's backoff, or sooner
    when the plan asked for it (``at_most``, e.g. a bake that ends first)."""

    at_most: float | None = None


class Backoff(Generic[K]):
    """Per-key exponential backoff with jitter: the n-th failure in a row waits a random time in
    [d/2, d], d = base * 2^(n-1) capped at ``cap``; a success forgets the key."""

    def __init__(
        self,
        base: float = BACKOFF_BASE_SECONDS,
        cap: float = BACKOFF_MAX_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self.base, self.cap = base, cap
        self._failures: dict[K, int] = {}
        self._rng = rng or random.Random()

    def failed(self, key: K) -> float:
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        ceiling = min(self.cap, self.base * 2.0 ** min(n - 1, 62))
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)


class WorkQueue(Generic[K]):
    def __init__(self, backoff: Backoff[K] | None = None) -> None:
        self.backoff: Backoff[K] = backoff or Backoff()
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        """Keys waiting for a worker."""
        return len(self._queued)

    def __contains__(self, key: object) -> bool:
        """Whether `key` waits for a worker (one being reconciled waits only once it is added again)."""
        return key in self._queued

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.put_nowait(key)
        metrics.QUEUE_DEPTH.set(len(self._queued))

    def add_after(self, key: K, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.get(key)
        when = loop.time() + seconds
        if old is not None and old.when() <= when:
            return  # an earlier wake-up is already set
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def worker(self, handle: Callable[[K], Awaitable[float | Retry | None]]) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))
            requeue: float | None
            try:
                result = await handle(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # the handler logs; the key comes back after its backoff
                result = Retry()
            finally:
                self._active.discard(key)
            if isinstance(result, Retry):
                delay = self.backoff.failed(key)
                requeue = delay if result.at_most is None else min(delay, result.at_most)
            else:
                self.backoff.succeeded(key)
                requeue = result
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif requeue is not None:
                self.add_after(key, requeue)

    def close(self) -> None:
        for timer in self._timers.values():
            with contextlib.suppress(Exception):
                timer.cancel()
        self._timers.clear()
