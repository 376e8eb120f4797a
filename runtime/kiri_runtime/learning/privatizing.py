"""Client-level DP on one site's update (DP-FedAvg, McMahan et al., ICLR 2018), applied on the site.

The update is clipped to L2 norm clipNorm as a whole (all tensors together), then every coordinate gets
N(0, (noiseMultiplier * clipNorm)^2). Clipping bounds what any one site's data can move the update; noise
calibrated to that bound makes each upload a Gaussian mechanism, so the guarantee holds against everyone who
sees the upload, the aggregator included.

The noise generator must be unpredictable in production (a known seed lets anyone subtract the noise), so
`noise_rng(None)` draws its seed from the OS; tests pass a seed to be reproducible.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np

from kiri_runtime.learning.errors import LearningError


def noise_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values())))


def clip(tensors: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """The update scaled to norm <= clip_norm, and its norm before clipping."""
    if not clip_norm > 0:
        raise LearningError(f"clipNorm must be > 0, got {clip_norm}")
    norm = global_norm(tensors)
    if not np.isfinite(norm):
        raise LearningError("the local update is not finite (training diverged): lower the learning rate")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: (t * scale).astype(np.float32) for n, t in tensors.items()}, norm


def privatize(
    tensors: Mapping[str, np.ndarray], clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], float]:
    if noise_multiplier < 0:
        raise LearningError(f"noiseMultiplier must be >= 0, got {noise_multiplier}")
    clipped, norm = clip(tensors, clip_norm)
    std = noise_multiplier * clip_norm
    noised = {
        n: (t + rng.normal(0.0, std, size=t.shape)).astype(np.float32) if std > 0 else t
        for n, t in clipped.items()
    }
    return noised, norm
