"""Adaptive micro-batching for models whose first dimension is a dynamic batch.

Requests queue here; a batch leaves when a run slot frees up. It takes every queued request with the
same input signature (dtypes and non-batch dimensions), up to `max_batch_size` rows. It waits up to
`max_wait` for more only when requests have lately arrived faster than `max_wait` apart. So a lone
client at concurrency 1 pays no wait, and a busy server batches what piled up during the previous run
(the adaptive part, in the spirit of Triton's dynamic batcher and MLServer's adaptive batching, but with
the wait switched off when it cannot pay).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from kiri_runtime.tensors import Array

Feeds = dict[str, Array]
RunFn = Callable[[Feeds], Feeds]
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


def signature(feeds: Feeds) -> Signature:
    return tuple(sorted((k, v.dtype.str, tuple(v.shape[1:])) for k, v in feeds.items()))


@dataclass
class _Item:
    feeds: Feeds
    rows: int
    signature: Signature
    future: asyncio.Future[Feeds]
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        concurrency: int = 2,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(concurrency)
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrival = asyncio.Event()
        self._on_batch = on_batch
        self._last_arrival = 0.0
        # Exponentially weighted mean gap between arrivals; starts "slow" so the first requests never wait.
        self._gap = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, feeds: Feeds) -> Feeds:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
        rows = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        now = time.monotonic()
        if self._last_arrival:
            gap = now - self._last_arrival
            self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * gap
        self._last_arrival = now
        item = _Item(feeds, rows, signature(feeds), asyncio.get_running_loop().create_future(), now)
        self._pending.append(item)
        self._arrival.set()
        return await item.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("server is shutting down"))
        self._pending.clear()

    def _queued_rows(self, sig: Signature) -> int:
        return sum(i.rows for i in self._pending if i.signature == sig)

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
            await self._slots.acquire()
            first = self._pending[0]
            if self._gap < self.max_wait_s:
                deadline = first.arrived + self.max_wait_s
                while self._queued_rows(first.signature) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arrival.clear()
                    try:
                        await asyncio.wait_for(self._arrival.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take(first.signature)
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, sig: Signature) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        keep: collections.deque[_Item] = collections.deque()
        while self._pending:
            item = self._pending.popleft()
            fits = item.signature == sig and (not batch or rows + item.rows <= self.max_batch_size)
            if fits:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._pending = keep
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            live = [i for i in batch if not i.future.done()]
            if not live:
                return
            if len(live) == 1:
                feeds = live[0].feeds
            else:
                feeds = {k: np.concatenate([i.feeds[k] for i in live]) for k in live[0].feeds}
            rows = sum(i.rows for i in live)
            if self._on_batch is not None:
                self._on_batch(rows)
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, feeds)
            except Exception as exc:
                for i in live:
                    if not i.future.done():
                        i.future.set_exception(exc)
                return
            try:
                parts, offset = [], 0
                for i in live:
                    parts.append(outputs if len(live) == 1 else _slice(outputs, offset, i.rows, rows))
                    offset += i.rows
            except RuntimeError as exc:
                parts = [exc] * len(live)  # type: ignore[list-item]
            for i, part in zip(live, parts, strict=True):
                if i.future.done():
                    continue
                if isinstance(part, Exception):
                    i.future.set_exception(part)
                else:
                    i.future.set_result(part)
        finally:
            self._slots.release()


def _slice(outputs: Feeds, start: int, rows: int, total: int) -> Feeds:
    out = {}
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise RuntimeError(f"output {name!r} has no batch dimension matching the {total} batched rows")
        out[name] = array[start : start + rows]
    return out
