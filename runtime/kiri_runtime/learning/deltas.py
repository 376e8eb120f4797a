"""The wire format of one site's update: what a trainer sends, the only thing that leaves a site.

The body is a safetensors file (https://huggingface.co/docs/safetensors): a u64 little-endian header length,
a JSON header naming each tensor's dtype, shape and byte range, then the tensors. Every tensor is float32
(`F32`). The header's `__metadata__` holds one entry, `kiri.delta`: a JSON object naming the round, site,
base model, sample count, trained part and DP parameters. Decoding untrusted bytes never runs code
(safetensors holds no pickle), the header is bounded and parsed before any tensor is read, and the
safetensors library checks that the byte ranges tile the body exactly. Tensors come back sorted by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from kiri_runtime.learning.errors import BadDelta, WrongShape

HEADER_LENGTH_BYTES = 8  # safetensors: the header's length, u64 little-endian, comes first
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
METADATA_KEY = "kiri.delta"
TENSOR_DTYPE = "F32"
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


def max_body_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The largest body a round with these update shapes accepts: the float32 payload and a bounded header."""
    payload = sum(4 * int(np.prod(s)) for s in shapes.values())
    return payload + HEADER_LENGTH_BYTES + MAX_HEADER_BYTES


def encode(delta: Delta) -> bytes:
    header = {
        "round": delta.round,
        "site": delta.site,
        "samples": delta.samples,
        "baseSha256": delta.base_sha256,
        "part": delta.part,
        "clipNorm": delta.clip_norm,
        "noiseMultiplier": delta.noise_multiplier,
    }
    tensors = {name: np.ascontiguousarray(t, dtype="<f4") for name, t in delta.tensors.items()}
    metadata = {METADATA_KEY: json.dumps(header, separators=(",", ":"), sort_keys=True)}
    body: bytes = safetensors.numpy.save(tensors, metadata=metadata)
    return body


# A site's update is weighted by the samples it says it trained on; no edge site holds a billion examples.
MAX_SAMPLES = 1_000_000_000


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadDelta(f"delta header: {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _json_object(text: bytes | str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadDelta(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadDelta(f"{what} is not a JSON object")
    return value


def _safetensors_header(body: bytes) -> dict[str, Any]:
    """The safetensors header, checked before the library reads a byte of the tensors."""
    if len(body) < HEADER_LENGTH_BYTES:
        raise BadDelta("delta truncated before its header length")
    head_len = int.from_bytes(body[:HEADER_LENGTH_BYTES], "little")
    if head_len > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + head_len > len(body):
        raise BadDelta(f"delta header length {head_len} does not fit a body of {len(body)} bytes")
    return _json_object(body[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + head_len], "delta header")


def decode(body: bytes) -> Delta:
    header = _safetensors_header(body)
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not isinstance(metadata.get(METADATA_KEY), str):
        raise BadDelta(
            f"not a Kiri delta (safetensors without {METADATA_KEY!r} metadata); send the body `kiri train-edge` builds"
        )
    if len(header) > MAX_TENSORS:
        raise BadDelta(f"delta lists {len(header)} tensors, more than {MAX_TENSORS}")
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype != TENSOR_DTYPE:
            raise BadDelta(
                f"tensor {name!r} has dtype {dtype!r}; a delta holds {TENSOR_DTYPE} (float32) tensors"
            )
    try:
        loaded = safetensors.numpy.load(body)
    except Exception as e:  # the library's SafetensorError names what does not fit: offsets, lengths, shapes
        raise BadDelta(f"delta is not valid safetensors: {e}") from None
    tensors = {name: np.asarray(loaded[name], dtype=np.float32) for name in sorted(loaded)}
    for name, t in tensors.items():
        if not np.isfinite(t).all():
            raise BadDelta(f"tensor {name!r} holds NaN or infinite values")
    info = _json_object(metadata[METADATA_KEY], f"delta metadata {METADATA_KEY!r}")
    samples = _field(info, "samples", int)
    if samples < 1:
        raise BadDelta(f"delta reports {samples} samples; at least 1 is needed to weight it")
    if samples > MAX_SAMPLES:
        # Self-reported and unchecked otherwise: 10**400 overflowed the weighting after the round closed.
        raise BadDelta(
            f"delta reports {str(samples)[:20]}... samples; at most {MAX_SAMPLES} are taken"
            if len(str(samples)) > 20
            else f"delta reports {samples} samples; at most {MAX_SAMPLES} are taken"
        )
    return Delta(
        round=_field(info, "round", int),
        site=_field(info, "site", str),
        samples=samples,
        base_sha256=_field(info, "baseSha256", str),
        part=_field(info, "part", dict),
        clip_norm=float(_field(info, "clipNorm", (int, float))),
        noise_multiplier=float(_field(info, "noiseMultiplier", (int, float))),
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
