"""The exec readiness probe (`kiri_runtime.probing`) against real `kiri serve` servers: it prints what
`/v2/health/ready` says and exits as the kubelet expects, running as the kubelet runs it (`python3 -I -S`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from runtime_helpers import sha256_of

from kiri_runtime import probing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def probe(port: int) -> tuple[int, str]:
    # The image's python3 is the venv's; here the test's interpreter stands in for it (no site either way).
    cmd = [sys.executable, *probing.command(port)[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    assert proc.stderr == ""
    return proc.returncode, proc.stdout


def test_the_probe_prints_the_servers_not_ready_reason_and_fails(serve, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    edge = serve(garbage, wait=False, sha256=sha256_of(garbage))
    deadline = time.monotonic() + 10
    while "not loaded" not in (said := httpx.get(f"{edge.url}/v2/health/ready").json().get("reason", "")):
        assert time.monotonic() < deadline, said
        time.sleep(0.05)
    code, out = probe(edge.server.port)
    after = httpx.get(f"{edge.url}/v2/health/ready").json()["reason"]
    assert code == 1
    # The same words as the body a person reads with curl, on one line. The loader retries meanwhile, and
    # between attempts the body may say "not loaded yet": the probe prints what the server said when asked.
    assert out in {f"{r.replace(chr(10), ' ')}\n" for r in (said, after, "model clf not loaded yet")}, out
    assert out.startswith("model clf not loaded")


def test_the_probe_passes_silently_once_the_server_is_ready(serve, classifier):
    edge = serve(classifier[0])
    assert probe(edge.server.port) == (0, "")


def test_the_probe_says_when_nothing_answers_on_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = probe(port)
    assert code == 1
    assert out.startswith(f"kiri serve does not answer on port {port}: ")
    assert "Connection refused" in out


def test_the_kubelet_event_message_gives_back_the_probe_output():
    said = "model clf not loaded: HTTP 401"
    assert probing.reason_from_event(probing.PROBE_FAILED + said + "\n") == said
    assert probing.reason_from_event("(combined from similar events): " + probing.PROBE_FAILED + said) == said
    assert probing.reason_from_event("Liveness probe failed: HTTP probe failed with statuscode: 500") is None
    assert (
        probing.reason_from_event("Readiness probe errored and resulted in unknown state: rpc error") is None
    )
