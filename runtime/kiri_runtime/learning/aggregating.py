"""Combining the updates of one round: FedAvg weighted by sample count, or a coordinate-wise trimmed mean.

Weighting by samples lets a site with ten times the data count ten times as much (FedAvg). The trimmed mean
drops the largest and smallest `trim` fraction of values per coordinate before averaging (Yin et al., 2018),
so a few sites sending wild updates cannot drag the model; it ignores sample counts by design, and trims
at least one value from each end from 3 updates on (a fraction of 3-9 sites would round down to none).

Both run on `bound_influence`'s output: no update is trusted for its size or its sample count. Each is
clipped server-side to `norm_bound` (what an honest site's clipped and noised update stays under, with
overwhelming probability, so honest updates pass untouched), and each weight is capped at
`SAMPLES_CAP_RATIO` times the median reported count. One site's pull on a round is then at most
2 x bound x its weight share (the share is at most cap / (cap + the others' weights)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from kiri_runtime.learning.errors import LearningError

Aggregation = Literal["fedavg", "trimmed-mean"]
AGGREGATIONS: tuple[Aggregation, ...] = ("fedavg", "trimmed-mean")


def fedavg(updates: Sequence[Mapping[str, np.ndarray]], samples: Sequence[float]) -> dict[str, np.ndarray]:
    if not updates or len(updates) != len(samples):
        raise LearningError("fedavg needs one sample count per update and at least one update")
    total = float(sum(samples))
    if total <= 0:
        raise LearningError("fedavg: the sample counts sum to zero")
    out: dict[str, np.ndarray] = {}
    for name in updates[0]:
        acc = np.zeros(updates[0][name].shape, dtype=np.float64)
        for u, n in zip(updates, samples, strict=True):
            acc += (n / total) * u[name]
        out[name] = acc.astype(np.float32)
    return out


SAMPLES_CAP_RATIO = 4.0
# Tail margin of the noise norm, in standard deviations of the chi distribution: P(exceed) < exp(-18).
NOISE_TAIL = 6.0


def norm_bound(clip_norm: float, noise_multiplier: float, dimension: int) -> float:
    """The largest norm an honest update has: clipped to clip_norm, plus Gaussian noise of std
    noise_multiplier * clip_norm per coordinate, whose norm stays below std * (sqrt(d) + NOISE_TAIL)."""
    return clip_norm * (1.0 + noise_multiplier * (math.sqrt(max(dimension, 1)) + NOISE_TAIL))


def bound_influence(
    updates: Sequence[Mapping[str, np.ndarray]], samples: Sequence[int], bound: float
) -> tuple[list[dict[str, np.ndarray]], list[float], list[int]]:
    """Updates clipped to L2 norm `bound` (all tensors together), weights capped at SAMPLES_CAP_RATIO times
    the median reported count, and the indexes of the updates that were clipped or capped."""
    if not updates or len(updates) != len(samples):
        raise LearningError("one sample count per update and at least one update are needed")
    cap = SAMPLES_CAP_RATIO * float(np.median(np.asarray(samples, dtype=np.float64)))
    out, weights, touched = [], [], []
    for i, (u, n) in enumerate(zip(updates, samples, strict=True)):
        norm = math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in u.values()))
        scale = bound / norm if norm > bound else 1.0
        out.append({k: (t * scale).astype(np.float32) for k, t in u.items()})
        weights.append(min(float(n), cap))
        if scale < 1.0 or n > cap:
            touched.append(i)
    return out, weights, touched


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim: float) -> dict[str, np.ndarray]:
    if not 0 <= trim < 0.5:
        raise LearningError(f"trim fraction must be in [0, 0.5), got {trim}")
    k = math.floor(trim * len(updates))
    if trim > 0 and len(updates) >= 3:
        k = max(k, 1)
    if len(updates) - 2 * k < 1:
        raise LearningError(
            f"trimmed mean: {len(updates)} updates leave none after trimming {k} from each end"
        )
    out: dict[str, np.ndarray] = {}
    for name in updates[0]:
        stacked = np.sort(np.stack([u[name] for u in updates]).astype(np.float64), axis=0)
        out[name] = stacked[k : len(updates) - k].mean(axis=0).astype(np.float32)
    return out


def aggregate(
    kind: str, updates: Sequence[Mapping[str, np.ndarray]], samples: Sequence[float], trim: float = 0.1
) -> dict[str, np.ndarray]:
    if kind == "fedavg":
        return fedavg(updates, samples)
    if kind == "trimmed-mean":
        return trimmed_mean(updates, trim)
    raise LearningError(f"aggregation {kind!r}: use one of {', '.join(AGGREGATIONS)}")


def apply(
    weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """New global weights: the base plus server_lr times the aggregated update; untouched tensors kept."""
    out = {n: np.array(w, copy=True) for n, w in weights.items()}
    for name, u in update.items():
        if name not in out:
            raise LearningError(f"update names {name!r}, which the model does not have")
        out[name] = (out[name] + server_lr * u).astype(out[name].dtype)
    return out
