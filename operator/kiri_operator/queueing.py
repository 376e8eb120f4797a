"""A coalescing work queue (controller-runtime's workqueue, in asyncio).

Many events about one ModelDeployment collapse into one pending reconcile; one key is never reconciled
by two workers at once; a key that changes while it is being reconciled runs again right after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from kiri_operator import metrics

K = TypeVar("K")


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
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

    async def worker(self, handle: Callable[[K], Awaitable[float | None]]) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            metrics.QUEUE_DEPTH.set(len(self._queued))
            try:
                requeue = await handle(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # the handler logs; the key comes back later
                requeue = 5.0
            finally:
                self._active.discard(key)
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
