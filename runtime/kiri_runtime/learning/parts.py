"""What a round trains, and the shapes of the update each site uploads.

Three choices, trading accuracy for upload size:

* `whole`: every floating-point parameter; the update is as large as the model.
* `layers`: only parameters whose names start with one of the given prefixes (e.g. the classifier head).
* `lora`: a rank-r adapter on Linear layers, W' = W + B A. A is frozen at a random basis that both the trainer
  and the aggregator derive from the round's seed, and only B is trained and uploaded (the FFA-LoRA variant,
  Sun et al., ICLR 2024). Freezing A makes the update linear in B, so averaging B across sites is exactly
  averaging the dense updates B A, and Gaussian noise on B stays Gaussian noise on the dense update; with
  both factors trained, the average of products is not the product of averages and noise would be squared.

Pure numpy: the aggregator validates and expands updates with this module too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kiri_runtime.learning.errors import LearningError

PartKind = Literal["whole", "layers", "lora", "adapter"]
# `adapter`: a language model's peft LoRA adapter (adapter_rounds.py), not a part of a factory's module.
PART_KINDS: tuple[PartKind, ...] = ("whole", "layers", "lora", "adapter")
LORA_SUFFIX = ".lora_B"


@dataclass(frozen=True)
class TrainedPart:
    kind: PartKind = "whole"
    # For `layers`: parameter name prefixes to train. For `lora`: Linear module names to adapt (empty: all).
    names: tuple[str, ...] = ()
    rank: int = 4

    def __post_init__(self) -> None:
        if self.kind not in PART_KINDS:
            raise LearningError(f"trained part {self.kind!r}: use one of {', '.join(PART_KINDS)}")
        if self.kind == "layers" and not self.names:
            raise LearningError("trained part 'layers' needs at least one layer name (--layers fc2)")
        if self.kind == "lora" and not 1 <= self.rank <= 1024:
            raise LearningError(f"LoRA rank {self.rank} is out of range [1, 1024]")

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "names": list(self.names), "rank": self.rank}


def _selected(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def upload_shapes(part: TrainedPart, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the update tensors for a model whose float parameters have `shapes`.

    For `lora`, `shapes` must hold each adapted Linear's `<module>.weight` of shape (out, in).
    """
    if part.kind == "adapter":
        raise LearningError(
            "an adapter round's tensors are the adapter's (adapter_rounds.py), not the model's"
        )
    if part.kind == "whole":
        out = dict(shapes)
    elif part.kind == "layers":
        out = {n: s for n, s in shapes.items() if _selected(n, part.names)}
    else:
        out = {}
        for n, s in shapes.items():
            if not n.endswith(".weight") or len(s) != 2:
                continue
            module = n[: -len(".weight")]
            if part.names and module not in part.names:
                continue
            out[module + LORA_SUFFIX] = (s[0], part.rank)
    if not out:
        raise LearningError(f"trained part {part.describe()} selects no parameters of the model")
    if part.kind == "lora" and part.names:
        missing = sorted(set(part.names) - {n[: -len(LORA_SUFFIX)] for n in out})
        if missing:
            raise LearningError(f"LoRA layers {missing} are not 2-D Linear weights of the model")
    return out


def lora_seed(number: int, base_sha256: str) -> int:
    """The seed of a round's frozen LoRA bases: every site and the server derive the same one."""
    return int.from_bytes(hashlib.sha256(f"{number}:{base_sha256}".encode()).digest()[:8], "little") >> 1


def lora_basis(seed: int, module: str, rank: int, in_features: int) -> np.ndarray:
    """The frozen A (rank x in) for `module` in a round: the same bytes in every process for the same seed."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    # Scaled so that A x keeps the magnitude of x: the learning rate then means the same for any rank.
    basis: np.ndarray = (rng.standard_normal((rank, in_features)) / np.sqrt(in_features)).astype(np.float32)
    return basis


def dense_update(
    part: TrainedPart, update: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], seed: int
) -> dict[str, np.ndarray]:
    """The update in parameter space: identity for whole/layers, B A for each LoRA module."""
    if part.kind != "lora":
        return {n: np.asarray(v, dtype=np.float32) for n, v in update.items()}
    out: dict[str, np.ndarray] = {}
    for name, b in update.items():
        module = name[: -len(LORA_SUFFIX)]
        weight_shape = shapes[module + ".weight"]
        a = lora_basis(seed, module, part.rank, weight_shape[1])
        out[module + ".weight"] = (np.asarray(b, dtype=np.float32) @ a).astype(np.float32)
    return out
