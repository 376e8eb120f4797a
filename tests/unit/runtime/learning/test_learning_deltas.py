"""The delta wire format (safetensors): round trip, and every malformed body refused with a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import safetensors.numpy

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


def _header(body: bytes) -> dict[str, object]:
    n = int.from_bytes(body[:8], "little")
    header: dict[str, object] = json.loads(body[8 : 8 + n])
    return header


def _info(body: bytes) -> dict[str, object]:
    metadata = _header(body)["__metadata__"]
    assert isinstance(metadata, dict)
    info: dict[str, object] = json.loads(metadata[deltas.METADATA_KEY])
    return info


def _with_info(body: bytes, **changes: object) -> bytes:
    info = _info(body) | changes
    tensors = safetensors.numpy.load(body)
    return bytes(safetensors.numpy.save(tensors, metadata={deltas.METADATA_KEY: json.dumps(info)}))


def test_round_trip_keeps_every_field_and_value() -> None:
    d = _delta()
    back = deltas.decode(deltas.encode(d))
    assert (back.round, back.site, back.samples, back.base_sha256) == (3, "plant-a", 42, "ab" * 32)
    assert back.part == d.part and back.clip_norm == 1.0 and back.noise_multiplier == 0.5
    assert list(back.tensors) == ["b", "w"]  # sorted by name, as safetensors stores them
    np.testing.assert_array_equal(back.tensors["w"], d.tensors["w"])
    np.testing.assert_array_equal(back.tensors["b"], d.tensors["b"])
    assert back.nbytes() == 36


def test_the_body_is_plain_safetensors_any_reader_can_open() -> None:
    body = deltas.encode(_delta())
    tensors = safetensors.numpy.load(body)
    assert sorted(tensors) == ["b", "w"]
    assert tensors["w"].dtype == np.float32 and tensors["w"].shape == (2, 3)
    header = _header(body)
    assert header["w"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]}
    assert _info(body) == {
        "baseSha256": "ab" * 32,
        "clipNorm": 1.0,
        "noiseMultiplier": 0.5,
        "part": {"kind": "whole", "names": [], "rank": 4},
        "round": 3,
        "samples": 42,
        "site": "plant-a",
    }
    # What crosses the wire beyond the tensors is the header only.
    assert len(body) == 8 + int.from_bytes(body[:8], "little") + 36


def test_max_body_bytes_is_the_float32_payload_plus_a_bounded_header() -> None:
    assert deltas.max_body_bytes({"w": (2, 3), "b": (3,)}) == 36 + 8 + deltas.MAX_HEADER_BYTES


def _plain(tensors: dict[str, np.ndarray], **metadata: str) -> bytes:
    return bytes(safetensors.numpy.save(tensors, metadata=metadata or None))


MALFORMED: list[tuple[Callable[[bytes], bytes], str]] = [
    (lambda b: b"PK\x03", "truncated before its header length"),
    (lambda b: b[:7], "truncated before its header length"),
    (lambda b: b[:12], "header length"),
    (lambda b: (1 << 40).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: (3).to_bytes(8, "little") + b"{x}", "delta header is not JSON"),
    (lambda b: (2).to_bytes(8, "little") + b"[]", "delta header is not a JSON object"),
    (lambda b: b[:-4], "not valid safetensors"),
    (lambda b: b + b"\0\0\0\0", "not valid safetensors"),
    (lambda b: _plain({"w": np.zeros(3, np.float32)}), "not a Kiri delta"),
    (lambda b: _plain({"w": np.zeros(3, np.float32)}, other="x"), "not a Kiri delta"),
    (lambda b: _plain({"w": np.zeros(3, np.float64)}, **{deltas.METADATA_KEY: "{}"}), "dtype 'F64'"),
    (lambda b: _plain({"w": np.zeros(3, np.float16)}, **{deltas.METADATA_KEY: "{}"}), "dtype 'F16'"),
    (lambda b: _plain({"w": np.zeros(3, np.int32)}, **{deltas.METADATA_KEY: "{}"}), "dtype 'I32'"),
    (lambda b: _plain({"w": np.zeros(3, np.float32)}, **{deltas.METADATA_KEY: "{x"}), "metadata .* not JSON"),
    (lambda b: _with_info(b, samples=0), "at least 1"),
    (lambda b: _with_info(b, samples=True), "'samples'"),
    (lambda b: _with_info(b, round="3"), "'round'"),
    (lambda b: _with_info(b, site=None), "'site'"),
    (lambda b: _with_info(b, part=[]), "'part'"),
]


@pytest.mark.parametrize(("mutate", "message"), MALFORMED)
def test_malformed_bodies_are_refused_with_a_bad_delta(
    mutate: Callable[[bytes], bytes], message: str
) -> None:
    body = deltas.encode(_delta())
    with pytest.raises(BadDelta, match=message) as caught:
        deltas.decode(mutate(body))
    assert caught.value.status == 400


def test_a_shape_that_does_not_fit_its_byte_range_is_refused() -> None:
    body = deltas.encode(_delta(w=np.zeros((2, 3), np.float32)))
    n = int.from_bytes(body[:8], "little")
    head = body[8 : 8 + n].replace(b'"shape":[2,3]', b'"shape":[3,3]')
    assert head != body[8 : 8 + n]
    with pytest.raises(BadDelta, match="not valid safetensors"):
        deltas.decode(body[:8] + head + body[8 + n :])


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
    with pytest.raises(WrongShape, match=r"unexpected \['w'\]"):
        deltas.check_shapes(t, {"v": (2, 3)})
    assert WrongShape.status == 422
