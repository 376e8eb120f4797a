"""The aggregator's torch model: shapes, evaluation, a server step that never touches the old model, saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiri_runtime.learning import rounds
from kiri_runtime.learning.loading import TorchGlobalModel, load_model


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


def test_saved_weights_load_back_into_the_factory_model(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "rounds" / "0001" / rounds.WEIGHTS_FILE
    model.save(path)
    back = load_model("torch.nn:Linear", {"in_features": 4, "out_features": 2}, path, seed=1)
    torch.testing.assert_close(back.state_dict(), model.module.state_dict())
