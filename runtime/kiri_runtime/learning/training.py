"""Local training on a site: the model's trained part, a few epochs of SGD, and the update it produced.

Only the trained part has `requires_grad`; for LoRA each chosen Linear is wrapped so that its output gains
(x A^T) B^T with A frozen (see parts.py) and B starting at zero, so the wrapped model starts out identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.parts import LORA_SUFFIX, TrainedPart, lora_basis, upload_shapes

if TYPE_CHECKING:
    import torch


@dataclass
class LocalResult:
    update: dict[str, np.ndarray]
    samples: int
    loss_before: float
    loss_after: float


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if y.dtype.is_floating_point:
        return F.mse_loss(out.reshape(y.shape), y)
    return F.cross_entropy(out, y)


def _targets(y: np.ndarray) -> torch.Tensor:
    import torch

    if np.issubdtype(y.dtype, np.integer):
        return torch.as_tensor(y.astype(np.int64))
    return torch.as_tensor(y.astype(np.float32))


def _attach_lora(module: torch.nn.Module, part: TrainedPart, seed: int) -> dict[str, torch.nn.Parameter]:
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, a: np.ndarray) -> None:
            super().__init__()
            self.base = base
            self.register_buffer("lora_A", torch.as_tensor(a))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, a.shape[0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T  # type: ignore[operator]
            return out

    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    wanted = upload_shapes(part, shapes)
    adapters: dict[str, torch.nn.Parameter] = {}
    for name in wanted:
        path = name[: -len(LORA_SUFFIX)]
        parent_name, _, attr = path.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        base = getattr(parent, attr)
        if not isinstance(base, torch.nn.Linear):
            raise LearningError(f"LoRA layer {path!r} is a {type(base).__name__}, not a torch.nn.Linear")
        wrapped = LoraLinear(base, lora_basis(seed, path, part.rank, base.in_features))
        setattr(parent, attr, wrapped)
        adapters[name] = wrapped.lora_B
    return adapters


def _mean_loss(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    import torch

    with torch.no_grad():
        return float(loss_fn(module(x), y))


def train_local(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    part: TrainedPart,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    lora_seed: int,
) -> LocalResult:
    """Train in place and return the raw (unclipped, noiseless) update of the trained part."""
    import torch

    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise LearningError(
            f"need epochs >= 1, learningRate > 0, batch size >= 1 (got {epochs}, {lr}, {batch_size})"
        )
    torch.manual_seed(seed)
    module.train()
    for p in module.parameters():
        p.requires_grad_(False)
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    trained: dict[str, torch.nn.Parameter]
    if part.kind == "lora":
        trained = _attach_lora(module, part, lora_seed)
    else:
        params = dict(module.named_parameters())
        trained = {n: params[n] for n in upload_shapes(part, shapes)}
    start = {n: p.detach().clone() for n, p in trained.items()}
    for p in trained.values():
        p.requires_grad_(True)
    xt, yt = torch.as_tensor(x), _targets(y)
    try:
        before = _mean_loss(module, xt, yt)
    except Exception as e:
        raise LearningError(f"the model cannot run on the site data: {type(e).__name__}: {e}") from None
    optimizer = torch.optim.SGD(list(trained.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            loss_fn(module(xt[idx]), yt[idx]).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    after = _mean_loss(module, xt, yt)
    update = {n: (p.detach() - start[n]).numpy().astype(np.float32) for n, p in trained.items()}
    return LocalResult(update=update, samples=len(xt), loss_before=before, loss_after=after)


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None
    samples: int


def evaluate(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> Evaluation:
    import torch

    module.eval()
    yt = _targets(y)
    with torch.no_grad():
        out = module(torch.as_tensor(x))
        loss = float(loss_fn(out, yt))
        accuracy = None
        if not yt.dtype.is_floating_point and out.ndim == 2:
            accuracy = float((out.argmax(dim=1) == yt).float().mean())
    return Evaluation(loss=loss, accuracy=accuracy, samples=len(x))
