"""Variant and gate specifications: the command-line syntax, the JSON form and refusing impossible gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiri_runtime.compressing import specs
from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.manifests import Gate, VariantSpec


def test_a_method_alone_names_the_variant() -> None:
    assert specs.parse_variant("int8-dynamic") == VariantSpec(name="int8-dynamic", method="int8-dynamic")


def test_key_value_pairs_carry_options_parsed_as_json_where_possible() -> None:
    v = specs.parse_variant(
        'name=int8pc,method=int8-dynamic,perChannel=true,maxExclude=4,quantize="int8-dynamic",x=y'
    )
    assert v.name == "int8pc" and v.method == "int8-dynamic"
    assert v.options == {"perChannel": True, "maxExclude": 4, "quantize": "int8-dynamic", "x": "y"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name=x", "method= is required"),
        ("method=int3", "invalid"),
        ("name=Bad_Name,method=fp16", "invalid"),
        ("method=fp16,perChannel", "key=value"),
    ],
)
def test_bad_variant_specs(text: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        specs.parse_variant(text)


def test_variants_json_from_a_file_inline_or_a_deployment_spec(tmp_path: Path) -> None:
    items = [{"name": "a", "method": "fp16"}, {"name": "b", "method": "distilled", "options": {"width": 0.5}}]
    f = tmp_path / "v.json"
    f.write_text(json.dumps(items))
    assert [v.name for v in specs.parse_variants_json(str(f))] == ["a", "b"]
    assert specs.parse_variants_json(json.dumps({"variants": items}))[1].options == {"width": 0.5}
    assert len(specs.parse_variants_json(json.dumps({"edge": {"variants": items}}))) == 2
    with pytest.raises(CompressionError, match="neither JSON nor a readable file"):
        specs.parse_variants_json(str(tmp_path / "missing.json"))
    with pytest.raises(CompressionError, match="expected a list"):
        specs.parse_variants_json('{"other": 1}')


@pytest.mark.parametrize(
    ("text", "target", "gate"),
    [
        ("cosine.min>=0.99", None, Gate(metric="cosine", stat="min", op=">=", threshold=0.99)),
        ("cosine>0.9", None, Gate(metric="cosine", stat="mean", op=">", threshold=0.9)),
        (
            "int8:top1-agreement>=0.97",
            "int8",
            Gate(metric="top1-agreement", stat="mean", op=">=", threshold=0.97),
        ),
        ("q: max_abs_error <= 0.05", "q", Gate(metric="max-abs-error", stat="max", op="<=", threshold=0.05)),
        ("top1>=1", None, Gate(metric="top1-agreement", stat="mean", op=">=", threshold=1.0)),
    ],
)
def test_gate_syntax(text: str, target: str | None, gate: Gate) -> None:
    assert specs.parse_gate(text) == (target, gate)


@pytest.mark.parametrize("text", ["cosine", "cosine=0.9", "latency<3", "cosine.median>=0.9", "cosine>=abc"])
def test_malformed_gates(text: str) -> None:
    with pytest.raises(CompressionError):
        specs.parse_gate(text)


@pytest.mark.parametrize(
    "text",
    [
        "cosine.min>=1.01",
        "cosine>1",
        "top1-agreement>=2",
        "top1-agreement<0",
        "max-abs-error<0",
        "cosine<=-2",
    ],
)
def test_impossible_gates_are_refused(text: str) -> None:
    _, gate = specs.parse_gate(text)
    with pytest.raises(CompressionError, match="impossible"):
        specs.check_gate_possible(gate, classifier=None)


def test_top1_gate_needs_a_classifier() -> None:
    _, gate = specs.parse_gate("top1-agreement>=0.9")
    specs.check_gate_possible(gate, classifier=True)
    with pytest.raises(CompressionError, match="classifier"):
        specs.check_gate_possible(gate, classifier=False)


def test_resolve_attaches_per_variant_then_global_then_default_gates() -> None:
    variants = [
        specs.parse_variant("name=a,method=int8-dynamic"),
        specs.parse_variant("name=b,method=fp16"),
        VariantSpec(name="c", method="int8-static", gate=[Gate(metric="cosine", op=">=", threshold=0.5)]),
    ]
    resolved = specs.resolve(variants, ["a:cosine.p5>=0.98", "cosine.mean>=0.995"], classifier=True)
    assert [[g.describe() for g in v.gate] for v in resolved] == [
        ["cosine.p5>=0.98"],
        ["cosine.mean>=0.995"],
        ["cosine.mean>=0.5"],
    ]
    defaults = specs.resolve(
        [specs.parse_variant("distilled"), specs.parse_variant("fp16")], [], classifier=True
    )
    assert [v.gate[0].describe() for v in defaults] == ["top1-agreement.mean>=0.97", "cosine.min>=0.99"]
    regression = specs.resolve([specs.parse_variant("distilled")], [], classifier=False)
    assert regression[0].gate[0].describe() == "cosine.mean>=0.95"


def test_resolve_refuses_unknown_targets_and_duplicates() -> None:
    with pytest.raises(CompressionError, match="names variant 'zz'"):
        specs.resolve([specs.parse_variant("fp16")], ["zz:cosine>=0.9"], classifier=None)
    with pytest.raises(CompressionError, match="duplicate"):
        specs.resolve([specs.parse_variant("fp16"), specs.parse_variant("fp16")], [], classifier=None)
