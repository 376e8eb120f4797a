"""The operator's compression Job arguments are accepted by `kiri compress` as the operator writes them."""

from __future__ import annotations

from kiri_operator.api.specs import Variant
from kiri_operator.planning.building import compression_variants_json
from kiri_runtime.compressing import distilling, quantizing, specs


def test_variants_json_from_the_operator_parses_with_every_option_understood() -> None:
    api_variants = [
        Variant.model_validate(v)
        for v in (
            {"name": "int8", "method": "int8-dynamic", "options": {"perChannel": True, "reduceRange": False},
             "gate": [{"metric": "cosine", "stat": "min", "op": ">=", "threshold": 0.99}]},
            {"name": "static", "method": "int8-static", "options": {"calibrationSamples": 128}},
            {"name": "half", "method": "fp16", "options": {"keepIoTypes": True},
             "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}}},
            {"name": "student", "method": "distilled",
             "options": {"studentWidth": 64, "studentDepth": 1, "quantize": True},
             "gate": [{"metric": "top1-agreement", "op": ">=", "threshold": 0.97},
                      {"metric": "max-abs-error", "op": "<=", "threshold": 2.0}]},
        )
    ]  # fmt: skip
    parsed = specs.parse_variants_json(compression_variants_json(api_variants))
    assert [v.name for v in parsed] == ["int8", "static", "half", "student"]
    assert parsed[0].gate[0].describe() == "cosine.min>=0.99"
    assert quantizing.defaults("int8-dynamic", parsed[0].options)["perChannel"] is True
    assert quantizing.defaults("int8-static", parsed[1].options)["calibrationSamples"] == 128
    assert quantizing.defaults("fp16", parsed[2].options)["keepIoTypes"] is True
    student = distilling.defaults(parsed[3].options)
    assert (student["studentWidth"], student["studentDepth"], student["quantize"]) == (64, 1, "int8-dynamic")
    assert [g.describe() for g in parsed[3].gate] == ["top1-agreement.mean>=0.97", "max-abs-error.mean<=2"]
    resolved = specs.resolve(parsed, [], classifier=True)
    assert [len(v.gate) for v in resolved] == [1, 1, 1, 2]
