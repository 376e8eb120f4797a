"""Property-based fuzz of the inference endpoint, both codecs, against a real `kiri serve` process.

For any body hypothesis makes (near-valid requests with hostile values, arbitrary JSON, binary tensors with
wrong sizes and header lengths, NaN/Inf bits, raw junk) the server answers, never with a 5xx, a 200 JSON
answer never holds a non-standard NaN token, and its memory stays bounded. Examples are few and
derandomized so that it runs in well under a minute on two cores and fails the same way twice.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import FEATURES, classifier_model, metric_samples, sha256_of

from kiri_runtime.tensors import DATATYPES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Headroom over the warm server's resident set for the whole fuzz: junk must not grow the process.
RSS_HEADROOM_MIB = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc, self.url = proc, url
        self.client = httpx.Client(timeout=30)
        self.baseline_kib = 0

    def infer(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(f"{self.url}/v2/models/clf/infer", content=body, headers=headers or {})


GOOD = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    path, _, _ = classifier_model(tmp / "clf.onnx")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "kiri_operator.cli", "serve",
        "--model-uri", path.as_uri(), "--name", "clf", "--sha256", sha256_of(path),
        "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
        "--cache-dir", str(tmp / "cache"), "--log-level", "WARNING", "--max-body-bytes", "1048576",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    server = Served(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{server.url}/v2/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)
    for _ in range(50):  # warm: allocator arenas, ORT session, the first connections
        assert server.infer(json.dumps(GOOD).encode()).status_code == 200
    server.baseline_kib = _status_kib(proc.pid, "VmRSS")
    yield server
    server.client.close()
    proc.terminate()
    proc.wait(30)


def check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        assert isinstance(reply.json()["error"], str)
        return
    if "Inference-Header-Content-Length" in reply.headers:
        header = reply.content[: int(reply.headers["Inference-Header-Content-Length"])]
    else:
        header = reply.content

    def no_constants(token: str) -> Any:
        raise AssertionError(f"answer holds the non-standard JSON token {token}")

    json.loads(header, parse_constant=no_constants)


# ---------------------------------------------------------------- strategies

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats | st.text(max_size=6)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=16,
)
datatypes = st.sampled_from([*DATATYPES, "FP8", "", "fp32"])
shapes = (
    st.lists(st.integers(-2, 2**63), max_size=40)
    | st.builds(lambda n: [n, FEATURES], st.integers(0, 8))
    | st.just([1] * 33)
)


@st.composite
def near_valid_tensor(draw: st.DrawFn) -> dict[str, Any]:
    """The model's input `x`, right or with one thing wrong: values, datatype, shape, name or extra keys."""
    rows = draw(st.integers(0, 4))
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x"] * 8 + ["y", ""])),
        "datatype": draw(st.sampled_from(["FP32"] * 7 + ["FP16", "FP64", "INT64", "BYTES"])),
        "shape": draw(st.sampled_from([[rows, FEATURES]] * 6 + [[rows * FEATURES], [rows, 2, 2]])),
        "data": draw(st.lists(floats | st.integers(-(2**65), 2**65), min_size=rows * FEATURES,
                              max_size=rows * FEATURES)),
    }  # fmt: skip
    if draw(st.integers(0, 3)) == 0:
        tensor[draw(st.sampled_from(["parameters", "shape", "data", "datatype"]))] = draw(json_values)
    return tensor


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(-1, 4))
    if kind == 4:  # nesting past any parser's recursion limit, at the top or inside a tensor's data
        depth = draw(st.integers(1, 200_000))
        nest = b"[" * depth + b"0.5" + b"]" * depth
        if draw(st.booleans()):
            return nest
        return b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ' + nest + b"}]}"
    if kind <= 0:
        doc: Any = {"inputs": [draw(near_valid_tensor())]}
    elif kind == 1:
        tensor = {"name": draw(st.text(max_size=4)), "datatype": draw(datatypes), "shape": draw(shapes),
                  "data": draw(json_values)}  # fmt: skip
        doc = {"inputs": draw(st.lists(st.just(tensor), max_size=2))}
    elif kind == 2:
        doc = draw(json_values)
    else:
        doc = {"inputs": [draw(near_valid_tensor())], draw(st.sampled_from(["outputs", "id", "parameters"])):
               draw(json_values)}  # fmt: skip
    body = json.dumps(doc).encode()  # allow_nan: NaN and Infinity tokens are part of the fuzz
    if draw(st.integers(0, 9)) == 0:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8))
    return body


