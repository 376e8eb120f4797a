"""Open Inference Protocol v2 tensors and their wire codec (JSON and the binary tensor extension).

The binary extension (Triton's `binary_tensor_data`, also spoken by KServe's v2 clients) sends a JSON
header of `Inference-Header-Content-Length` bytes followed by the raw tensors in the order of the inputs
that carry `parameters.binary_data_size`. Raw tensors are little-endian, row-major; BYTES elements are each
prefixed by a 4-byte little-endian length. Outputs are binary when the request asks for it per output
(`outputs[i].parameters.binary_data`) or for all (`parameters.binary_data_output`).

Every decoding problem raises `BadRequest` with a message naming the tensor, so a client learns what to fix.
That includes hostile shapes of input: JSON nested past the parser's recursion limit, more than `MAX_DIMS`
dimensions, and non-finite floats.

Non-finite policy (the same on both codecs): a request whose FP16/FP32/FP64 input holds NaN or +-Inf, as
JSON numbers (`1e999`, strings like `"nan"`) or as raw binary bits, is refused with 400, and JSON tokens
`NaN`/`Infinity` anywhere in a request header are refused too (they are not JSON). A model can still
produce non-finite outputs from finite inputs: binary outputs carry their IEEE bits as they are, JSON
outputs carry `null` in their place, so a JSON answer never holds a non-standard `NaN` token.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kiri_runtime.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# numpy 1.x allows 32 dimensions and numpy 2.x 64; the lower bound keeps the error a 400 on either.
MAX_DIMS = 32
_FLOAT_TYPES = ("FP16", "FP32", "FP64")

DATATYPES: dict[str, npt.DTypeLike] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

_NUMPY_TO_DATATYPE = {np.dtype(t).str: name for name, t in DATATYPES.items() if name != "BYTES"}

# ONNX Runtime type strings, as `session.get_inputs()[i].type` reports them.
ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

Array = npt.NDArray[Any]
Parameters = dict[str, Any]


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Array
    parameters: Parameters = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferenceRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferenceResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


def datatype_of(array: Array) -> str:
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES"
    name = _NUMPY_TO_DATATYPE.get(array.dtype.newbyteorder("<").str)
    if name is None:
        raise BadRequest(f"numpy dtype {array.dtype} has no OIP datatype")
    return name


# ---------------------------------------------------------------- decoding


def _refuse_constant(token: str) -> Any:
    raise BadRequest(f"{token} is not JSON; non-finite numbers are refused")


def _parse_header(
    body: bytes | bytearray, header_length: int | None, strict: bool = True
) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        header_bytes, rest = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes",
            )
        header_bytes, rest = body[:header_length], memoryview(body)[header_length:]
    try:
        header = (
            json.loads(header_bytes, parse_constant=_refuse_constant) if strict else json.loads(header_bytes)
        )
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested deeper than the parser allows") from None
    if not isinstance(header, dict):
        raise BadRequest("the request body must be a JSON object")
    return header, rest


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise BadRequest(f"{where}: shape must be a list of integers")
    if len(raw) > MAX_DIMS:
        raise BadRequest(f"{where}: shape has {len(raw)} dimensions, at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in raw):
        raise BadRequest(f"{where}: shape {raw} has a negative dimension")
    return tuple(raw)


def _parameters(raw: Any, where: str) -> Parameters:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: parameters must be an object")
    return raw


def _from_json_data(data: Any, datatype: str, shape: tuple[int, ...], where: str, finite: bool) -> Array:
    if not isinstance(data, list):
        data = [data]
    count = math.prod(shape)
    try:
        if datatype == "BYTES":
            flat = _flatten(data)
            if not all(isinstance(v, str) for v in flat):
                raise BadRequest(f"{where}: BYTES data must be strings")
            array = np.empty(len(flat), dtype=np.object_)
            array[:] = [v.encode() for v in flat]
        elif datatype in _FLOAT_TYPES:
            # Numbers only: numpy would read the string "nan" or the bool true as a float.
            loose = np.asarray(data)
            if loose.dtype.kind not in "iuf":
                raise BadRequest(f"{where}: data are not {datatype}")
            with np.errstate(over="ignore"):  # an FP16 overflow becomes inf, refused just below
                array = loose.astype(DATATYPES[datatype])
            if finite:
                _check_finite(array, where)
        else:
            # numpy would silently truncate 1.5 to an integer, or read 2 as True.
            loose = np.asarray(data)
            if datatype == "UINT64" and loose.dtype.kind in "fO":
                # Python ints above 2**63 make numpy guess float64; check them as ints instead.
                flat = _flatten(data)
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
                    raise BadRequest(f"{where}: data are not {datatype}")
                loose = np.array(flat, dtype=np.uint64)
            if loose.dtype.kind not in ("b" if datatype == "BOOL" else "iu"):
                raise BadRequest(f"{where}: data are not {datatype}")
            array = loose.astype(DATATYPES[datatype])
    except BadRequest:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"{where}: data do not convert to {datatype}: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{where}: data are nested too deeply") from None
    if array.size != count:
        raise BadRequest(f"{where}: shape {list(shape)} needs {count} elements, data have {array.size}")
    return array.reshape(shape)


def _check_finite(array: Array, where: str) -> None:
    if array.size and not np.isfinite(array).all():
        raise BadRequest(f"{where}: data hold NaN or Inf (or values out of the datatype's range)")


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _from_binary(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str, finite: bool) -> Array:
    count = math.prod(shape)
    if datatype == "BYTES":
        elements = _unpack_bytes(raw, where)
        if len(elements) != count:
            raise BadRequest(
                f"{where}: shape {list(shape)} needs {count} elements, data have {len(elements)}"
            )
        array = np.empty(count, dtype=np.object_)
        array[:] = elements
        return array.reshape(shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"{where}: binary_data_size is {len(raw)} bytes but shape {list(shape)} of {datatype} "
            f"needs {count * dtype.itemsize}",
        )
    array = np.frombuffer(raw, dtype=dtype)
    if finite and datatype in _FLOAT_TYPES:
        _check_finite(array, where)
    return array.reshape(shape)


def _unpack_bytes(raw: memoryview, where: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"{where}: truncated BYTES length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"{where}: BYTES element runs past the tensor")
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    return out


def _pack_bytes(array: Array) -> bytes:
    parts = []
    for v in array.ravel():
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _decode_tensors(
    raw_list: Any, rest: memoryview, offset: int, kind: str, finite: bool = True
) -> tuple[list[Tensor], int]:
    if not isinstance(raw_list, list):
        raise BadRequest(f"{kind} must be a list")
    tensors = []
    for i, raw in enumerate(raw_list):
        if not isinstance(raw, dict):
            raise BadRequest(f"{kind}[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{kind}[{i}]: name must be a non-empty string")
        where = f"{kind[:-1]} {name!r}"
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise BadRequest(f"{where}: unknown datatype {datatype!r}")
        shape = _shape(raw.get("shape"), where)
        params = _parameters(raw.get("parameters"), where)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise BadRequest(f"{where}: has both data and binary_data_size")
            if offset + size > len(rest):
                raise BadRequest(
                    f"{where}: binary_data_size {size} runs past the {len(rest)} binary bytes in the body",
                )
            array = _from_binary(rest[offset : offset + size], datatype, shape, where, finite)
            offset += size
        else:
            if "data" not in raw:
                raise BadRequest(f"{where}: has neither data nor binary_data_size")
            array = _from_json_data(raw["data"], datatype, shape, where, finite)
        tensors.append(Tensor(name, datatype, shape, array, params))
    return tensors, offset


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferenceRequest:
    header, rest = _parse_header(body, header_length)
    inputs, used = _decode_tensors(header.get("inputs"), rest, 0, "inputs")
    if used != len(rest):
        raise BadRequest(f"the body has {len(rest)} binary bytes but the inputs declare {used}")
    outputs = []
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise BadRequest("outputs must be a list")
    for i, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest(f"outputs[{i}] must be an object with a name")
        outputs.append(
            RequestedOutput(raw["name"], _parameters(raw.get("parameters"), f"output {raw['name']!r}"))
        )
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    return InferenceRequest(inputs, outputs, request_id, _parameters(header.get("parameters"), "request"))


def decode_response(body: bytes, header_length: int | None = None) -> InferenceResponse:
    # Lenient: an answer (from the cloud runtime) may carry non-finite outputs, and older servers wrote NaN.
    header, rest = _parse_header(body, header_length, strict=False)
    outputs, _ = _decode_tensors(header.get("outputs"), rest, 0, "outputs", finite=False)
    name = header.get("model_name")
    if not isinstance(name, str):
        raise BadRequest("response has no model_name")
    return InferenceResponse(
        name,
        outputs,
        header.get("model_version"),
        header.get("id"),
        _parameters(header.get("parameters"), ""),
    )


# ---------------------------------------------------------------- encoding


def _json_data(array: Array, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    values: list[Any] = array.ravel().tolist()
    if datatype in _FLOAT_TYPES and not np.isfinite(array).all():
        # JSON has no NaN or Inf; null is standard, and numpy reads it back as NaN in a float array.
        values = [v if math.isfinite(v) else None for v in values]
    return values


def _encode_tensors(
    tensors: list[Tensor], binary: set[str] | bool
) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries, blobs = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: v for k, v in t.parameters.items() if k not in ("binary_data", "binary_data_size")}
        if binary is True or (isinstance(binary, set) and t.name in binary):
            if t.datatype == "BYTES":
                blob = _pack_bytes(t.data)
            else:
                blob = np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<")).tobytes()
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        else:
            entry["data"] = _json_data(t.data, t.datatype)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    return entries, blobs


def _assemble(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    # allow_nan=False: a non-finite float that got this far is a bug to raise, not a token to send.
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def binary_outputs(request: InferenceRequest) -> set[str] | bool:
    """Which outputs the client asked to receive as raw bytes."""
    if request.parameters.get("binary_data_output") is True:
        return True
    return {o.name for o in request.outputs if o.parameters.get("binary_data") is True}


def encode_response(response: InferenceResponse, binary: set[str] | bool = False) -> tuple[bytes, int | None]:
    """Returns the body and, when any output is binary, the JSON header length."""
    entries, blobs = _encode_tensors(response.outputs, binary)
    header: dict[str, Any] = {"model_name": response.model_name, "outputs": entries}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    return _assemble(header, blobs)


def encode_request(request: InferenceRequest, binary: bool = True) -> tuple[bytes, int | None]:
    """Encodes a request (binary inputs by default), as the cloud fallback forwards it."""
    entries, blobs = _encode_tensors(request.inputs, binary)
    header: dict[str, Any] = {"inputs": entries}
    if request.outputs:
        header["outputs"] = [{"name": o.name, "parameters": o.parameters} for o in request.outputs]
    if request.id is not None:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = request.parameters
    return _assemble(header, blobs)
