"""Make a built onnxruntime-genai model LoRA-ready (`add_lora_inputs`): every targeted projection gains the inputs
that onnxruntime-genai's adapters feed (kiri_runtime/lora_layouts.py says which and how they are named).

Why not the model builder's `adapter_path`: it bakes one adapter's A and B into the graph as initializers (its
`make_matmul_lora`: MatMul(x, A), MatMul(., B * scaling), Add), which makes a merged variant per adapter, not a
base that takes adapters at run time; at int4 it would also quantize the adapter's MatMuls. Olive's
ExtractAdapters pass turns those initializers into inputs afterwards; this does the same in one step on any build
(fp32, int8, int4: the projection's MatMul or MatMulNBits is left untouched, the branch is added beside it), with
empty defaults (rank 0) so the model still runs without an adapter and answers exactly as before.

Per projection, with x its input and y its output:

    y_base = MatMul/MatMulNBits(x, W)           (the builder's node, its output renamed)
    y_a    = MatMul(x, <prefix>.lora_A)         [.., r]
    y_b    = MatMul(y_a, <prefix>.lora_B)       [.., out]
    y      = Add(y_base, y_b)

Only model.onnx is rewritten (the weights in model.onnx.data are not read or moved); lora.json is written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.lora_layouts import LAYOUT_FILE, LoraLayout, Projection

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def add_lora_inputs(model_dir: Path, targets: Sequence[str]) -> LoraLayout:
    """Rewrite `model_dir`/model.onnx in place so that adapters on `targets` (Hugging Face projection names) load."""
    import onnx

    unknown = sorted(set(targets) - set(ATTENTION) - set(MLP))
    if unknown or not targets:
        raise CompressionError(
            f"LoRA targets {unknown or '(none)'}: choose from {', '.join(ATTENTION + MLP)}"
        )
    if (model_dir / LAYOUT_FILE).exists():
        raise CompressionError(f"{model_dir} is LoRA-ready already ({LAYOUT_FILE})")
    path = model_dir / "model.onnx"
    try:
        genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]
        decoder = genai["decoder"]
        layers = int(decoder["num_hidden_layers"])
        q_width = int(decoder["num_attention_heads"]) * int(decoder["head_size"])
        kv_width = int(decoder["num_key_value_heads"]) * int(decoder["head_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressionError(f"{model_dir}: no usable genai_config.json: {e}") from None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output if out}
    inits = {i.name: i for i in graph.initializer}
    projections: list[Projection] = []
    for layer in range(layers):
        for path_, parts in _candidates(layer, targets, producers, q_width, kv_width):
            node = producers[f"/model/layers.{layer}/{path_}/MatMul/output_0"]
            k, n = _matmul_shape(node, inits)
            if len(parts) == 1:
                parts = ((parts[0][0], 0, n),)
            elif sum(w for _, _, w in parts) != n:
                raise CompressionError(
                    f"{node.name}: {n} outputs, not the q|k|v widths {[w for *_, w in parts]}"
                )
            projections.append(Projection(layer, path_, k, n, parts))
    if not projections:
        raise CompressionError(f"{model_dir}: no projection of {', '.join(targets)} found in model.onnx")
    # Keyed by node name (the builder's names are unique); the branch goes right after its projection.
    branches = {producers[p.output].name: _branch(graph, producers[p.output], p) for p in projections}
    nodes: list[Any] = []
    for node in graph.node:
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        nodes += [kept, *branches.get(node.name, [])]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    layout = LoraLayout(tuple(targets), tuple(projections))
    layout.save(model_dir)
    return layout


def _candidates(
    layer: int, targets: Sequence[str], producers: dict[str, Any], q_width: int, kv_width: int
) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
    def exists(path: str) -> bool:
        return f"/model/layers.{layer}/{path}/MatMul/output_0" in producers

    found: list[tuple[str, tuple[tuple[str, int, int], ...]]] = []
    qkv = [t for t in ("q_proj", "k_proj", "v_proj") if t in targets]
    if qkv and exists("attn/qkv_proj"):
        # A fused projection takes any of the three (block-diagonal B); the targets say what the base was made for.
        found.append(
            (
                "attn/qkv_proj",
                (
                    ("q_proj", 0, q_width),
                    ("k_proj", q_width, kv_width),
                    ("v_proj", q_width + kv_width, kv_width),
                ),
            )
        )
    else:
        for t in qkv:
            if not exists(f"attn/{t}"):
                raise CompressionError(f"layer {layer}: no attn/{t} MatMul in model.onnx")
            found.append((f"attn/{t}", ((t, 0, -1),)))  # its width: the MatMul's N
    for t in targets:
        if t in ("q_proj", "k_proj", "v_proj"):
            continue
        path = f"attn/{t}" if t in ATTENTION else f"mlp/{t}"
        if not exists(path):
            raise CompressionError(
                f"layer {layer}: no {path} MatMul in model.onnx (a fused MLP is not supported)"
            )
        found.append((path, ((t, 0, -1),)))
    return found


def _matmul_shape(node: Any, inits: dict[str, Any]) -> tuple[int, int]:
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return int(attrs["K"]), int(attrs["N"])
    if node.op_type == "MatMul" and node.input[1] in inits:
        dims = list(inits[node.input[1]].dims)
        if len(dims) == 2:
            return int(dims[0]), int(dims[1])
    raise CompressionError(f"{node.name}: a {node.op_type} whose weight shape is unknown; cannot adapt it")


def _branch(graph: Any, node: Any, p: Projection) -> list[Any]:
    """The nodes that follow `node` (whose output is renamed), the inputs and their empty defaults added."""
    from onnx import TensorProto, helper

    out = p.output
    base_out = f"/model/layers.{p.layer}/{p.path}/lora/base_output_0"
    node.output[0] = base_out
    x = node.input[0]
    stem = f"/model/layers.{p.layer}/{p.path}/lora"
    a_out, b_out = f"{stem}/MatMul_A/output_0", f"{stem}/MatMul_B/output_0"
    new_nodes = [
        helper.make_node("MatMul", [x, p.a], [a_out], name=f"{stem}/MatMul_A"),
        helper.make_node("MatMul", [a_out, p.b], [b_out], name=f"{stem}/MatMul_B"),
        helper.make_node("Add", [base_out, b_out], [out], name=f"{stem}/Add"),
    ]
    graph.input.extend(
        [
            helper.make_tensor_value_info(p.a, TensorProto.FLOAT, [p.in_features, p.rank_dim]),
            helper.make_tensor_value_info(p.b, TensorProto.FLOAT, [p.rank_dim, p.out_features]),
        ]
    )
    # Empty defaults: an input with an initializer of its name is optional (IR >= 4); rank 0 adds zeros.
    graph.initializer.extend(
        [
            helper.make_tensor(p.a, TensorProto.FLOAT, [p.in_features, 0], []),
            helper.make_tensor(p.b, TensorProto.FLOAT, [0, p.out_features], []),
        ]
    )
    return new_nodes
