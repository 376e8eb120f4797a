"""Models for the compression benchmark, big enough for int8 and distillation to pay off on a CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Encoder(nn.Module):
    """A BERT-small-sized transformer encoder producing a pooled embedding."""

    def __init__(
        self, features: int = 32, d_model: int = 256, layers: int = 4, heads: int = 4, outlier: float = 0.0
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_model)
        if outlier:
            # Trained transformers grow a few outlier feature channels; per-tensor int8 scales suffer from them.
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear) and m is not self.out:
                        m.weight[:2, :] *= outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.encoder(self.proj(x))
        return self.out(h.mean(dim=1))


def encoder(**kwargs: float) -> nn.Module:
    return Encoder(**kwargs)  # type: ignore[arg-type]


def cnn(classes: int = 8, width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * width, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def mlp(inputs: int = 256, hidden: int = 1024, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def blobs_images(n: int, seed: int, classes: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """32x32 images: the class is where a bump sits (and how wide it is), under noise and clutter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    yy, xx = np.mgrid[0:32, 0:32]
    pos = [(8, 8), (8, 24), (24, 8), (24, 24)]
    imgs = rng.normal(0, 0.8, (n, 1, 32, 32))
    for i, c in enumerate(y):
        cy, cx = pos[c % 4]
        cy += rng.integers(-3, 4)
        cx += rng.integers(-3, 4)
        sigma = 2.0 if c < 4 else 4.5
        imgs[i, 0] += rng.uniform(0.8, 1.8) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        oy, ox = rng.integers(0, 32, 2)  # a distractor bump
        imgs[i, 0] += 1.2 * np.exp(-((yy - oy) ** 2 + (xx - ox) ** 2) / (2 * rng.choice([2.0, 4.5]) ** 2))
    return imgs.astype(np.float32), y
