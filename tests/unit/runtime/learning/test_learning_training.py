"""What is trained and the update it yields: whole model, named layers, and FFA-LoRA adapters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.parts import TrainedPart, dense_update, lora_basis, upload_shapes
from kiri_runtime.learning.training import evaluate, train_local


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def _data(seed: int = 0, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


SHAPES = {"0.weight": (10, 6), "0.bias": (10,), "2.weight": (3, 10), "2.bias": (3,)}


def test_upload_shapes_per_part() -> None:
    assert upload_shapes(TrainedPart(), SHAPES) == SHAPES
    assert upload_shapes(TrainedPart("layers", ("2",)), SHAPES) == {"2.weight": (3, 10), "2.bias": (3,)}
    lora = upload_shapes(TrainedPart("lora", rank=2), SHAPES)
    assert lora == {"0.lora_B": (10, 2), "2.lora_B": (3, 2)}
    assert upload_shapes(TrainedPart("lora", ("2",), rank=2), SHAPES) == {"2.lora_B": (3, 2)}
    with pytest.raises(LearningError, match="selects no parameters"):
        upload_shapes(TrainedPart("layers", ("head",)), SHAPES)
    with pytest.raises(LearningError, match="needs at least one"):
        TrainedPart("layers")


def test_lora_basis_is_shared_by_seed_and_averaging_b_is_averaging_dense_updates() -> None:
    np.testing.assert_array_equal(lora_basis(7, "0", 2, 6), lora_basis(7, "0", 2, 6))
    assert not np.array_equal(lora_basis(7, "0", 2, 6), lora_basis(8, "0", 2, 6))
    part = TrainedPart("lora", rank=2)
    rng = np.random.default_rng(0)
    bs = [{"0.lora_B": rng.normal(size=(10, 2)).astype(np.float32)} for _ in range(3)]
    mean_b = {"0.lora_B": np.mean([b["0.lora_B"] for b in bs], axis=0)}
    dense_of_mean = dense_update(part, mean_b, SHAPES, 7)["0.weight"]
    mean_of_dense = np.mean([dense_update(part, b, SHAPES, 7)["0.weight"] for b in bs], axis=0)
    np.testing.assert_allclose(dense_of_mean, mean_of_dense, atol=1e-6)


def test_training_is_deterministic_under_a_seed_and_lowers_local_loss() -> None:
    x, y = _data()
    runs = [
        train_local(_model(), x, y, TrainedPart(), epochs=3, lr=0.2, batch_size=16, seed=5, lora_seed=0)
        for _ in range(2)
    ]
    for name in runs[0].update:
        np.testing.assert_array_equal(runs[0].update[name], runs[1].update[name])
    assert runs[0].loss_after < runs[0].loss_before
    assert runs[0].samples == 64


def test_layers_part_changes_only_the_named_layers() -> None:
    x, y = _data()
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_local(
        model, x, y, TrainedPart("layers", ("2",)), epochs=2, lr=0.2, batch_size=16, seed=0, lora_seed=0
    )
    assert set(result.update) == {"2.weight", "2.bias"}
    after = dict(model.named_parameters())
    assert torch.equal(before["0.weight"], after["0.weight"])
    np.testing.assert_allclose(
        result.update["2.weight"], (after["2.weight"] - before["2.weight"]).detach().numpy(), atol=1e-7
    )


def test_lora_update_merged_into_the_weights_reproduces_the_adapted_model() -> None:
    x, y = _data()
    part = TrainedPart("lora", rank=3)
    base = _model()
    adapted = _model()
    result = train_local(adapted, x, y, part, epochs=2, lr=0.2, batch_size=16, seed=0, lora_seed=11)
    assert set(result.update) == {"0.lora_B", "2.lora_B"}
    assert result.loss_after < result.loss_before
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    merged = base.state_dict()
    for name, u in dense_update(part, result.update, shapes, 11).items():
        merged[name] = merged[name] + torch.as_tensor(u)
    base.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(
            base(torch.as_tensor(x)), adapted(torch.as_tensor(x)), atol=1e-5, rtol=1e-5
        )


def test_evaluate_reports_accuracy_for_labels_and_only_loss_for_regression() -> None:
    x, y = _data()
    e = evaluate(_model(), x, y)
    assert e.accuracy is not None and 0 <= e.accuracy <= 1 and e.samples == 64
    reg = torch.nn.Linear(6, 1)
    assert evaluate(reg, x, x[:, 0].copy()).accuracy is None
