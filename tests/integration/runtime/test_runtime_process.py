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
