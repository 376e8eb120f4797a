"""Weights files: safetensors written atomically and read back equal, torch state dicts still read, every bad
file one line that names it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors
import torch

from kiri_runtime import weights
from kiri_runtime.weights import WeightsError


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2).state_dict()


def _saved(tmp_path: Path, name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    weights.save(_state(), path)
    return path


def _error(path: Path) -> str:
    with pytest.raises(WeightsError) as info:
        weights.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_saved_weights_are_safetensors_with_format_metadata_and_load_back_equal(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    assert weights.is_safetensors_header(path.read_bytes()[:9], path.stat().st_size)
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    back = weights.load(path)
    assert sorted(back) == ["bias", "weight"]
    torch.testing.assert_close(back, _state())


def test_extra_metadata_is_written_next_to_the_format(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    weights.save(_state(), path, {"kiri.round": "3"})
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "kiri.round": "3"}


def test_saving_leaves_no_temporary_file_and_the_same_state_gives_the_same_bytes(tmp_path: Path) -> None:
    first = _saved(tmp_path, "a.safetensors")
    second = _saved(tmp_path, "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert first.read_bytes() == second.read_bytes()


def test_saving_over_an_existing_file_replaces_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    weights.save(_state(), path)
    torch.testing.assert_close(weights.load(path), _state())


def test_tied_and_non_contiguous_tensors_are_saved_as_copies_and_load_back_equal(tmp_path: Path) -> None:
    shared = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"a": shared, "b": shared, "t": shared.t(), "row": shared[1]}
    path = tmp_path / "w.safetensors"
    weights.save(state, path)
    back = weights.load(path)
    assert sorted(back) == ["a", "b", "row", "t"]
    torch.testing.assert_close(back["b"], shared)
    torch.testing.assert_close(back["t"], shared.t().contiguous())
    torch.testing.assert_close(back["row"], torch.tensor([3.0, 4.0, 5.0]))


def test_a_state_holding_something_other_than_tensors_is_not_saved(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(WeightsError) as info:
        weights.save({"weight": torch.zeros(2), "step": 3}, path)
    assert str(info.value) == f"weights {path}: 'step' holds int, not a tensor"
    assert not path.exists()


def test_safetensors_is_told_by_suffix_or_by_the_header_whatever_the_name(tmp_path: Path) -> None:
    st = _saved(tmp_path)
    renamed = tmp_path / "0123abcd"
    renamed.write_bytes(st.read_bytes())
    pt = tmp_path / "w.pt"
    torch.save(_state(), pt)
    assert weights.is_safetensors(st) and weights.is_safetensors(renamed)
    assert not weights.is_safetensors(pt)
    assert weights.suffix_for(st.read_bytes()) == ".safetensors"
    assert weights.suffix_for(pt.read_bytes()) == ".pt"
    assert weights.suffix_for(b"") == ".pt"
    torch.testing.assert_close(weights.load(renamed), _state())


def test_a_torch_state_dict_loads_as_given_and_a_nested_checkpoint_by_its_state_dict(tmp_path: Path) -> None:
    plain, nested = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    torch.save(_state(), plain)
    torch.save({"state_dict": _state(), "epoch": 4}, nested)
    torch.testing.assert_close(weights.load(plain), _state())
    torch.testing.assert_close(weights.load(nested), _state())


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    assert _error(path) == f"weights file {path} does not exist"


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-5])
    assert _error(path) == (
        f"weights {path}: not a valid safetensors file: "
        "Error while deserializing header: incomplete metadata, file not fully covered"
    )


def test_a_truncated_safetensors_file_without_the_suffix_is_still_read_as_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "global-0123"
    path.write_bytes(_saved(tmp_path).read_bytes()[:-5])
    assert _error(path).startswith(f"weights {path}: not a valid safetensors file: ")


def test_garbage_named_safetensors_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not weights at all")
    assert _error(path) == (
        f"weights {path}: not a valid safetensors file: Error while deserializing header: header too large"
    )


def test_a_safetensors_header_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    good = _saved(tmp_path).read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good[:8] + b"{nonsense" + good[17:])
    assert _error(path).startswith(
        f"weights {path}: not a valid safetensors file: Error while deserializing header: invalid JSON in header"
    )


def test_garbage_named_pt_is_one_line_with_its_first_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"not weights at all")
    assert (
        _error(path)
        == f"weights {path}: neither safetensors nor a torch state dict (it starts with bytes 6e6f7420)"
    )


def test_an_empty_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    assert _error(path) == f"weights {path}: neither safetensors nor a torch state dict (it is empty)"


def test_a_truncated_torch_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_state(), path)
    path.write_bytes(path.read_bytes()[:100])
    assert _error(path) == (
        f"weights {path}: not a readable torch state dict: "
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory"
    )


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_a_torch_file_that_would_run_code_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "w.pt"
    torch.save({"weight": _RunsCode()}, path)
    assert _error(path) == (
        f"weights {path}: a torch file that holds more than tensors, refused (loading it could run code): "
        "Unsupported global: GLOBAL print was not an allowed global by default"
    )
    assert "this must never run" not in capsys.readouterr().out


def test_a_legacy_pickle_that_is_not_a_torch_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(pickle.dumps({"weight": [1.0]}, protocol=2))
    assert _error(path) == (
        f"weights {path}: not a readable torch state dict: RuntimeError: Invalid magic number; corrupt file?"
    )


def test_a_torch_file_holding_something_other_than_a_mapping_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save([torch.zeros(2)], path)
    assert _error(path) == f"weights {path}: holds a list, not a state dict (a mapping of names to tensors)"
