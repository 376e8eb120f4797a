"""Models and data for the learning loop.

A model is a module factory (`pkg.module:function` or `path/file.py:function`, the compressor's `factory`
format) plus a weights file (kiri_runtime/weights.py): safetensors, which the aggregator writes for every
round, or the user's own `torch.save(model.state_dict())` file (loaded with `weights_only=True`); neither can
run code. Site data and the held-out set are `.npz` files with arrays `x` (inputs) and
`y` (int class labels, or float targets for regression); loaded with `allow_pickle=False`. `TorchGlobalModel`
is the torch side of the aggregator's rounds (collecting.py knows only its protocol).
"""

from __future__ import annotations

import copy
import hashlib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime import weights as weights_files
from kiri_runtime.learning import rounds
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.training import evaluate

if TYPE_CHECKING:
    import torch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_path(uri: str) -> Path:
    """Weights come from a local path or file:// URI: the fetcher or the Job's init container put them there."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    raise LearningError(f"weights {uri!r}: use a local path or file:// URI (fetch remote artifacts first)")


def build_module(factory: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    import torch

    from kiri_runtime.compressing.errors import CompressionError
    from kiri_runtime.compressing.exporting import load_factory

    torch.manual_seed(seed)
    try:
        module = load_factory(factory)(**kwargs)
    except CompressionError as e:
        raise LearningError(str(e)) from None
    except Exception as e:
        raise LearningError(f"factory {factory!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise LearningError(f"factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_model(factory: str, kwargs: dict[str, Any], weights: Path | None, seed: int = 0) -> torch.nn.Module:
    module = build_module(factory, kwargs, seed)
    if weights is not None:
        try:
            state = weights_files.load(weights)
        except weights_files.WeightsError as e:
            raise LearningError(str(e)) from None
        try:
            module.load_state_dict(state)
        except Exception as e:
            raise LearningError(
                f"weights {weights} do not fit {factory}: {' '.join(str(e).split())}"
            ) from None
    return module


def float_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().astype(np.float32) for n, p in module.named_parameters()}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """The module's state dict as safetensors, written atomically (readers see the old file or the new one)."""
    try:
        weights_files.save(module.state_dict(), path)
    except weights_files.WeightsError as e:
        raise LearningError(str(e)) from None


class TorchGlobalModel:
    """The aggregator's model (`collecting.GlobalModel`) as a torch module and the held-out set it is judged on."""

    def __init__(self, module: torch.nn.Module, eval_set: tuple[np.ndarray, np.ndarray]) -> None:
        self.module = module
        self.eval_set = eval_set

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.module.named_parameters()}

    def evaluate(self) -> rounds.Evaluation:
        e = evaluate(self.module, *self.eval_set)
        return rounds.Evaluation(loss=e.loss, accuracy=e.accuracy, samples=e.samples)

    def updated(self, update: Mapping[str, np.ndarray], server_lr: float) -> TorchGlobalModel | None:
        import torch

        state = self.module.state_dict()
        new_state = {k: v.detach().clone() for k, v in state.items()}
        for name, u in update.items():
            new_state[name] = new_state[name] + server_lr * torch.as_tensor(u, dtype=new_state[name].dtype)
        if not all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):
            return None
        module = copy.deepcopy(self.module)
        module.load_state_dict(new_state)
        return TorchGlobalModel(module, self.eval_set)

    def save(self, path: Path) -> None:
        save_weights(self.module, path)


def load_arrays(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise LearningError(f"{what} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise LearningError(f"{what} {path}: needs arrays 'x' and 'y', has {sorted(data.files)}")
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except LearningError:
        raise
    except Exception as e:
        raise LearningError(f"{what} {path}: not a readable .npz: {type(e).__name__}: {e}") from None
    if len(x) == 0 or len(x) != len(y):
        raise LearningError(f"{what} {path}: x has {len(x)} rows and y {len(y)}; need the same, at least one")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x.astype(np.float64)).all():
        raise LearningError(f"{what} {path}: x must be finite numbers")
    return x.astype(np.float32), y
