"""Carry a GGUF's own quantized blocks into a builder-made model (`transcode`), and the build to make first (`plan_for`).

A GGUF that is already quantized is not quantized again: build the dequantised checkpoint with `plan_for`'s precision
and options (int4, block 32, q/k/v as separate projections, embedding table not shared with lm_head), then
`transcode` rewrites each MatMulNBits node's B, scales, zero_points and bits/block_size attributes from the GGUF
tensor of the same projection (reblocking.py has the per-type arithmetic), and writes the token embedding (a float
Gather in that graph) as the GGUF's values dequantised exactly. GGUF names map to the builder's nodes:

  blk.N.attn_q|attn_k|attn_v|attn_output.weight -> /model/layers.N/attn/q_proj|k_proj|v_proj|o_proj/MatMul
  blk.N.ffn_gate|ffn_up|ffn_down.weight          -> /model/layers.N/mlp/gate_proj|up_proj|down_proj/MatMul
  output.weight (token_embd.weight when tied)    -> /lm_head/MatMul;  token_embd.weight -> the embedding Gather

llama.cpp stores q and k rows permuted for its rotary layout (architecture "llama"); a permutation of output rows
keeps each row's K-dimension blocks whole, so the blocks are reordered, not recomputed. A fused q|k|v node takes the
three tensors stacked when they have one layout. A tensor whose type cannot be carried keeps the builder's own int4
blocks and is reported in `Transcoded.requantized` (the gate then judges the variant like any other).

Measured on the tiny test LLaMA (tests/lm_fixture.py: hidden 128, 2 layers, vocab 512; teacher-forced KL mean
over 320 positions against the dequantised model under HF transformers fp32; sizes of the whole directory):

  GGUF                 GGUF bytes  transcoded  KL (accuracy 4)  KL (accuracy 1)  | builder int4 of the dequantised model
  Q4_0                 255 616     382 004     0.00003          < 1e-7           | 597 771, KL 0.00003 (RTN finds Q4_0's blocks)
  Q4_1                 282 240     438 524     < 1e-7           < 1e-7           | 597 771, KL 0.0046
  Q8_0                 468 608     594 141     0.00003          < 1e-7           | 597 771, KL 0.0045
  Q4_0 + Q4_K ffn_down 255 616     390 570     0.00002          < 1e-7           | 597 771, KL 0.0003
  Q8_0 + Q6_K ffn_down 452 736     606 803     0.00003          < 1e-7           | 597 771, KL 0.0045

(Figures above: float32 scales, before min form.) Since then (same model, KL against the full model over the
bench's 1,524 held-out positions, sizes of the packed tar, docs/benchmarks.md):
  - **float16 scales**: scales and mins that float16 holds exactly (every Q4_0/Q4_1/Q8_0 scale, Q4_1's m) are stored
    as float16 with a Cast in front (halving.half_scales, exact_only), which onnxruntime folds into float32
    initializers when the session starts: the same numbers at run time, the GGUF's bytes per weight on disk (Q4_0 18
    per 32, Q4_1 20, Q8_0 34). K-quant scales d*sc_j and mins dmin*m_j are products that float16 does not hold
    exactly and stay float32 (Q4_K 24 vs 18, Q6_K 42 vs 26.25).
  - **min form** (`mins_form`, default): a float zero point sends MatMulNBits to a slow float32 path (Q4_1 701 tok/s
    vs Q4_0 8,447 in one run). Q4_1/Q4_K are rewritten exactly as the integer default zero point plus a per-block
    correction: W = (q - 8)*s + (m + 8s), so x @ W^T = MatMulNBits(x) + blocksum(x) @ (m + 8s)^T (reblocking.min_form,
    `_min_corrections`). Q4_1 then decodes at 4,838 tok/s (llama.cpp 4,711), KL 0.01204 (float form 0.01199,
    llama.cpp 0.01203; the difference is accuracy level 4's int8 activations). At accuracy 1 it matches the
    dequantised model to KL < 1e-6.
  - the rotary tables are computed in the graph and the JSON is unindented (compacting.py, run by the build).
Tiny model, packed: Q4_0 278,528 bytes (GGUF 255,584), Q4_1 332,288 (GGUF 282,208); the difference is the
tokenizer, graph and configs (~40 KB) that do not grow with the weights.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import reblocking
from kiri_runtime.compressing.lm.reblocking import NBits

PERMUTED_ARCHITECTURES = frozenset({"llama"})
PROJECTIONS = {
    "attn_q": "attn/q_proj",
    "attn_k": "attn/k_proj",
    "attn_v": "attn/v_proj",
    "attn_output": "attn/o_proj",
    "ffn_gate": "mlp/gate_proj",
    "ffn_up": "mlp/up_proj",
    "ffn_down": "mlp/down_proj",
}
ACCURACY_LEVEL = 4
"""MatMulNBits' compute type for a transcoded variant: 4 (activations quantized to int8 per block, as llama.cpp's
q8 dot products). bench_lm.py, same run against llama.cpp on the same files (docs/benchmarks.md): accuracy 1
(float32) lowers KL on the tiny trained model (Q4_0 0.01524 vs 0.01539 at 4, llama.cpp 0.01537) but not on the
41.7M model (Q4_0 0.01380 vs 0.01378, llama.cpp 0.01378), where it decodes at about half the speed (Q4_1 206 vs 334
tok/s, llama.cpp 343). So 4 stays the default and 1 is the next candidate when a gate asks for more (running.py)."""
EXACT_ACCURACY_LEVEL = 1
"""float32 compute: the GGUF's weights to float rounding (KL < 1e-6 against the dequantised model)."""
_GGUF_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_SUFFIX = re.compile(r"_Q\d+$")


