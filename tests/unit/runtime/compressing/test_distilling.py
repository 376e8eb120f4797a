"""Student construction and distillation options, including the ModelDeployment API's option names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiri_runtime.compressing import distilling, quantizing
from kiri_runtime.compressing.errors import CompressionError


def _mlp(hidden: int = 64, layers: int = 3) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = 16
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, 5))


def _linears(m: nn.Module) -> list[tuple[int, int]]:
    return [(x.in_features, x.out_features) for x in m.modules() if isinstance(x, nn.Linear)]


def test_width_factor_narrows_hidden_layers_and_keeps_the_output() -> None:
    student, info = distilling.reduced_copy(_mlp(), width=0.25, depth=1.0, example=(torch.randn(2, 16),))
    assert _linears(student) == [(16, 16), (16, 16), (16, 16), (16, 5)]
    assert info == {"reduced": "width", "factor": 0.25}
    assert student(torch.randn(3, 16)).shape == (3, 5)


def test_absolute_student_width_and_depth_from_the_api() -> None:
    student, info = distilling.reduced_copy(
        _mlp(), width=1.0, depth=1.0, example=(torch.randn(2, 16),), student_width=8, student_depth=1
    )
    assert _linears(student) == [(16, 8), (8, 5)]
    assert info == {"reduced": "width", "keptHiddenLayers": 1, "factor": 0.125}


def test_cnn_channels_are_narrowed_with_their_batch_norms() -> None:
    teacher = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 3),
    )
    student, _ = distilling.reduced_copy(teacher, width=0.5, depth=1.0, example=(torch.randn(2, 1, 8, 8),))
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d)).num_features == 4
    assert _linears(student) == [(8 * 4 * 4, 3)]


def test_transformer_depth_keeps_evenly_spaced_teacher_layers() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    teacher = nn.Sequential(nn.TransformerEncoder(layer, 5, enable_nested_tensor=False))
    student, info = distilling.reduced_copy(teacher, width=0.5, depth=0.4, example=(torch.randn(2, 3, 8),))
    assert info == {"reduced": "depth", "encoders": [{"layers": 5, "kept": [0, 4]}]}
    enc = student[0]
    assert isinstance(enc, nn.TransformerEncoder)
    assert torch.equal(enc.layers[1].linear1.weight, teacher[0].layers[4].linear1.weight)
    _, info = distilling.reduced_copy(
        teacher, width=1, depth=1, example=(torch.randn(2, 3, 8),), student_depth=3
    )
    assert info["encoders"][0]["kept"] == [0, 2, 4]


def test_unsupported_architectures_ask_for_a_student_factory() -> None:
    with pytest.raises(CompressionError, match=r"options\.student"):
        distilling.reduced_copy(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), width=0.5, depth=1,
            example=(torch.randn(2, 4),),
        )  # fmt: skip
    with pytest.raises(CompressionError, match="studentDepth"):
        distilling.reduced_copy(
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2)), width=1, depth=1,
            example=(torch.randn(2, 1, 5, 5),), student_depth=1,
        )  # fmt: skip


def test_option_defaults_accept_the_api_shape() -> None:
    opts = distilling.defaults({"studentWidth": 32, "quantize": True, "perChannel": None})
    assert opts["quantize"] == "int8-dynamic" and opts["width"] == 1.0 and opts["depth"] == 1.0
    assert opts["perChannel"] is True
    assert distilling.defaults({"quantize": False})["quantize"] is None
    assert distilling.defaults({})["width"] == 0.5
    with pytest.raises(CompressionError, match="unknown options"):
        distilling.defaults({"widht": 0.5})
    with pytest.raises(CompressionError, match="positive integer"):
        distilling.defaults({"studentWidth": 0})
    assert (
        quantizing.defaults("int8-static", {"perChannel": None, "calibrationSamples": 10})["perChannel"]
        is False
    )
    with pytest.raises(CompressionError, match="true or false"):
        quantizing.defaults("int8-dynamic", {"perChannel": "yes"})


def test_mixup_interpolates_float_inputs_and_leaves_ids_alone() -> None:
    import numpy as np

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    other = np.array([1, 2, 0])
    assert np.array_equal(distilling._mix(a, np.ones(3, np.float32), other), a)
    half = distilling._mix(a, np.full(3, 0.5, np.float32), other)
    assert np.allclose(half, (a + a[other]) / 2) and half.dtype == np.float32
    ids = np.arange(6).reshape(3, 2)
    assert distilling._mix(ids, np.full(3, 0.5, np.float32), other) is ids
    assert distilling.defaults({"mixup": 0.4})["mixup"] == 0.4
    with pytest.raises(CompressionError, match="mixup"):
        distilling.defaults({"mixup": -1})
