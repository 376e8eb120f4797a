"""A tiny classifier and seeded non-IID site data for the learning tests (seconds on two shared cores).

Loaded by trainer and aggregator processes as the factory `tests/learning_tiny_model.py:make_model`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES = 8
CLASSES = 3


def make_model(hidden: int = 16) -> object:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES)
    )


def _centers(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, size=(CLASSES, FEATURES)).astype(np.float32) * 1.2


def sample(rng: np.random.Generator, centers: np.ndarray, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, n in enumerate(counts):
        xs.append(centers[label] + rng.normal(0.0, 1.0, size=(n, FEATURES)))
        ys.append(np.full(n, label, dtype=np.int64))
    order = rng.permutation(sum(counts))
    return np.concatenate(xs).astype(np.float32)[order], np.concatenate(ys)[order]


def write_sites(root: Path, sites: int, seed: int = 0, per_site: int = 120) -> tuple[list[Path], Path]:
    """Each site skews toward one class (non-IID, Dirichlet 0.5); the held-out set is balanced."""
    rng = np.random.default_rng(seed)
    centers = _centers(seed)
    paths = []
    for i in range(sites):
        mix = rng.dirichlet([0.5] * CLASSES)
        counts = [int(c) for c in np.round(mix * per_site)]
        counts[int(np.argmax(mix))] += per_site - sum(counts)
        x, y = sample(rng, centers, counts)
        path = root / f"site-{i}.npz"
        np.savez(path, x=x, y=y)
        paths.append(path)
    x, y = sample(rng, centers, [100] * CLASSES)
    held_out = root / "held-out.npz"
    np.savez(held_out, x=x, y=y)
    return paths, held_out
