"""Where a LoRA-ready onnxruntime-genai model takes its adapters: the `lora.json` beside model.onnx, and the check
that an adapter's parameters fit it. Pure data (json, numpy): the runtime, the compressor and the trainer share it.

A LoRA-ready model (compressing/lm/adapting.py writes one) has, for every adapted projection of every layer, two
extra graph inputs: `<prefix>.lora_A` [in, r] and `<prefix>.lora_B` [r, out], where `<prefix>` is the projection's
weight name without `.MatMul.weight` (`model.layers.0.attn.qkv_proj`). The projection's output becomes
x W + (x A) B. Each input has an empty default (r = 0): without an adapter the branch adds zeros, and
onnxruntime-genai's adapters (`og.Adapters`, a `.onnx_adapter` file) feed A and B by these names when active.
The rank is a symbolic dimension per projection, so one base serves adapters of any rank.

A fused q|k|v projection (the builder's default) is one LoRA input pair: an adapter on q_proj, k_proj and v_proj
becomes A = [A_q; A_k; A_v] and a block-diagonal B (`parts` gives each module's columns), the same sum exactly.
The scaling alpha / r is folded into B, as the model builder does with `adapter_path`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LAYOUT_FILE = "lora.json"
FORMAT = 1
MAX_RANK = 1024


class LayoutError(ValueError):
    """A lora.json that cannot be read, or an adapter whose parameters do not fit the model."""


@dataclass(frozen=True)
class Projection:
    """One adapted MatMul: its layer, its place in the graph (`attn/qkv_proj`), its shape, and which of the Hugging
    Face modules it holds at which output columns (`parts`: name, first column, width)."""

    layer: int
    path: str
    in_features: int
    out_features: int
    parts: tuple[tuple[str, int, int], ...]

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.layer}.{self.path.replace('/', '.')}"

    @property
    def a(self) -> str:
        return f"{self.prefix}.lora_A"

    @property
    def b(self) -> str:
        return f"{self.prefix}.lora_B"

    @property
    def rank_dim(self) -> str:
        return f"{self.prefix}.lora_r"

    @property
    def output(self) -> str:
        """The builder's name for the projection's output (the same for MatMul and MatMulNBits)."""
        return f"/model/layers.{self.layer}/{self.path}/MatMul/output_0"

    def part(self, module: str) -> tuple[int, int] | None:
        for name, start, width in self.parts:
            if name == module:
                return start, width
        return None


@dataclass(frozen=True)
class LoraLayout:
    targets: tuple[str, ...]  # the Hugging Face module names an adapter may adapt (q_proj, v_proj, ...)
    projections: tuple[Projection, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "targets": list(self.targets),
            "projections": [
                {
                    "layer": p.layer,
                    "path": p.path,
                    "in": p.in_features,
                    "out": p.out_features,
                    "parts": [list(part) for part in p.parts],
                }
                for p in self.projections
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> LoraLayout:
        try:
            if data["format"] != FORMAT:
                raise LayoutError(f"lora.json format {data['format']!r}; this runtime reads {FORMAT}")
            projections = tuple(
                Projection(
                    int(p["layer"]),
                    str(p["path"]),
                    int(p["in"]),
                    int(p["out"]),
                    tuple((str(n), int(s), int(w)) for n, s, w in p["parts"]),
                )
                for p in data["projections"]
            )
            return cls(tuple(str(t) for t in data["targets"]), projections)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, LayoutError):
                raise
            raise LayoutError(f"lora.json is malformed: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, model_dir: Path) -> LoraLayout | None:
        """The model's layout, or None when the model takes no adapters."""
        path = model_dir / LAYOUT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LayoutError(f"{path}: not readable JSON: {e}") from None
        return cls.from_json(data)

    def save(self, model_dir: Path) -> None:
        (model_dir / LAYOUT_FILE).write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")

    def by_input(self) -> dict[str, tuple[Projection, str]]:
        """Every LoRA input name -> (its projection, "A" or "B")."""
        out: dict[str, tuple[Projection, str]] = {}
        for p in self.projections:
            out[p.a] = (p, "A")
            out[p.b] = (p, "B")
        return out

    def check(self, params: Mapping[str, np.ndarray]) -> int:
        """Raise LayoutError unless `params` (an adapter's tensors by name) fit this model: known names, A and B of
        each projection together, float32, [in, r] and [r, out] with one r >= 1, finite. Returns the bytes."""
        if not params:
            raise LayoutError("the adapter holds no parameters")
        inputs = self.by_input()
        unknown = sorted(set(params) - set(inputs))
        if unknown:
            raise LayoutError(
                f"the adapter names {len(unknown)} input(s) this model does not take, e.g. {unknown[0]!r} "
                f"(the model adapts {', '.join(self.targets)})"
            )
        total = 0
        for p in self.projections:
            a, b = params.get(p.a), params.get(p.b)
            if a is None and b is None:
                continue
            if a is None or b is None:
                raise LayoutError(f"the adapter has only one of {p.a} and {p.b}")
            for name, t in ((p.a, a), (p.b, b)):
                if t.dtype != np.float32:
                    raise LayoutError(f"{name} is {t.dtype}; the model takes float32")
                if t.ndim != 2:
                    raise LayoutError(f"{name} has shape {list(t.shape)}; expected two dimensions")
            r = a.shape[1]
            if a.shape != (p.in_features, r) or b.shape != (r, p.out_features) or not 1 <= r <= MAX_RANK:
                raise LayoutError(
                    f"{p.prefix}: A is {list(a.shape)} and B {list(b.shape)}; expected "
                    f"[{p.in_features}, r] and [r, {p.out_features}] with 1 <= r <= {MAX_RANK}"
                )
            for name, t in ((p.a, a), (p.b, b)):
                if not np.isfinite(t).all():
                    raise LayoutError(f"{name} holds NaN or infinite values")
            total += int(a.nbytes + b.nbytes)
        return total
