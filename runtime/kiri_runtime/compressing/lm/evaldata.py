"""Eval data of a causal language model: JSON Lines of texts or chats, tokenized as the model will see them.

Each non-blank line is one sample, either `{"text": "..."}` (tokenized with the tokenizer's defaults) or
`{"messages": [{"role": "user", "content": "..."}, ...]}` (rendered with the tokenizer's chat template, then
tokenized without adding special tokens again: the template has them). Any other line is an error that names the
line, because a typo must not silently shrink the eval set. Eval data is required for language models: the
gates are only as good as the texts they are measured on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kiri_runtime.compressing.errors import CompressionError

MIN_TOKENS = 2  # one position to predict


@dataclass(frozen=True)
class Record:
    """One parsed line: a text, or a chat (list of {role, content})."""

    line: int
    text: str | None = None
    messages: tuple[dict[str, str], ...] = ()


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    chat_template: Any

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, *, tokenize: bool = ..., **kwargs: Any) -> Any: ...


def _message(line: int, i: int, m: Any) -> dict[str, str]:
    if not (
        isinstance(m, dict)
        and isinstance(m.get("role"), str)
        and m["role"]
        and isinstance(m.get("content"), str)
    ):
        raise CompressionError(
            f"eval data line {line}: messages[{i}] must be an object with string 'role' and 'content'"
        )
    return {"role": m["role"], "content": m["content"]}


def parse(text: str, *, what: str = "eval data") -> list[Record]:
    """Parse JSON Lines into records; the first bad line is an error naming it."""
    records: list[Record] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CompressionError(f"{what} line {n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
            raise CompressionError(
                f'{what} line {n}: expected an object with exactly one of "text" or "messages", '
                f"got {raw.strip()[:80]}"
            )
        if "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise CompressionError(f'{what} line {n}: "text" must be a non-empty string')
            records.append(Record(line=n, text=obj["text"]))
            continue
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise CompressionError(f'{what} line {n}: "messages" must be a non-empty list')
        records.append(Record(line=n, messages=tuple(_message(n, i, m) for i, m in enumerate(msgs))))
    if not records:
        raise CompressionError(
            f'{what} has no samples: expected JSON Lines of {{"text": ...}} or {{"messages": ...}}'
        )
    return records


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode(
    records: Sequence[Record], tokenizer: Tokenizer, max_tokens: int, *, what: str = "eval data"
) -> list[list[int]]:
    """Token ids per record, truncated to `max_tokens` (the model's context)."""
    out: list[list[int]] = []
    for r in records:
        if r.text is not None:
            ids = _ids(tokenizer(r.text))
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise CompressionError(
                    f"{what} line {r.line} has messages, but the model's tokenizer has no chat template"
                )
            try:
                rendered = tokenizer.apply_chat_template(list(r.messages), tokenize=False)
            except Exception as e:  # jinja errors: the template refused these messages
                raise CompressionError(f"{what} line {r.line}: the chat template failed: {e}") from None
            ids = _ids(tokenizer(str(rendered), add_special_tokens=False))
        if len(ids) < MIN_TOKENS:
            raise CompressionError(
                f"{what} line {r.line}: {len(ids)} token(s); a sample needs at least {MIN_TOKENS}"
            )
        out.append(ids[:max_tokens])
    return out


def load_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok: Tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise CompressionError(f"cannot load the tokenizer from {tokenizer_dir}: {e}") from None
    return tok


def read_eval(path_or_uri: str | Path, tokenizer_dir: Path, max_tokens: int) -> list[list[int]]:
    """Token ids of every sample in a local JSON Lines file (fetch remote URIs first)."""
    path = Path(str(path_or_uri).removeprefix("file://"))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompressionError(f"cannot read eval data {path_or_uri}: {e}") from None
    return encode(parse(text), load_tokenizer(tokenizer_dir), max_tokens)