@st.composite
def binary_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    rows = draw(st.integers(0, 4))
    datatype = draw(st.sampled_from(["FP32", "FP32", "FP16", "FP64", "BYTES", "INT8"]))
    if draw(st.booleans()):
        values = np.array(draw(st.lists(floats, min_size=rows * FEATURES, max_size=rows * FEATURES)))
        with np.errstate(over="ignore"):  # large doubles become inf in FP32: part of the fuzz
            blob = values.astype(np.float32).tobytes() if datatype == "FP32" else draw(st.binary(max_size=64))
    else:
        blob = draw(st.binary(max_size=128))
    size = draw(st.sampled_from([len(blob), len(blob), len(blob) + 1, max(0, len(blob) - 1), 2**40, -1]))
    params: dict[str, Any] = {"binary_data_size": size}
    if draw(st.integers(0, 4)) == 0:
        params = draw(json_values) if draw(st.booleans()) else {"binary_data_size": draw(json_values)}
    tensor = {"name": draw(st.sampled_from(["x", "x", "y"])), "datatype": datatype,
              "shape": draw(st.sampled_from([[rows, FEATURES], [rows * FEATURES]]) | shapes), "parameters": params}  # fmt: skip
    doc: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        doc["outputs"] = [{"name": "probs", "parameters": {"binary_data": draw(st.booleans())}}]
    head = json.dumps(doc).encode()
    declared = draw(
        st.sampled_from([str(len(head))] * 4 + ["-1", "0", str(len(head) + 3), "abc", str(2**70), ""])
    )
    return head + blob, {"Inference-Header-Content-Length": declared}


# ---------------------------------------------------------------- properties


@FUZZ
@given(body=json_bodies())
def test_any_json_body_answers_without_a_5xx(served: Served, body: bytes) -> None:
    check(served.infer(body, {"Content-Type": "application/json"}))


@FUZZ
@given(request=binary_bodies())
def test_any_binary_tensor_body_answers_without_a_5xx(
    served: Served, request: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = request
    check(served.infer(body, {"Content-Type": "application/octet-stream", **headers}))


@settings(FUZZ, max_examples=50)
@given(body=st.binary(max_size=512))
def test_raw_junk_answers_without_a_5xx(served: Served, body: bytes) -> None:
    check(served.infer(body))


def test_after_the_fuzz_the_server_answers_counts_no_5xx_and_its_memory_stayed_bounded(
    served: Served,
) -> None:
    # Runs after the properties above (file order): same process, same server.
    reply = served.infer(json.dumps(GOOD).encode())
    assert reply.status_code == 200
    samples = metric_samples(served.url)
    codes = {dict(labels)["code"] for name, labels in samples if name == "kiri_requests_total"}
    assert codes == {"200"}
    rejected = sum(v for (name, _), v in samples.items() if name == "kiri_rejected_requests_total")
    assert rejected > 100
    peak = _status_kib(served.proc.pid, "VmHWM")
    rss = _status_kib(served.proc.pid, "VmRSS")
    print(f"server RSS: warm {served.baseline_kib / 1024:.1f} MiB, after fuzz {rss / 1024:.1f} MiB, "
          f"peak {peak / 1024:.1f} MiB")  # fmt: skip
    assert peak - served.baseline_kib < RSS_HEADROOM_MIB * 1024
