"""A factory's `--state-dict`: safetensors (what the learning loop publishes) and a user's torch state dict both
load into the factory's module; a file that is neither is one `CompressionError` line."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.exporting import load_torch

FACTORY = "torch.nn:Linear"
KWARGS = {"in_features": 4, "out_features": 2}


def _trained() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torch.nn.Linear(4, 2).state_dict()


def _load(path: Path) -> torch.nn.Module:
    # seed=0: the factory's own initialisation differs from _trained(), so equality means the file was loaded.
    return load_torch("factory", path, factory=FACTORY, factory_kwargs=KWARGS, seed=0).module


def _error(path: Path) -> str:
    with pytest.raises(CompressionError) as info:
        _load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_safetensors_state_dict_loads_into_the_factory_module(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(_trained(), path)
    torch.testing.assert_close(_load(path).state_dict(), _trained())


def test_a_safetensors_state_dict_fetched_under_another_name_is_told_by_its_header(tmp_path: Path) -> None:
    path = tmp_path / "3f9a0c"  # the fetch cache names files by digest
    path.write_bytes(safetensors.torch.save(_trained()))
    torch.testing.assert_close(_load(path).state_dict(), _trained())


def test_a_users_torch_state_dict_still_loads_into_the_factory_module(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_trained(), path)
    torch.testing.assert_close(_load(path).state_dict(), _trained())


def test_a_torch_checkpoint_nesting_its_state_dict_loads_too(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": _trained(), "epoch": 9}, path)
    torch.testing.assert_close(_load(path).state_dict(), _trained())


def test_a_truncated_safetensors_state_dict_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(safetensors.torch.save(_trained())[:-4])
    assert _error(path) == (
        f"--state-dict: weights {path}: not a valid safetensors file: "
        "Error while deserializing header: incomplete metadata, file not fully covered"
    )


def test_a_garbage_state_dict_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"garbage!" * 4)
    assert _error(path) == (
        f"--state-dict: weights {path}: neither safetensors nor a torch state dict (it starts with bytes 67617262)"
    )


def test_a_state_dict_of_another_shape_is_one_line_naming_the_factory(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, path)
    assert _error(path) == (
        "state dict weights.safetensors does not fit torch.nn:Linear: Error(s) in loading state_dict for Linear: "
        "size mismatch for weight: copying a param with shape torch.Size([2, 3]) from checkpoint, "
        "the shape in current model is torch.Size([2, 4])."
    )
