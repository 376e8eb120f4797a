"""Tiny real models for the compressor tests. Factories are referenced as `compress_zoo.py:name` by `kiri compress`."""

from __future__ import annotations

import torch
from torch import nn


def mlp(inputs: int = 16, hidden: int = 64, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def cnn(classes: int = 4, width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, classes),
    )


class Encoder(nn.Module):
    """A small transformer encoder with a pooled embedding output (not a classifier)."""

    def __init__(self, features: int = 16, d_model: int = 32, layers: int = 2, outlier: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_model)
        if outlier:
            # Outlier channels like those of trained transformers: one big column per weight wrecks a single
            # per-tensor int8 scale while per-channel scales absorb it.
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear) and m is not self.out:
                        m.weight[0, :] *= outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.encoder(self.proj(x))
        return self.out(h.mean(dim=1))


def encoder(**kwargs: float) -> nn.Module:
    return Encoder(**kwargs)  # type: ignore[arg-type]


_CALLS = [0]


class Drifting(nn.Module):
    """Scales by a Python-side call counter: the traced graph freezes it, so export verification must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS[0] += 1
        return self.lin(x) * float(_CALLS[0])


def drifting() -> nn.Module:
    return Drifting()
