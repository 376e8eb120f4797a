"""`kiri checkpoint` (the init container of a vLLM cloud tier): an hf source fetched, its sha256 checked, unpacked
once and linked at OUT/model; a source that does not match is refused with one line and nothing linked."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from kiri_operator.cli import main
from kiri_runtime.compressing.lm.sources import directory_sha256

pytestmark = pytest.mark.timeout(30)


def _checkpoint_tar(root: Path) -> tuple[Path, str]:
    d = root / "assistant"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    save_file({"w": np.ones((4, 8), dtype=np.float32)}, str(d / "model.safetensors"))
    tar = root / "checkpoint.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(d, arcname="assistant")  # under one top-level directory, as `tar cf x.tar dir` makes it
    return tar, hashlib.sha256(tar.read_bytes()).hexdigest()


def test_a_checkpoint_tar_is_unpacked_and_linked_at_out_model_by_a_relative_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar, sha = _checkpoint_tar(tmp_path)
    out = tmp_path / "volume"
    out.mkdir()
    assert main(["checkpoint", "--source", tar.as_uri(), "--sha256", sha, "--out", str(out)]) == 0
    link = out / "model"
    assert link.readlink() == Path(".source/source/assistant")
    assert sorted(p.name for p in link.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (link / "model.safetensors").read_bytes() == (
        tmp_path / "assistant" / "model.safetensors"
    ).read_bytes()
    assert capsys.readouterr().out == f"{link} -> .source/source/assistant\n"
    # Run again (a restarted init container): the same link, nothing left over from the first run.
    assert main(["checkpoint", "--source", tar.as_uri(), "--sha256", sha, "--out", str(out)]) == 0
    assert link.readlink() == Path(".source/source/assistant")
    assert sorted(p.name for p in out.iterdir()) == [".source", "model"]


def test_a_checkpoint_whose_sha256_does_not_match_is_refused_and_nothing_is_linked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar, sha = _checkpoint_tar(tmp_path)
    out = tmp_path / "volume"
    out.mkdir()
    wrong = "0" * 64
    assert main(["checkpoint", "--source", tar.as_uri(), "--sha256", wrong, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"kiri checkpoint: error: source {tar.as_uri()}: sha256 mismatch: expected {wrong}, got {sha}\n"
    )
    assert not (out / "model").exists()


def test_a_checkpoint_directory_is_checked_in_place_and_linked_by_its_absolute_path(tmp_path: Path) -> None:
    _checkpoint_tar(tmp_path)
    directory = tmp_path / "assistant"
    out = tmp_path / "volume"
    out.mkdir()
    sha = directory_sha256(directory)
    assert main(["checkpoint", "--source", str(directory), "--sha256", sha, "--out", str(out)]) == 0
    assert (out / "model").readlink() == directory.resolve()
