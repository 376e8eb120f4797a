"""The tiny trained LLaMA every language-model test uses (built once, cached by content hash) and its GGUFs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from lm_fixture import tiny_gguf, tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """HF checkpoint directory of the trained tiny LlamaForCausalLM (untied lm_head); treat it as read-only."""
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(qtype, types=None) -> a GGUF of the tiny LLaMA with its weights as `qtype` (one file per call args)."""
    root = tmp_path_factory.mktemp("gguf")

    def make(qtype: str = "F32", types: Mapping[str, str] | None = None) -> Path:
        suffix = "-".join(f"{k}={v}" for k, v in sorted((types or {}).items()))
        name = f"model-{qtype}{'-' + suffix if suffix else ''}.gguf"
        return tiny_gguf(tiny_llama_dir, root / name, qtype, types=types)

    return make
