"""`kiri serve` as a real process: startup through the CLI, and SIGTERM letting in-flight requests finish."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from runtime_helpers import FEATURES, sha256_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_in_flight_requests(classifier, tmp_path):
    path = classifier[0]
    port = _free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve",
        "--model-uri", path.as_uri(), "--name", "clf", "--sha256", sha256_of(path),
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--delay-ms", "1500", "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("server never became ready")

        body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                in_flight = [
                    asyncio.create_task(client.post(f"{url}/v2/models/clf/infer", json=body))
                    for _ in range(4)
                ]
                await asyncio.sleep(0.5)  # the requests are now inside their 1.5 s delay
                proc.send_signal(signal.SIGTERM)
                replies = await asyncio.gather(*in_flight)
                return [r.status_code for r in replies]

        assert asyncio.run(scenario()) == [200, 200, 200, 200]
        assert proc.wait(timeout=20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v2/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_cache_dir_the_runtime_cannot_write_is_logged_and_is_the_readiness_reason(classifier, tmp_path):
    # As on a node: the kubelet made the hostPath owned by another user, 0755, and the runtime is not root.
    # Root here keeps its uid (the interpreter lives under /root) but loses the capability to override
    # file permissions, which is what makes the difference.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve",
        "--model-uri", classifier[0].as_uri(), "--name", "clf", "--sha256", sha256_of(classifier[0]),
        "--host", "127.0.0.1", "--port", str(port := _free_port()), "--threads", "1", "--cache-dir", str(cache),
    ]  # fmt: skip
    if os.getuid() == 0:
        os.chown(cache, 65534, 65534)
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]
    else:
        cache.chmod(0o555)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        reply = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready")
                if "not writable" in reply.json().get("reason", ""):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert reply is not None and reply.status_code == 503
        reason = reply.json()["reason"]
        assert reason.startswith(
            f"model clf not loaded: cache dir {cache} not writable by uid {os.getuid()}: "
        )
        assert reason.endswith("Permission denied")
        assert proc.poll() is None  # live: the loader retries, and an admin's chown heals it
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    errors = [line for line in out.decode().splitlines() if " ERROR " in line]
    assert errors and f"cache dir {cache} not writable" in errors[0] and "retrying in 1s" in errors[0]
