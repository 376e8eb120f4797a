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
    assert set(learning["required"]) == {"trainable", "evalDataUri"}
    rules = [r["rule"] for r in learning["x-kubernetes-validations"]]
    assert any("clientsPerRound" in r for r in rules)
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
