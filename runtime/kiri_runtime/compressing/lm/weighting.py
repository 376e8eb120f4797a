"""`algorithm: imatrix`: 4-bit blocks whose scales minimise the activation-weighted rounding error (`requantize`).

Round-to-nearest picks each block's scale from its largest weight. llama.cpp's quantizers instead search the scale
that minimises a weighted squared error over the block, and with an importance matrix ("imatrix") weigh each input
channel by how large its activations are on calibration text: an error on a channel that carries large inputs
costs more output error. This module does that for MatMulNBits' symmetric 4-bit blocks (w = (q - 8) * scale, the
format the builder writes and llama.cpp's Q4_0 has), as llama.cpp's `make_qx_quants` with `quant_weights`:

* importance: mean x^2 per input channel of each projection's input, over the eval data's tokens, measured with
  forward hooks on the reference model under torch (`importance`);
* per block of 32, weight_j = importance_j * sqrt(sigma^2 + w_j^2) (sigma^2 the block's mean w^2, llama.cpp's
  form), and for 19 candidate inverse scales -(8 + 0.1 i) / max (i = -9..9; max the block's signed
  largest-magnitude weight) the codes q = clamp(round(w * iscale), -8, 7) and the least-squares scale
  sum(weight q w) / sum(weight q^2); the candidate with the smallest weighted error wins (`search_blocks`).

`requantize` takes a builder int4 model built with float32 scales (`halfScales: false`), rewrites every 4-bit
MatMulNBits node's codes and scales from the reference model's weights (q/k/v concatenated when fused), leaves
8-bit nodes (int8LmHead, int8Tensors) as built, then stores the scales as float16 when asked. The bytes are those
of round-to-nearest; only the values change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import reblocking

BLOCK = 32
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+_proj)/MatMul(?:_Q\d+)?$")
_QKV = ("q_proj", "k_proj", "v_proj")


def importance(model: Any, samples: Sequence[Sequence[int]]) -> dict[str, np.ndarray[Any, Any]]:
    """Mean x^2 per input channel of every nn.Linear's input over the samples' tokens, by module name."""
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + int(x.shape[0])

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for ids in samples:
                model(torch.tensor([list(ids)], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / max(counts[name], 1)).numpy().astype(np.float64) for name in sums}


def search_blocks(w: np.ndarray[Any, Any], imp: np.ndarray[Any, Any] | None) -> reblocking.NBits:
    """w [N, K] as symmetric 4-bit blocks of 32 (zero point 8) with the weighted-error-minimising scales."""
    n, k = w.shape
    if k % BLOCK:
        raise CompressionError(f"imatrix: K={k} is not a multiple of {BLOCK}")
    x = w.astype(np.float64).reshape(n, k // BLOCK, BLOCK)
    sigma2 = (x * x).mean(axis=-1, keepdims=True)
    channel = np.ones(k) if imp is None else np.maximum(imp, 1e-12)
    weight = channel.reshape(1, k // BLOCK, BLOCK) * np.sqrt(sigma2 + x * x)
    idx = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, idx[..., None], axis=-1)  # signed largest-magnitude weight
    safe_peak = np.where(peak == 0, 1.0, peak)
    best_err = np.full(x.shape[:2], np.inf)
    best_q = np.zeros(x.shape, dtype=np.int8)
    best_scale = np.zeros(x.shape[:2])
    for i in range(-9, 10):
        iscale = -(8 + 0.1 * i) / safe_peak
        q = np.clip(np.round(x * iscale), -8, 7)
        sumlx = (weight * q * x).sum(axis=-1)
        suml2 = (weight * q * q).sum(axis=-1)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
        err = (weight * (x - scale[..., None] * q) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_q = np.where(better[..., None], q, best_q).astype(np.int8)
    codes = (best_q.astype(np.int16) + 8).astype(np.uint8).reshape(n, k)
    return reblocking.NBits(4, BLOCK, codes, best_scale.astype(np.float32), None)


def _weights(model: Any, node: str) -> tuple[np.ndarray[Any, Any], str] | None:
    """The reference weight [N, K] behind a builder MatMulNBits node, and the module whose input it reads."""
    modules = dict(model.named_modules())
    if node.startswith("/lm_head/MatMul"):
        head = model.get_output_embeddings()
        name = next((n for n, m in modules.items() if m is head), "lm_head")
        return head.weight.detach().float().numpy(), name
    match = _NODE.match(node)
    if match is None:
        return None
    layer, part, proj = match.groups()
    block = "self_attn" if part == "attn" else "mlp"
    prefix = next((n for n in modules if n.endswith(f"layers.{layer}.{block}")), None)
    if prefix is None:
        return None
    names = [f"{prefix}.{p}" for p in _QKV] if proj == "qkv_proj" else [f"{prefix}.{proj}"]
    if not all(n in modules for n in names):
        return None
    stacked = np.concatenate([modules[n].weight.detach().float().numpy() for n in names])
    return stacked, names[0]


def requantize(
    model_dir: Path,
    torch_model: Any,
    imp: dict[str, np.ndarray[Any, Any]],
    *,
    half: bool,
    accuracy_level: int = 4,
) -> int:
    """Rewrite model_dir's 4-bit MatMulNBits blocks with `search_blocks`; returns how many nodes changed."""
    import onnx

    from kiri_runtime.compressing.lm import transcoding
    from kiri_runtime.compressing.lm.halving import half_scales, scale_names

    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("bits") != 4 or node.input[2] not in inits:
            continue
        found = _weights(torch_model, node.name)
        if found is None:
            continue
        w, source = found
        nbits = search_blocks(w, imp.get(source))
        transcoding._rewrite(onnx, model, node, inits, nbits, accuracy_level, False)
        done += 1
    if done == 0:
        raise CompressionError("imatrix: no 4-bit projection of the built model matched the reference model")
    if half:
        half_scales(model, inits, scale_names(model), exact_only=False)
    transcoding._save(onnx, model, model_dir)
    return done
