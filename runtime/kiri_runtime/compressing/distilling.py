"""Knowledge distillation: a smaller student trained on the full model's outputs.

Teacher outputs come from the verified fp32 ONNX model, so any source format can teach. The student is a given
factory, or a reduced copy of the teacher when its structure allows: narrower Linear/Conv layers (MLP, CNN) or
fewer layers of an nn.TransformerEncoder (kept evenly spaced and initialised from the teacher, as DistilBERT does).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet

if TYPE_CHECKING:
    import torch

KNOWN_OPTIONS = {
    "student",
    "studentKwargs",
    "width",
    "depth",
    "temperature",
    "alpha",
    "labels",
    "epochs",
    "patience",
    "lr",
    "batchSize",
    "quantize",
    "weightDecay",
    "mixup",
    # The ModelDeployment API's names: absolute student size, and how to quantize the student.
    "studentWidth",
    "studentDepth",
    "perChannel",
    "reduceRange",
}


def defaults(options: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise CompressionError(f"distilled: unknown options {unknown}; known: {sorted(KNOWN_OPTIONS)}")
    # An absolute student size names the axis to reduce; the other axis then stays as it is unless given.
    absolute = "studentWidth" in options or "studentDepth" in options
    merged: dict[str, Any] = {
        "width": 1.0 if absolute else 0.5,
        "depth": 1.0 if absolute else 0.5,
        "temperature": 2.0,
        "alpha": 0.0,
        "epochs": 60,
        "patience": 8,
        "lr": 3e-3,
        "batchSize": 64,
        "weightDecay": 0.0,
        "mixup": 0.0,
        "quantize": None,
        "perChannel": True,
        "reduceRange": False,
    } | options
    if merged["quantize"] is True:
        merged["quantize"] = "int8-dynamic"
    elif merged["quantize"] is False:
        merged["quantize"] = None
    for key in ("width", "depth"):
        if not 0 < float(merged[key]) <= 1:
            raise CompressionError(f"distilled: {key} must be in (0, 1], got {merged[key]!r}")
    for key in ("studentWidth", "studentDepth"):
        if key in merged and (not isinstance(merged[key], int) or merged[key] < 1):
            raise CompressionError(f"distilled: {key} must be a positive integer, got {merged[key]!r}")
    if float(merged["mixup"]) < 0:
        raise CompressionError("distilled: mixup (the Beta distribution's parameter) must be >= 0")
    if float(merged["temperature"]) <= 0 or not 0 <= float(merged["alpha"]) <= 1:
        raise CompressionError("distilled: temperature must be > 0 and alpha in [0, 1]")
    if merged["quantize"] not in (None, "int8-dynamic"):
        raise CompressionError("distilled: quantize may only be true, false, null or 'int8-dynamic'")
    return merged


def _materialize(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    import torch

    try:
        with torch.no_grad():
            module.eval()(*example)
    except Exception as e:
        raise CompressionError(
            f"the reduced copy of this architecture does not run ({type(e).__name__}: {e}); give options.student"
        ) from None
    return module


def _prune_hidden_layers(student: torch.nn.Module, keep: int) -> int:
    """Keep the first `keep` hidden Linear blocks of a Sequential MLP, and its output layer."""
    from torch import nn

    if not isinstance(student, nn.Sequential) or not all(
        isinstance(m, nn.Linear | nn.ReLU | nn.GELU | nn.Tanh | nn.SiLU | nn.Dropout | nn.Flatten)
        for m in student
    ):
        raise CompressionError(
            "studentDepth applies to transformer encoders and Sequential MLPs; give options.student"
        )
    groups: list[list[nn.Module]] = [[]]
    for m in student:
        if isinstance(m, nn.Linear) and any(isinstance(g, nn.Linear) for g in groups[-1]):
            groups.append([])
        groups[-1].append(m)
    hidden, last = groups[:-1], groups[-1]
    kept = hidden[: max(1, keep)]
    modules = [m for g in [*kept, last] for m in g]
    for name in list(student._modules):
        del student._modules[name]
    for i, m in enumerate(modules):
        student.add_module(str(i), m)
    return len(kept)


def reduced_copy(
    teacher: torch.nn.Module,
    *,
    width: float,
    depth: float,
    example: tuple[torch.Tensor, ...],
    student_width: int | None = None,
    student_depth: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A smaller module of the same architecture and what was reduced.

    `width`/`depth` are fractions of the teacher; `student_width` (the widest hidden layer) and `student_depth`
    (hidden layers, or encoder layers) are absolute sizes, as the ModelDeployment API states them.
    """
    from torch import nn

    student = copy.deepcopy(teacher)
    encoders = [m for m in student.modules() if isinstance(m, nn.TransformerEncoder)]
    if encoders:
        kept = []
        for enc in encoders:
            n = len(enc.layers)
            k = min(n, student_depth) if student_depth else max(1, math.ceil(n * depth))
            idx = sorted({round(i) for i in np.linspace(0, n - 1, k)})
            enc.layers = nn.ModuleList([enc.layers[i] for i in idx])
            enc.num_layers = len(idx)
            kept.append({"layers": n, "kept": idx})
        return _materialize(student, example), {"reduced": "depth", "encoders": kept}
    info: dict[str, Any] = {"reduced": "width"}
    if student_depth:
        info["keptHiddenLayers"] = _prune_hidden_layers(student, student_depth)
    layers = [
        (name, m)
        for name, m in student.named_modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.BatchNorm1d | nn.BatchNorm2d)
    ]
    weighted = [(n, m) for n, m in layers if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    if len(weighted) < 2:
        raise CompressionError(
            "cannot reduce a model with fewer than two Linear/Conv layers; give options.student"
        )
    if any(isinstance(m, nn.LayerNorm | nn.MultiheadAttention) for m in student.modules()):
        raise CompressionError(
            "cannot narrow a model with LayerNorm/attention outside a TransformerEncoder; give options.student"
        )
    last = weighted[-1][0]
    if student_width:
        widest = max(
            (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in weighted if n != last
        )
        width = min(1.0, student_width / widest)
    info["factor"] = round(width, 6)
    for name, m in layers:
        new: nn.Module
        if isinstance(m, nn.Linear):
            out = m.out_features if name == last else max(1, round(m.out_features * width))
            new = nn.LazyLinear(out, bias=m.bias is not None)
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            if m.groups != 1:
                raise CompressionError("cannot narrow grouped convolutions; give options.student")
            out = m.out_channels if name == last else max(1, round(m.out_channels * width))
            lazy = nn.LazyConv1d if isinstance(m, nn.Conv1d) else nn.LazyConv2d
            new = lazy(out, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None)  # type: ignore[arg-type]
        else:
            lazy_bn = nn.LazyBatchNorm1d if isinstance(m, nn.BatchNorm1d) else nn.LazyBatchNorm2d
            new = lazy_bn(eps=m.eps, momentum=m.momentum)
        parent_name, _, attr = name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        setattr(parent, attr, new)
    return _materialize(student, example), info


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(
    student: torch.nn.Module,
    train_set: EvalSet,
    train_targets: list[np.ndarray[Any, Any]],
    val_set: EvalSet,
    val_targets: list[np.ndarray[Any, Any]],
    *,
    classifier: bool,
    options: dict[str, Any],
    labels: np.ndarray[Any, Any] | None,
    seed: int,
    progress: Callable[[str], None],
    teacher: Callable[[list[np.ndarray[Any, Any]]], list[np.ndarray[Any, Any]]] | None = None,
) -> dict[str, Any]:
    """Train in place; keep the weights of the epoch with the best validation fidelity.

    With `mixup > 0` and a `teacher`, every batch also carries mixed pairs of its inputs labelled by the
    teacher on the spot: the student sees the regions between samples, where it most often disagrees.
    """
    import torch

    mixup = float(options.get("mixup", 0.0))
    rng = np.random.default_rng(seed)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.from_numpy(np.ascontiguousarray(a)) for a in train_set.arrays]
    ys = [torch.from_numpy(t.astype(np.float32)) for t in train_targets]
    y_hard = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    vx = [torch.from_numpy(np.ascontiguousarray(a)) for a in val_set.arrays]
    temperature, alpha = float(options["temperature"]), float(options["alpha"])
    opt = torch.optim.AdamW(
        student.parameters(), lr=float(options["lr"]), weight_decay=float(options["weightDecay"])
    )
    epochs, patience, bs = int(options["epochs"]), int(options["patience"]), int(options["batchSize"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))

    def outputs(module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.utils._pytree import tree_leaves

        return [t for t in tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]

    def score() -> tuple[float, float]:
        """(top-1 agreement, mean cosine) for classifiers, else (mean cosine, mean cosine).

        The cosine breaks ties: once every validation sample agrees, a student whose logits still move
        closer to the teacher's keeps improving instead of stopping at the first perfect epoch.
        """
        student.eval()
        with torch.no_grad():
            got = outputs(student, vx)
        ref = np.concatenate([t.reshape(len(t), -1) for t in val_targets], 1)
        out = np.concatenate([g.reshape(len(g), -1).numpy() for g in got], 1)
        norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-12)
        cos = float(((ref * out).sum(1) / norms).mean())
        if classifier:
            return float((got[0].argmax(1).numpy() == val_targets[0].argmax(1)).mean()), cos
        return cos, cos

    best: tuple[float, float] = (-math.inf, -math.inf)
    best_state, best_epoch = copy.deepcopy(student.state_dict()), 0
    history: list[dict[str, float]] = []
    n = len(train_set)
    for epoch in range(1, epochs + 1):
        student.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            inputs = [x[idx] for x in xs]
            targets = [y[idx] for y in ys]
            hard = y_hard[idx] if y_hard is not None else None
            got = outputs(student, inputs)
            loss = _loss(got, targets, hard, classifier=classifier, temperature=temperature, alpha=alpha)
            if mixup > 0 and teacher is not None:
                lam = rng.beta(mixup, mixup, size=len(idx)).astype(np.float32)
                other = rng.permutation(len(idx))
                mixed = [_mix(a.numpy(), lam, other) for a in inputs]
                mixed_targets = [torch.from_numpy(t.astype(np.float32)) for t in teacher(mixed)]
                got_mixed = outputs(student, [torch.from_numpy(m) for m in mixed])
                loss = loss + _loss(
                    got_mixed, mixed_targets, None, classifier=classifier, temperature=temperature, alpha=0.0
                )
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        s = score()
        history.append({"epoch": epoch, "loss": round(total / n, 6), "fidelity": round(s[0], 6)})
        what = f"top1 {s[0]:.4f}, cosine {s[1]:.4f}" if classifier else f"cosine {s[0]:.4f}"
        progress(f"distill epoch {epoch}/{epochs}: loss {total / n:.4f}, validation {what}")
        if s > best:
            best, best_state, best_epoch = s, copy.deepcopy(student.state_dict()), epoch
        elif epoch - best_epoch >= patience:
            progress(
                f"early stop: no improvement for {patience} epochs (best {best[0]:.4f} at epoch {best_epoch})"
            )
            break
    student.load_state_dict(best_state)
    student.eval()
    return {
        "epochs": len(history),
        "bestEpoch": best_epoch,
        "validationFidelity": best[0],
        "history": history,
    }


def _mix(
    a: np.ndarray[Any, Any], lam: np.ndarray[Any, Any], other: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    if not np.issubdtype(a.dtype, np.floating):
        return a  # token ids and masks cannot be interpolated
    w = lam.reshape(-1, *([1] * (a.ndim - 1)))
    mixed: np.ndarray[Any, Any] = (w * a + (1 - w) * a[other]).astype(a.dtype)
    return mixed


def _loss(
    got: list[torch.Tensor],
    targets: list[torch.Tensor],
    hard: torch.Tensor | None,
    *,
    classifier: bool,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Temperature-scaled KL to the teacher (plus optional hard-label CE) for logits, MSE for other outputs."""
    import torch
    import torch.nn.functional as F

    loss = torch.zeros(())
    for k, (g, y) in enumerate(zip(got, targets, strict=True)):
        if classifier and k == 0:
            kl = F.kl_div(
                F.log_softmax(g / temperature, 1), F.softmax(y / temperature, 1), reduction="batchmean"
            )
            loss = loss + (1 - alpha) * kl * temperature**2
            if hard is not None and alpha > 0:
                loss = loss + alpha * F.cross_entropy(g, hard)
        else:
            loss = loss + F.mse_loss(g, y)
    return loss


def student_params(module: torch.nn.Module) -> int:
    return _params(module)
