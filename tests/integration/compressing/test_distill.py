"""Distillation: a reduced copy or a given student trained on the teacher's outputs, then exported and gated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from compress_helpers import ZOO, load, save_npz
from compress_zoo import Encoder, mlp

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning.building import compression_variants_json

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Run = Callable[..., tuple[int, str]]
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _blobs(n: int, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(42).standard_normal((classes, 16)) * 1.5
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.standard_normal((n, 16))).astype(np.float32), y


def _trained_teacher(path: Path) -> None:
    torch.manual_seed(0)
    teacher = mlp(hidden=128)
    x, y = _blobs(2000, seed=1)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    torch.save(teacher.state_dict(), path)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A trained teacher (trained once per module: it is the slowest step) and its unlabeled data."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    state = tmp_path / "teacher.pt"
    _trained_teacher(state)
    x_train, y_train = _blobs(1500, seed=2)
    x_eval, _ = _blobs(300, seed=3)
    train = save_npz(tmp_path / "train.npz", x=x_train, labels=y_train)
    return state, train, save_npz(tmp_path / "eval.npz", x=x_eval)


def test_reduced_width_student_matches_the_teacher_and_can_be_quantized(
    tmp_path: Path, run_compress: Run, classifier: tuple[Path, Path, Path]
) -> None:
    state, train, data = classifier
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:mlp", "--factory-kwargs", '{"hidden": 128}', "--state-dict", str(state),
        "--eval-data", str(data), "--train-data", str(train), "--out", str(out), "--seed", "3",
        "--variant", "name=student,method=distilled,width=0.25,epochs=25,patience=5,quantize=\"int8-dynamic\"",
        "--variant", "name=hard,method=distilled,width=0.25,epochs=3,alpha=0.3,labels=labels,mixup=0.4",
        "--gate", "top1-agreement>=0.95", "--latency-rounds", "20",
    )  # fmt: skip
    assert rc == 0, log
    m = load(out)
    v = m.variant("student")
    assert v is not None and v.accepted, v.reason
    assert (
        v.fidelity is not None and v.fidelity.top1_agreement is not None and v.fidelity.top1_agreement >= 0.95
    )
    assert v.fidelity.samples == 300  # measured on the eval set, which training never saw
    assert v.extra["architecture"] == {"reduced": "width", "factor": 0.25}
    assert v.extra["studentParameters"] < v.extra["teacherParameters"] / 4
    assert v.extra["training"]["bestEpoch"] <= v.extra["training"]["epochs"] <= 25
    assert [c.options["quantize"] for c in v.search] == ["int8-dynamic", None]
    assert v.size_bytes is not None and v.size_bytes < m.model.size_bytes / 4
    assert "distill epoch 1/25" in log
    hard = m.variant("hard")
    assert hard is not None and hard.options["alpha"] == 0.3 and hard.options["mixup"] == 0.4
    assert hard.fidelity is not None and hard.fidelity.top1_agreement is not None


def test_transformer_student_keeps_every_other_layer(tmp_path: Path, run_compress: Run) -> None:
    torch.manual_seed(0)
    state = tmp_path / "enc.pt"
    torch.save(Encoder(layers=4).state_dict(), state)
    data = save_npz(
        tmp_path / "eval.npz", x=np.random.default_rng(0).standard_normal((80, 12, 16)).astype(np.float32)
    )
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:encoder", "--factory-kwargs", '{"layers": 4}', "--state-dict", str(state),
        "--eval-data", str(data), "--out", str(out), "--task", "other",
        "--variant", "name=small,method=distilled,depth=0.5,epochs=4", "--gate", "cosine.mean>=0.5",
        "--latency-rounds", "10",
    )  # fmt: skip
    assert rc == 0, log
    v = load(out).variant("small")
    assert v is not None and v.fidelity is not None and v.fidelity.top1_agreement is None
    assert v.extra["architecture"] == {"reduced": "depth", "encoders": [{"layers": 4, "kept": [0, 3]}]}
    assert v.extra["fidelitySet"].startswith("held-out")
    assert v.fidelity.samples == 16  # 20% of 80 held out from training
    assert v.accepted == (v.fidelity.cosine.mean >= 0.5)


def test_the_multi_site_fleet_example_compresses_an_onnx_source_with_the_default_student(
    tmp_path: Path, run_compress: Run, classifier: tuple[Path, Path, Path]
) -> None:
    """examples/multi-site-fleet.yaml's variants, as the operator passes them to the Job, from an ONNX model."""
    state, _, data = classifier
    teacher = mlp(hidden=128)
    teacher.load_state_dict(torch.load(state))
    source = tmp_path / "model.onnx"
    torch.onnx.export(
        teacher.eval(), (torch.zeros(2, 16),), source, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    example = yaml.safe_load((EXAMPLES / "multi-site-fleet.yaml").read_text())
    variants = compression_variants_json(ModelDeploymentSpec.model_validate(example["spec"]).edge.variants)
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", str(source), "--eval-data", str(data), "--out", str(out), "--variants-json", variants,
        "--latency-rounds", "10",
    )  # fmt: skip
    assert rc == 0, log
    m = load(out)
    assert [v.name for v in m.variants] == ["fp16", "student", "int8"]
    student = m.variant("student")
    assert student is not None
    assert student.extra["architecture"] == {"student": "mlp", "width": 64, "depth": 2}
    assert student.extra["studentParameters"] == 16 * 64 + 64 + 64 * 64 + 64 + 64 * 5 + 5
    assert [c.options["quantize"] for c in student.search] == ["int8-dynamic", None]
    assert student.accepted, student.reason
    assert "default student: an MLP of 2 hidden layers of 64 units" in log


def test_a_given_student_factory_is_used(
    tmp_path: Path, run_compress: Run, classifier: tuple[Path, Path, Path]
) -> None:
    state, train, data = classifier
    out = tmp_path / "out"
    rc, log = run_compress(
        "--source", f"{ZOO}:mlp", "--factory-kwargs", '{"hidden": 128}', "--state-dict", str(state),
        "--eval-data", str(data), "--train-data", str(train), "--out", str(out),
        "--variants-json", f'[{{"name": "tiny", "method": "distilled", "options": {{"student": "{ZOO}:mlp", '
        '"studentKwargs": {"hidden": 8}, "epochs": 15}}]', "--latency-rounds", "10",
    )  # fmt: skip
    assert rc == 0, log
    v = load(out).variant("tiny")
    assert v is not None and v.extra["architecture"] == {"student": f"{ZOO}:mlp"}
    assert v.extra["studentParameters"] == sum(p.numel() for p in mlp(hidden=8).parameters())
    assert v.gate[0].describe() == "top1-agreement.mean>=0.97"  # default gate for a distilled classifier
