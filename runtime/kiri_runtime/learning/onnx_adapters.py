"""A trained adapter in the form onnxruntime-genai loads: the inputs of a LoRA-ready model (lora_layouts.py) in
onnxruntime's `.onnx_adapter` format. The scaling alpha / r is folded into B, and the modules of a fused
projection (the builder's q|k|v) are stacked: A = [A_q; A_v], B block-diagonal, which is the same sum."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.learning.adapter_files import read_config, read_weights
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.lora_layouts import LoraLayout

ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
_PEFT_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _scaling(config: Mapping[str, Any]) -> float:
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LearningError(
                f"adapter config: {key} is not supported (one rank and alpha for every module)"
            )
    if config.get("use_dora"):
        raise LearningError("adapter config: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise LearningError("adapter config: LoRA biases are not supported (bias must be 'none')")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def onnx_adapter_params(adapter_dir: Path, layout: LoraLayout) -> dict[str, np.ndarray]:
    """A peft adapter as the named inputs of a LoRA-ready model (lora_layouts.py): per projection A [in, R] and
    B [R, out] with the scaling folded into B; the modules of a fused projection stacked (block-diagonal B)."""
    scale = _scaling(read_config(adapter_dir))
    weights = read_weights(adapter_dir)
    factors: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in weights.items():
        m = _PEFT_NAME.search(name)
        if m is None:
            raise LearningError(
                f"adapter tensor {name!r} is not a LoRA factor of a decoder layer's projection"
            )
        factors.setdefault((int(m[1]), m[2]), {})[m[3]] = t
    params: dict[str, np.ndarray] = {}
    used: set[tuple[int, str]] = set()
    for p in layout.projections:
        present = [(part, factors[(p.layer, part[0])]) for part in p.parts if (p.layer, part[0]) in factors]
        if not present:
            continue
        rank = sum(f["A"].shape[0] for _, f in present)
        a = np.zeros((p.in_features, rank), dtype=np.float32)
        b = np.zeros((rank, p.out_features), dtype=np.float32)
        row = 0
        for (module, start, width), f in present:
            if "A" not in f or "B" not in f:
                raise LearningError(f"layer {p.layer} {module}: the adapter lacks lora_A or lora_B")
            r = f["A"].shape[0]
            if f["A"].shape != (r, p.in_features) or f["B"].shape != (width, r):
                raise LearningError(
                    f"layer {p.layer} {module}: A {list(f['A'].shape)} and B {list(f['B'].shape)} do not fit "
                    f"the served model's [r, {p.in_features}] and [{width}, r]"
                )
            a[:, row : row + r] = f["A"].T
            b[row : row + r, start : start + width] = scale * f["B"].T
            row += r
            used.add((p.layer, module))
        params[p.a], params[p.b] = a, b
    left = sorted(set(factors) - used)
    if left:
        layer, module = left[0]
        raise LearningError(
            f"the served model takes no adapter on layer {layer} {module} (it adapts {', '.join(layout.targets)}); "
            "rebuild it LoRA-ready for these targets or train on fewer"
        )
    layout.check(params)
    return params


def export_onnx_adapter(adapter_dir: Path, layout: LoraLayout, out_file: Path) -> int:
    """Write the adapter as onnxruntime-genai loads it (`og.Adapters.load`): a `.onnx_adapter` file (onnxruntime's
    flatbuffers adapter format) of the LoRA-ready model's inputs. Returns its size in bytes."""
    import onnxruntime as ort

    params = onnx_adapter_params(adapter_dir, layout)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(t) for n, t in params.items()})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    fmt.export_adapter(str(tmp))
    tmp.replace(out_file)
    return out_file.stat().st_size
