"""Make a built onnxruntime-genai model smaller without changing what it computes at run time (`compact`).

Three rewrites of model.onnx, each keeping the graph the runtime executes the same or numerically equivalent,
because onnxruntime folds constant subgraphs (a Cast or Mul of initializers) into initializers when the session
is created, before MatMulNBits prepacks its weights:

  * **float16 storage of scales** (`half`): a float32 initializer that MatMulNBits (or the embedding's
    dequantisation) reads as scales, zero points or per-block mins is stored as float16 with a Cast in front.
    With `exact_only` only tensors that float16 holds exactly are converted (a GGUF's Q4_0/Q4_1/Q8_0 scales are
    float16 already, so nothing changes); otherwise every one is rounded to float16 (the builder's own int4: the
    scales llama.cpp would store).
  * **rotary caches computed** (`rotary`): the builder writes cos_cache/sin_cache [positions, rotary_dim/2] as
    float32 tables (positions x rotary_dim x 4 bytes; 64 KB for the tiny test model, 1 MB for a 2k-context
    model with head size 128, 16 MB for 32k). They are cos/sin of position x inv_freq (times a constant mscale),
    so they become Range -> Mul -> Cos/Sin from the [rotary_dim/2] frequencies, checked against the tables
    (max error <= ROTARY_TOLERANCE or the tables stay).
  * **no padding** (`tidy`): tokenizer.json and the other JSON files written without indentation (the same JSON;
    the tiny model's tokenizer.json goes from 22 KB to 9 KB), and the graph without its value_info (shapes that
    onnxruntime infers again) and doc strings.
  * **quantized token embedding** (`embedding`): a float32 Gather table becomes blocks of `bits` (4 or 8,
    symmetric round-to-nearest, block 32, like llama.cpp's Q4_0/Q8_0) and the dequantisation that
    transcoding.py writes for a GGUF's embedding (Gather of the rows' blocks, then (q - zp) * scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.compressing.lm import reblocking
from kiri_runtime.compressing.lm.halving import half_scales, scale_names

ROTARY_TOLERANCE = 2e-5
EMBEDDING_BLOCK = 32


@dataclass(frozen=True)
class Compacted:
    halved: int  # initializers now stored as float16
    rotary: bool  # cos/sin caches replaced by their formula
    embedding_bits: int | None  # the token embedding's new width, None when left as it was


def compact(
    model_dir: Path,
    *,
    half: bool = True,
    exact_only: bool = False,
    rotary: bool = True,
    embedding_bits: int | None = None,
    tidy: bool = True,
) -> Compacted:
    """Rewrite model_dir/model.onnx(.data) in place (see the module docstring)."""
    import onnx

    from kiri_runtime.compressing.lm import transcoding

    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    embedded = None
    if embedding_bits is not None:
        embedded = embedding_bits if quantize_embedding(model, inits, embedding_bits) else None
    rot = replace_rotary(model, inits) if rotary else False
    halved = half_scales(model, inits, scale_names(model), exact_only=exact_only) if half else 0
    if tidy:
        del model.graph.value_info[:]
        model.doc_string = ""
        for node in model.graph.node:
            node.doc_string = ""
        minify_json(model_dir)
    transcoding._save(onnx, model, model_dir)
    return Compacted(halved=halved, rotary=rot, embedding_bits=embedded)


def minify_json(model_dir: Path) -> None:
    """Every top-level *.json file rewritten without indentation (same content, same key order)."""
    import json

    for path in sorted(model_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def replace_rotary(model: Any, inits: dict[str, Any]) -> bool:
    """cos_cache/sin_cache initializers -> mscale * cos|sin(Range(positions) x inv_freq), when that reproduces them."""
    from onnx import helper, numpy_helper

    if "cos_cache" not in inits or "sin_cache" not in inits:
        return False
    cos = numpy_helper.to_array(inits["cos_cache"]).astype(np.float64)
    sin = numpy_helper.to_array(inits["sin_cache"]).astype(np.float64)
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[0] < 2 or inits["cos_cache"].data_type != 1:
        return False
    positions = cos.shape[0]
    mscale = float(np.float32(cos[0, 0]))
    if mscale <= 0 or not np.allclose(cos[0], mscale) or not np.allclose(sin[0], 0):
        return False
    # The frequency from position 1, refined at the last position (its angle pins it to ~1 ulp / positions).
    f1 = np.arctan2(sin[1], cos[1])
    last = positions - 1
    angle = np.arctan2(sin[last], cos[last])
    turns = np.round((last * f1 - angle) / (2 * np.pi))
    inv_freq = ((angle + 2 * np.pi * turns) / last).astype(np.float32)
    t = np.arange(positions, dtype=np.float32)[:, None]
    got_cos = np.cos(t * inv_freq[None, :]) * np.float32(mscale)
    got_sin = np.sin(t * inv_freq[None, :]) * np.float32(mscale)
    if max(np.abs(got_cos - cos).max(), np.abs(got_sin - sin).max()) > ROTARY_TOLERANCE:
        return False
    p = "/rotary/"
    consts = {
        p + "start": np.array(0, dtype=np.float32),
        p + "limit": np.array(positions, dtype=np.float32),
        p + "delta": np.array(1, dtype=np.float32),
        p + "axis": np.array([1], dtype=np.int64),
        p + "inv_freq": inv_freq.reshape(1, -1),
    }
    if mscale != 1.0:
        consts[p + "mscale"] = np.array(mscale, dtype=np.float32)
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    nodes = [
        helper.make_node("Range", [p + "start", p + "limit", p + "delta"], [p + "t"], name=p + "Range"),
        helper.make_node("Unsqueeze", [p + "t", p + "axis"], [p + "t1"], name=p + "Column"),
        helper.make_node("Mul", [p + "t1", p + "inv_freq"], [p + "freqs"], name=p + "Freqs"),
    ]
    for which, op in (("cos", "Cos"), ("sin", "Sin")):
        raw = p + which
        nodes.append(helper.make_node(op, [p + "freqs"], [raw], name=p + op))
        if mscale == 1.0:
            nodes.append(helper.make_node("Identity", [raw], [f"{which}_cache"], name=p + op + "Out"))
        else:
            nodes.append(
                helper.make_node("Mul", [raw, p + "mscale"], [f"{which}_cache"], name=p + op + "Scaled")
            )
    for name in ("cos_cache", "sin_cache"):
        model.graph.initializer.remove(inits.pop(name))
    for offset, node in enumerate(nodes):
        model.graph.node.insert(offset, node)
    return True


def quantize_embedding(model: Any, inits: dict[str, Any], bits: int) -> bool:
    """The float embedding table as `bits`-bit symmetric blocks of 32 (RTN), dequantised after the Gather."""
    import onnx
    from onnx import numpy_helper

    from kiri_runtime.compressing.lm import transcoding

    gather = next(
        (n for n in model.graph.node if n.op_type == "Gather" and n.name.endswith("embed_tokens/Gather")),
        None,
    )
    if gather is None or gather.input[0] not in inits:
        return False
    table = numpy_helper.to_array(inits[gather.input[0]])
    if table.ndim != 2 or table.shape[1] % EMBEDDING_BLOCK:
        return False
    w = rtn_blocks(table.astype(np.float32), bits)
    return transcoding._embedding(onnx, model, inits, w, None)


def rtn_blocks(table: np.ndarray[Any, Any], bits: int) -> reblocking.NBits:
    """Symmetric round-to-nearest blocks of 32 along the rows, as llama.cpp's Q4_0 (bits 4) or Q8_0 (bits 8):
    the scale maps the block's largest-magnitude value to -2^(bits-1) (Q4_0) or its magnitude to 127 (Q8_0)."""
    n, k = table.shape
    blocks = table.reshape(n, k // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    if bits == 4:
        idx = np.abs(blocks).argmax(axis=-1)
        peak = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
        d = (peak / -8).astype(np.float16).astype(np.float32)
        safe = np.where(d == 0, np.float32(1), d)
        q = np.clip(np.round(blocks / safe[..., None]) + 8, 0, 15)
    elif bits == 8:
        d = (np.abs(blocks).max(axis=-1) / 127).astype(np.float16).astype(np.float32)
        safe = np.where(d == 0, np.float32(1), d)
        q = np.clip(np.round(blocks / safe[..., None]) + 128, 1, 255)
    else:
        raise ValueError(f"embedding bits must be 4 or 8, got {bits}")
    return reblocking.NBits(bits, EMBEDDING_BLOCK, q.astype(np.uint8).reshape(n, k), d, None)
