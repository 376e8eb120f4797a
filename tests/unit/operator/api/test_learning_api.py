"""spec.learning and spec.rollout.updatePolicy in the API models, and their CRD schema."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kiri_operator.api import generating
from kiri_operator.api.specs import LearningSpec, ModelDeploymentSpec, UpdatePolicy

SHA = "a" * 64


def _learning(**extra: Any) -> dict[str, Any]:
    return {
        "trainable": {
            "factory": "models.vision:make",
            "weightsUri": "s3://models/v1.pt",
            "weightsSha256": SHA,
        },
        "evalDataUri": "s3://data/held-out.npz",
        **extra,
    }


def test_defaults_are_a_small_private_adapter() -> None:
    spec = LearningSpec.model_validate(_learning())
    assert spec.mode == "federated"
    assert spec.trained.kind == "lora" and spec.trained.rank == 4
    assert spec.aggregation == "fedavg"
    assert spec.dp.clip_norm == 1.0 and spec.dp.noise_multiplier == 1.0 and spec.dp.target_epsilon == 8.0
    assert spec.dp.delta is None  # the operator uses 1e-5
    assert spec.site_data_path.startswith("/")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trained": {"kind": "layers"}}, "must name at least one layer"),
        ({"minClients": 5, "clientsPerRound": 3}, "must not exceed"),
        ({"dp": {"noiseMultiplier": -1}}, "greater than or equal"),
        ({"dp": {"delta": 1.5}}, "less than 1"),
        ({"aggregation": "median"}, "fedavg"),
        ({"mode": "centralized"}, "federated"),
        ({"siteDataPath": "relative/path.npz"}, "pattern"),
        (
            {"trainable": {"factory": "no colon", "weightsUri": "s3://m/v1.pt", "weightsSha256": SHA}},
            "pattern",
        ),
    ],
)
def test_bad_learning_specs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LearningSpec.model_validate(_learning(**changes))


def test_update_policy_and_learning_sit_in_the_model_deployment() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "version": "1",
                "source": {"uri": "s3://m/m.onnx", "sha256": SHA},
                "evalDataUri": "s3://data/inputs.npz",
            },
            "rollout": {
                "updatePolicy": {
                    "minIntervalSeconds": 3600,
                    "maxBytesPerDay": 10_000_000,
                    "minImprovement": 0.01,
                }
            },
            "learning": _learning(rounds=5),
        }
    )
    assert spec.rollout.update_policy == UpdatePolicy(
        min_interval_seconds=3600, max_bytes_per_day=10_000_000, min_improvement=0.01
    )
    assert spec.learning is not None and spec.learning.rounds == 5
    assert "learning" in spec.dump() and spec.dump()["rollout"]["updatePolicy"]["minImprovement"] == 0.01


def test_crd_schema_carries_the_fields_and_cel_rules() -> None:
    root = generating.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    learning = root["spec"]["properties"]["learning"]
    # trainable is required for a tensor model only: a spec-level rule, since a language model has none.
    assert set(learning["required"]) == {"evalDataUri"}
    rules = [r["rule"] for r in learning["x-kubernetes-validations"]]
    assert any("clientsPerRound" in r for r in rules)
    spec_rules = [r["rule"] for r in root["spec"]["x-kubernetes-validations"]]
    assert (
        "!has(self.learning) || has(self.learning.trainable) || self.model.source.format == 'hf'"
        in spec_rules
    )
    assert "adapter" in root["status"]["properties"]["learning"]["properties"]
    assert "updatePolicy" in root["spec"]["properties"]["rollout"]["properties"]
    assert "rounds" in root["status"]["properties"]["learning"]["properties"]


def test_learning_needs_model_eval_data_to_export_the_learned_weights() -> None:
    body = {
        "model": {"name": "m", "version": "1", "source": {"uri": "s3://m/m.onnx", "sha256": SHA}},
        "learning": _learning(),
    }
    with pytest.raises(ValidationError, match=r"model\.evalDataUri is required with learning"):
        ModelDeploymentSpec.model_validate(body)
    rules = [
        r["rule"]
        for r in generating.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "x-kubernetes-validations"
        ]
    ]
    assert "!has(self.learning) || has(self.model.evalDataUri)" in rules


LM_SOURCE = {"uri": "file:///models/tiny-llama", "format": "hf", "sha256": SHA}


def _lm(learning: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {
        "model": {
            "name": "m",
            "version": "1",
            "source": dict(LM_SOURCE),
            "evalDataUri": "s3://e/e.jsonl",
            **model,
        },
        "edge": {"variants": [{"name": "q4", "method": "int4", "options": {"loraTargets": "q_proj,v_proj"}}]},
        "learning": learning,
    }


def test_a_language_models_learning_trains_an_adapter_on_the_checkpoint_itself() -> None:
    spec = ModelDeploymentSpec.model_validate(_lm({"evalDataUri": "s3://e/held-out.jsonl"}))
    assert spec.learning is not None and spec.learning.trainable is None
    assert spec.learning.adapter_name == "learned"
    assert (
        spec.learning.trained.kind,
        spec.learning.trained.steps,
        spec.learning.trained.sequence_length,
    ) == (
        "lora",
        50,
        128,
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "model": {
                    "name": "m",
                    "version": "1",
                    "source": {"uri": "s3://m/m.onnx", "sha256": SHA},
                    "evalDataUri": "s3://e/e.npz",
                },
                "learning": {"evalDataUri": "s3://e/e.npz"},
            },
            r"learning\.trainable is required for a tensor model",
        ),
        (_lm(_learning()), r"learning\.trainable must be unset for a language model"),
        (
            _lm({"evalDataUri": "s3://e/e.jsonl", "trained": {"kind": "layers", "layers": ["head"]}}),
            r"learning\.trained\.kind must be lora for a language model",
        ),
        (
            _lm({"evalDataUri": "s3://e/e.jsonl"}, source={**LM_SOURCE, "uri": "s3://m/ckpt.tar"}),
            r"model\.source\.uri must be file:// or pvc:// for a language model that learns",
        ),
        (
            _lm({"evalDataUri": "s3://e/e.jsonl", "adapterName": "base"}),
            r"learning\.adapterName must not be 'base'",
        ),
    ],
    ids=[
        "tensor-without-trainable",
        "lm-with-trainable",
        "lm-not-lora",
        "lm-remote-checkpoint",
        "lm-name-base",
    ],
)
def test_learning_that_does_not_fit_the_model_is_refused(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelDeploymentSpec.model_validate(body)


def test_the_learned_adapter_needs_a_name_no_declared_adapter_has() -> None:
    body = _lm({"evalDataUri": "s3://e/e.jsonl"})
    body["edge"]["adapters"] = [
        {"name": "learned", "uri": "s3://a/a.onnx_adapter", "sha256": SHA, "sizeBytes": 10, "sites": ["a"]}
    ]
    with pytest.raises(ValidationError, match=r"learning\.adapterName names an adapter of edge\.adapters"):
        ModelDeploymentSpec.model_validate(body)
    body["learning"]["adapterName"] = "site-tuned"
    assert ModelDeploymentSpec.model_validate(body).learning is not None
