"""A site's text for adapter training: JSON Lines documents, tokenized and packed into windows.

One document a line: `{"text": "..."}` or `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the
base tokenizer's chat template). Documents are tokenized, each followed by the end-of-sequence token, packed into
one stream and cut into windows of `seq_len` tokens. A bad line is one LearningError naming its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.learning.errors import LearningError

MAX_LINE_BYTES = 1 << 20


def load_documents(data_path: Path, render_chat: Any = None) -> list[str]:
    """The site's documents as text. `render_chat(messages) -> str` renders a chat line (the tokenizer's
    template); without it, chat lines are refused."""
    if not data_path.is_file():
        raise LearningError(f"site data {data_path} does not exist")
    docs: list[str] = []
    with data_path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise LearningError(f"{data_path}:{number}: line over {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as e:
                raise LearningError(f"{data_path}:{number}: not a JSON object: {e}") from None
            docs.append(_document(record, f"{data_path}:{number}", render_chat))
    if not docs:
        raise LearningError(f"site data {data_path} holds no documents")
    return docs


def _document(record: Any, where: str, render_chat: Any) -> str:
    if not isinstance(record, dict):
        raise LearningError(f'{where}: expected {{"text": ...}} or {{"messages": [...]}}')
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise LearningError(f"{where}: text must be a non-empty string")
        return text
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LearningError(f'{where}: expected {{"text": ...}} or a non-empty {{"messages": [...]}}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LearningError(f"{where}: messages[{i}] needs string role and content")
    if render_chat is None:
        raise LearningError(f"{where}: a chat line needs the base tokenizer's chat template")
    return str(render_chat(messages))


def tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base))
    except Exception as e:
        raise LearningError(f"{base}: no usable tokenizer: {type(e).__name__}: {e}") from None


def chat_renderer(tok: Any) -> Any:
    if not getattr(tok, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False))

    return render


def token_stream(tok: Any, docs: Iterable[str]) -> list[int]:
    """Documents tokenized and packed, each followed by the tokenizer's end-of-sequence token."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(int(eos))
    return stream


def windows(stream: Sequence[int], seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens; a short stream is one shorter window."""
    n = len(stream) // seq_len
    if n == 0:
        if len(stream) < 2:
            raise LearningError(f"site data holds {len(stream)} token(s); at least 2 are needed")
        return np.asarray([stream], dtype=np.int64)
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
