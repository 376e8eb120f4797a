"""The fetcher against real servers: an HTTP server that cuts the first transfer, and an S3-compatible server
(moto) when one is installed (`KIRI_TEST_MOTO_SERVER`, default: the one hack/install-test-servers.sh installs)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, FetchError, RetryPolicy
from kiri_runtime.signing import sign_v4

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class CuttingHandler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; the first full GET is cut after a third of the bytes."""

    cuts_left = 1
    ranges_seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        start = 0
        if rng:
            type(self).ranges_seen.append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        if not rng and type(self).cuts_left > 0:
            type(self).cuts_left -= 1
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(PAYLOAD[start:])


@pytest.fixture
def cutting_server() -> Iterator[str]:
    CuttingHandler.cuts_left = 1
    CuttingHandler.ranges_seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), CuttingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_resume_after_cut(cutting_server, tmp_path):
    cache = ArtifactCache(tmp_path)
    fetcher = ArtifactFetcher(cache, RetryPolicy(backoff_s=0.01), sleep=lambda s: None)
    path = fetcher.fetch(f"{cutting_server}/model.onnx", DIGEST)
    assert path == tmp_path / "blobs" / "sha256" / DIGEST
    assert path.read_bytes() == PAYLOAD
    assert len(CuttingHandler.ranges_seen) == 1
    resumed_from = int(CuttingHandler.ranges_seen[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from < len(PAYLOAD)
    assert not any((tmp_path / "partial").iterdir())
    # A second fetch is a verified cache hit: no request reaches the server.
    CuttingHandler.cuts_left = 99
    assert fetcher.fetch(f"{cutting_server}/model.onnx", DIGEST) == path


def test_http_404_fails_fast(cutting_server, tmp_path):
    calls = []
    fetcher = ArtifactFetcher(ArtifactCache(tmp_path), RetryPolicy(), sleep=calls.append)

    class NotFound(CuttingHandler):
        def do_GET(self) -> None:
            self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchError, match="HTTP 404"):
            fetcher.fetch(f"http://127.0.0.1:{server.server_address[1]}/m.onnx", DIGEST)
    finally:
        server.shutdown()
    assert calls == []


# `make setup` installs moto here (hack/install-test-servers.sh); it needs a venv of its own.
_KIRI_CACHE = Path(os.environ.get("KIRI_CACHE", Path.home() / ".cache" / "kiri"))
MOTO = Path(os.environ.get("KIRI_TEST_MOTO_SERVER", _KIRI_CACHE / "moto-5.2.5-venv" / "bin" / "moto_server"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    if not MOTO.exists():
        # `make setup` installs it, so in CI a missing server is a setup bug, not a reason to skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no S3-compatible server: {MOTO} is absent (run hack/install-test-servers.sh)"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(url)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _signed_put(url: str, body: bytes, env: dict[str, str]) -> None:
    headers = sign_v4(
        "PUT",
        url,
        {"x-amz-content-sha256": hashlib.sha256(body).hexdigest()},
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        service="s3",
        amz_date=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        payload_hash=hashlib.sha256(body).hexdigest(),
    )
    reply = httpx.put(url, content=body, headers=headers)
    assert reply.status_code == 200, reply.text


def test_s3_path_style_sigv4(s3_endpoint, tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": "kiri-test",
        "AWS_SECRET_ACCESS_KEY": "kiri-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
    }
    _signed_put(f"{s3_endpoint}/models", b"", env)
    _signed_put(f"{s3_endpoint}/models/clf/v1/model%20a.onnx", PAYLOAD, env)
    fetcher = ArtifactFetcher(ArtifactCache(tmp_path), RetryPolicy(attempts=2), env=env)
    path = fetcher.fetch("s3://models/clf/v1/model a.onnx", DIGEST)
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher.fetch("s3://models/clf/v1/missing.onnx", "1" * 64)
