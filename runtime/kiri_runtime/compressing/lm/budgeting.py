"""Size-budgeted mixed precision (`maxBytes`): which projections to keep at 8 bits so the artifact fits a byte budget
with the least loss, measured on the eval data.

1. **Sensitivity** (`sensitivities`): the units are what the builder can keep at 8 bits (a projection node:
   lm_head, a layer's qkv_proj or q/k/v_proj, o_proj, gate/up/down_proj; and, for untied models, the token
   embedding). The reference model under torch gets every unit's weights rounded to 4 bits (symmetric
   round-to-nearest blocks of 32, compacting.rtn_blocks) and is teacher-forced on the eval samples: KL_all, the
   mean KL(full || that model). A unit's sensitivity is what giving it back its full weights (8 bits is within
   0.0002 KL of them) saves: KL_all - KL_all-but-this-unit, measured where the variant will be, with every other
   unit at 4 bits, so what the others already lose is counted. The full model's logits are taken before any
   rounding (a lazily caching reference would otherwise be computed with rounded weights). One forward pass of
   the eval data per unit (7 per layer + 2), plus one; 4 s for the tiny model's 12 units on 6 samples.
2. **Choice** (`choose`): each unit costs its weights x (34 - 18) / 32 bytes more at 8 bits (Q8_0-like blocks
   against Q4_0-like, float16 scales); units are taken in order of sensitivity per byte while the allowance
   lasts (the greedy knapsack: the per-unit losses add up closely for small perturbations).
3. **Fit** (`fit`): the bytes an upgrade really adds to the packed (xz) artifact are not the raw cost (8-bit
   blocks compress better than 4-bit ones), so the allowance is fitted on real builds: the all-4-bit build gives
   the base size, the next build its compression ratio, and at most FIT_BUILDS builds in all find the largest
   choice whose artifact is no larger than `maxBytes`; of those within budget, the lowest measured KL wins.
   Every build is recorded (options, bytes, KL) in the variant's `extra.budget`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError

UPGRADE_BYTES_PER_WEIGHT = (34 - 18) / 32  # Q8_0-like vs Q4_0-like block of 32 with a float16 scale
EMBEDDING = "embedding"
FIT_BUILDS = 4
FIRST_RATIO = 0.97  # the first guess of packed bytes per raw upgrade byte, before a build measures it
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")


@dataclass(frozen=True)
class Unit:
    name: str  # an int8Tensors name (building.TENSOR_NAME), or "embedding"
    weights: int
    sensitivity: float  # mean KL saved by keeping this unit exact while the others are at 4 bits

    @property
    def cost(self) -> float:
        return self.weights * UPGRADE_BYTES_PER_WEIGHT


def units_of(model: Any, fuse_qkv: bool, tied: bool) -> dict[str, list[Any]]:
    """The torch parameters behind each unit, in model order (builder names; q/k/v as one unit when fused)."""
    out: dict[str, list[Any]] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match is None or not hasattr(module, "weight"):
            continue
        layer, block, proj = match.groups()
        part = "attn" if block == "self_attn" else "mlp"
        if part == "attn" and proj in ("q_proj", "k_proj", "v_proj") and fuse_qkv:
            proj = "qkv_proj"
        out.setdefault(f"layers.{layer}.{part}.{proj}", []).append(module.weight)
    head = model.get_output_embeddings()
    if head is not None:
        out["lm_head"] = [head.weight]
    embed = model.get_input_embeddings()
    if not tied and embed is not None:
        out[EMBEDDING] = [embed.weight]
    return out


def fake_int4(weight: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The weight as 4-bit symmetric round-to-nearest blocks of 32 would give it back (float32)."""
    from kiri_runtime.compressing.lm import compacting, reblocking

    return reblocking.dequantize(compacting.rtn_blocks(weight.astype(np.float32), 4))


def sensitivities(
    model: Any,
    reference: Callable[[Sequence[int]], np.ndarray[Any, Any]],
    samples: Sequence[Sequence[int]],
    *,
    fuse_qkv: bool,
    tied: bool,
) -> list[Unit]:
    """Each unit's KL saved on `samples` by keeping it exact while every other unit is at 4 bits (the model is
    restored afterwards); `reference(ids)` gives the full model's logits."""
    import torch

    units = {
        name: params
        for name, params in units_of(model, fuse_qkv, tied).items()
        if not any(p.shape[-1] % 32 for p in params)  # not a 4-bit candidate anyway (K not whole blocks)
    }
    if not units:
        raise CompressionError("maxBytes: no projection of this architecture could be found for the budget")
    for ids in samples:
        reference(ids)  # the full model's logits first: a caching reference computes them with this model
    exact = {id(p): p.data.clone() for params in units.values() for p in params}
    rounded = {
        id(p): torch.from_numpy(fake_int4(p.data.numpy())) for params in units.values() for p in params
    }
    out = []
    try:
        with torch.no_grad():
            for params in units.values():
                for p in params:
                    p.data = rounded[id(p)]
            everything = _mean_kl(model, reference, samples)
            for name, params in units.items():
                for p in params:
                    p.data = exact[id(p)]
                kl = _mean_kl(model, reference, samples)
                for p in params:
                    p.data = rounded[id(p)]
                out.append(Unit(name, sum(int(p.numel()) for p in params), max(everything - kl, 0.0)))
    finally:
        for params in units.values():
            for p in params:
                p.data = exact[id(p)]
    return out


