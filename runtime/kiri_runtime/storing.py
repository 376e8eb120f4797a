"""The in-cluster artifact store (`kiri store`): a write-once HTTP file server for compression outputs.

The chart deploys it (helm/kiri, `store.*`) so that a plain cluster has a store every pod can reach: the
compression Job PUTs its variants and manifest under `<namespace>/<name>/<compression key>/`, edge runtimes
GET them (`kiri_runtime.fetching`: Range resumes, sha256 checked against the manifest ConfigMap).

Write-once: a path, once written, keeps its bytes. A PUT of the same bytes again answers 200 (a retried
Job publishes again), of other bytes 409: what an edge node verified stays what it fetches. A PUT naming
`X-Kiri-Sha256` is refused with 400 when the body does not match it, and nothing is kept. Paths are
relative, without `..`, hidden or empty segments. Counters per method and status code, and bytes sent, are
on `/metrics` (how a test proves a rollback fetched nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import StreamReader, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

log = logging.getLogger(__name__)

__all__ = ["SHA256_HEADER", "ArtifactStore", "PathRefused", "StoreMetrics", "WriteConflict", "make_app"]

SHA256_HEADER = "X-Kiri-Sha256"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20
_PARTIAL_DIR = ".partial"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PathRefused(ValueError):
    pass


class WriteConflict(Exception):
    pass


class DigestMismatch(ValueError):
    pass


class ArtifactStore:
    """Files under `root`, written once (transport-free: the HTTP adapter is `make_app`)."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root.resolve()
        self.partial = self.root / _PARTIAL_DIR
        if not read_only:  # a read-only store's volume is mounted read-only: it writes nothing
            self.partial.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()

    def path(self, rel: str) -> Path:
        parts = rel.split("/")
        if not rel or len(rel) > 1024 or not all(_SEGMENT.match(p) for p in parts):
            raise PathRefused(
                f"path {rel!r} refused: use relative segments of letters, digits, '.', '_' and '-' "
                "that do not start with '.'"
            )
        return self.root.joinpath(*parts)

    async def put(self, rel: str, body: StreamReader | None, expected: str | None) -> bool:
        """Writes `rel` once. True: created; False: the same bytes were already there."""
        target = self.path(rel)
        temp = self.partial / uuid.uuid4().hex
        digest = hashlib.sha256()
        try:
            with temp.open("wb") as fh:
                if body is not None:
                    while chunk := await body.read(_CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            actual = digest.hexdigest()
            if expected is not None and expected.lower().removeprefix("sha256:") != actual:
                raise DigestMismatch(f"body sha256 is {actual}, {SHA256_HEADER} says {expected}")
            async with self._lock:
                if target.is_file():
                    if _sha256(target) == actual:
                        return False
                    raise WriteConflict(f"{rel} exists with other bytes; artifacts are written once")
                if target.exists():
                    raise WriteConflict(f"{rel} exists and is not a file")
                target.parent.mkdir(parents=True, exist_ok=True)
                temp.rename(target)
                return True
        finally:
            temp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "kiri_store_requests",
            "Requests to the artifact store, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "kiri_store_sent_bytes", "Artifact bytes the store sent (GET bodies).", registry=self.registry
        )
        self.received_bytes = Counter(
            "kiri_store_received_bytes", "Artifact bytes the store kept (PUT bodies).", registry=self.registry
        )


def make_app(
    store: ArtifactStore, metrics: StoreMetrics | None = None, *, read_only: bool = False
) -> web.Application:
    metrics = metrics or StoreMetrics()

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def get(request: web.Request) -> web.StreamResponse:
        try:
            path = store.path(request.match_info["path"])
        except PathRefused as exc:
            return error(400, str(exc))
        if not path.is_file():
            return error(404, f"{request.match_info['path']} not found")
        reply = web.FileResponse(path, chunk_size=_CHUNK)
        await reply.prepare(request)  # sends the body (or the Range asked for); HEAD sends none
        if request.method == "GET" and reply.status in (200, 206):
            metrics.sent_bytes.inc(reply.content_length or 0)
        return reply

    async def put(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        try:
            created = await store.put(rel, request.content, request.headers.get(SHA256_HEADER))
        except PathRefused as exc:
            return error(400, str(exc))
        except DigestMismatch as exc:
            return error(400, str(exc))
        except WriteConflict as exc:
            return error(409, str(exc))
        if created:
            metrics.received_bytes.inc(store.path(rel).stat().st_size)
            log.info("stored %s", rel)
        return web.json_response({"path": rel, "created": created}, status=201 if created else 200)

    async def healthz(_: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def metrics_route(_: web.Request) -> web.StreamResponse:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @web.middleware
    async def count(request: web.Request, handler: _Handler) -> web.StreamResponse:
        reply = await handler(request)
        if request.path not in ("/healthz", "/metrics"):
            metrics.requests.labels(request.method, str(reply.status)).inc()
        return reply

    app = web.Application(middlewares=[count], client_max_size=0)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/{path:.+}", get)  # HEAD too (aiohttp adds it to GET routes)
    if not read_only:  # read-only: aiohttp answers a PUT 405 Method Not Allowed
        app.router.add_put("/{path:.+}", put)
    return app


def serve(root: Path, host: str, port: int, *, read_only: bool = False) -> None:
    store = ArtifactStore(root, read_only=read_only)
    mode = "read-only " if read_only else ""
    log.info("%sartifact store on %s:%d, files under %s", mode, host, port, store.root)
    web.run_app(make_app(store, read_only=read_only), host=host, port=port, print=None, access_log=None)
