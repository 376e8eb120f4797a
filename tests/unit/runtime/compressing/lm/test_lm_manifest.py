"""The manifest of a language-model run: additive within v1, read by the operator, and what the Job is told."""

from __future__ import annotations

import json

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning.building import compression_variants_json
from kiri_operator.planning.compression import _variant_status
from kiri_runtime import manifests
from kiri_runtime.compressing import specs
from kiri_runtime.manifests import (
    Baseline,
    Candidate,
    Decode,
    LmFidelity,
    Manifest,
    ModelInfo,
    Variant,
)

SHA = "a" * 64
OLD = {  # a v1 manifest as the tensor pipeline wrote it before language models
    "schemaVersion": "kiri.dev/compression-manifest/v1",
    "model": {"sourceUri": "m.onnx", "sourceSha256": SHA, "format": "onnx", "uri": "model.onnx",
              "onnxSha256": SHA, "sizeBytes": 10, "inputs": ["x"], "outputs": ["y"]},
    "baseline": {"p50LatencyMs": 1.0, "sizeBytes": 10},
    "createdAt": "2026-01-01T00:00:00Z", "seed": 0,
    "variants": [{"name": "int8", "method": "int8-dynamic", "uri": "int8.onnx", "sha256": SHA, "sizeBytes": 4,
                  "fidelity": {"cosine": {"mean": 1.0, "min": 0.99, "p5": 0.995}, "maxAbsError": 0.1},
                  "latency": {"p50Ms": 0.5, "ratioVsFp32": 0.5}, "accepted": True, "reason": "ok"}],
}  # fmt: skip
FID = LmFidelity(
    kl_mean=0.02,
    top1_agreement=0.93,
    perplexity_ratio=1.01,
    greedy_match=0.875,
    positions=300,
    greedy_tokens=16,
)


def lm_manifest() -> Manifest:
    return Manifest(
        model=ModelInfo(
            source_uri="s3://m/ckpt.tar",
            source_sha256=SHA,
            format="hf",
            uri="model.tar",
            onnx_sha256=SHA,
            size_bytes=1000,
            kind="causal-lm",
            architecture="LlamaForCausalLM",
        ),
        baseline=Baseline(
            p50_latency_ms=2.0,
            size_bytes=1000,
            decode=Decode(decode_tokens_per_s=500.0, ttft_ms=3.0, new_tokens=64, prompt_tokens=20),
        ),
        seed=0,
        variants=[
            Variant(
                name="q4",
                method="int4",
                options={"int8LmHead": True},
                uri="q4.tar",
                sha256="b" * 64,
                size_bytes=300,
                gate=[],
                accepted=True,
                reason="passed",
                generative=FID,
                decode=Decode(decode_tokens_per_s=900.0, ttft_ms=1.5, new_tokens=64, prompt_tokens=20),
                search=[
                    Candidate(options={}, generative=FID, size_bytes=280, passed=False),
                    Candidate(options={"algorithm": "hqq"}, passed=False, error="builder: boom"),
                ],
                extra={"transcoded": {"tensors": 14, "byType": {"Q4_1": 14}, "requantized": []}},
            )
        ],
    )


def test_a_manifest_written_before_language_models_still_loads_as_a_tensor_model() -> None:
    m = manifests.loads(json.dumps(OLD))
    assert m.model.kind == "tensor" and m.model.architecture is None
    assert m.variants[0].generative is None and m.variants[0].decode is None
    assert m.baseline.decode is None


def test_a_language_model_manifest_round_trips_with_its_fidelity_decode_and_search() -> None:
    m = lm_manifest()
    text = manifests.dumps(m)
    assert manifests.loads(text) == m
    wire = json.loads(text)["variants"][0]
    assert wire["generative"] == {
        "klMean": 0.02,
        "top1Agreement": 0.93,
        "perplexityRatio": 1.01,
        "greedyMatch": 0.875,
        "positions": 300,
        "samples": 0,
        "greedyTokens": 16,
    }
    assert wire["decode"]["decodeTokensPerS"] == 900.0 and wire["decode"]["ttftMs"] == 1.5
    assert wire["search"][1] == {
        "options": {"algorithm": "hqq"},
        "fidelity": None,
        "latency": None,
        "sizeBytes": None,
        "passed": False,
        "error": "builder: boom",
        "generative": None,
    }
    assert json.loads(text)["model"]["kind"] == "causal-lm"


def _spec(**model: object) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "chat",
                "version": "1",
                "source": {"uri": "s3://m/ckpt.tar", "format": "hf", "sha256": SHA},
                "evalDataUri": "s3://m/eval.jsonl",
                **model,
            },
            "edge": {"variants": [{"name": "q4", "method": "int4"}]},
        }
    )


def test_the_operator_shows_a_language_model_variants_fidelity_and_decode_speed_in_status() -> None:
    (entry,) = _variant_status(_spec(), lm_manifest(), "file:///artifacts/")
    assert entry["state"] == "Verified" and entry["uri"] == "file:///artifacts/q4.tar"
    assert entry["fidelity"] == {
        "kl": {"mean": 0.02},
        "top1Agreement": 0.93,
        "perplexity": {"ratio": 1.01},
        "greedyMatch": {"mean": 0.875, "tokens": 16},
        "positions": 300,
    }
    assert entry["latency"] == {"decodeTokensPerS": 900.0, "ttftMs": 1.5}


def test_the_job_gets_no_gate_for_a_language_model_variant_left_at_the_api_default() -> None:
    spec = _spec()
    assert [g.metric for g in spec.edge.variants[0].gate] == ["cosine"]  # what the API server fills in
    parsed = specs.parse_variants_json(compression_variants_json(spec.edge.variants, language_model=True))
    (resolved,) = specs.resolve(parsed, [], classifier=None, lm=True)
    assert [g.describe() for g in resolved.gate] == ["kl.mean<=0.1", "top1-agreement.mean>=0.88"]


def test_the_job_keeps_language_model_gates_and_options_as_written() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "chat",
                "version": "1",
                "source": {"uri": "s3://m/x.gguf", "format": "gguf", "sha256": SHA},
                "evalDataUri": "s3://m/eval.jsonl",
            },
            "edge": {
                "variants": [
                    {
                        "name": "q8",
                        "method": "int8",
                        "options": {"greedyTokens": 8, "blockSize": 16},
                        "gate": [
                            {"metric": "perplexity", "op": "<=", "threshold": 1.02},
                            {"metric": "greedy-match", "op": ">=", "threshold": 0.9},
                        ],
                    }
                ]
            },
        }
    )
    (parsed,) = specs.parse_variants_json(compression_variants_json(spec.edge.variants, language_model=True))
    (resolved,) = specs.resolve([parsed], [], classifier=None, lm=True)
    assert [g.describe() for g in resolved.gate] == ["perplexity.ratio<=1.02", "greedy-match.mean>=0.9"]
    assert specs.greedy_tokens(resolved) == 8 and resolved.options["blockSize"] == 16
