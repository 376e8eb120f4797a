"""Fixtures: a recording proxy between trainers and the aggregator, and processes killed at teardown."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from learning_harness import Proxy, Recorded


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[str], Proxy]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(upstream: str) -> Proxy:
        proxy = Proxy(upstream)
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    proxy.requests.append(Recorded(self.command, self.path, body))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                try:
                    r = httpx.request(
                        self.command, upstream + self.path, content=body, headers=headers, timeout=30
                    )
                except httpx.TransportError:
                    self.send_error(502)
                    return
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = _forward
            do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
        return proxy

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
