"""Artifact fetcher with a content-addressed node cache.

Schemes: `file://` (or a bare path), `http(s)://`, and `s3://bucket/key` (path-style, SigV4 signed with
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, region from `AWS_REGION` or
`AWS_DEFAULT_REGION`, endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`; unsigned when no key is set).

Cache layout under the cache dir (a hostPath on edge nodes, shared by the revisions on a node):

    blobs/sha256/<hex>      verified artifacts, only ever created by an atomic rename
    partial/<key>.part      downloads in progress; resumed with Range, never served
    quarantine/<hex>.<ts>   files whose digest did not match, kept for a post-mortem
    pins.json               per model, the last N verified revisions (N-1 stays for a fast rollback)

Edge links drop: an HTTP transfer resumes from the bytes already on disk after a cut, retries with
exponential backoff on transport errors, 429 and 5xx, and gives up at once on other 4xx. The digest is
checked on the whole file before the rename, and again on a cache hit (bit rot and hand edits happen).
A full disk raises `DiskFullError` naming the directory and the sizes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.signing import EMPTY_SHA256, sign_v4

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class FetchError(Exception):
    pass


class IntegrityError(FetchError):
    pass


class DiskFullError(FetchError):
    pass


class _Retryable(Exception):
    pass


@dataclass
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0

    def delay(self, attempt: int) -> float:
        base: float = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)  # jitter keeps a site's nodes from retrying in step


def normalize_sha256(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    value = value.strip().lower().removeprefix("sha256:")
    if not _HEX64.match(value):
        raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write(fh: IO[bytes], chunk: bytes) -> None:
    fh.write(chunk)


class ArtifactCache:
    def __init__(self, root: Path | str, revisions_kept: int = 2, eviction_grace_s: float = 600.0) -> None:
        if revisions_kept < 1:
            raise ValueError("revisions_kept must be >= 1")
        self.root = Path(root)
        self.revisions_kept = revisions_kept
        self.eviction_grace_s = eviction_grace_s
        self.blobs = self.root / "blobs" / "sha256"
        self.partial = self.root / "partial"
        self.quarantined = self.root / "quarantine"
        for d in (self.blobs, self.partial, self.quarantined):
            d.mkdir(parents=True, exist_ok=True)
        self._pins = self.root / "pins.json"

    def blob(self, sha256: str) -> Path:
        return self.blobs / sha256

    def partial_for(self, uri: str, sha256: str | None) -> Path:
        key = hashlib.sha256(f"{uri}\n{sha256 or ''}".encode()).hexdigest()[:32]
        return self.partial / f"{key}.part"

    def quarantine(self, path: Path, label: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        target = self.quarantined / f"{label}.{stamp}"
        os.replace(path, target)
        log.warning("quarantined %s as %s", path.name, target)
        return target

    def commit(self, partial: Path, sha256: str) -> Path:
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        target = self.blob(sha256)
        os.replace(partial, target)  # atomic: readers see no file or the whole verified file
        return target

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_pins(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = json.loads(self._pins.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        models = data.get("models", {}) if isinstance(data, dict) else {}
        if not isinstance(models, dict):
            return {}
        return {
            str(name): [r for r in revs if isinstance(r, dict) and isinstance(r.get("sha256"), str)]
            for name, revs in models.items()
            if isinstance(revs, list)
        }

    def pins(self, model: str = "default") -> list[dict[str, Any]]:
        return self._read_pins().get(model, [])

    def pin(self, sha256: str, uri: str = "", model: str = "default") -> list[str]:
        """Records a verified, loaded revision of `model`; keeps its newest `revisions_kept`, and deletes
        blobs no model on this node still pins (several models may share a node's cache dir)."""
        with self._locked():
            models = self._read_pins()
            revisions = [r for r in models.get(model, []) if r["sha256"] != sha256]
            revisions.insert(0, {"sha256": sha256, "uri": uri, "pinned_at": datetime.now(UTC).isoformat()})
            models[model] = revisions[: self.revisions_kept]
            tmp = self._pins.with_suffix(".tmp")
            tmp.write_text(json.dumps({"models": models}, indent=2))
            os.replace(tmp, self._pins)
            kept = {r["sha256"] for revs in models.values() for r in revs}
            now = time.time()
            for blob in self.blobs.iterdir():
                # A fresh blob may be another process's download that is not loaded and pinned yet.
                if blob.name not in kept and now - blob.stat().st_mtime > self.eviction_grace_s:
                    log.info("evicting unpinned artifact %s", blob.name)
                    blob.unlink(missing_ok=True)
            return [r["sha256"] for r in models[model]]


class ArtifactFetcher:
    def __init__(
        self,
        cache: ArtifactCache,
        policy: RetryPolicy | None = None,
        *,
        metrics: RuntimeMetrics | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cache = cache
        self.policy = policy or RetryPolicy()
        self.metrics = metrics
        self._sleep = sleep
        self._env = env if env is not None else dict(os.environ)
        timeout = httpx.Timeout(
            self.policy.read_timeout_s,
            connect=self.policy.connect_timeout_s,
            pool=self.policy.connect_timeout_s,
        )
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self._client.close()

    def fetch(self, uri: str, sha256: str | None = None) -> Path:
        """Returns the path of a verified copy of `uri` in the cache."""
        expected = normalize_sha256(sha256)
        if expected is not None:
            hit = self.cache.blob(expected)
            if hit.exists():
                if file_sha256(hit) == expected:
                    self._count("hit")
                    return hit
                self.cache.quarantine(hit, expected)
        else:
            log.warning("no sha256 given for %s: trusting the first download", _redact(uri))
        try:
            return self._fetch_and_verify(uri, expected, fresh_retry=True)
        except FetchError:
            self._count("failed")
            raise

    def _fetch_and_verify(self, uri: str, expected: str | None, fresh_retry: bool) -> Path:
        partial = self.cache.partial_for(uri, expected)
        resumed = partial.exists() and partial.stat().st_size > 0
        self._download(uri, partial)
        actual = file_sha256(partial)
        if expected is not None and actual != expected:
            self.cache.quarantine(partial, actual)
            if resumed and fresh_retry:
                # The bytes kept from an earlier attempt may belong to a different upload: start over once.
                log.warning(
                    "digest mismatch after a resumed download of %s; downloading afresh", _redact(uri)
                )
                return self._fetch_and_verify(uri, expected, fresh_retry=False)
            raise IntegrityError(f"{_redact(uri)}: sha256 is {actual}, expected {expected}; file quarantined")
        path = self.cache.commit(partial, actual)
        self._count("downloaded")
        return path

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.fetches.labels(result).inc()

    # ------------------------------------------------------------ schemes

    def _download(self, uri: str, partial: Path) -> None:
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            self._copy_file(Path(unquote(parts.path)), partial)
        elif parts.scheme in ("http", "https"):
            self._http_download(uri, partial, lambda h: h, "http")
        elif parts.scheme == "s3":
            url, signer = self._s3(parts.netloc, parts.path.lstrip("/"))
            self._http_download(url, partial, signer, "s3")
        else:
            raise FetchError(f"unsupported artifact scheme {parts.scheme!r} in {_redact(uri)}")

    def _copy_file(self, source: Path, partial: Path) -> None:
        if not source.is_file():
            raise FetchError(f"artifact {source} does not exist")
        self._check_space(partial, source.stat().st_size)
        with source.open("rb") as src, partial.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                self._write(dst, chunk, partial)

    def _s3(self, bucket: str, key: str) -> tuple[str, Callable[[dict[str, str]], dict[str, str]]]:
        env = self._env
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = (
            env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or f"https://s3.{region}.amazonaws.com"
        )
        url = f"{endpoint.rstrip('/')}/{quote(bucket)}/{quote(key, safe='/-_.~')}"
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN")

        def signer(headers: dict[str, str]) -> dict[str, str]:
            if not access or not secret:
                return headers
            # Range is left unsigned so each resume signs the same way.
            unsigned = {k: v for k, v in headers.items() if k.lower() == "range"}
            signed = sign_v4(
                "GET",
                url,
                {"x-amz-content-sha256": EMPTY_SHA256},
                access_key=access,
                secret_key=secret,
                region=region,
                service="s3",
                amz_date=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
                session_token=token,
            )
            return {**signed, **unsigned}

        return url, signer

    def _http_download(
        self, url: str, partial: Path, sign: Callable[[dict[str, str]], dict[str, str]], scheme: str
    ) -> None:
        attempt = 0
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                self._http_attempt(url, partial, sign(headers), offset, scheme)
                return
            except (httpx.TransportError, _Retryable) as exc:
                attempt += 1
                if attempt >= self.policy.attempts:
                    raise FetchError(f"{_redact(url)}: gave up after {attempt} attempts: {exc}") from None
                delay = self.policy.delay(attempt)
                log.warning("fetch of %s failed (%s); retry %d in %.1fs", _redact(url), exc, attempt, delay)
                self._sleep(delay)

    def _http_attempt(
        self, url: str, partial: Path, headers: dict[str, str], offset: int, scheme: str
    ) -> None:
        with self._client.stream("GET", url, headers=headers) as reply:
            code = reply.status_code
            if code == 416 and offset:
                partial.unlink()  # what we hold is not a prefix of the object any more
                raise _Retryable("range not satisfiable; restarting")
            if code == 429 or code >= 500:
                raise _Retryable(f"HTTP {code}")
            if code not in (200, 206):
                raise FetchError(f"{_redact(url)}: HTTP {code}")
            if code == 200 and offset:
                log.info("server ignored Range for %s; downloading from the start", _redact(url))
                offset = 0
            if code == 206 and not reply.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                partial.unlink()
                raise _Retryable(f"unexpected Content-Range {reply.headers.get('content-range')!r}")
            length = reply.headers.get("content-length")
            remaining = int(length) if length is not None and length.isdigit() else None
            if remaining is not None:
                self._check_space(partial, remaining)
            received = 0
            with partial.open("ab" if offset else "wb") as fh:
                for chunk in reply.iter_bytes():  # unbuffered: a cut keeps every byte received
                    self._write(fh, chunk, partial)
                    received += len(chunk)
                    if self.metrics is not None:
                        self.metrics.fetch_bytes.labels(scheme).inc(len(chunk))
            if remaining is not None and received < remaining:
                raise _Retryable(f"connection closed after {offset + received} of {offset + remaining} bytes")

    def _check_space(self, partial: Path, needed: int) -> None:
        free = shutil.disk_usage(partial.parent).free
        if needed > free:
            raise DiskFullError(
                f"cache dir {self.cache.root} is full: the artifact needs {needed} more bytes, {free} are free",
            )

    def _write(self, fh: IO[bytes], chunk: bytes, partial: Path) -> None:
        try:
            _write(fh, chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            fh.close()
            size = partial.stat().st_size if partial.exists() else 0
            partial.unlink(missing_ok=True)  # free the space; a partial file is never served anyway
            raise DiskFullError(
                f"cache dir {self.cache.root} is full (ENOSPC) after writing {size} bytes of the artifact",
            ) from None


def _redact(uri: str) -> str:
    """Drops query strings (presigned URLs carry credentials in them) and userinfo from log lines."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else uri
