"""An adapter on disk in peft's layout (adapter_config.json + adapter_model.safetensors) and its tensors as named
float32 arrays: peft's names, `...q_proj.lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank]."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.learning.errors import LearningError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


def check_names(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise LearningError(f"adapter weights do not fit: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise LearningError(f"adapter tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def a_names(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(A_SUFFIX))


def b_names(names: Iterable[str]) -> list[str]:
    """The factors FFA-LoRA averages (and trains): every lora_B."""
    return sorted(n for n in names if n.endswith(B_SUFFIX))


def read_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    """An adapter directory's tensors as named float32 arrays (sorted by name)."""
    from safetensors.numpy import load_file

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LearningError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}")
    try:
        loaded = load_file(str(path))
    except Exception as e:
        raise LearningError(f"{path}: not readable safetensors: {e}") from None
    out = {n: np.asarray(loaded[n], dtype=np.float32) for n in sorted(loaded)}
    for n, t in out.items():
        if not np.isfinite(t).all():
            raise LearningError(f"{path}: tensor {n!r} holds NaN or infinite values")
    return out


def read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LearningError(f"{path}: not readable: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LearningError(f"{path}: not a LoRA adapter config (peft_type LORA)")
    return config


def write_adapter(adapter_dir: Path, weights: Mapping[str, np.ndarray], like: Path) -> Path:
    """Write named arrays as an adapter directory whose config is `like`'s (e.g. a round's averaged adapter).
    The names and shapes must be those of `like`'s weights."""
    from safetensors.numpy import save_file

    config = read_config(like)
    reference = read_weights(like)
    check_names(weights, {n: t.shape for n, t in reference.items()})
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in sorted(weights)}
    tmp = adapter_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(adapter_dir / ADAPTER_WEIGHTS)
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter_dir


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
