"""Knowledge distillation: a smaller student trained on the full model's outputs.

Teacher outputs come from the verified fp32 ONNX model, so any source format can teach. The student is a given
factory, or a reduced copy of the teacher when its structure allows: narrower Linear/Conv layers (MLP, CNN) or
fewer layers of an nn.TransformerEncoder (kept evenly spaced and initialised from the teacher, as DistilBERT does).
A teacher with no PyTorch module to copy (an ONNX source, as every ModelDeployment example has) gets the default
student: an MLP of `studentDepth` (default 2) hidden ReLU layers of `studentWidth` (default 64) units on the
flattened float input (one), one linear head per output. The variant's gate decides whether it is good enough.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiri_runtime.compressing import evaluating, exporting, quantizing
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.evaluating import EvalSet
from kiri_runtime.compressing.searching import Context, Search, fidelity
from kiri_runtime.compressing.students import DEFAULT_STUDENT_DEPTH, DEFAULT_STUDENT_WIDTH, mlp_student
from kiri_runtime.manifests import Variant, VariantSpec

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


# ---- the student pipeline: teacher outputs, a student, training, export, the search ----------------------


def distilled_variant(
    ctx: Context, spec: VariantSpec, raw_eval: EvalSet | None, raw_train: EvalSet | None
) -> tuple[Variant, Path | None]:
    import torch

    opts = defaults(spec.options)
    ctx.log(f"variant {spec.name}: distilled")
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(max(1, ctx.threads))
    if raw_train is not None:
        train_all = evaluating.bind(raw_train, evaluating.session(ctx.fp32))
        train_set, val_set = train_all.split(0.9)
        report_set, report_ref = ctx.evalset, ctx.reference
        label_src, held_out = raw_train, False
    else:
        train_set, val_set = ctx.evalset.split(0.8)
        cut = len(train_set)
        report_set, report_ref = val_set, [r[cut:] for r in ctx.reference]
        label_src, held_out = raw_eval, True  # type: ignore[assignment]
    labels = None
    if opts.get("labels"):
        if label_src is None or opts["labels"] not in label_src.names:
            raise CompressionError(
                f"distilled: labels array {opts['labels']!r} not found in the training data"
            )
        labels = label_src.arrays[label_src.names.index(opts["labels"])][: len(train_set)]
    teacher = evaluating.session(ctx.fp32, threads=ctx.threads)
    t_train = evaluating.run(teacher, train_set)
    t_val = evaluating.run(teacher, val_set)
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in train_set.arrays)
    info: dict[str, Any]
    if opts.get("student"):
        torch.manual_seed(ctx.seed)
        student = exporting.load_factory(str(opts["student"]))(**dict(opts.get("studentKwargs") or {}))
        if not isinstance(student, torch.nn.Module):
            raise CompressionError(
                f"distilled: student factory returned {type(student).__name__}, not a Module"
            )
        info = {"student": opts["student"]}
    elif ctx.torch_model is None or not ctx.torch_model.rebuildable:
        # No PyTorch teacher to copy (an ONNX source): the default student, documented in the API.
        width = int(opts.get("studentWidth") or DEFAULT_STUDENT_WIDTH)
        depth = int(opts.get("studentDepth") or DEFAULT_STUDENT_DEPTH)
        torch.manual_seed(ctx.seed)
        student = mlp_student(train_set.arrays, t_train, width=width, depth=depth)
        info = {"student": "mlp", "width": width, "depth": depth}
        ctx.log(
            f"  default student: an MLP of {depth} hidden layers of {width} units (no PyTorch teacher to copy)"
        )
    else:
        student, info = reduced_copy(
            ctx.torch_model.module,
            width=float(opts["width"]),
            depth=float(opts["depth"]),
            example=example,
            student_width=opts.get("studentWidth"),
            student_depth=opts.get("studentDepth"),
        )
    ctx.log(f"  training student ({student_params(student)} parameters) on {len(train_set)} samples")
    training = train(
        student,
        train_set,
        t_train,
        val_set,
        t_val,
        classifier=ctx.classifier,
        options=opts,
        labels=labels,
        seed=ctx.seed,
        progress=ctx.log,
        teacher=lambda arrays: evaluating.run(teacher, EvalSet(train_set.names, arrays)),
    )
    ctx.log("  exporting student")
    student_model = exporting.TorchModel(student, None, rebuildable=True)
    fp32_student = ctx.work / f"{spec.name}-student-fp32.onnx"
    exporting.export(student_model, train_set, fp32_student, output_names=ctx.output_names)
    exported = evaluating.run(evaluating.session(fp32_student), report_set)
    exporting.verify(student_model, report_set, exported, atol=ctx.atol, rtol=ctx.rtol)
    paths: list[tuple[dict[str, Any], Path]] = []
    if opts["quantize"] == "int8-dynamic":
        mm = ctx.work / f"{spec.name}-student-mm.onnx"
        quantizing.gemm_to_matmul(fp32_student, mm)
        q = ctx.work / f"{spec.name}-student-int8.onnx"
        q_opts = quantizing.defaults(
            "int8-dynamic", {"perChannel": opts["perChannel"], "reduceRange": opts["reduceRange"]}
        )
        quantizing.build("int8-dynamic", q_opts, mm, q)
        paths.append((opts | {"quantize": "int8-dynamic"}, q))
    paths.append((opts | {"quantize": None}, fp32_student))
    search = Search(ctx, spec)
    for options, path in paths:
        fid = fidelity(ctx, path, report_set, report_ref)
        cand, lat = search.judge(options, path, fid)
        ctx.log(
            f"  student {'int8' if options['quantize'] else 'fp32'}: fidelity {fid.top1_agreement if ctx.classifier else fid.cosine.mean}, latency x{lat.ratio_vs_fp32:.2f}, {'PASS' if cand.passed else 'miss'}"
        )
    teacher_params = student_params(ctx.torch_model.module) if ctx.torch_model is not None else None
    extra = {
        "studentParameters": student_params(student),
        "teacherParameters": teacher_params,
        "architecture": info,
        "training": {k: v for k, v in training.items() if k != "history"} | {"trainSamples": len(train_set)},
        "fidelitySet": "held-out 20% of the eval data"
        if held_out
        else "the eval data (training used --train-data)",
    }
    return search.finish(extra)
