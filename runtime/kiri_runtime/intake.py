"""Taking in an infer request's body: size cap, in-flight byte budget, read timeout, and decoding off the loop.

The HTTP adapter (`rest`) calls `Intake.body` and `Intake.decode`; nothing here knows the routes.

**Budget.** All requests together may hold at most `max_inflight_body_bytes` of body. A request that
declares its size (Content-Length) reserves it whole before a byte is read; a chunked one reserves chunk by
chunk. A request that does not fit answers 429 with `Retry-After` at once (it never waits, so a flood
cannot pile up reservations), and the reservation is held until the answer is built: the decoded arrays
are views of, or copies the size of, the body. Memory held by bodies is therefore bounded by about twice
the budget, plus one JSON decode at a time (below), not by how many clients connect.

**Decoding off the loop.** JSON parsing and `np.asarray` over a list are single C calls that hold the
GIL from start to end: in a thread they stall the event loop as long as on it (measured in
docs/benchmarks.md, "Request body decoding"). So a request whose JSON part is `decode_offload_bytes` or
more is decoded in a separate process (one worker, forkserver, started on first use), which also keeps
JSON's object overhead (up to ~24 bytes of Python objects per byte of JSON) out of the server's memory:
if a hostile body takes that worker down, the request answers 413 and a fresh worker takes the next one.
A request with a small JSON part and a large binary part is decoded in a thread: its work (the finiteness
check, BYTES unpacking) is numpy that releases the GIL, or Python bytecode that yields it every 5 ms.
Smaller bodies decode on the loop: a hop costs more than their decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import Gauge

from kiri_runtime.errors import BadRequest, BodyBudgetExceeded, InferenceError, PayloadTooLarge
from kiri_runtime.tensors import InferenceRequest, decode_request

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_DECODE_OFFLOAD_BYTES = 256 * 1024
DEFAULT_BODY_TIMEOUT_S = 60.0
# Where `Intake.body` leaves the seconds spent reading the body, so the adapter can leave them out of
# the request's server time (a slow uplink is not model latency).
BODY_READ_SECONDS = web.RequestKey("kiri_body_read_s", float)


class _Short(Exception):
    def __init__(self, received: int) -> None:
        self.received = received


async def _read_exactly(request: web.Request, length: int) -> bytearray:
    """Into one buffer of the declared size: aiohttp's `readexactly` joins its chunks at the end, which holds
    the body twice for a moment (measured in bench/runtime/bench_body_flood.py)."""
    buf = bytearray(length)
    view = memoryview(buf)
    pos = 0
    while pos < length:
        chunk = await request.content.readany()
        if not chunk:
            raise _Short(pos)
        n = min(len(chunk), length - pos)
        view[pos : pos + n] = chunk[:n]
        pos += n
    return buf


class RequestTimeout(InferenceError):
    status = 408


@dataclass
class IntakeConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight_body_bytes: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES
    decode_offload_bytes: int = DEFAULT_DECODE_OFFLOAD_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}): a body of the largest allowed size could never be admitted",
            )


class BodyBudget:
    """Bytes of request bodies held at once. Single event loop: no lock needed."""

    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self._gauge = gauge

    def acquire(self, n: int) -> None:
        if self.in_use + n > self.limit:
            raise BodyBudgetExceeded(
                f"the server holds {self.in_use} bytes of request bodies and this one needs {n} more "
                f"(limit {self.limit}); retry shortly",
            )
        self.in_use += n
        if self._gauge is not None:
            self._gauge.set(self.in_use)

    def release(self, n: int) -> None:
        self.in_use -= n
        if self._gauge is not None:
            self._gauge.set(self.in_use)


class Intake:
    def __init__(self, config: IntakeConfig | None = None, gauge: Gauge | None = None) -> None:
        self.config = config or IntakeConfig()
        self.budget = BodyBudget(self.config.max_inflight_body_bytes, gauge)
        self._pool: ProcessPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def body(self, request: web.Request) -> AsyncIterator[bytes | bytearray]:
        """The whole body, held against the budget until the block ends."""
        held = 0
        start = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.config.body_timeout_s):
                    body, held = await self._read(request)
            except TimeoutError:
                raise RequestTimeout(
                    f"the body did not arrive within {self.config.body_timeout_s:.0f} s"
                ) from None
            finally:
                request[BODY_READ_SECONDS] = time.perf_counter() - start
            yield body
        finally:
            self.budget.release(held)

    async def _read(self, request: web.Request) -> tuple[bytes | bytearray, int]:
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
        held = 0
        try:
            if length is not None and not request.headers.get("Content-Encoding"):
                self.budget.acquire(length)
                held = length
                return await _read_exactly(request, length), held
            # Chunked or compressed (aiohttp inflates it): the size is known only as it comes, so reserve
            # chunk by chunk and stop at the limit, which then applies to the inflated bytes.
            chunks: list[bytes] = []
            async for chunk in request.content.iter_any():
                if held + len(chunk) > limit:
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
                self.budget.acquire(len(chunk))
                held += len(chunk)
                chunks.append(chunk)
            return b"".join(chunks), held
        except _Short as exc:
            self.budget.release(held)
            raise BadRequest(f"the body ended after {exc.received} of {length} bytes") from None
        except (HttpProcessingError, ConnectionError) as exc:
            # The client hung up mid-body or sent a broken chunked/compressed stream: its doing, not ours.
            self.budget.release(held)
            raise BadRequest(f"the body could not be read: {exc}") from None
        except BaseException:
            self.budget.release(held)
            raise

    async def decode(self, body: bytes | bytearray, header_length: int | None) -> InferenceRequest:
        threshold = self.config.decode_offload_bytes
        json_part = len(body) if header_length is None else max(0, min(header_length, len(body)))
        if json_part >= threshold:
            return await self._decode_in_process(body, header_length)
        if len(body) >= threshold:
            return await asyncio.to_thread(decode_request, body, header_length)
        return decode_request(body, header_length)

    async def _decode_in_process(
        self, body: bytes | bytearray, header_length: int | None
    ) -> InferenceRequest:
        if self._pool is None:
            # forkserver, not fork: the server process has ONNX Runtime and executor threads to not copy.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["kiri_runtime.tensors"])
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(decode_request, body, header_length))
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False)
            log.warning("the decode worker died on a %d-byte body; a fresh one takes the next", len(body))
            raise PayloadTooLarge(
                f"decoding this {len(body)}-byte body took the decoder down (out of memory?); "
                "send it with the binary tensor extension or in smaller requests",
            ) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
