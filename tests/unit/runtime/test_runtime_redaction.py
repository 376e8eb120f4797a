"""No credential reaches a log line: URL userinfo, presigned query parameters, bearer tokens."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiri_runtime import redaction
from kiri_runtime.fetching import ArtifactCache, ArtifactFetcher, FetchError, RetryPolicy

pytestmark = pytest.mark.timeout(30)

DATA = b"onnx bytes " * 1000
SHA = hashlib.sha256(DATA).hexdigest()
SECRETS = ("hunter2", "AKIDEXAMPLE%2F20260101", "deadbeefsig", "tok-123", "sesstoken9")


@pytest.mark.parametrize(
    ("line", "clean"),
    [
        ("GET https://alice:hunter2@host:8443/m.onnx ok", "GET https://***@host:8443/m.onnx ok"),
        ("s3://AKID:se@cr@t@bucket/key", "s3://***@bucket/key"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKID%2F2026&X-Amz-Date=20260101T000000Z"
            "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=sess",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=20260101T000000Z"
            "&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        ("URL('https://h/p?sig=abc&sv=2022')", "URL('https://h/p?sig=***&sv=2022')"),
        ("https://h/p?TOKEN=abc#frag", "https://h/p?TOKEN=***#frag"),
        ("Authorization: Bearer eyJhbGciOi.x-y_z", "Authorization: Bearer ***"),
        ("https://h/p?monkey=banana&keyring=1", "https://h/p?monkey=banana&keyring=1"),
        ("no url here: a=b", "no url here: a=b"),
    ],
)
def test_redact_masks_credentials_and_keeps_the_rest(line, clean):
    assert redaction.redact(line) == clean


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/m.onnx"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)
        else:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args: object) -> None:  # the server's own access log is not under test
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_fetch_with_credentials_in_the_uri_logs_none_of_them(origin, tmp_path: Path, caplog):
    redaction.install()
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="httpx")  # other commands' setup may have quietened it
    query = (
        "X-Amz-Credential=AKIDEXAMPLE%2F20260101&X-Amz-Signature=deadbeefsig"
        "&X-Amz-Security-Token=sesstoken9&token=tok-123"
    )
    fetcher = ArtifactFetcher(ArtifactCache(tmp_path), RetryPolicy(attempts=2), sleep=lambda s: None)
    try:
        path = fetcher.fetch(f"http://alice:hunter2@{origin}/m.onnx?{query}", SHA)
        assert path.read_bytes() == DATA
        with pytest.raises(FetchError, match="HTTP 403"):
            fetcher.fetch(f"http://alice:hunter2@{origin}/denied.onnx?{query}", "0" * 64)
        logging.getLogger("kiri.test").error("while fetching %s", f"http://alice:hunter2@{origin}/x")
        try:
            raise RuntimeError(f"upstream said no to https://h/m?X-Amz-Signature=deadbeefsig&{query}")
        except RuntimeError:
            logging.getLogger("kiri.test").exception("fetch failed")
    finally:
        fetcher.close()
    formatter = logging.Formatter("%(name)s %(message)s")
    lines = [formatter.format(r) for r in caplog.records]
    leaks = [line for line in lines if any(secret in line for secret in SECRETS)]
    assert leaks == []
    # httpx did log the full URL, so the test above had something to catch.
    masked = "X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&token=***"
    assert f'httpx HTTP Request: GET http://***@{origin}/m.onnx?{masked} "HTTP/1.0 200 OK"' in lines
    assert any("upstream said no to https://h/m?X-Amz-Signature=***" in line for line in lines)
