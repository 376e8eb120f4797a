"""The delta wire format: round trip, and every malformed body refused with a clear error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from kiri_runtime.learning import deltas
from kiri_runtime.learning.errors import BadDelta, WrongShape


def _delta(**tensors: np.ndarray) -> deltas.Delta:
    return deltas.Delta(
        round=3,
        site="plant-a",
        samples=42,
        base_sha256="ab" * 32,
        part={"kind": "whole", "names": [], "rank": 4},
        clip_norm=1.0,
        noise_multiplier=0.5,
        tensors=tensors or {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)},
    )


def test_round_trip_keeps_every_field_and_value() -> None:
    d = _delta()
    back = deltas.decode(deltas.encode(d))
    assert (back.round, back.site, back.samples, back.base_sha256) == (3, "plant-a", 42, "ab" * 32)
    assert back.part == d.part and back.clip_norm == 1.0 and back.noise_multiplier == 0.5
    assert list(back.tensors) == ["w", "b"]
    np.testing.assert_array_equal(back.tensors["w"], d.tensors["w"])
    assert back.nbytes() == 36


def _with_header(body: bytes, **changes: object) -> bytes:
    start = len(deltas.MAGIC) + 4
    (n,) = struct.unpack("<I", body[len(deltas.MAGIC) : start])
    header = json.loads(body[start : start + n])
    header.update(changes)
    head = json.dumps(header).encode()
    return deltas.MAGIC + struct.pack("<I", len(head)) + head + body[start + n :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"PK\x03\x04" + b[4:], "bad magic"),
        (lambda b: b[: len(deltas.MAGIC) + 2], "truncated"),
        (lambda b: deltas.MAGIC + struct.pack("<I", 1 << 30) + b[len(deltas.MAGIC) + 4 :], "header length"),
        (lambda b: deltas.MAGIC + struct.pack("<I", 3) + b"{x}", "not JSON"),
        (lambda b: b[:-4], "do not match"),
        (lambda b: b + b"\0\0\0\0", "trailing bytes"),
        (lambda b: _with_header(b, samples=0), "at least 1"),
        (lambda b: _with_header(b, samples=True), "'samples'"),
        (lambda b: _with_header(b, round="3"), "'round'"),
        (
            lambda b: _with_header(b, tensors=[{"name": "w", "shape": [-1], "offset": 0, "nbytes": 4}]),
            "shape",
        ),
    ],
)
def test_malformed_bodies_are_refused(mutate: object, message: str) -> None:
    body = deltas.encode(_delta())
    with pytest.raises(BadDelta, match=message):
        deltas.decode(mutate(body))  # type: ignore[operator]


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(BadDelta, match="NaN or infinite"):
        deltas.decode(deltas.encode(_delta(w=np.array([1.0, np.inf], np.float32))))


def test_shapes_must_match_the_round() -> None:
    t = {"w": np.zeros((2, 3), np.float32)}
    deltas.check_shapes(t, {"w": (2, 3)})
    with pytest.raises(WrongShape, match="expects"):
        deltas.check_shapes(t, {"w": (3, 2)})
    with pytest.raises(WrongShape, match="missing"):
        deltas.check_shapes(t, {"w": (2, 3), "b": (3,)})
    assert WrongShape.status == 422
