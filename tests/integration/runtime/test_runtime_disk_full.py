"""A real full disk under `kiri serve`'s cache (issue 19): a size-limited tmpfs, not an injected error.

The cache directory is a tmpfs mounted with `size=`, partly taken by another file (as another tenant's or an
older revision's artifacts take a node's disk). The model does not fit. From a `file://` store the runtime
sees it before writing (the size is known); from an HTTP server that sends no Content-Length, the kernel
says ENOSPC part-way through. Either way: the readiness probe's reason and an ERROR line say the cache is
full, no partial file is left (nor anything that could later pass for the artifact), and once the other
file is deleted the next retry loads and serves the model.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped with that reason.
The same fault on a real node's cache: tests/e2e/test_real_nodes.py (marked `real_nodes`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import FEATURES, _save

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TMPFS_BYTES = 4 * 1024 * 1024
BALLAST_BYTES = 2 * 1024 * 1024 + 512 * 1024  # leaves 1.5 MiB free: less than the model
HIDDEN = 100_000  # W 4x100000 + V 100000x3 float32: about 2.8 MB


def big_model(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(19)
    w = (rng.standard_normal((FEATURES, HIDDEN)) / 100).astype(np.float32)
    v = (rng.standard_normal((HIDDEN, 3)) / 100).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "V"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")],
    )
    return _save(graph, path), w, v


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class NoLengthHandler(BaseHTTPRequestHandler):
    """Sends the artifact with no Content-Length (the end is the closed connection), so nothing can be
    checked before writing: the kernel's ENOSPC is what stops the download."""

    protocol_version = "HTTP/1.0"
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for i in range(0, len(self.body), 64 * 1024):
            self.wfile.write(self.body[i : i + 64 * 1024])

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("source", ["file", "http-without-length"])
def test_a_full_cache_disk_is_the_readiness_reason_leaves_no_partial_file_and_heals_when_space_is_freed(
    small_disk: Path, tmp_path: Path, source: str
) -> None:
    model, w, v = big_model(tmp_path / "big.onnx")
    data = model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert BALLAST_BYTES + len(data) > TMPFS_BYTES > len(data)
    ballast = small_disk / "other-tenant.bin"
    ballast.write_bytes(b"\0" * BALLAST_BYTES)
    cache = small_disk / "cache"
    server = None
    if source == "file":
        uri = model.as_uri()
    else:
        handler = type("Handler", (NoLengthHandler,), {"body": data})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}/big.onnx"
    port = _free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve", "--model-uri", uri, "--name", "big",
        "--sha256", sha, "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
        "--cache-dir", str(cache),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        reason = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "is full" not in reason:
            try:
                reply = httpx.get(f"{url}/v2/health/ready")
                assert reply.status_code == 503, reply.text
                reason = reply.json().get("reason", "")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        if source == "file":
            free = TMPFS_BYTES - BALLAST_BYTES
            assert reason.startswith(f"model big not loaded: cache dir {cache} is full: the artifact needs ")
            assert int(reason.split(" are free")[0].rsplit(" ", 1)[1]) <= free
        else:
            assert reason.startswith(
                f"model big not loaded: cache dir {cache} is full (ENOSPC) after writing "
            )
        # Nothing partial is left behind, and nothing stands where the verified artifact will be.
        assert [f for f in _files(cache) if not f.startswith("locks/")] == [], _files(cache)
        assert proc.poll() is None  # live, retrying

        ballast.unlink()  # space freed: the next retry (1, 2, 4 s ...) fetches, verifies and loads
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{url}/v2/health/ready").text
            time.sleep(0.2)
        x = np.random.default_rng(1).standard_normal((2, FEATURES)).astype(np.float32)
        body = {
            "inputs": [{"name": "x", "shape": [2, FEATURES], "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        out = httpx.post(f"{url}/v2/models/big/infer", json=body, timeout=30).json()["outputs"][0]
        np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), x @ w @ v, rtol=1e-4, atol=1e-5)
        blob = cache / "blobs" / "sha256" / sha
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha
        assert not any((cache / "partial").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        out_text, _ = proc.communicate(timeout=20)
        if server is not None:
            server.shutdown()
    errors = [line for line in out_text.decode().splitlines() if " ERROR " in line]
    assert errors and f"cache dir {cache} is full" in errors[0] and "retrying in 1s" in errors[0], errors
