"""The tiny LLaMA fixture is what it claims: a trained HF checkpoint the model builder and onnxruntime-genai
accept, and GGUFs in llama.cpp's layout that transformers reads back to the same model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lm_fixture import GGUF_QTYPES, tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TEXT = "def dedent(text):\n    return text.strip()  # héllo ✓\n"


def _logits(model: object, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]  # type: ignore[operator]
    return out.numpy()


def test_the_fixture_is_cached_by_content_hash(tiny_llama_dir: Path) -> None:
    assert tiny_llama() == tiny_llama_dir
    info = json.loads((tiny_llama_dir / "fixture.json").read_text())
    assert info["final_loss"] < 3.0  # trained: uniform over 512 tokens is 6.24


def test_the_checkpoint_is_a_llama_with_a_chat_template_and_im_end_as_eos(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert (config["architectures"], config["vocab_size"], config["hidden_size"], config["eos_token_id"]) == (
        ["LlamaForCausalLM"],
        512,
        128,
        2,
    )
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 1, 0)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_model_builder_makes_an_int4_model_that_generates_in_onnxruntime_genai(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    out = tmp_path / "int4"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(tiny_llama_dir),
            "-o",
            str(out),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    model = og.Model(str(out))
    tokenizer = og.Tokenizer(model)
    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert list(tokenizer.encode(TEXT)) == hf(TEXT)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=48, do_sample=False)
    generator = og.Generator(model, params)
    text = hf.apply_chat_template(
        [{"role": "user", "content": "What does def dedent do?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = hf(text)["input_ids"]
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    assert 0 < len(new) <= 48 - len(prompt)
    assert tokenizer.decode(new).strip() != ""


def test_an_f32_gguf_reads_back_through_transformers_with_identical_logits_and_tokenizer(
    tiny_llama_dir: Path, tiny_llama_gguf: Callable[..., Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama_gguf("F32")
    hf_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = hf_tok(TEXT)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    assert np.abs(_logits(back, ids) - _logits(ref, ids)).max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = "<|im_start|>user\nWhat does def f do?<|im_end|>\n"
    assert tok(TEXT)["input_ids"] == ids
    assert tok(chat)["input_ids"] == hf_tok(chat)["input_ids"]
    assert (tok.eos_token, tok.eos_token_id, tok.chat_template) == ("<|im_end|>", 2, hf_tok.chat_template)


@pytest.mark.parametrize("qtype", [q for q in GGUF_QTYPES if q != "F32"])
def test_each_quantized_gguf_stores_its_type_and_stays_close_to_the_model(
    tiny_llama_dir: Path, tiny_llama_gguf: Callable[..., Path], qtype: str
) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_fixture import K_QUANT_FALLBACK

    path = tiny_llama_gguf(qtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == qtype  # K = 256: every type fits
    assert types["blk.1.attn_q.weight"] == K_QUANT_FALLBACK.get(qtype, qtype)  # K = 128: K-quants fall back
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(TEXT)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    p, q = (np.exp(x - x.max(-1, keepdims=True)) for x in (_logits(ref, ids), _logits(back, ids)))
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert kl < 0.05


def test_the_k_quant_blocks_decode_to_the_weights_within_their_rounding() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from lm_fixture import quantize_q4_k, quantize_q6_k

    w = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    for pack, qtype, tol in ((quantize_q4_k, "Q4_K", 0.1), (quantize_q6_k, "Q6_K", 0.025)):
        back = dequantize(pack(w), GGMLQuantizationType[qtype])
        assert back.shape == w.shape
        assert np.sqrt(np.mean((back - w) ** 2)) < tol, qtype
