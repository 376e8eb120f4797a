"""Gates of language-model variants: the grammar, the defaults per method, and the clear errors."""

from __future__ import annotations

import pytest

from kiri_runtime.compressing import specs
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import Gate, VariantSpec


@pytest.mark.parametrize(
    ("text", "described"),
    [
        ("kl.mean<=0.1", "kl.mean<=0.1"),
        ("kl<=0.1", "kl.mean<=0.1"),
        ("top1-agreement.mean>=0.88", "top1-agreement.mean>=0.88"),
        ("perplexity.ratio<=1.05", "perplexity.ratio<=1.05"),
        ("perplexity<=1.05", "perplexity.ratio<=1.05"),
        ("ppl.mean<=1.05", "perplexity.ratio<=1.05"),
        ("q4:greedy-match.mean>=0.9", "greedy-match.mean>=0.9"),
        ("greedy_match>=0.9", "greedy-match.mean>=0.9"),
    ],
)
def test_language_model_gates_parse(text: str, described: str) -> None:
    _, gate = specs.parse_gate(text)
    assert gate.describe() == described


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kl.min<=0.1", "kl has the stat mean only"),
        ("greedy-match.p5>=0.9", "greedy-match has the stat mean only"),
        ("perplexity.max<=1.1", "perplexity has the stat ratio only"),
    ],
)
def test_language_model_metrics_have_one_stat(text: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        specs.parse_gate(text)


def _v(method: str, **options: object) -> VariantSpec:
    return VariantSpec(name="v", method=method, options=dict(options))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("int8", ["kl.mean<=0.01", "top1-agreement.mean>=0.97"]),
        ("int4", ["kl.mean<=0.1", "top1-agreement.mean>=0.88"]),
        ("fp16", ["kl.mean<=0.001", "top1-agreement.mean>=0.99"]),
    ],
)
def test_a_language_model_variant_without_a_gate_gets_its_method_default(
    method: str, expected: list[str]
) -> None:
    (resolved,) = specs.resolve([_v(method)], [], classifier=None, lm=True)
    assert [g.describe() for g in resolved.gate] == expected


def test_command_line_gates_replace_the_default() -> None:
    (resolved,) = specs.resolve([_v("int4")], ["perplexity<=1.05"], classifier=None, lm=True)
    assert [g.describe() for g in resolved.gate] == ["perplexity.ratio<=1.05"]


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ("cosine.min>=0.99", "tensor-model metric; a language model is gated on kl"),
        ("max-abs-error<=0.1", "tensor-model metric"),
        ("kl.mean<-0.1", "impossible: kl is never negative"),
        ("perplexity<=-1", "impossible: a perplexity ratio is positive"),
        ("greedy-match>=1.5", "impossible: greedy-match lies in \\[0, 1\\]"),
        ("top1-agreement>1", "impossible: top1-agreement lies in \\[0, 1\\]"),
    ],
)
def test_impossible_or_foreign_gates_on_a_language_model_are_refused(gate: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        specs.resolve([_v("int4")], [gate], classifier=None, lm=True)


@pytest.mark.parametrize("gate", ["kl.mean<=0.1", "perplexity<=1.1", "greedy-match>=0.5"])
def test_language_model_metrics_on_a_tensor_model_are_refused(gate: str) -> None:
    with pytest.raises(CompressionError, match="is a language-model metric; it needs --format hf or gguf"):
        specs.resolve([_v("int8-dynamic")], [gate], classifier=True, lm=False)


def test_methods_must_fit_the_kind_of_model() -> None:
    with pytest.raises(CompressionError, match="method int4 is for causal language models"):
        specs.resolve([_v("int4")], [], classifier=True, lm=False)
    with pytest.raises(CompressionError, match="method int8-dynamic is for tensor models"):
        specs.resolve([_v("int8-dynamic")], [], classifier=None, lm=True)
    with pytest.raises(CompressionError, match="method distilled is for tensor models"):
        specs.resolve([_v("distilled")], [], classifier=None, lm=True)


def test_greedy_tokens_come_from_the_variant_options() -> None:
    assert specs.greedy_tokens(_v("int4")) == 16
    assert specs.greedy_tokens(_v("int4", greedyTokens=32)) == 32
    assert specs.greedy_tokens(_v("int4", greedyTokens=None)) == 16
    with pytest.raises(CompressionError, match="greedyTokens must be an integer"):
        specs.greedy_tokens(_v("int4", greedyTokens="many"))
    with pytest.raises(CompressionError, match="a greedy-match gate needs greedyTokens > 0"):
        specs.resolve([_v("int4", greedyTokens=0)], ["greedy-match>=0.9"], classifier=None, lm=True)


def test_the_deployment_api_default_stat_mean_reads_as_ratio_for_perplexity() -> None:
    gate = Gate.model_validate({"metric": "perplexity", "stat": "mean", "op": "<=", "threshold": 1.05})
    assert gate.describe() == "perplexity.ratio<=1.05"
    assert Gate.model_validate({"metric": "kl", "op": "<=", "threshold": 0.1}).stat == "mean"
