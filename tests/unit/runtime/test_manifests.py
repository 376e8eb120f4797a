"""The compression manifest round-trips and rejects what an operator must not trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiri_runtime import manifests
from kiri_runtime.manifests import (
    Baseline,
    CosineStats,
    Fidelity,
    Gate,
    GateResult,
    Latency,
    Manifest,
    ModelInfo,
    Variant,
    VariantSpec,
)


def _manifest() -> Manifest:
    fid = Fidelity(
        cosine=CosineStats(mean=0.999, min=0.995, p5=0.997), top1_agreement=1.0, max_abs_error=0.01
    )
    return Manifest(
        model=ModelInfo(
            source_uri="file:///m.onnx",
            source_sha256="a" * 64,
            format="onnx",
            uri="model.onnx",
            onnx_sha256="b" * 64,
            size_bytes=1000,
        ),
        baseline=Baseline(p50_latency_ms=2.0, size_bytes=1000),
        seed=0,
        variants=[
            Variant(
                name="int8",
                method="int8-dynamic",
                options={"perChannel": True},
                uri="int8.onnx",
                sha256="c" * 64,
                size_bytes=300,
                fidelity=fid,
                latency=Latency(p50_ms=1.0, ratio_vs_fp32=0.5),
                gate=[
                    GateResult(metric="cosine", stat="min", op=">=", threshold=0.99, value=0.995, passed=True)
                ],
                accepted=True,
                reason="passed cosine.min>=0.99",
            )
        ],
    )


def test_round_trip_uses_camel_case_and_is_atomic(tmp_path: Path) -> None:
    path = manifests.dump(_manifest(), tmp_path)
    assert path == tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    assert raw["schemaVersion"] == manifests.SCHEMA_VERSION
    assert raw["baseline"]["p50LatencyMs"] == 2.0
    assert raw["variants"][0]["fidelity"]["top1Agreement"] == 1.0
    assert raw["variants"][0]["latency"]["ratioVsFp32"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    loaded = manifests.load(tmp_path)
    assert loaded == _manifest().model_copy(update={"created_at": loaded.created_at})
    assert [v.name for v in loaded.accepted()] == ["int8"]
    assert loaded.variant("int8") is not None and loaded.variant("nope") is None


def test_unknown_schema_version_is_refused() -> None:
    raw = json.loads(manifests.dumps(_manifest()))
    raw["schemaVersion"] = "kiri.dev/compression-manifest/v9"
    with pytest.raises(ValueError, match="schemaVersion"):
        manifests.loads(json.dumps(raw))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = json.loads(manifests.dumps(_manifest()))
    raw["variants"][0]["newField"] = 1
    assert manifests.loads(json.dumps(raw)).variants[0].name == "int8"


def test_variant_spec_accepts_the_deployment_shape() -> None:
    spec = VariantSpec.model_validate(
        {
            "name": "int8-pc",
            "method": "int8-dynamic",
            "options": {"perChannel": True},
            "gate": [{"metric": "cosine", "stat": "min", "op": ">=", "threshold": 0.99}],
        }
    )
    assert spec.gate == [Gate(metric="cosine", stat="min", op=">=", threshold=0.99)]
    assert spec.gate[0].describe() == "cosine.min>=0.99"
    err = VariantSpec.model_validate(
        {"name": "e", "method": "fp16", "gate": [{"metric": "max-abs-error", "op": "<", "threshold": 0.1}]}
    )
    assert err.gate[0].stat == "max"
    with pytest.raises(ValidationError):
        VariantSpec.model_validate({"name": "Bad_Name", "method": "int8-dynamic"})
    with pytest.raises(ValidationError):
        VariantSpec.model_validate({"name": "x", "method": "int3"})
