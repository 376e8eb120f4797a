"""The continuous-batching decoder (decoding.SlotDecoder) on the tiny trained LLaMA against onnxruntime-genai's own
greedy loop: rows of different lengths in one step, rows leaving and joining, buffers growing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiri_runtime.decoding import SlotDecoder, unsupported

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROMPTS = [
    "def ",
    "class Template(object):\n    x = 1",
    "import os\n",
    "    return sorted(set(items), key=len)[:10]",
]
# Over 64 tokens (the buffers' growth step): a row that joins with it makes the live rows' buffers grow.
LONG_PROMPT = "def dedent(text):\n    lines = text.splitlines()\n" * 4


@pytest.fixture(scope="module")
def genai_dir() -> Path:
    from lm_fixture import tiny_genai

    return tiny_genai()


def encode(genai_dir: Path, text: str) -> list[int]:
    import onnxruntime_genai as og

    return [int(t) for t in og.Tokenizer(str(genai_dir)).encode(text)]


def reference(genai_dir: Path, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """onnxruntime-genai's greedy tokens and the logits each was chosen from."""
    import onnxruntime_genai as og

    model = og.Model(str(genai_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.asarray(prompt, dtype=np.int32))
    tokens, logits = [], []
    while not g.is_done():
        logits.append(np.asarray(g.get_logits(), dtype=np.float32).reshape(-1))
        g.generate_next_token()
        tokens.append(int(g.get_next_tokens()[0]))
    return tokens, logits


def test_the_tiny_model_is_one_the_decoder_takes(genai_dir: Path) -> None:
    assert unsupported(genai_dir) is None


def test_rows_of_different_lengths_decoded_in_one_step_give_each_rows_own_logits(genai_dir: Path) -> None:
    n = 12
    prompts = [encode(genai_dir, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 4
    refs = [reference(genai_dir, p, n) for p in prompts]
    decoder = SlotDecoder(genai_dir, threads=1)
    got: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):  # one at a time: the batched prefill is the next test's
        logits = decoder.prefill([p], [len(p) + n])[0]
        np.testing.assert_allclose(logits, refs[i][1][0], atol=1e-4)
        got[i].append(int(logits.argmax()))
    for k in range(1, n):
        logits = decoder.step([g[-1] for g in got])
        assert logits.shape == (4, decoder.vocab_size)
        for i in range(4):
            np.testing.assert_allclose(logits[i], refs[i][1][k], atol=1e-4)
            got[i].append(int(logits[i].argmax()))
    assert got == [r[0] for r in refs]
    assert decoder.lengths == [len(p) + n - 1 for p in prompts]


def test_a_row_that_leaves_is_replaced_by_the_last_and_a_row_that_joins_later_decodes_exactly(
    genai_dir: Path,
) -> None:
    n = 20
    a, b, c = (encode(genai_dir, p) for p in PROMPTS[1:])
    long = encode(genai_dir, LONG_PROMPT)
    assert len(long) > 64
    refs = {name: reference(genai_dir, p, n)[0] for name, p in (("a", a), ("b", b), ("c", c), ("long", long))}
    decoder = SlotDecoder(genai_dir, threads=1)
    rows: list[str] = []
    got: dict[str, list[int]] = {}

    def join(name: str, prompt: list[int], length: int) -> None:
        got[name] = [int(decoder.prefill([prompt], [length])[0].argmax())]
        rows.append(name)

    def step() -> None:
        logits = decoder.step([got[name][-1] for name in rows])
        for i, name in enumerate(rows):
            got[name].append(int(logits[i].argmax()))

    join("a", a, len(a) + 8)  # room for 8 positions only: the buffers grow when "long" joins
    join("b", b, len(b) + n)
    for _ in range(5):
        step()
    assert decoder.release(0) == 1  # "a" leaves mid-answer; "b" moves into slot 0
    rows[0] = rows.pop()
    join("c", c, len(c) + n)  # slot 1: the cache positions "b" used, stale
    for _ in range(3):
        step()
    join("long", long, len(long) + n)
    while len(got["b"]) < n:
        step()
    assert decoder.release(2) is None  # the last row leaves: nothing moves
    assert got["a"] == refs["a"][:6]
    assert got["b"] == refs["b"]
    assert got["c"] == refs["c"][: len(got["c"])] and len(got["c"]) == n - 5
    assert got["long"] == refs["long"][: len(got["long"])]
    assert decoder.rows == 2 and rows[:2] == ["b", "c"]


def test_prompts_of_different_lengths_prefilled_together_equal_each_prefilled_alone(genai_dir: Path) -> None:
    prompts = [encode(genai_dir, p) for p in PROMPTS]
    alone = SlotDecoder(genai_dir, threads=1)
    single = np.stack([alone.prefill([p], [len(p) + 4])[0] for p in prompts])
    together = SlotDecoder(genai_dir, threads=1)
    together.prefill([prompts[0]], [len(prompts[0]) + 4])  # a live row first: the batch lands in slots 1..4
    batched = together.prefill(prompts, [len(p) + 4 for p in prompts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert together.lengths == [len(prompts[0])] + [len(p) for p in prompts]
    tokens = [int(t) for t in single.argmax(axis=1)]
    np.testing.assert_allclose(together.step([tokens[0], *tokens])[1:], alone.step(tokens), atol=1e-4)
