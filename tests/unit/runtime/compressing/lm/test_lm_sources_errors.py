"""sources: every bad language-model source fails with one clear line (no model needed: synthetic files)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.packing import pack
from kiri_runtime.compressing.lm.sources import check_hf_dir, directory_sha256, gguf_extent, load_source

pytestmark = pytest.mark.timeout(30)


def _checkpoint(root: Path, architecture: str = "LlamaForCausalLM") -> Path:
    d = root / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    (d / "tokenizer.json").write_text("{}")
    save_file({"w": np.ones((4, 8), dtype=np.float32)}, str(d / "model.safetensors"))
    return d


def _error(uri: str, fmt: str, work: Path, sha256: str | None = None) -> str:
    with pytest.raises(CompressionError) as e:
        load_source(uri, fmt, work, sha256)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_good_checkpoint_directory_reports_its_architecture_and_weight_bytes(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    assert check_hf_dir(d) == ("LlamaForCausalLM", (d / "model.safetensors").stat().st_size)


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    assert _error("x", "onnx", tmp_path) == "--format 'onnx': language model sources are hf, gguf"


def test_a_directory_without_config_json_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / "config.json").unlink()
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: no config.json: not a Hugging Face checkpoint directory"
    )


def test_a_config_naming_no_architecture_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / "config.json").write_text('{"model_type": "llama"}')
    assert _error(str(d), "hf", tmp_path / "w") == (
        f'source {d}: config.json names no architecture ("architectures": [...])'
    )


def test_an_unsupported_architecture_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, "GPT2LMHeadModel")
    assert _error(f"file://{d}", "hf", tmp_path / "w") == (
        f"source file://{d}: architecture GPT2LMHeadModel is not supported (supported: LlamaForCausalLM, "
        "MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )


def test_a_checkpoint_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / "tokenizer.json").unlink()
    assert _error(str(d), "hf", tmp_path / "w") == f"source {d}: no tokenizer: tokenizer.json is missing"


def test_a_safetensors_file_shorter_than_its_header_says_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    full = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(full[:-10])
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: model.safetensors is truncated: its header says {len(full)} bytes, the file has {len(full) - 10}"
    )


def test_a_safetensors_file_cut_inside_its_header_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    full = (d / "model.safetensors").read_bytes()
    header = int.from_bytes(full[:8], "little")
    (d / "model.safetensors").write_bytes(full[:20])
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: model.safetensors is truncated: its header says {8 + header} bytes of header, the file has 20"
    )


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: weights are pickled (*.bin/*.pt); Kiri reads safetensors only"
    )


def test_a_shard_listed_in_the_index_but_absent_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}})
    )
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: weight shard model-00002-of-00002.safetensors is missing (listed in model.safetensors.index.json)"
    )


def test_a_directory_whose_sha256_differs_from_the_given_one_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    digest = directory_sha256(d)
    assert load_source(str(d), "hf", tmp_path / "w", digest).sha256 == digest
    assert _error(str(d), "hf", tmp_path / "w", "0" * 64) == (
        f"source {d}: sha256 mismatch: expected {'0' * 64}, got {digest}"
    )


def test_a_checkpoint_tar_loads_from_file_uri_with_the_tars_sha256(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    sha, _ = pack(d, tmp_path / "ckpt.tar")
    src = load_source(f"file://{tmp_path / 'ckpt.tar'}", "hf", tmp_path / "w", f"sha256:{sha}")
    assert (src.sha256, src.architecture, src.format) == (sha, "LlamaForCausalLM", "hf")
    assert (src.hf_dir / "config.json").read_bytes() == (d / "config.json").read_bytes()


def test_a_tar_whose_sha256_differs_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    sha, _ = pack(d, tmp_path / "ckpt.tar")
    uri = f"file://{tmp_path / 'ckpt.tar'}"
    assert _error(uri, "hf", tmp_path / "w", "f" * 64) == (
        f"source {uri}: sha256 mismatch: expected {'f' * 64}, got {sha}"
    )


def test_a_tar_with_an_unsafe_member_is_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        info = tarfile.TarInfo("../config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    uri = str(tmp_path / "evil.tar")
    assert _error(uri, "hf", tmp_path / "w") == (
        f"source {uri}: unsafe tar evil.tar: member '../config.json' escapes the directory"
    )
    assert not (tmp_path / "w" / "config.json").exists()


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "nope.gguf")
    assert _error(uri, "gguf", tmp_path / "w") == f"source {uri}: no such file"


def _gguf(
    path: Path, arch: str = "llama", raw: tuple[np.ndarray, gguf.GGMLQuantizationType] | None = None
) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_token_list(["a", "b"])
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    if raw is None:
        w.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), np.float32))
    else:
        w.add_tensor("blk.0.attn_q.weight", raw[0], raw_dtype=raw[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_extent_is_its_file_size(tmp_path: Path) -> None:
    p = _gguf(tmp_path / "m.gguf")
    assert gguf_extent(p) == p.stat().st_size


def test_a_truncated_gguf_is_refused(tmp_path: Path) -> None:
    p = _gguf(tmp_path / "m.gguf")
    full = p.read_bytes()
    p.write_bytes(full[:-1000])
    assert _error(str(p), "gguf", tmp_path / "w") == (
        f"source {p}: GGUF is truncated: its header says {len(full)} bytes, the file has {len(full) - 1000}"
    )


def test_a_gguf_cut_inside_its_header_is_refused(tmp_path: Path) -> None:
    p = _gguf(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:40])
    assert _error(str(p), "gguf", tmp_path / "w") == (
        f"source {p}: GGUF is truncated: its header ends early (the file has 40 bytes)"
    )


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip" * 4)
    assert _error(str(p), "gguf", tmp_path / "w") == f"source {p}: not a GGUF file (no GGUF magic)"


def test_a_gguf_of_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    p = _gguf(tmp_path / "m.gguf", arch="gpt2")
    assert _error(str(p), "gguf", tmp_path / "w") == (
        f"source {p}: GGUF architecture 'gpt2' is not supported (supported: llama, mistral, phi3, qwen2, qwen3)"
    )


def test_a_gguf_with_an_iq_tensor_type_is_refused_with_the_supported_types(tmp_path: Path) -> None:
    blocks = np.zeros((64, 2 * 18), dtype=np.uint8)  # IQ4_NL: 32 weights in 18 bytes
    p = _gguf(tmp_path / "m.gguf", raw=(blocks, gguf.GGMLQuantizationType.IQ4_NL))
    assert _error(str(p), "gguf", tmp_path / "w") == (
        f"source {p}: GGUF tensor blk.0.attn_q.weight has type IQ4_NL, which Kiri cannot read (supported: BF16, "
        "F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0)"
    )


def test_a_gguf_whose_sha256_differs_is_refused(tmp_path: Path) -> None:
    p = _gguf(tmp_path / "m.gguf")
    import hashlib

    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    assert _error(str(p), "gguf", tmp_path / "w", "1" * 64) == (
        f"source {p}: sha256 mismatch: expected {'1' * 64}, got {digest}"
    )
