"""Per-block scales, zero points and mins stored as float16 with a Cast back to float32 in front.

onnxruntime folds each Cast into a float32 constant when the session starts, so the graph it runs is the one
before; the artifact carries half the bytes for those tensors. Used by compacting (the builder's scales, where
rounding them is measured) and transcoding (a GGUF's scales, already float16: exact)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def scale_names(model: Any) -> set[str]:
    """Float inputs that hold per-block scales, zero points or mins (MatMulNBits, GatherBlockQuantized, ours)."""
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            names.update(n for n in node.input[2:4] if n)
        elif node.name.startswith(transcoding_prefixes()):
            names.update(n for n in node.input if n)
    return names


def transcoding_prefixes() -> tuple[str, ...]:
    return ("/model/embed_tokens/dequantize/", "/block_mins/")


def half_scales(model: Any, inits: dict[str, Any], names: Iterable[str], *, exact_only: bool) -> int:
    """Store the named float32 initializers as float16 followed by a Cast back to float32; returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    done = 0
    casts = []
    for name in sorted(names):
        init = inits.get(name)
        if init is None or init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 2:
            continue
        values = numpy_helper.to_array(init)
        halfed = values.astype(np.float16)
        if exact_only and not np.array_equal(halfed.astype(np.float32), values):
            continue
        if not np.all(np.isfinite(halfed)):
            continue
        stored = f"{name}_f16"
        init.CopyFrom(numpy_helper.from_array(halfed, stored))
        del inits[name]
        inits[stored] = init
        casts.append(helper.make_node("Cast", [stored], [name], to=TensorProto.FLOAT, name=f"/half/{name}"))
        done += 1
    for offset, node in enumerate(casts):
        model.graph.node.insert(offset, node)
    return done
