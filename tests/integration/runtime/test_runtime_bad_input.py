"""Bad input gets a 4xx with OIP error JSON, and the server keeps serving."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest
from runtime_helpers import FEATURES, metric_samples, sample

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GOOD = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}


def _binary(header: dict, blob: bytes, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if declared is None else declared
    return head + blob, {"Inference-Header-Content-Length": str(length)}


CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = []


def case(
    label: str, path: str, body: bytes | dict, status: int, needle: str, headers: dict | None = None
) -> None:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    CASES.append((label, path, raw, headers or {}, status, needle))


def x_input(**over: object) -> dict:
    return {"inputs": [{**GOOD["inputs"][0], **over}]}


case("malformed json", "clf", b'{"inputs": [', 400, "malformed JSON")
case("not an object", "clf", b"[1, 2]", 400, "JSON object")
case("unknown model", "nope", GOOD, 404, "not served")
case("unknown datatype", "clf", x_input(datatype="FP8"), 400, "unknown datatype")
case("wrong datatype", "clf", x_input(datatype="INT64", data=[1, 2, 3, 4]), 400, "expects FP32")
case("float data for INT", "clf", x_input(datatype="INT32", data=[1.5, 2, 3, 4]), 400, "not INT32")
case("string data for FP32", "clf", x_input(data=["a", "b", "c", "d"]), 400, "FP32")
case("element count", "clf", x_input(data=[0.1, 0.2, 0.3]), 400, "needs 4 elements")
case("wrong shape", "clf", x_input(shape=[2, 2]), 400, "does not match")
case("wrong rank", "clf", x_input(shape=[4]), 400, "does not match")
case("negative dim", "clf", x_input(shape=[-1, 4]), 400, "negative")
case("shape not ints", "clf", x_input(shape=["1", 4]), 400, "list of integers")
case("ragged data", "clf", x_input(data=[[0.1, 0.2], [0.3]]), 400, "FP32")
case("unknown input", "clf", x_input(name="y"), 400, "unexpected input")
case("missing inputs", "clf", {"inputs": []}, 400, "missing inputs")
case("no data", "clf", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, 400, "neither data")
case("unknown output", "clf", {**GOOD, "outputs": [{"name": "zz"}]}, 400, "unknown outputs")
case(
    "bad header length",
    "clf",
    json.dumps(GOOD).encode(),
    400,
    "must be an integer",
    {"Inference-Header-Content-Length": "abc"},
)
case(
    "header longer than body",
    "clf",
    json.dumps(GOOD).encode(),
    400,
    "body has",
    {"Inference-Header-Content-Length": "99999"},
)
good_bin = x_input(parameters={"binary_data_size": 16})
del good_bin["inputs"][0]["data"]
body, headers = _binary(good_bin, b"\x00" * 12)
case("binary size past the body", "clf", body, 400, "runs past", headers)
body, headers = _binary(good_bin, b"\x00" * 20)
case("extra binary bytes", "clf", body, 400, "declare", headers)
bad_size = x_input(parameters={"binary_data_size": 8})
del bad_size["inputs"][0]["data"]
body, headers = _binary(bad_size, b"\x00" * 8)
case("binary size vs shape", "clf", body, 400, "needs 16", headers)
body, headers = _binary(good_bin, b"\x00" * 16, declared=5)
case("header length mid-json", "clf", body, 400, "malformed JSON", headers)
case("oversized body", "clf", b"{" + b" " * 300_000 + b"}", 413, "limit")
# Hostile shapes of input that once answered 500 (issue 19).
case(
    "json nested 50k deep", "clf", b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "nested deeper"
)
case("33 dimensions", "clf", x_input(shape=[1] * 33, data=[0.5]), 400, "at most 32")
case(
    "NaN token",
    "clf",
    json.dumps(x_input(data=[0.1, float("nan"), 0.3, 0.4])).encode(),
    400,
    "NaN is not JSON",
)
case("overflowing literal", "clf", json.dumps(GOOD).replace("0.4", "1e999").encode(), 400, "NaN or Inf")
case("nan as a string", "clf", x_input(data=[0.1, "nan", 0.3, 0.4]), 400, "not FP32")
body, headers = _binary(good_bin, np.array([0.1, np.inf, 0.3, 0.4], dtype="<f4").tobytes())
case("binary Inf", "clf", body, 400, "NaN or Inf", headers)


@pytest.mark.parametrize(
    ("label", "model", "body", "headers", "status", "needle"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_clear_4xx(serve, classifier, label, model, body, headers, status, needle):
    server = serve(classifier[0], max_body_bytes=200_000)
    reply = httpx.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers)
    assert reply.status_code == status, reply.text
    assert needle in reply.json()["error"]
    assert httpx.post(f"{server.url}/v2/models/clf/infer", json=GOOD).status_code == 200


def _mutations(rng: random.Random) -> bytes:
    good = json.dumps(GOOD).encode()
    kind = rng.randrange(6)
    if kind == 0:  # truncate
        return good[: rng.randrange(len(good))]
    if kind == 1:  # flip bytes
        b = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    if kind == 3:  # type confusion in one field
        doc = json.loads(good)
        field = rng.choice(["name", "shape", "datatype", "data", "parameters"])
        doc["inputs"][0][field] = rng.choice([None, 7, -3, "x", [], {}, [[[]]], True, 1e308, ["FP32"]])
        return json.dumps(doc).encode()
    if kind == 4:  # huge or odd shapes
        doc = json.loads(good)
        doc["inputs"][0]["shape"] = [
            rng.choice([0, 1, 2**31, 2**62, 10**6]) for _ in range(rng.randint(0, 4))
        ]
        return json.dumps(doc).encode()
    doc = json.loads(good)  # top-level junk
    doc[rng.choice(["inputs", "outputs", "id", "parameters"])] = rng.choice([None, 5, "s", {}, [1], [{}]])
    return json.dumps(doc).encode()


def test_fuzz_then_a_good_request_succeeds(serve, classifier):
    server = serve(classifier[0], max_body_bytes=200_000)
    rng = random.Random(1234)
    url = f"{server.url}/v2/models/clf/infer"
    statuses: dict[int, int] = {}
    with httpx.Client() as client:
        for i in range(400):
            headers = {}
            if i % 5 == 0:
                headers["Inference-Header-Content-Length"] = str(rng.randint(-5, 400))
            reply = client.post(url, content=_mutations(rng), headers=headers)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (reply.status_code, reply.text)
            if reply.status_code != 200:
                assert isinstance(reply.json()["error"], str)
        x = np.array([[0.5, -0.5, 1.0, 2.0]], dtype=np.float32)
        good = {
            "inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        final = client.post(url, json=good)
    assert final.status_code == 200
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) > 300
    samples = metric_samples(server.url)
    # Junk is the client's doing: counted apart, never in the series the error-ratio gates read.
    assert sample(samples, "kiri_rejected_requests_total", model="clf", code="400") == statuses[400]
    assert sample(samples, "kiri_requests_total", model="clf", code="200") == 1 + statuses.get(200, 0)
    assert [labels for name, labels in samples if name == "kiri_requests_total"] == [
        frozenset({("model", "clf"), ("code", "200")})
    ]
