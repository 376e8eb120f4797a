"""The aggregator's torch model: shapes, evaluation, a server step that never touches the old model, saving
(safetensors), and loading the weights a round starts from (safetensors or a user's torch state dict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from kiri_runtime.learning import rounds
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.loading import TorchGlobalModel, load_model, save_weights

LINEAR = ("torch.nn:Linear", {"in_features": 4, "out_features": 2})


def _model() -> TorchGlobalModel:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    return TorchGlobalModel(torch.nn.Linear(4, 2), (x, (x[:, 0] > 0).astype(np.int64)))


def test_shapes_and_evaluation_come_from_the_module_and_the_held_out_set() -> None:
    model = _model()
    assert model.shapes() == {"weight": (2, 4), "bias": (2,)}
    e = model.evaluate()
    assert isinstance(e, rounds.Evaluation) and e.samples == 20
    assert e.accuracy is not None and 0 <= e.accuracy <= 1 and e.loss > 0


def test_an_update_makes_a_new_model_and_leaves_the_old_one_as_it_was() -> None:
    model = _model()
    before = model.module.weight.detach().clone()
    new = model.updated({"weight": np.full((2, 4), 0.5, np.float32)}, server_lr=0.5)
    assert new is not None and new is not model and new.eval_set is model.eval_set
    torch.testing.assert_close(new.module.weight.detach(), before + 0.25)
    torch.testing.assert_close(new.module.bias.detach(), model.module.bias.detach())
    torch.testing.assert_close(model.module.weight.detach(), before)


def test_an_update_to_non_finite_weights_gives_no_model() -> None:
    assert _model().updated({"bias": np.array([np.inf, 0.0], np.float32)}, server_lr=1.0) is None


def test_round_weights_are_written_as_safetensors_and_load_back_into_the_factory_model(
    tmp_path: Path,
) -> None:
    model = _model()
    path = tmp_path / "rounds" / "0001" / rounds.WEIGHTS_FILE
    model.save(path)
    assert path.name == "weights.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.safetensors"]  # no temporary left
    torch.testing.assert_close(safetensors.torch.load_file(path), model.module.state_dict())
    back = load_model(*LINEAR, path, seed=1)
    torch.testing.assert_close(back.state_dict(), model.module.state_dict())


def test_a_users_torch_state_dict_still_loads_as_the_first_rounds_weights(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "v1.pt"
    torch.save(model.module.state_dict(), path)
    back = load_model(*LINEAR, path, seed=1)
    torch.testing.assert_close(back.state_dict(), model.module.state_dict())


def test_a_truncated_weights_file_is_one_learning_error_line(tmp_path: Path) -> None:
    path = tmp_path / rounds.WEIGHTS_FILE
    save_weights(_model().module, path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(LearningError) as info:
        load_model(*LINEAR, path)
    assert str(info.value) == (
        f"weights {path}: not a valid safetensors file: "
        "Error while deserializing header: incomplete metadata, file not fully covered"
    )


def test_weights_of_another_model_are_one_line_naming_the_factory(tmp_path: Path) -> None:
    path = tmp_path / rounds.WEIGHTS_FILE
    save_weights(torch.nn.Linear(3, 2), path)
    with pytest.raises(LearningError) as info:
        load_model(*LINEAR, path)
    assert str(info.value) == (
        f"weights {path} do not fit torch.nn:Linear: Error(s) in loading state_dict for Linear: "
        "size mismatch for weight: copying a param with shape torch.Size([2, 3]) from checkpoint, "
        "the shape in current model is torch.Size([2, 4])."
    )
