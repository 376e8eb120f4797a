"""Compression benchmark: size, latency (against fp32 in the same run) and fidelity per model and variant.

    .venv/bin/python bench/compress/bench_compress.py [--quick] [--only transformer,cnn,mlp]

Latency is p50 of single-sample inference with one ONNX Runtime thread, variants and fp32 interleaved round by
round so that load from other processes hits both alike. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_models

from kiri_runtime.compressing import running, specs
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import Manifest

MODELS = str(Path(__file__).with_name("bench_models.py"))
TEACHER_ACCURACY: list[float] = []
# The distilled CNN student: unlabeled training samples and the variant's options (overridable from the CLI).
CNN: dict[str, Any] = {"train": 12000, "student": "width=0.5,temperature=1,patience=8"}


def _train_cnn_teacher(path: Path, quick: bool) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = bench_models.cnn()
    x, y = bench_models.blobs_images(3000 if quick else 6000, seed=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = 150 if quick else 400
    for step in range(steps):
        idx = torch.randint(0, len(xt), (64,))
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % 100 == 0:
            print(f"  teacher step {step}/{steps}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    xe, ye = bench_models.blobs_images(500, seed=11)
    with torch.no_grad():
        acc = (model(torch.from_numpy(xe)).argmax(1).numpy() == ye).mean()
    print(f"  teacher accuracy on fresh data: {acc:.3f}", file=sys.stderr)
    TEACHER_ACCURACY.append(float(acc))
    torch.save(model.state_dict(), path)


def transformer(work: Path, quick: bool) -> tuple[Manifest, float]:
    torch.manual_seed(0)
    kwargs = {"outlier": 20.0}
    state = work / "encoder.pt"
    torch.save(bench_models.encoder(**kwargs).state_dict(), state)
    data = work / "encoder.npz"
    np.savez(
        data, x=np.random.default_rng(0).standard_normal((48 if quick else 96, 64, 32)).astype(np.float32)
    )
    variants = [specs.parse_variant(v) for v in ("name=int8,method=int8-dynamic", "fp16")]
    return _run(
        work / "transformer", f"{MODELS}:encoder", variants, data, state=state, kwargs=kwargs, task="other",
        gates=["cosine.min>=0.99"], quick=quick,
    )  # fmt: skip


def cnn(work: Path, quick: bool) -> tuple[Manifest, float]:
    state = work / "cnn.pt"
    _train_cnn_teacher(state, quick)
    x_train, _ = bench_models.blobs_images(2000 if quick else CNN["train"], seed=12)
    x_eval, _ = bench_models.blobs_images(500, seed=13)
    train, data = work / "cnn-train.npz", work / "cnn-eval.npz"
    np.savez(train, x=x_train)
    np.savez(data, x=x_eval)
    epochs = 8 if quick else 30
    variants = [
        specs.parse_variant(f"name=student,method=distilled,quantize=true,epochs={epochs},{CNN['student']}"),
        specs.parse_variant("name=int8-static,method=int8-static,perChannel=true"),
    ]
    return _run(
        work / "cnn", f"{MODELS}:cnn", variants, data, state=state, train=train, task="classifier",
        gates=["top1-agreement>=0.97"],
        quick=quick,
    )  # fmt: skip


def mlp(work: Path, quick: bool) -> tuple[Manifest, float]:
    torch.manual_seed(0)
    state = work / "mlp.pt"
    torch.save(bench_models.mlp().state_dict(), state)
    data = work / "mlp.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
    variants = [
        specs.parse_variant(v)
        for v in (
            "name=int8,method=int8-dynamic,perChannel=true",
            "name=int8-static,method=int8-static",
            "fp16",
        )
    ]
    return _run(
        work / "mlp", f"{MODELS}:mlp", variants, data, state=state, quick=quick, gates=["cosine.min>=0.99"]
    )


def _run(
    out: Path,
    source: str,
    variants: list,  # type: ignore[type-arg]
    data: Path,
    *,
    state: Path,
    quick: bool,
    gates: list[str],
    kwargs: dict | None = None,  # type: ignore[type-arg]
    train: Path | None = None,
    task: str = "auto",
) -> tuple[Manifest, float]:
    t0 = time.monotonic()
    req = running.Request(
        source=source,
        out=out,
        variants=variants,
        gates=gates,
        eval_data=str(data),
        train_data=str(train) if train else None,
        state_dict=str(state),
        factory_kwargs=kwargs or {},
        seed=0,
        latency_rounds=60 if quick else 200,
        task=task,
    )
    return running.run(req), time.monotonic() - t0


def report(name: str, m: Manifest, seconds: float) -> None:
    print(f"\n## {name}: fp32 {m.baseline.size_bytes / 1e6:.2f} MB, p50 {m.baseline.p50_latency_ms:.3f} ms "
          f"(run took {seconds:.0f} s)")  # fmt: skip
    print(f"{'variant':<14} {'method':<13} {'ok':<4} {'size x':>7} {'smaller':>8} {'lat x':>7} {'faster':>7} "
          f"{'cos min':>8} {'cos mean':>9} {'top1':>6} {'tried':>5}")  # fmt: skip
    for v in m.variants:
        fid, lat = v.fidelity, v.latency
        size = (v.size_bytes or 0) / m.baseline.size_bytes
        ratio = lat.ratio_vs_fp32 if lat else float("nan")
        top1 = f"{fid.top1_agreement:.3f}" if fid and fid.top1_agreement is not None else "-"
        print(
            f"{v.name:<14} {v.method:<13} {'yes' if v.accepted else 'NO':<4} {size:>7.3f} {1 / size if size else 0:>7.2f}x "
            f"{ratio:>7.3f} {1 / ratio:>6.2f}x {fid.cosine.min if fid else float('nan'):>8.4f} "
            f"{fid.cosine.mean if fid else float('nan'):>9.4f} {top1:>6} {len(v.search):>5}"
        )
        if v.method == "distilled":
            print(f"{'':<14} student {v.extra.get('studentParameters')} params vs teacher "
                  f"{v.extra.get('teacherParameters')}; epochs {v.extra['training']['epochs']}")  # fmt: skip
            for c in v.search:
                if c.fidelity and c.latency:
                    print(f"{'':<14} candidate quantize={c.options['quantize']}: latency x{c.latency.ratio_vs_fp32:.3f}, "
                          f"top1 {c.fidelity.top1_agreement}, size {c.size_bytes}")  # fmt: skip
        if not v.accepted or len(v.search) > 1:
            print(f"{'':<14} {v.reason}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller eval sets and fewer epochs")
    parser.add_argument("--only", default="transformer,cnn,mlp")
    parser.add_argument("--keep", type=Path, help="keep outputs here instead of a temporary directory")
    parser.add_argument(
        "--cnn-train", type=int, default=CNN["train"], help="unlabeled samples for distillation"
    )
    parser.add_argument(
        "--cnn-student", default=CNN["student"], help="student variant options (key=value,...)"
    )
    args = parser.parse_args()
    CNN.update(train=args.cnn_train, student=args.cnn_student)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kiri-bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    benches = {"transformer": transformer, "cnn": cnn, "mlp": mlp}
    results = []
    for name in args.only.split(","):
        print(f"# {name}", file=sys.stderr)
        try:
            results.append((name, *benches[name](work, args.quick)))
        except CompressionError as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return 2
    print(
        f"\nkiri compress benchmark ({'quick' if args.quick else 'full'}); ratios are variant / fp32 in the same run"
    )
    for name, m, seconds in results:
        report(name, m, seconds)
    if TEACHER_ACCURACY:
        print(f"\ncnn teacher accuracy on its own task (fresh samples): {TEACHER_ACCURACY[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
