"""The wire format of one site's update: what a trainer sends, the only thing that leaves a site.

    b"KIRIDELTA1\\n" | u32 little-endian header length | header JSON (UTF-8) | float32 little-endian tensors

The header names the round, site, base model, sample count, trained part and DP parameters, and lists each
tensor's name, shape and byte offset. No pickle, no npz: decoding untrusted bytes must never run code, and
every length is checked against the body before a byte is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiri_runtime.learning.errors import BadDelta, WrongShape

MAGIC = b"KIRIDELTA1\n"
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MEDIA_TYPE = "application/x-kiri-delta"


@dataclass
class Delta:
    round: int
    site: str
    samples: int
    base_sha256: str
    part: dict[str, Any]
    clip_norm: float
    noise_multiplier: float
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())


def encode(delta: Delta) -> bytes:
    entries = []
    offset = 0
    blobs = []
    for name, tensor in delta.tensors.items():
        arr = np.ascontiguousarray(tensor, dtype="<f4")
        entries.append({"name": name, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    header = {
        "round": delta.round,
        "site": delta.site,
        "samples": delta.samples,
        "baseSha256": delta.base_sha256,
        "part": delta.part,
        "clipNorm": delta.clip_norm,
        "noiseMultiplier": delta.noise_multiplier,
        "tensors": entries,
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadDelta(f"delta header: {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def decode(body: bytes) -> Delta:
    if not body.startswith(MAGIC):
        raise BadDelta("not a Kiri delta (bad magic); send the body `kiri train-edge` builds")
    start = len(MAGIC) + 4
    if len(body) < start:
        raise BadDelta("delta truncated before its header length")
    (head_len,) = struct.unpack("<I", body[len(MAGIC) : start])
    if head_len > MAX_HEADER_BYTES or start + head_len > len(body):
        raise BadDelta(f"delta header length {head_len} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[start : start + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadDelta(f"delta header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadDelta("delta header is not a JSON object")
    payload = memoryview(body)[start + head_len :]
    entries = _field(header, "tensors", list)
    if len(entries) > MAX_TENSORS:
        raise BadDelta(f"delta lists {len(entries)} tensors, more than {MAX_TENSORS}")
    tensors: dict[str, np.ndarray] = {}
    expected_offset = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadDelta("delta tensor entry is not an object")
        name = _field(entry, "name", str)
        shape = _field(entry, "shape", list)
        offset = _field(entry, "offset", int)
        nbytes = _field(entry, "nbytes", int)
        if name in tensors:
            raise BadDelta(f"delta lists tensor {name!r} twice")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape):
            raise BadDelta(f"tensor {name!r}: shape {shape} is not a list of non-negative integers")
        count = math.prod(shape)
        if nbytes != 4 * count or offset != expected_offset or offset + nbytes > len(payload):
            raise BadDelta(
                f"tensor {name!r}: {nbytes} bytes at {offset} do not match shape {shape} and the body"
            )
        tensors[name] = np.frombuffer(payload[offset : offset + nbytes], dtype="<f4").reshape(shape).copy()
        expected_offset += nbytes
    if expected_offset != len(payload):
        raise BadDelta(f"delta has {len(payload) - expected_offset} trailing bytes after its tensors")
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            raise BadDelta(f"tensor {name!r} holds NaN or infinite values")
    samples = _field(header, "samples", int)
    if samples < 1:
        raise BadDelta(f"delta reports {samples} samples; at least 1 is needed to weight it")
    return Delta(
        round=_field(header, "round", int),
        site=_field(header, "site", str),
        samples=samples,
        base_sha256=_field(header, "baseSha256", str),
        part=_field(header, "part", dict),
        clip_norm=float(_field(header, "clipNorm", (int, float))),
        noise_multiplier=float(_field(header, "noiseMultiplier", (int, float))),
        tensors=tensors,
    )


def check_shapes(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WrongShape(
            f"delta tensors do not match the round: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise WrongShape(
                f"tensor {name!r} has shape {list(tensors[name].shape)}, the round expects {list(shape)}"
            )
