"""Eval data of language models: JSON Lines of texts or chats; every bad line is an error naming it."""

from __future__ import annotations

from typing import Any

import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm.evaldata import Record, encode, parse


class FakeTokenizer:
    """One token per character (its code point); the chat template wraps each message in <role>...</role>."""

    def __init__(self, template: str | None = "yes") -> None:
        self.chat_template = template
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.calls.append((text, add_special_tokens))
        bos = [1] if add_special_tokens else []
        return {"input_ids": bos + [ord(c) for c in text]}

    def apply_chat_template(self, conversation: Any, *, tokenize: bool = True, **kwargs: Any) -> Any:
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in conversation)


def test_texts_and_chats_parse_and_blank_lines_are_skipped() -> None:
    text = '{"text": "ab"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    assert parse(text) == [
        Record(line=1, text="ab"),
        Record(line=3, messages=({"role": "user", "content": "hi"},)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"text": "ok"}\n{"text": "x"', "eval data line 2: not JSON"),
        ('{"text": "ok"}\n["a"]', "eval data line 2: expected an object with exactly one of"),
        ('{"prompt": "a"}', "eval data line 1: expected an object with exactly one of"),
        ('{"text": "a", "messages": []}', "eval data line 1: expected an object with exactly one of"),
        ('{"text": 3}', 'eval data line 1: "text" must be a non-empty string'),
        ('{"text": "  "}', 'eval data line 1: "text" must be a non-empty string'),
        ('{"messages": []}', 'eval data line 1: "messages" must be a non-empty list'),
        ('{"messages": [{"role": "user"}]}', "eval data line 1: messages\\[0\\] must be an object"),
        ('{"messages": [{"role": "", "content": "x"}]}', "eval data line 1: messages\\[0\\]"),
        ("\n\n", "eval data has no samples"),
    ],
)
def test_bad_lines_are_one_error_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        parse(text)


def test_texts_use_the_tokenizer_defaults_and_chats_the_template_without_extra_specials() -> None:
    tok = FakeTokenizer()
    records = parse('{"text": "ab"}\n{"messages": [{"role": "u", "content": "c"}]}')
    ids = encode(records, tok, max_tokens=100)
    assert ids == [[1, 97, 98], [ord(c) for c in "<u>c</u>"]]
    assert tok.calls == [("ab", True), ("<u>c</u>", False)]


def test_samples_are_truncated_to_the_context() -> None:
    assert encode(parse('{"text": "abcdef"}'), FakeTokenizer(), max_tokens=3) == [[1, 97, 98]]


def test_a_chat_without_a_chat_template_is_an_error_naming_the_line() -> None:
    records = parse('{"text": "ab"}\n{"messages": [{"role": "u", "content": "c"}]}')
    with pytest.raises(CompressionError, match="line 2 has messages, but the model's tokenizer has no chat"):
        encode(records, FakeTokenizer(template=None), max_tokens=100)


def test_a_sample_with_nothing_to_predict_is_an_error() -> None:
    tok = FakeTokenizer()
    with pytest.raises(CompressionError, match="line 1: 1 token\\(s\\); a sample needs at least 2"):
        encode([Record(line=1, messages=({"role": "", "content": ""},))], _OneToken(), max_tokens=9)
    assert encode(parse('{"text": "a"}'), tok, max_tokens=9) == [[1, 97]]


class _OneToken(FakeTokenizer):
    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [7]}
