"""A bench-only LLaMA of realistic proportions for size and speed (never for fidelity): random weights.

hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1536, vocab 16,384 (a byte-level BPE trained on
standard-library sources), untied, 2,048 positions: 41.7M parameters, 167 MB in fp32. The tests' tiny model
(tests/lm_fixture.py) has a fixed overhead (tokenizer, graph, configs) as large as its weights; this one has the
proportions of a small real model, so size ratios and per-token cost are the weights'. Its weights are random
(seeded), so KL against it says nothing about quantization quality on a trained model; it still shows whether two
runtimes compute the same function from the same file. Cached in ${KIRI_CACHE:-~/.cache/kiri}/bench-models/.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import lm_fixture  # noqa: E402

PARAMS: dict[str, Any] = {
    "vocab_size": 16384,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "seed": 7,
}
TOKENIZER_MODULES = (
    "argparse", "asyncio.base_events", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "http.client", "inspect", "ipaddress", "json.decoder",
    "logging", "pathlib", "pickle", "pydoc", "random", "shutil", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest.case", "urllib.parse", "zipfile",
)  # fmt: skip


def bench_llama() -> Path:
    dest = (
        lm_fixture.cache_root().parent / "bench-models" / f"llama-{lm_fixture._digest(PARAMS, [], 'bench')}"
    )
    return lm_fixture._atomic_build(dest, _build)


def _build(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [Path(importlib.import_module(m).__file__ or "").read_text() for m in TOKENIZER_MODULES]
    tok = lm_fixture._train_tokenizer(texts, PARAMS["vocab_size"])
    vocab = tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=lm_fixture.BOS,
        eos_token=lm_fixture.EOS,
        pad_token=lm_fixture.PAD,
        unk_token=None,
        model_max_length=PARAMS["max_position_embeddings"],
    )
    fast.chat_template = lm_fixture.CHAT_TEMPLATE
    fast.save_pretrained(out)
    lm_fixture._fix_tokenizer_config(out)
    torch.manual_seed(PARAMS["seed"])
    p = {k: v for k, v in PARAMS.items() if k != "seed"}
    config = LlamaConfig(**{**p, "vocab_size": max(vocab, 512)}, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    (out / "fixture.json").write_text(json.dumps({**PARAMS, "tokenizer_vocab": vocab}, indent=1) + "\n")


if __name__ == "__main__":
    print(bench_llama())