@dataclass(frozen=True)
class Transcoded:
    tensors: int  # MatMulNBits weights replaced by the GGUF's own blocks
    by_type: Mapping[str, int] = field(default_factory=dict)  # ggml type -> count
    requantized: tuple[
        str, ...
    ] = ()  # GGUF tensors whose type cannot be carried (kept as the builder quantized)


def carried(tensor_types: Mapping[str, str]) -> dict[str, str]:
    """The projection tensors (2-D weights of MatMuls and the embedding) whose GGUF type transcoding carries."""
    return {n: t for n, t in tensor_types.items() if t in reblocking.CARRIED and _is_weight(n)}


def plan_for(tensor_types: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """What to build before transcoding: a graph whose MatMulNBits nodes can take the GGUF's blocks.

    int4 block 32 symmetric (every carried type is 32-weight blocks, or 16 for Q6_K, which transcode sets per
    node), q/k/v apart (a GGUF may give them different types), the embedding a float Gather of its own.
    """
    del tensor_types  # one plan fits every mix: transcode sets bits/block per node
    return (
        "int4",
        {
            "blockSize": 32,
            "symmetric": True,
            "fuseQkv": False,
            "int8Embeddings": True,
            "embeddingBits": 32,  # the float Gather that transcode replaces with the GGUF's embedding blocks
            "halfScales": False,  # transcode writes float32 scales, then stores those float16 holds exactly as such
            "accuracyLevel": ACCURACY_LEVEL,  # transcode sets it on every node it rewrites; the manifest records it
        },
    )


def transcode(
    gguf_path: Path, model_dir: Path, accuracy_level: int = ACCURACY_LEVEL, *, mins_form: bool = True
) -> Transcoded:
    """Rewrite model_dir/model.onnx(.data) in place so its projections compute with the GGUF's own weights.

    accuracy_level: MatMulNBits' compute type (4: activations quantized to int8 per block, the CPU default, fast;
    1: float32, the GGUF's weights to float rounding; nodes with float zero points compute in float32 either way).
    """
    import onnx
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (OSError, ValueError) as e:
        raise CompressionError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    tensors = {t.name: t for t in reader.tensors}
    arch = _field(reader, "general.architecture") or "llama"
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    path = model_dir / "model.onnx"
    if not path.is_file():
        raise CompressionError(f"{model_dir} has no model.onnx to transcode into")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    by_type: dict[str, int] = {}
    requantized: list[str] = []
    done = 0
    lm_head = None
    mins: dict[str, str] = {}

    def blocks(name: str) -> NBits | None:
        t = tensors[name]
        qtype = t.tensor_type.name
        if qtype not in reblocking.CARRIED:
            return None
        w = reblocking.decode(np.asarray(t.data, dtype=np.uint8), qtype)
        match = _GGUF_NAME.match(name)
        role = match.group(2) if match else ""
        if arch in PERMUTED_ARCHITECTURES and role in ("attn_q", "attn_k") and heads:
            count = int(heads if role == "attn_q" else kv_heads)
            w = reblocking.take_rows(w, reblocking.llama_unpermute(w.shape[0], count))
        return w

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        names = _gguf_names(_SUFFIX.sub("", node.name), tensors)
        if not names:
            continue
        parts = [blocks(n) for n in names]
        if any(p is None for p in parts) or len({p.layout() for p in parts if p is not None}) != 1:
            requantized += [n for n in names if n not in requantized]
            continue
        weight = reblocking.concat_rows([p for p in parts if p is not None])
        mins_name = _rewrite(onnx, model, node, inits, weight, accuracy_level, mins_form)
        if mins_name:
            mins[node.name] = mins_name
        done += 1
        if names == ["token_embd.weight"]:
            lm_head = node
        for n in names:
            qtype = tensors[n].tensor_type.name
            by_type[qtype] = by_type.get(qtype, 0) + 1
    if "token_embd.weight" in tensors:
        embedding = blocks("token_embd.weight")
        shared = lm_head if "output.weight" not in tensors else None
        shared_mins = mins.get(shared.name, "") if shared is not None else ""
        if _embedding(onnx, model, inits, embedding, shared, shared_mins, mins_form):
            qtype = tensors["token_embd.weight"].tensor_type.name
            by_type[qtype] = by_type.get(qtype, 0) + 1
    _min_corrections(model, inits, mins)
    from kiri_runtime.compressing.lm.halving import half_scales, scale_names

    half_scales(model, inits, scale_names(model), exact_only=True)
    _save(onnx, model, model_dir)
    return Transcoded(tensors=done, by_type=dict(sorted(by_type.items())), requantized=tuple(requantized))


def _is_weight(name: str) -> bool:
    match = _GGUF_NAME.match(name)
    return name in ("output.weight", "token_embd.weight") or bool(match and match.group(2) in PROJECTIONS)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def _gguf_names(node: str, tensors: Mapping[str, Any]) -> list[str]:
    """The GGUF tensors a builder MatMulNBits node computes (three for a fused q|k|v), or [] if none."""
    if node == "/lm_head/MatMul":
        name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        return [name] if name in tensors else []
    match = re.match(r"^/model/layers\.(\d+)/(\w+/\w+)/MatMul$", node)
    if not match:
        return []
    layer, part = match.groups()
    if part == "attn/qkv_proj":
        names = [f"blk.{layer}.{role}.weight" for role in ("attn_q", "attn_k", "attn_v")]
    else:
        roles = [role for role, p in PROJECTIONS.items() if p == part]
        names = [f"blk.{layer}.{role}.weight" for role in roles]
    return names if names and all(n in tensors for n in names) else []


def _rewrite(
    onnx: Any, model: Any, node: Any, inits: dict[str, Any], w: NBits, accuracy_level: int, mins_form: bool
) -> str:
    """The node computes with w's blocks; a float-zero-point w in min form when `mins_form` (returns the mins'
    initializer name then, else "")."""
    from onnx import numpy_helper

    attrs = {a.name: a for a in node.attribute}
    n, k = int(attrs["N"].i), int(attrs["K"].i)
    if w.shape != (n, k):
        raise CompressionError(
            f"{node.name}: GGUF tensor is {w.shape[0]}x{w.shape[1]}, the graph's node {n}x{k}"
        )
    scales_init = inits[node.input[2]]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(scales_init.data_type)
    mins_name = ""
    if mins_form and w.zero_points is not None and w.zero_points.dtype != np.uint8:
        w, mins = reblocking.min_form(w)
        mins_name = node.input[1].rsplit("_Q", 1)[0] + "_mins"
        _replace(inits, mins_name, numpy_helper.from_array(mins.astype(dtype), mins_name), model)
    _replace(inits, node.input[1], numpy_helper.from_array(reblocking.pack_b(w), node.input[1]))
    _replace(inits, node.input[2], numpy_helper.from_array(w.scales.astype(dtype), node.input[2]))
    zp = reblocking.pack_zero_points(w)
    inputs = list(node.input)
    while len(inputs) < 4:
        inputs.append("")
    if zp is None:
        inputs[3] = ""
    else:
        zp_name = inputs[3] or node.input[1].rsplit("_Q", 1)[0] + "_zero_points"
        values = zp.astype(dtype) if zp.dtype != np.uint8 else zp
        _replace(inits, zp_name, numpy_helper.from_array(values, zp_name), model)
        inputs[3] = zp_name
    while inputs and inputs[-1] == "":
        inputs.pop()
    del node.input[:]
    node.input.extend(inputs)
    attrs["bits"].i = w.bits
    attrs["block_size"].i = w.block_size
    if "accuracy_level" in attrs:
        attrs["accuracy_level"].i = accuracy_level
    return mins_name


def _min_corrections(model: Any, inits: dict[str, Any], mins: Mapping[str, str]) -> None:
    """After each min-form MatMulNBits node: Y = MatMulNBits(A) + blocksum(A) @ (mins + z*scales)^T.

    blocksum(A) [batch, seq, K/bs] = ReduceSum over Reshape(A, [batch, seq, K/bs, bs]), one per (A, bs) however
    many nodes read A; (mins + z*scales)^T is a constant that onnxruntime folds when the session starts.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    p = "/block_mins/"
    if not mins:
        return
    const: dict[str, np.ndarray[Any, Any]] = {
        p + "axes": np.array([-1], dtype=np.int64),
        p + "z4": np.array(8, dtype=np.float32),
        p + "z8": np.array(128, dtype=np.float32),
    }
    for name, value in const.items():
        _replace(inits, name, numpy_helper.from_array(value, name), model)
    sums: dict[tuple[str, int], str] = {}
    head: list[Any] = []
    i = 0
    while i < len(graph.node):
        node = graph.node[i]
        if node.name not in mins:
            i += 1
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, bs, bits = attrs["K"], attrs["block_size"], attrs["bits"]
        a, scales, y = node.input[0], node.input[2], node.output[0]
        before: list[Any] = []
        key = (a, bs)
        if key not in sums:
            q = f"{p}s{len(sums)}/"  # short names: the graph is stored beside the weights
            shape = q + "shape"
            _replace(
                inits, shape, numpy_helper.from_array(np.array([0, 0, k // bs, bs], np.int64), shape), model
            )
            before = [
                helper.make_node("Reshape", [a, shape], [q + "blocks"], name=q + "Reshape"),
                helper.make_node(
                    "ReduceSum", [q + "blocks", p + "axes"], [q + "sums"], keepdims=0, name=q + "Sum"
                ),
            ]
            sums[key] = q + "sums"
        n = f"{p}{len(head) // 3}/"
        head += [
            helper.make_node("Mul", [scales, f"{p}z{bits}"], [n + "zs"], name=n + "ZeroPointTimesScale"),
            helper.make_node("Add", [mins[node.name], n + "zs"], [n + "offsets"], name=n + "Offsets"),
            helper.make_node(
                "Transpose", [n + "offsets"], [n + "offsets_t"], perm=[1, 0], name=n + "Transpose"
            ),
        ]
        node.output[0] = n + "nbits"
        after = [
            helper.make_node("MatMul", [sums[key], n + "offsets_t"], [n + "correction"], name=n + "MatMul"),
            helper.make_node("Add", [n + "nbits", n + "correction"], [y], name=n + "Add"),
        ]
        for offset, new in enumerate(before):
            graph.node.insert(i + offset, new)
        i += len(before) + 1
        for offset, new in enumerate(after):
            graph.node.insert(i + offset, new)
        i += len(after)
    for offset, new in enumerate(head):
        graph.node.insert(offset, new)


def _replace(inits: dict[str, Any], name: str, tensor: Any, model: Any = None) -> None:
    old = inits.get(name)
    if old is None:
        if model is None:
            raise CompressionError(f"initializer {name} not found in the built graph")
        model.graph.initializer.append(tensor)
        inits[name] = model.graph.initializer[-1]
        return
    old.CopyFrom(tensor)


def _embedding(
    onnx: Any,
    model: Any,
    inits: dict[str, Any],
    w: NBits | None,
    shared: Any,
    shared_mins: str = "",
    mins_form: bool = False,
) -> bool:
    """The embedding Gather becomes Gather of the GGUF's blocks then (q - zp) * scale, the MatMulNBits formula
    (in min form, `mins_form` and float zero points: q * scale + mins, reblocking.min_form).

    The table keeps the GGUF's size (plus its scales); `shared` is the lm_head node that holds the same blocks
    (a tied GGUF), whose B/scales/zero_points (or `shared_mins`) the Gather then reads too. False when the graph
    has no float Gather.
    """
    from onnx import TensorProto, helper, numpy_helper

    if w is None:
        return False
    graph = model.graph
    index = next(
        (
            i
            for i, n in enumerate(graph.node)
            if n.op_type == "Gather" and n.name.endswith("embed_tokens/Gather")
        ),
        None,
    )
    if index is None or graph.node[index].input[0] not in inits:
        return False
    node = graph.node[index]
    table_name, ids, out = node.input[0], node.input[1], node.output[0]
    table = inits[table_name]
    vocab, hidden = (int(d) for d in table.dims)
    if w.shape != (vocab, hidden):
        raise CompressionError(
            f"token_embd.weight is {w.shape[0]}x{w.shape[1]}, the graph's embedding {vocab}x{hidden}"
        )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(table.data_type)
    kb = hidden // w.block_size
    p = "/model/embed_tokens/dequantize/"
    mins_name = ""
    if mins_form and w.zero_points is not None and w.zero_points.dtype != np.uint8:
        w, mins = reblocking.min_form(w)
        mins_name = table_name + "_mins"
    if shared is not None and len(shared.input) > 2:
        b_name, s_name = shared.input[1], shared.input[2]
        zp_name = shared.input[3] if len(shared.input) > 3 else ""
        if mins_name:
            if not shared_mins:
                raise CompressionError("a tied embedding in min form needs its lm_head in min form too")
            mins_name = shared_mins
    else:
        b_name, s_name = table_name + "_Q", table_name + "_scales"
        _replace(inits, b_name, numpy_helper.from_array(reblocking.pack_b(w), b_name), model)
        _replace(inits, s_name, numpy_helper.from_array(w.scales.astype(dtype), s_name), model)
        if mins_name:
            _replace(inits, mins_name, numpy_helper.from_array(mins.astype(dtype), mins_name), model)
        zp = reblocking.pack_zero_points(w)
        zp_name = ""
        if zp is not None:
            zp_name = table_name + "_zero_points"
            _replace(
                inits,
                zp_name,
                numpy_helper.from_array(zp.astype(dtype) if zp.dtype != np.uint8 else zp, zp_name),
                model,
            )
    consts: dict[str, np.ndarray[Any, Any]] = {
        p + "mask": np.array(0x0F, dtype=np.uint8),
        p + "four": np.array(4, dtype=np.uint8),
        p + "last": np.array([-1], dtype=np.int64),
        p + "blocks": np.array([0, 0, kb, w.block_size], dtype=np.int64),
        p + "rows": np.array([0, 0, hidden], dtype=np.int64),
        p + "default_zp": np.array(2 ** (w.bits - 1), dtype=dtype),
    }
    for name, value in consts.items():
        _replace(inits, name, numpy_helper.from_array(value, name), model)
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gather", [b_name, ids], [p + "packed"], name=p + "GatherB")]
    if w.bits == 4:
        nodes += [
            helper.make_node("BitwiseAnd", [p + "packed", p + "mask"], [p + "low"], name=p + "Low"),
            helper.make_node(
                "BitShift", [p + "packed", p + "four"], [p + "high"], direction="RIGHT", name=p + "High"
            ),
            helper.make_node("Unsqueeze", [p + "low", p + "last"], [p + "low1"], name=p + "LowAxis"),
            helper.make_node("Unsqueeze", [p + "high", p + "last"], [p + "high1"], name=p + "HighAxis"),
            helper.make_node("Concat", [p + "low1", p + "high1"], [p + "pairs"], axis=-1, name=p + "Pairs"),
            helper.make_node("Reshape", [p + "pairs", p + "blocks"], [p + "q"], name=p + "Blocks"),
        ]
    else:
        nodes.append(helper.make_node("Reshape", [p + "packed", p + "blocks"], [p + "q"], name=p + "Blocks"))
    nodes += [
        helper.make_node("Cast", [p + "q"], [p + "qf"], to=to, name=p + "CastQ"),
        helper.make_node("Gather", [s_name, ids], [p + "scale"], name=p + "GatherScales"),
        helper.make_node("Unsqueeze", [p + "scale", p + "last"], [p + "scale1"], name=p + "ScaleAxis"),
    ]
    if mins_name:
        nodes += [
            helper.make_node("Gather", [mins_name, ids], [p + "mins"], name=p + "GatherMins"),
            helper.make_node("Unsqueeze", [p + "mins", p + "last"], [p + "mins1"], name=p + "MinsAxis"),
            helper.make_node("Mul", [p + "qf", p + "scale1"], [p + "scaled"], name=p + "Mul"),
            helper.make_node("Add", [p + "scaled", p + "mins1"], [p + "w"], name=p + "AddMins"),
            helper.make_node("Reshape", [p + "w", p + "rows"], [out], name=p + "Rows"),
        ]
        zp_value = ""
    elif zp_name:
        nodes += [
            helper.make_node("Gather", [zp_name, ids], [p + "zp_raw"], name=p + "GatherZeroPoints"),
            helper.make_node("Cast", [p + "zp_raw"], [p + "zp"], to=to, name=p + "CastZeroPoints"),
            helper.make_node("Unsqueeze", [p + "zp", p + "last"], [p + "zp1"], name=p + "ZeroPointAxis"),
        ]
        zp_value = p + "zp1"
    else:
        zp_value = p + "default_zp"
    if zp_value:
        nodes += [
            helper.make_node("Sub", [p + "qf", zp_value], [p + "centered"], name=p + "Sub"),
            helper.make_node("Mul", [p + "centered", p + "scale1"], [p + "w"], name=p + "Mul"),
            helper.make_node("Reshape", [p + "w", p + "rows"], [out], name=p + "Rows"),
        ]
    if w.bits == 4 and zp_name and inits[zp_name].data_type == TensorProto.UINT8:
        raise CompressionError("packed 4-bit integer zero points are not used by any carried GGUF type")
    del graph.node[index]
    for offset, new in enumerate(nodes):
        graph.node.insert(index + offset, new)
    if not any(table_name in n.input for n in graph.node):
        graph.initializer.remove(table)
        del inits[table_name]
    return True


def _save(onnx: Any, model: Any, model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".transcode-") as tmp:
        staged = Path(tmp) / "model.onnx"
        onnx.save_model(
            model, str(staged), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
        )
        (model_dir / "model.onnx.data").unlink(missing_ok=True)
        (Path(tmp) / "model.onnx.data").replace(model_dir / "model.onnx.data")
        staged.replace(model_dir / "model.onnx")
