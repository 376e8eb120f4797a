"""Body intake under load and abuse: the in-flight byte budget (429 + Retry-After), cut bodies, and
bodies decoded off the event loop, against a real server. None of it may count as a model failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from runtime_helpers import FEATURES, metric_samples, sample

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GOOD = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}


def _start_body(port: int, declared: int, sent: bytes) -> socket.socket:
    """A client that declares `declared` body bytes, sends `sent`, and then stalls with the socket open."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(
        b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    return conn


def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_over_the_body_budget_a_request_answers_429_with_retry_after_then_recovers(serve, classifier):
    server = serve(classifier[0], max_body_bytes=100_000, max_inflight_body_bytes=150_000)
    stalled = _start_body(server.server.port, 100_000, b"{")
    try:
        _wait_for(lambda: sample(metric_samples(server.url), "kiri_inflight_body_bytes") == 100_000)
        big = json.dumps(GOOD).encode() + b" " * 60_000  # fits the body limit, not what is left of the budget
        reply = httpx.post(f"{server.url}/v2/models/clf/infer", content=big)
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "1"
        assert "holds 100000 bytes of request bodies" in reply.json()["error"]
        small = httpx.post(f"{server.url}/v2/models/clf/infer", json=GOOD)
        assert small.status_code == 200  # what still fits goes through
    finally:
        stalled.close()
    _wait_for(lambda: sample(metric_samples(server.url), "kiri_inflight_body_bytes") == 0)
    assert httpx.post(f"{server.url}/v2/models/clf/infer", content=big).status_code == 200
    samples = metric_samples(server.url)
    assert sample(samples, "kiri_rejected_requests_total", model="clf", code="429") == 1
    # The stalled client hung up mid-body: its doing, a 400, not a 500.
    assert sample(samples, "kiri_rejected_requests_total", model="clf", code="400") == 1
    assert sample(samples, "kiri_requests_total", model="clf", code="200") == 2
    assert [labels for name, labels in samples if name == "kiri_requests_total"] == [
        frozenset({("model", "clf"), ("code", "200")})
    ]


def test_a_body_that_does_not_arrive_in_time_answers_408(serve, classifier):
    server = serve(classifier[0], body_timeout_s=0.5)
    stalled = _start_body(server.server.port, 1000, b'{"inputs"')
    try:
        stalled.settimeout(10)
        head = stalled.recv(4096)
    finally:
        stalled.close()
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert sample(metric_samples(server.url), "kiri_rejected_requests_total", model="clf", code="408") == 1


def test_large_json_and_binary_bodies_decoded_off_the_loop_give_the_same_answer(serve, classifier):
    inline = serve(classifier[0])
    offloaded = serve(classifier[0], decode_offload_bytes=1024)
    rows = 3000  # ~100 KiB of JSON: over the 1 KiB threshold, so it decodes in the worker process
    x = np.random.default_rng(7).standard_normal((rows, FEATURES)).astype(np.float32)
    body = {"inputs": [{"name": "x", "shape": [rows, FEATURES], "datatype": "FP32", "data": x.tolist()}]}
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    binary_headers = {"Inference-Header-Content-Length": str(len(head))}
    answers = []
    for server in (inline, offloaded):
        j = httpx.post(f"{server.url}/v2/models/clf/infer", json=body, timeout=60)
        b = httpx.post(
            f"{server.url}/v2/models/clf/infer",
            content=head + x.tobytes(),
            headers=binary_headers,
            timeout=60,
        )
        assert (j.status_code, b.status_code) == (200, 200)
        answers += [j.json()["outputs"][0]["data"], b.json()["outputs"][0]["data"]]
    assert answers[1] == answers[0] and answers[2] == answers[0] and answers[3] == answers[0]
    bad = json.dumps(body).replace("]]", ', "nan"]]', 1).encode()
    reply = httpx.post(f"{offloaded.url}/v2/models/clf/infer", content=bad, timeout=60)
    assert reply.status_code == 400  # an error raised in the worker process comes back as the same 400
    assert "input 'x'" in reply.json()["error"]


def test_a_body_that_takes_the_decode_worker_down_answers_413_and_the_next_one_decodes(serve, classifier):
    server = serve(classifier[0], decode_offload_bytes=1024, max_body_bytes=64 << 20)
    rows = 400_000  # ~35 MiB of JSON: the worker spends about a second on it
    x = np.random.default_rng(3).standard_normal((rows, FEATURES)).astype(np.float32)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [rows, FEATURES], "datatype": "FP32", "data": x.tolist()}]}
    ).encode()
    intake = server.server.rest.intake
    replies: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: replies.append(
            httpx.post(f"{server.url}/v2/models/clf/infer", content=body, timeout=120)
        )
    )
    sender.start()
    _wait_for(lambda: intake._pool is not None and bool(intake._pool._processes), timeout=60)
    time.sleep(0.3)
    # What the kernel's OOM killer does to the worker on a body too big for the pod's memory.
    for pid in list(intake._pool._processes):
        os.kill(pid, signal.SIGKILL)
    sender.join(120)
    assert replies[0].status_code == 413
    assert "took the decoder down" in replies[0].json()["error"]
    small = {
        "inputs": [{"name": "x", "shape": [300, FEATURES], "datatype": "FP32", "data": x[:300].tolist()}]
    }
    assert httpx.post(f"{server.url}/v2/models/clf/infer", json=small, timeout=60).status_code == 200
    samples = metric_samples(server.url)
    assert sample(samples, "kiri_rejected_requests_total", model="clf", code="413") == 1
    assert sample(samples, "kiri_requests_total", model="clf", code="200") == 1
