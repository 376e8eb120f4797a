"""Artifact fetcher with a content-addressed node cache.

Schemes: `file://` (or a bare path), `http(s)://`, and `s3://bucket/key` (path-style, SigV4 signed with
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, region from `AWS_REGION` or
`AWS_DEFAULT_REGION`, endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`; without keys, the pod's
identity (EKS IRSA web identity or Pod Identity, `kiri_runtime.authenticating`); unsigned when none is set).

Credentials come from the environment, which the operator fills from the ModelDeployment's Secret
(`credentials.secretRef`, docs/operations.md "Security model"): an `http(s)://` store gets `Authorization:
Bearer` from `KIRI_HTTP_BEARER_TOKEN` (or the file named by `KIRI_HTTP_BEARER_TOKEN_FILE`, read at each
request so a rotated token is picked up), or `Basic` from `KIRI_HTTP_USERNAME` and `KIRI_HTTP_PASSWORD`;
httpx drops the header on a redirect to another host. `KIRI_CA_FILE` names PEM certificates trusted in
addition to the public roots (a store behind a private CA). A 401 or 403 fails at once, saying whether
credentials were sent (never their values).

The cache itself (layout, locks, quarantine, pins) is `kiri_runtime.artifacts`.

Edge links drop: an HTTP transfer resumes from the bytes already on disk after a cut, retries with
exponential backoff on transport errors, 429 and 5xx, and gives up at once on other 4xx. The digest is
checked on the whole file before the rename, and again on a cache hit (bit rot and hand edits happen).
A full disk raises `DiskFullError` naming the directory and the sizes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote, urlsplit

import certifi
import httpx

from kiri_runtime.artifacts import ArtifactCache, VerifiedArtifact, fd_sha256
from kiri_runtime.authenticating import AwsCredentialChain, CredentialsError
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.redaction import strip_url
from kiri_runtime.signing import EMPTY_SHA256, sign_v4

log = logging.getLogger(__name__)

__all__ = [
    "ArtifactCache",
    "ArtifactFetcher",
    "DiskFullError",
    "FetchError",
    "IntegrityError",
    "RetryPolicy",
    "VerifiedArtifact",
    "file_sha256",
    "normalize_sha256",
]

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
    # `fh` is unbuffered, so a full disk raises here, in `Fetcher._write`, never later from a flush at close;
    # an unbuffered write may also take only part of the chunk.
    view = memoryview(chunk)
    while view:
        view = view[fh.write(view) :]


def tls_verify(env: dict[str, str]) -> ssl.SSLContext | bool:
    """The public roots plus `KIRI_CA_FILE`'s certificates when it is set; httpx's default otherwise."""
    extra = env.get("KIRI_CA_FILE")
    if not extra:
        return True
    context = ssl.create_default_context(cafile=certifi.where())
    try:
        context.load_verify_locations(cafile=extra)
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"KIRI_CA_FILE {extra}: not a readable PEM bundle: {exc}") from None
    return context


def http_authorization(env: dict[str, str]) -> str | None:
    """The `Authorization` value for an http(s) store, from the environment; None without credentials."""
    token = env.get("KIRI_HTTP_BEARER_TOKEN")
    token_file = env.get("KIRI_HTTP_BEARER_TOKEN_FILE")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise FetchError(f"KIRI_HTTP_BEARER_TOKEN_FILE {token_file}: {exc.strerror}") from None
    if token:
        return f"Bearer {token.strip()}"
    user, password = env.get("KIRI_HTTP_USERNAME"), env.get("KIRI_HTTP_PASSWORD")
    if user:
        return "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return None


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
        self._client = client or httpx.Client(
            timeout=timeout, follow_redirects=True, verify=tls_verify(self._env)
        )
        self._aws = AwsCredentialChain(self._env, self._client)

    def close(self) -> None:
        self._client.close()

    def fetch(self, uri: str, sha256: str | None = None) -> Path:
        """Returns the path of a verified copy of `uri` in the cache (to load it race-free: `open`)."""
        with self.open(uri, sha256) as artifact:
            return artifact.path

    def open(self, uri: str, sha256: str | None = None) -> VerifiedArtifact:
        """A verified copy of `uri` in the cache, as an open descriptor whose bytes were the ones hashed.
        The caller closes it (it is a context manager) once the model is loaded from `load_path`."""
        expected = normalize_sha256(sha256)
        with self.cache.fetch_lock(uri, expected):
            if expected is not None:
                hit = self.cache.blob(expected)
                try:
                    fd = os.open(hit, os.O_RDONLY)
                except FileNotFoundError:
                    pass
                else:
                    if fd_sha256(fd) == expected:
                        self._count("hit")
                        return VerifiedArtifact(hit, expected, fd)
                    os.close(fd)
                    self.cache.quarantine(hit, expected)
            else:
                log.warning("no sha256 given for %s: trusting the first download", _redact(uri))
            try:
                return self._fetch_and_verify(uri, expected, fresh_retry=True)
            except FetchError:
                self._count("failed")
                raise

    def _fetch_and_verify(self, uri: str, expected: str | None, fresh_retry: bool) -> VerifiedArtifact:
        partial = self.cache.partial_for(uri, expected)
        resumed = partial.exists() and partial.stat().st_size > 0
        self._download(uri, partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            actual = fd_sha256(fd)
        except BaseException:
            os.close(fd)
            raise
        if expected is not None and actual != expected:
            os.close(fd)
            self.cache.quarantine(partial, actual)
            if resumed and fresh_retry:
                # The bytes kept from an earlier attempt may belong to a different upload: start over once.
                log.warning(
                    "digest mismatch after a resumed download of %s; downloading afresh", _redact(uri)
                )
                return self._fetch_and_verify(uri, expected, fresh_retry=False)
            raise IntegrityError(f"{_redact(uri)}: sha256 is {actual}, expected {expected}; file quarantined")
        try:
            path = self.cache.commit(partial, actual, fd)
        except BaseException:
            os.close(fd)
            raise
        self._count("downloaded")
        return VerifiedArtifact(path, actual, fd)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.fetches.labels(result).inc()

    # ------------------------------------------------------------ schemes

    def _download(self, uri: str, partial: Path) -> None:
        parts = urlsplit(uri)
        if parts.scheme in ("", "file"):
            self._copy_file(Path(unquote(parts.path)), partial)
        elif parts.scheme in ("http", "https"):
            self._http_download(uri, partial, self._http_signer(), "http")
        elif parts.scheme == "s3":
            url, signer = self._s3(parts.netloc, parts.path.lstrip("/"))
            self._http_download(url, partial, signer, "s3")
        else:
            raise FetchError(f"unsupported artifact scheme {parts.scheme!r} in {_redact(uri)}")

    def _copy_file(self, source: Path, partial: Path) -> None:
        if not source.is_file():
            raise FetchError(f"artifact {source} does not exist")
        self._check_space(partial, source.stat().st_size)
        with source.open("rb") as src, partial.open("wb", buffering=0) as dst:
            while chunk := src.read(_CHUNK):
                self._write(dst, chunk, partial)

    def _http_signer(self) -> Callable[[dict[str, str]], dict[str, str]]:
        def signer(headers: dict[str, str]) -> dict[str, str]:
            authorization = http_authorization(self._env)
            return {**headers, "Authorization": authorization} if authorization else headers

        return signer

    def _credentials_hint(self, scheme: str) -> str:
        """Whether credentials were sent, and from where: names only, never values."""
        env = self._env
        if scheme == "s3":
            source = self._aws.source()
            if source is not None:
                return f"the store refused the credentials from {source}"
            return (
                "no credentials were sent (give the pod AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY with the "
                "spec's credentials.secretRef, or a service account bound to a cloud role)"
            )
        names = "KIRI_HTTP_BEARER_TOKEN(_FILE) or KIRI_HTTP_USERNAME/KIRI_HTTP_PASSWORD"
        if (
            env.get("KIRI_HTTP_BEARER_TOKEN")
            or env.get("KIRI_HTTP_BEARER_TOKEN_FILE")
            or env.get("KIRI_HTTP_USERNAME")
        ):
            return f"the store refused the credentials in {names}"
        return f"no credentials were sent (set {names}, e.g. with the spec's credentials.secretRef)"

    def _s3(self, bucket: str, key: str) -> tuple[str, Callable[[dict[str, str]], dict[str, str]]]:
        env = self._env
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = (
            env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or f"https://s3.{region}.amazonaws.com"
        )
        url = f"{endpoint.rstrip('/')}/{quote(bucket)}/{quote(key, safe='/-_.~')}"

        def signer(headers: dict[str, str]) -> dict[str, str]:
            try:
                credentials = self._aws.get()
            except CredentialsError as exc:
                raise FetchError(f"{_redact(url)}: no S3 credentials: {exc}") from None
            if credentials is None:
                return headers
            # Range is left unsigned so each resume signs the same way.
            unsigned = {k: v for k, v in headers.items() if k.lower() == "range"}
            signed = sign_v4(
                "GET",
                url,
                {"x-amz-content-sha256": EMPTY_SHA256},
                access_key=credentials.access_key,
                secret_key=credentials.secret_key,
                region=region,
                service="s3",
                amz_date=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
                session_token=credentials.session_token,
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
            if code in (401, 403):
                raise FetchError(f"{_redact(url)}: HTTP {code}: {self._credentials_hint(scheme)}")
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
            with partial.open("ab" if offset else "wb", buffering=0) as fh:
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
    """Drops query strings (presigned URLs carry credentials in them) and userinfo from Kiri's log lines."""
    return strip_url(uri)
