"""load_source on the trained tiny LLaMA: hf directory, hf tar (file:// and http://) and GGUF sources, and the
bad sources made from it, each with its exact error line."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.packing import pack
from kiri_runtime.compressing.lm.sources import directory_sha256, load_source

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TEXT = "import os\nfrom pathlib import Path\n\ndef glob(pattern):\n    return [p for p in Path('.').glob(pattern)]\n"


def _logits(hf_dir: Path, ids: list[int], gguf_file: str | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # type: ignore[no-any-return]


def _ids(hf_dir: Path, text: str = TEXT) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"])


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_hf_directory_loads_in_place(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = load_source(f"file://{tiny_llama_dir}", "hf", tmp_path)
    assert (src.hf_dir, src.format, src.architecture, src.gguf_path, dict(src.gguf_tensor_types)) == (
        tiny_llama_dir,
        "hf",
        "LlamaForCausalLM",
        None,
        {},
    )
    assert src.size_bytes == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert src.sha256 == directory_sha256(tiny_llama_dir)


def test_an_hf_tar_over_http_is_fetched_verified_and_unpacked(
    tiny_llama_dir: Path, tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, base = http_root
    sha, _size = pack(tiny_llama_dir, root / "ckpt.tar")
    src = load_source(f"{base}/ckpt.tar", "hf", tmp_path / "work", sha)
    assert (src.sha256, src.format, src.architecture) == (sha, "hf", "LlamaForCausalLM")
    assert (src.hf_dir / "model.safetensors").read_bytes() == (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()
    assert np.array_equal(
        _logits(src.hf_dir, _ids(src.hf_dir)), _logits(tiny_llama_dir, _ids(tiny_llama_dir))
    )


def test_an_hf_tar_over_http_with_another_sha256_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, base = http_root
    pack(tiny_llama_dir, root / "ckpt.tar")
    with pytest.raises(CompressionError) as e:
        load_source(f"{base}/ckpt.tar", "hf", tmp_path / "work", "0" * 64)
    assert str(e.value).startswith(f"source {base}/ckpt.tar: sha256 mismatch: ")


def test_an_f32_gguf_dequantises_to_a_checkpoint_with_the_models_logits_and_tokenizer(
    tiny_llama_dir: Path, tiny_llama_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    path = tiny_llama_gguf("F32")
    src = load_source(str(path), "gguf", tmp_path)
    assert (src.format, src.architecture, src.gguf_path, src.size_bytes) == (
        "gguf",
        "LlamaForCausalLM",
        path,
        path.stat().st_size,
    )
    assert set(src.gguf_tensor_types.values()) == {"F32"}
    ids = _ids(tiny_llama_dir)
    assert _ids(src.hf_dir) == ids
    assert np.abs(_logits(src.hf_dir, ids) - _logits(tiny_llama_dir, ids)).max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(src.hf_dir))
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(tiny_llama_dir)).chat_template
    config = json.loads((src.hf_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["eos_token_id"], config["tie_word_embeddings"]) == (2, False)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K"])
def test_a_quantized_gguf_dequantises_to_its_own_values_and_records_its_tensor_types(
    tiny_llama_dir: Path, tiny_llama_gguf: Callable[..., Path], tmp_path: Path, qtype: str
) -> None:
    path = tiny_llama_gguf(qtype)
    src = load_source(f"file://{path}", "gguf", tmp_path)
    types = dict(src.gguf_tensor_types)
    assert (types["blk.0.attn_norm.weight"], types["blk.0.ffn_down.weight"], types["output.weight"]) == (
        "F32",
        qtype,
        {"Q4_K": "Q5_0"}.get(qtype, qtype),
    )
    assert len(types) == 2 * 9 + 3
    ids = _ids(tiny_llama_dir)
    # The reference is the GGUF's own (dequantised) weights: equal to what transformers computes from the file.
    assert np.abs(_logits(src.hf_dir, ids) - _logits(path.parent, ids, gguf_file=path.name)).max() <= 1e-5


def _error(uri: str, fmt: str, work: Path) -> str:
    with pytest.raises(CompressionError) as e:
        load_source(uri, fmt, work)
    return str(e.value)


def test_a_checkpoint_without_its_tokenizer_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, d)
    (d / "tokenizer.json").unlink()
    assert _error(str(d), "hf", tmp_path / "w") == f"source {d}: no tokenizer: tokenizer.json is missing"


def test_a_checkpoint_of_an_unknown_architecture_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    assert _error(str(d), "hf", tmp_path / "w") == (
        f"source {d}: architecture MambaForCausalLM is not supported (supported: LlamaForCausalLM, "
        "MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )


def test_a_checkpoint_tar_with_truncated_safetensors_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, d)
    full = (d / "model.safetensors").stat().st_size
    with (d / "model.safetensors").open("r+b") as fh:
        fh.truncate(full // 2)
    pack(d, tmp_path / "ckpt.tar")
    uri = f"file://{tmp_path / 'ckpt.tar'}"
    assert _error(uri, "hf", tmp_path / "w") == (
        f"source {uri}: model.safetensors is truncated: its header says {full} bytes, the file has {full // 2}"
    )


def test_a_gguf_with_an_iq4_nl_tensor_is_refused(
    tiny_llama_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    path = tiny_llama_gguf("Q4_0", types={"blk.1.ffn_up.weight": "IQ4_NL"})
    assert _error(str(path), "gguf", tmp_path) == (
        f"source {path}: GGUF tensor blk.1.ffn_up.weight has type IQ4_NL, which Kiri cannot read (supported: BF16, "
        "F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0)"
    )


def test_a_truncated_gguf_is_refused(tiny_llama_gguf: Callable[..., Path], tmp_path: Path) -> None:
    full = tiny_llama_gguf("Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size - 4096])
    assert _error(str(cut), "gguf", tmp_path / "w") == (
        f"source {cut}: GGUF is truncated: its header says {full.stat().st_size} bytes, "
        f"the file has {full.stat().st_size - 4096}"
    )
