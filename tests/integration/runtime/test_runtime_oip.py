"""OIP v2 over real HTTP with real ONNX Runtime: health, metadata, JSON and binary tensors, the documented
KServe/Triton examples, and Triton's own Python HTTP client."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import CLASSES, FEATURES, _save, multi_type_model, reference_probs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def documented_model(path: Path) -> Path:
    """The `mymodel` of the KServe/Triton protocol docs: input0 UINT32[2,2], input1 BOOL[3] ->
    output0 FP32[3,2] (the documented constants) and output1 = input0 - 1 (the documented [0,1,2,3])."""
    c = np.array([[1.0, 1.1], [2.0, 2.1], [3.0, 3.1]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["input1", "axis1"], ["cond"]),
            helper.make_node("Where", ["cond", "C", "C"], ["output0"]),
            helper.make_node("Sub", ["input0", "one"], ["output1"]),
        ],
        "mymodel",
        [
            helper.make_tensor_value_info("input0", TensorProto.UINT32, [2, 2]),
            helper.make_tensor_value_info("input1", TensorProto.BOOL, [3]),
        ],
        [
            helper.make_tensor_value_info("output0", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("output1", TensorProto.UINT32, [2, 2]),
        ],
        [
            numpy_helper.from_array(c, "C"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array(1, dtype=np.uint32), "one"),
        ],
    )
    return _save(graph, path)


def test_health_and_metadata(serve, classifier):
    server = serve(classifier[0], name="clf", model_version="3", variant="int8")
    url = server.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{url}/v2").json()
    assert meta["name"] == "kiri" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(f"{url}/v2/models/clf").json()
    assert model["versions"] == ["3"]
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert model["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, CLASSES]}]
    assert model["parameters"]["kiri_variant"] == "int8"
    assert httpx.get(f"{url}/v2/models/clf/versions/3").status_code == 200
    assert httpx.get(f"{url}/v2/models/clf/ready").json() == {"name": "clf", "ready": True}
    assert httpx.get(f"{url}/v2/models/clf/versions/3/ready").status_code == 200
    missing = httpx.get(f"{url}/v2/models/clf/versions/9/ready")
    assert missing.status_code == 404 and "version" in missing.json()["error"]
    assert httpx.get(f"{url}/v2/models/nope").status_code == 404
    assert "error" in httpx.get(f"{url}/v2/nowhere").json()


def test_json_infer_matches_onnx_math(serve, classifier):
    path, w, b = classifier
    server = serve(path)
    x = np.random.default_rng(1).standard_normal((5, FEATURES)).astype(np.float32)
    body = {
        "id": "r1",
        "inputs": [{"name": "x", "shape": [5, FEATURES], "datatype": "FP32", "data": x.tolist()}],
    }
    reply = httpx.post(f"{server.url}/v2/models/clf/infer", json=body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["id"] == "r1" and out["model_name"] == "clf" and out["model_version"] == "1"
    assert out["parameters"]["kiri_tier"] == "edge"
    (probs,) = out["outputs"]
    assert probs["name"] == "probs" and probs["datatype"] == "FP32" and probs["shape"] == [5, CLASSES]
    np.testing.assert_allclose(
        np.array(probs["data"]).reshape(5, CLASSES), reference_probs(x, w, b), rtol=1e-5
    )
    versioned = httpx.post(f"{server.url}/v2/models/clf/versions/1/infer", json=body)
    assert versioned.status_code == 200


def test_documented_kserve_json_example(serve, tmp_path):
    server = serve(documented_model(tmp_path / "mymodel.onnx"), name="mymodel")
    # The KServe v2 doc's request, with input1's data made to match its shape [3].
    request = {
        "id": "42",
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
        ],
        "outputs": [{"name": "output0"}],
    }
    reply = httpx.post(f"{server.url}/v2/models/mymodel/infer", json=request)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["id"] == "42"
    assert [o["name"] for o in out["outputs"]] == ["output0"]
    assert out["outputs"][0]["shape"] == [3, 2] and out["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(out["outputs"][0]["data"], [1.0, 1.1, 2.0, 2.1, 3.0, 3.1], rtol=1e-6)


def test_documented_triton_binary_example(serve, tmp_path):
    server = serve(documented_model(tmp_path / "mymodel.onnx"), name="mymodel")
    header = {
        "model_name": "mymodel",
        "inputs": [
            {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "parameters": {"binary_data_size": 16}},
            {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
        ],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}, {"name": "output1"}],
    }
    head = json.dumps(header).encode()
    body = head + np.array([1, 2, 3, 4], dtype="<u4").tobytes()
    reply = httpx.post(
        f"{server.url}/v2/models/mymodel/infer",
        content=body,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    )
    assert reply.status_code == 200, reply.text
    n = int(reply.headers["Inference-Header-Content-Length"])
    out = json.loads(reply.content[:n])
    out0, out1 = out["outputs"]
    assert out0["name"] == "output0" and out0["parameters"] == {"binary_data_size": 24} and "data" not in out0
    assert out1 == {"name": "output1", "datatype": "UINT32", "shape": [2, 2], "data": [0, 1, 2, 3]}
    assert len(reply.content) == n + 24
    np.testing.assert_allclose(
        np.frombuffer(reply.content[n:], dtype="<f4"), [1.0, 1.1, 2.0, 2.1, 3.0, 3.1], rtol=1e-6
    )


def test_bytes_int64_and_bool_both_encodings(serve, tmp_path):
    server = serve(multi_type_model(tmp_path / "multi.onnx"), name="multi")
    url = f"{server.url}/v2/models/multi/infer"
    words = ["edge", "", "クラウド"]
    json_req = {
        "inputs": [
            {"name": "ids", "shape": [3], "datatype": "INT64", "data": [1, -2, 2**40]},
            {"name": "text", "shape": [3], "datatype": "BYTES", "data": words},
            {"name": "flags", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        ]
    }
    out = {o["name"]: o for o in httpx.post(url, json=json_req).json()["outputs"]}
    assert out["ids_out"]["data"] == [1, -2, 2**40]
    assert out["text_out"]["datatype"] == "BYTES" and out["text_out"]["data"] == words
    assert out["flags_out"]["data"] == [False, True]

    text_blob = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    ids_blob = np.array([7, 8, 9], dtype="<i8").tobytes()
    header = {
        "inputs": [
            {
                "name": "ids",
                "shape": [3],
                "datatype": "INT64",
                "parameters": {"binary_data_size": len(ids_blob)},
            },
            {
                "name": "text",
                "shape": [3],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(text_blob)},
            },
            {"name": "flags", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    reply = httpx.post(
        url,
        content=head + ids_blob + text_blob + b"\x00\x01",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert reply.status_code == 200, reply.text
    n = int(reply.headers["Inference-Header-Content-Length"])
    outs = json.loads(reply.content[:n])["outputs"]
    sizes = [o["parameters"]["binary_data_size"] for o in outs]
    blobs, pos = {}, n
    for o, size in zip(outs, sizes, strict=True):
        blobs[o["name"]] = reply.content[pos : pos + size]
        pos += size
    assert np.frombuffer(blobs["ids_out"], dtype="<i8").tolist() == [7, 8, 9]
    assert blobs["text_out"] == text_blob
    assert blobs["flags_out"] == b"\x01\x00"


def test_tritonclient_http(serve, classifier):
    httpclient = pytest.importorskip("tritonclient.http")
    path, w, b = classifier
    server = serve(path)
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("clf")
        meta = client.get_model_metadata("clf")
        assert meta["inputs"][0]["name"] == "x"
        x = np.random.default_rng(2).standard_normal((3, FEATURES)).astype(np.float32)
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = httpclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                out = httpclient.InferRequestedOutput("probs", binary_data=binary_out)
                result = client.infer("clf", [inp], outputs=[out], request_id="t1")
                np.testing.assert_allclose(result.as_numpy("probs"), reference_probs(x, w, b), rtol=1e-5)
                assert result.get_response()["parameters"]["kiri_tier"] == "edge"
    finally:
        client.close()