def _mean_kl(
    model: Any, reference: Callable[[Sequence[int]], np.ndarray[Any, Any]], samples: Sequence[Sequence[int]]
) -> float:
    import torch

    total, positions = 0.0, 0
    for ids in samples:
        n = len(ids) - 1
        if n < 1:
            continue
        got = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0, :n].float()
        p = torch.log_softmax(torch.from_numpy(reference(ids)[:n]).float(), dim=-1)
        q = torch.log_softmax(got, dim=-1)
        total += float((p.exp() * (p - q)).sum())
        positions += n
    return total / max(positions, 1)


def choose(units: Sequence[Unit], allowance: float) -> list[str]:
    """The units to keep at 8 bits: most sensitivity per byte first, while their raw cost fits `allowance`."""
    chosen, spent = [], 0.0
    for unit in sorted(units, key=lambda u: (-u.sensitivity / u.cost, u.name)):
        if unit.sensitivity > 0 and spent + unit.cost <= allowance:
            chosen.append(unit.name)
            spent += unit.cost
    order = {u.name: i for i, u in enumerate(units)}
    return sorted(chosen, key=order.__getitem__)


def options_for(base: Mapping[str, Any], chosen: Sequence[str], untied: bool) -> dict[str, Any]:
    """Build options of a choice: int8Tensors (model order), and the embedding's width for untied models."""
    opts = {k: v for k, v in base.items() if k not in ("int8Tensors", "maxBytes")}
    opts["int8Tensors"] = [c for c in chosen if c != EMBEDDING]
    if untied:
        opts["embeddingBits"] = 8 if EMBEDDING in chosen else 4
    return opts


@dataclass
class Tried:
    options: dict[str, Any]
    size_bytes: int | None
    kl_mean: float | None
    allowance: float

    def record(self) -> dict[str, Any]:
        return {
            "int8Tensors": self.options.get("int8Tensors", []),
            "embeddingBits": self.options.get("embeddingBits"),
            "allowanceBytes": round(self.allowance),
            "sizeBytes": self.size_bytes,
            "klMean": self.kl_mean,
        }


Measure = Callable[[dict[str, Any]], tuple[int | None, float | None]]


def fit(
    units: Sequence[Unit],
    base: Mapping[str, Any],
    max_bytes: int,
    measure: Measure,
    *,
    untied: bool,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, Any] | None, list[Tried]]:
    """The choice whose packed artifact fits `max_bytes` with the lowest measured KL (None: even all-4-bit is
    over), and every build tried. `measure(options)` builds, scores and packs: (bytes, KL), None where it failed."""
    tried: list[Tried] = []
    seen: dict[tuple[str, ...], Tried] = {}

    def attempt(allowance: float) -> Tried:
        chosen = choose(units, allowance)
        key = tuple(chosen)
        if key not in seen:
            opts = options_for(base, chosen, untied)
            size, kl = measure(opts)
            seen[key] = Tried(opts, size, kl, allowance)
            tried.append(seen[key])
            log(f"  budget {max_bytes}: {len(chosen)} units at 8 bits -> {size} bytes, kl {kl}")
        return seen[key]

    floor = attempt(0.0)
    if floor.size_bytes is None or floor.size_bytes > max_bytes:
        return None, tried
    raw = {u.name: u.cost for u in units}
    ratio = FIRST_RATIO
    allowance = (max_bytes - floor.size_bytes) / ratio
    for _ in range(FIT_BUILDS - 1):
        t = attempt(allowance)
        spent = sum(raw[c] for c in choose(units, allowance))
        if t.size_bytes is None or spent <= 0:
            break
        ratio = max((t.size_bytes - floor.size_bytes) / spent, 1e-3)
        if t.size_bytes > max_bytes:
            allowance = min(allowance, (max_bytes - floor.size_bytes) / ratio) * 0.98
        else:
            wider = (max_bytes - floor.size_bytes) / ratio
            if choose(units, wider) == choose(units, allowance):
                break
            allowance = wider
    within = [
        t for t in tried if t.size_bytes is not None and t.size_bytes <= max_bytes and t.kl_mean is not None
    ]
    if not within:
        return None, tried
    best = min(within, key=lambda t: (t.kl_mean if t.kl_mean is not None else np.inf, t.size_bytes or 0))
    return best.options, tried
