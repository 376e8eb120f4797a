"""A measurement runs on a reconcile worker: whatever answers at the Prometheus address, it is over within
its deadline, reads no more than the cap, and follows no redirect. Real sockets, hostile servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kiri_operator import analyzing
from kiri_operator.analyzing import Substitutions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOW = datetime.now(UTC)
SUBS = Substitutions(revision="abc", namespace="ns", variants=["int8"])


class Query:
    name = "errors"
    promql = "sum(rate(kiri_requests_total[1m]))"
    success_condition = "result < 0.05"
    interval = 10
    failure_limit = 0
    min_samples = 1


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def trickling() -> Iterator[str]:
    """Headers at once, then one byte of a never-ending body every 0.1 s: no read timeout ever fires."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                for _ in range(100000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

    yield from _serve(Handler)


@pytest.fixture
def flooding() -> Iterator[str]:
    """Answers 64 MiB of JSON-looking bytes, as fast as it can."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(64 << 20))
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"[" * (1 << 20))
            except OSError:
                pass

    yield from _serve(Handler)


@pytest.fixture
def silent() -> Iterator[str]:
    """Accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _measure(address: str, queries: int = 1, deadline_s: float = 1.5) -> tuple[float, analyzing.Measurement]:
    started = time.monotonic()
    m, _ = analyzing.measure_sync(
        address, [Query()] * queries, SUBS, NOW - timedelta(minutes=5), NOW, deadline_s=deadline_s
    )
    return time.monotonic() - started, m


def test_a_server_that_trickles_bytes_forever_is_cut_off_at_the_deadline(trickling: str) -> None:
    took, m = _measure(trickling)
    assert took < 2.5
    assert m.outcome == "Error"  # holds the wave; never a rollback
    assert m.message == f"errors: Prometheus at {trickling} did not answer within the measurement's deadline"


def test_the_deadline_covers_all_the_queries_of_a_measurement_together(trickling: str) -> None:
    took, m = _measure(trickling, queries=5)
    assert took < 2.5  # not five deadlines
    assert m.outcome == "Error"
    assert m.message.count("not asked: the measurement's deadline has passed") == 4


def test_a_server_that_never_answers_is_cut_off_at_the_deadline(silent: str) -> None:
    took, m = _measure(silent, deadline_s=1.0)
    assert took < 2.0
    assert m.outcome == "Error" and "ReadTimeout" in m.message


def test_an_answer_larger_than_the_cap_is_refused_without_reading_it_all(flooding: str) -> None:
    took, m = _measure(flooding, deadline_s=10)
    assert took < 5  # 4 MiB of the 64 read, then the connection dropped
    assert m.outcome == "Error"
    assert (
        m.message == f"errors: Prometheus at {flooding} answered more than {analyzing.MAX_ANSWER_BYTES} bytes"
    )


def test_a_redirect_elsewhere_is_not_followed() -> None:
    hits: list[str] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

    class Redirecting(BaseHTTPRequestHandler):
        target = ""

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"{self.target}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

    for other in _serve(Elsewhere):
        Redirecting.target = other
        for address in _serve(Redirecting):
            _, m = _measure(address)
            assert m.outcome == "Error" and "HTTP 302" in m.message
    assert hits == []
