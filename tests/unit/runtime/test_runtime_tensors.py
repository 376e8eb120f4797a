"""The OIP v2 codec: JSON and binary tensors both ways, and its error messages."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from kiri_runtime.errors import BadRequest
from kiri_runtime.tensors import (
    DATATYPES,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    Tensor,
    binary_outputs,
    datatype_of,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

pytestmark = pytest.mark.timeout(10)


def test_json_request_nested_and_flat_data_agree():
    flat = {"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    nested = {"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]}]}
    for body in (flat, nested):
        req = decode_request(json.dumps(body).encode())
        (t,) = req.inputs
        assert t.data.dtype == np.float32 and t.data.shape == (2, 2)
        assert t.data.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("datatype", "values", "dtype"),
    [
        ("BOOL", [True, False], np.bool_),
        ("UINT8", [0, 255], np.uint8),
        ("INT16", [-3, 3], np.int16),
        ("UINT64", [0, 2**63], np.uint64),
        ("INT64", [-(2**62), 5], np.int64),
        ("FP16", [0.5, -2.0], np.float16),
        ("FP64", [1e-300, 3.5], np.float64),
    ],
)
def test_every_numeric_datatype_round_trips_json_and_binary(datatype, values, dtype):
    array = np.array(values, dtype=dtype)
    assert datatype_of(array) == datatype
    response = InferenceResponse("m", [Tensor("t", datatype, (2,), array)], "1", "id")
    for binary in (False, True):
        body, header_length = encode_response(response, binary)
        assert (header_length is not None) == binary
        back = decode_response(body, header_length)
        assert back.outputs[0].data.dtype == np.dtype(dtype)
        assert back.outputs[0].data.tolist() == array.tolist()
        assert back.id == "id" and back.model_version == "1"


def test_bytes_binary_layout_is_length_prefixed():
    array = np.array([b"ab", b"", "ü".encode()], dtype=np.object_)
    req = InferenceRequest([Tensor("s", "BYTES", (3,), array)])
    body, n = encode_request(req, binary=True)
    assert n is not None
    assert (
        body[n:] == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + "ü".encode()
    )
    back = decode_request(body, n)
    assert back.inputs[0].data.tolist() == [b"ab", b"", "ü".encode()]


def test_binary_and_json_inputs_mix_in_order():
    a = np.arange(6, dtype="<i4").reshape(2, 3)
    header = {
        "inputs": [
            {"name": "a", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": 24}},
            {"name": "b", "shape": [1], "datatype": "FP32", "data": [0.5]},
            {"name": "c", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
    }
    head = json.dumps(header).encode()
    req = decode_request(head + a.tobytes() + b"\x07\x09", len(head))
    assert req.inputs[0].data.tolist() == a.tolist()
    assert req.inputs[1].data.tolist() == [0.5]
    assert req.inputs[2].data.tolist() == [7, 9]
    assert binary_outputs(req) == {"y"}
    assert binary_outputs(
        InferenceRequest([], [RequestedOutput("y")], parameters={"binary_data_output": True})
    )


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{", None, "malformed JSON"),
        (b'"x"', None, "JSON object"),
        (b'{"inputs": 3}', None, "inputs must be a list"),
        (b'{"inputs": [3]}', None, "must be an object"),
        (b'{"inputs": [{"name": ""}]}', None, "non-empty string"),
        (b'{"inputs": [{"name": "a", "datatype": {}, "shape": [1], "data": [1]}]}', None, "unknown datatype"),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            "needs 2 elements",
        ),
        (b'{"inputs": [{"name": "a", "datatype": "INT8", "shape": [1], "data": [true]}]}', None, "not INT8"),
        (b'{"inputs": [{"name": "a", "datatype": "BOOL", "shape": [1], "data": [2]}]}', None, "not BOOL"),
        (b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [2]}]}', None, "strings"),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1], "parameters": 1}]}',
            None,
            "parameters",
        ),
        (b'{"inputs": [], "id": 5}', None, "id must be a string"),
        (b'{"inputs": [], "outputs": [{}]}', None, "outputs[0]"),
        (b'{"inputs": []}', 99, "body has"),
        (b'{"inputs": []}', -1, "body has"),
    ],
)
def test_decode_errors_name_the_problem(body, header_length, message):
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_request(body, header_length)


def test_binary_size_checks():
    header = {
        "inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]
    }
    head = json.dumps(header).encode()
    assert decode_request(head + bytes(8), len(head)).inputs[0].data.tolist() == [0, 0]
    with pytest.raises(BadRequest, match="runs past"):
        decode_request(head + bytes(7), len(head))
    with pytest.raises(BadRequest, match="declare 8"):
        decode_request(head + bytes(9), len(head))
    header["inputs"][0]["data"] = [1, 2]
    head = json.dumps(header).encode()
    with pytest.raises(BadRequest, match="both data and binary_data_size"):
        decode_request(head + bytes(8), len(head))
    bad = {
        "inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]
    }
    head = json.dumps(bad).encode()
    with pytest.raises(BadRequest, match="runs past the tensor"):
        decode_request(head + struct.pack("<I", 9) + b"ab", len(head))


# ---------------------------------------------------------------- hostile input (issue 19)


def _fp32(data: object, shape: list[int] | None = None) -> bytes:
    tensor = {"name": "a", "datatype": "FP32", "shape": shape or [1], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


def test_json_nested_past_the_parsers_recursion_limit_is_a_bad_request():
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="nested deeper than the parser allows"):
        decode_request(body)


def test_data_nested_deeper_than_numpy_allows_is_a_bad_request():
    data: object = [0.5]
    for _ in range(200):
        data = [data]
    with pytest.raises(BadRequest, match="data do not convert to FP32"):
        decode_request(_fp32(data, [1] * 30))


@pytest.mark.parametrize("dims", [33, 65, 1000])
def test_a_shape_with_more_dimensions_than_numpy_allows_is_a_bad_request(dims):
    with pytest.raises(BadRequest, match=f"shape has {dims} dimensions, at most 32 are allowed"):
        decode_request(_fp32([0.5], [1] * dims))


def test_thirty_two_dimensions_still_decode():
    assert decode_request(_fp32([0.5], [1] * 32)).inputs[0].data.shape == (1,) * 32


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', "NaN is not JSON"),
        (b'{"inputs": [], "parameters": {"t": -Infinity}}', "-Infinity is not JSON"),
        # json reads an overflowing literal as inf
        (
            b'{"inputs": [{"name": "a", "datatype": "FP64", "shape": [1], "data": [1e999]}]}',
            "hold NaN or Inf",
        ),
        (_fp32(["nan"]), "data are not FP32"),  # numpy would read the string as NaN
        (_fp32([True]), "data are not FP32"),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP16", "shape": [1], "data": [70000.0]}]}',
            "out of the datatype's range",
        ),
    ],
)
def test_non_finite_json_inputs_are_refused(body, message):
    with pytest.raises(BadRequest, match=re.escape(message)):
        decode_request(body)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_binary_inputs_are_refused(datatype, value):
    raw = np.array([1.0, value], dtype=DATATYPES[datatype]).astype(
        "<" + np.dtype(DATATYPES[datatype]).str[1:]
    )
    header = {
        "inputs": [
            {"name": "a", "datatype": datatype, "shape": [2], "parameters": {"binary_data_size": raw.nbytes}}
        ]
    }
    head = json.dumps(header).encode()
    with pytest.raises(BadRequest, match="input 'a': data hold NaN or Inf"):
        decode_request(head + raw.tobytes(), len(head))


def test_non_finite_outputs_are_null_in_json_and_raw_bits_in_binary():
    values = np.array([0.25, np.nan, np.inf, -np.inf], dtype=np.float32)
    response = InferenceResponse("m", [Tensor("y", "FP32", (4,), values)])
    body, header_length = encode_response(response)
    assert header_length is None
    assert b"NaN" not in body and b"Infinity" not in body
    assert json.loads(body)["outputs"][0]["data"] == [0.25, None, None, None]
    body, header_length = encode_response(response, binary=True)
    assert header_length is not None
    raw = np.frombuffer(body[header_length:], dtype="<f4")
    assert raw[0] == 0.25 and np.isnan(raw[1]) and raw[2] == np.inf and raw[3] == -np.inf


def test_a_cloud_answer_with_non_finite_outputs_still_decodes():
    body = (
        b'{"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [NaN, 1]}]}'
    )
    data = decode_response(body).outputs[0].data
    assert np.isnan(data[0]) and data[1] == 1.0


def test_an_error_message_quoting_a_huge_field_is_cut_short():
    body = json.dumps({"inputs": [{"name": "a", "datatype": "X" * 100_000, "shape": [1], "data": [1]}]})
    with pytest.raises(BadRequest) as caught:
        decode_request(body.encode())
    assert len(caught.value.message) == 1003 and caught.value.message.endswith("...")
