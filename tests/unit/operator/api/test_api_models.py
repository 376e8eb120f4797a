"""The pydantic models: wire names, defaults, round trips and the validators that mirror the CEL rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

import kiri_operator.api as api
from kiri_operator.api import (
    Condition,
    GateCheck,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    RolloutSpec,
    RolloutStage,
    SelectorRequirement,
    Toleration,
    Variant,
)

pytestmark = pytest.mark.timeout(30)

SHA = "ab" * 32


def minimal(**extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": "m", "version": "1", "source": {"uri": "file:///models/m.onnx", "sha256": SHA}},
        **extra,
    }


def test_package_exports_every_public_model() -> None:
    for name in api.__all__:
        assert hasattr(api, name), name
    assert api.API_VERSION == "kiri.dev/v1alpha1"
    assert api.KIND == "ModelDeployment"


def test_defaults_follow_the_agreed_field_sketch() -> None:
    spec = ModelDeploymentSpec.model_validate(minimal())
    assert spec.model.source.format == "onnx"
    assert spec.runtime.image_pull_policy == "IfNotPresent"
    assert spec.runtime.compressor_image == "ghcr.io/kiri-dev/kiri-compressor:0.1.0"
    assert (spec.cloud.replicas, spec.cloud.port, spec.cloud.resources.gpu) == (1, 8080, 1)
    assert spec.cloud.node_selector == {"kiri.dev/tier": "cloud"}
    assert spec.cloud.tolerations == [
        Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    ]
    assert spec.edge.node_selector == {"kiri.dev/tier": "edge"}
    assert spec.edge.variants == []
    assert spec.edge.fallback.enabled is True
    assert (spec.edge.cache.path, spec.edge.cache.revisions_kept) == ("/var/lib/kiri/cache", 2)
    rollout = spec.rollout
    assert rollout.stages == [RolloutStage(percent=100)]
    assert rollout.stages[0].bake_seconds == 0 and rollout.stages[0].pause is False
    assert (rollout.max_unavailable, rollout.offline_nodes, rollout.progress_deadline_seconds) == (
        1,
        "Skip",
        600,
    )
    assert (rollout.paused, rollout.revision_history_limit) == (False, 10)
    assert rollout.analysis is None and rollout.bandwidth is None and rollout.group_by is None


def test_defaults_are_not_shared_between_instances() -> None:
    a = ModelDeploymentSpec.model_validate(minimal())
    b = ModelDeploymentSpec.model_validate(minimal())
    a.cloud.node_selector["extra"] = "x"
    a.cloud.tolerations.append(Toleration(key="example.com/dedicated", operator="Exists"))
    assert b.cloud.node_selector == {"kiri.dev/tier": "cloud"}
    assert len(b.cloud.tolerations) == 1


def test_camel_case_on_the_wire_snake_case_in_python() -> None:
    spec = ModelDeploymentSpec.model_validate(
        minimal(
            rollout={
                "progressDeadlineSeconds": 30,
                "stages": [{"nodes": 1, "bakeSeconds": 5}, {"percent": 100}],
            }
        )
    )
    assert spec.rollout.progress_deadline_seconds == 30
    assert spec.rollout.stages[0].bake_seconds == 5
    by_name = ModelDeploymentSpec(**{**minimal(), "rollout": RolloutSpec(progress_deadline_seconds=30)})
    assert by_name.rollout.progress_deadline_seconds == 30
    wire = spec.dump()
    assert wire["rollout"]["progressDeadlineSeconds"] == 30
    assert "progress_deadline_seconds" not in str(wire)
    assert "evalDataUri" not in wire["model"]  # None is left out, not written as null
    assert ModelDeploymentSpec.model_validate(wire) == spec


def test_unknown_spec_fields_are_errors() -> None:
    with pytest.raises(ValidationError, match="replica"):
        ModelDeploymentSpec.model_validate(minimal(cloud={"replica": 2}))


def test_quantities_accept_numbers_and_keep_strings() -> None:
    spec = ModelDeploymentSpec.model_validate(minimal(cloud={"resources": {"cpu": 2, "memory": "512Mi"}}))
    assert spec.cloud.resources.cpu == "2"
    assert spec.dump()["cloud"]["resources"] == {"cpu": "2", "memory": "512Mi", "gpu": 1}
    with pytest.raises(ValidationError, match="quantity"):
        ModelDeploymentSpec.model_validate(minimal(cloud={"resources": {"memory": "2 GB"}}))


@pytest.mark.parametrize("value", [0, 3, "0%", "25%", "100%"])
def test_max_unavailable_accepts_counts_and_percentages(value: int | str) -> None:
    assert RolloutSpec(max_unavailable=value).max_unavailable == value


@pytest.mark.parametrize("value", [-1, "101%", "25", "x%"])
def test_max_unavailable_rejects_the_rest(value: int | str) -> None:
    with pytest.raises(ValidationError, match="percentage"):
        RolloutSpec(max_unavailable=value)


@pytest.mark.parametrize(
    "stages",
    [
        [{"percent": 100}],
        [{"nodes": 1}, {"percent": 100}],
        [{"nodes": 1}, {"nodes": 3}, {"percent": 50}, {"percent": 100}],
        [{"percent": 10, "pause": True}, {"percent": 100, "bakeSeconds": 60}],
    ],
)
def test_well_ordered_stages_are_accepted(stages: list[dict[str, Any]]) -> None:
    assert len(RolloutSpec.model_validate({"stages": stages}).stages) == len(stages)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"percent": 50}, {"percent": 50}, {"percent": 100}], "percent must strictly increase"),
        ([{"nodes": 3}, {"nodes": 1}, {"percent": 100}], "nodes must strictly increase"),
        ([{"percent": 10}, {"nodes": 5}, {"percent": 100}], "nodes must come before"),
        ([{"nodes": 1}], "last stage must be percent: 100"),
        ([{"nodes": 1, "percent": 100}], "exactly one of"),
        ([], "at least 1"),
    ],
)
def test_badly_ordered_stages_are_rejected(stages: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RolloutSpec.model_validate({"stages": stages})


def test_gate_checks_compare_in_the_declared_direction() -> None:
    at_least = GateCheck(metric="cosine", op=">=", threshold=0.99)
    assert at_least.stat == "mean"
    assert at_least.passes(0.99) and at_least.passes(1.0) and not at_least.passes(0.98)
    assert not GateCheck(metric="cosine", op=">", threshold=0.99).passes(0.99)
    below = GateCheck(metric="max-abs-error", stat="p5", op="<", threshold=0.1)
    assert below.passes(0.05) and not below.passes(0.1)
    assert GateCheck(metric="max-abs-error", op="<=", threshold=0.1).passes(0.1)


def test_variant_defaults_to_a_fidelity_gate_and_keeps_unknown_options() -> None:
    variant = Variant.model_validate(
        {"name": "int8", "method": "int8-dynamic", "options": {"symmetric": True}}
    )
    assert variant.gate == [GateCheck(metric="cosine", stat="mean", op=">=", threshold=0.99)]
    assert variant.dump()["options"] == {"symmetric": True}
    assert variant.requires.match_labels == {} and variant.requires.min_memory_mb is None


def test_variant_options_must_fit_the_method() -> None:
    Variant.model_validate(
        {"name": "s", "method": "distilled", "options": {"studentWidth": 8, "quantize": True}}
    )
    with pytest.raises(ValidationError, match="studentWidth applies only to method distilled"):
        Variant.model_validate({"name": "s", "method": "fp16", "options": {"studentWidth": 8}})


def test_selector_requirement_values_fit_the_operator() -> None:
    SelectorRequirement(key="kiri.dev/memory-mb", operator="Gt", values=["1024"])
    SelectorRequirement(key="kiri.dev/accelerator", operator="Exists")
    with pytest.raises(ValidationError, match="single integer"):
        SelectorRequirement(key="kiri.dev/memory-mb", operator="Lt", values=["1024", "2048"])
    with pytest.raises(ValidationError, match="non-empty"):
        SelectorRequirement(key="kiri.dev/arch", operator="NotIn")


def test_int8_static_needs_calibration_data() -> None:
    variants = [{"name": "q", "method": "int8-static"}]
    with pytest.raises(ValidationError, match="evalDataUri is required"):
        ModelDeploymentSpec.model_validate(minimal(edge={"variants": variants}))
    spec = minimal(edge={"variants": variants})
    spec["model"]["evalDataUri"] = "pvc://data/eval.npz"
    assert ModelDeploymentSpec.model_validate(spec).edge.variants[0].method == "int8-static"


@pytest.mark.parametrize(
    "uri", ["file:///m.onnx", "http://h/m.onnx", "https://h/m", "s3://b/k", "pvc://claim/p"]
)
def test_supported_uri_schemes(uri: str) -> None:
    spec = minimal()
    spec["model"]["source"]["uri"] = uri
    assert ModelDeploymentSpec.model_validate(spec).model.source.uri == uri


def test_status_round_trip_with_rfc3339_times() -> None:
    when = datetime(2026, 11, 26, 5, 44, 9, 123456, tzinfo=UTC)
    status = ModelDeploymentStatus.model_validate(
        {
            "observedGeneration": 3,
            "phase": "Progressing",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "WaveInProgress", "lastTransitionTime": when}
            ],
            "currentRevision": "abc123",
            "updateRevision": "def456",
            "cloud": {"replicas": 2, "ready": 1},
            "variants": [
                {
                    "name": "int8",
                    "state": "Verified",
                    "fidelity": {"cosine": {"mean": 0.998, "min": 0.97}},
                    "sizeBytes": 1234,
                    "latency": {"p50Ms": 1.5},
                }
            ],
            "edge": {
                "targetNodes": 10,
                "updatedNodes": 3,
                "readyNodes": 3,
                "stageIndex": 1,
                "stage": "2/3 (50%)",
                "stageStartedAt": "2026-11-26T05:44:09Z",
                "perVariant": [{"name": "int8", "revision": "def456", "nodes": 3, "ready": 3}],
            },
            "history": [
                {
                    "revision": "abc123",
                    "modelVersion": "1",
                    "outcome": "Promoted",
                    "time": "2026-11-26T05:00:00Z",
                }
            ],
        }
    )
    wire = status.dump()
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-26T05:44:09Z"
    assert wire["conditions"][0]["message"] == ""
    assert wire["edge"]["stageStartedAt"] == "2026-11-26T05:44:09Z"
    assert wire["variants"][0]["fidelity"] == {"cosine": {"mean": 0.998, "min": 0.97}}
    assert status.edge.stage_started_at == datetime(2026, 11, 26, 5, 44, 9, tzinfo=UTC)
    assert ModelDeploymentStatus.model_validate(wire).dump() == wire


def test_times_are_written_in_utc() -> None:
    offset = datetime(2026, 1, 1, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    condition = Condition(type="Ready", status="True", reason="Promoted", last_transition_time=offset)
    assert condition.dump()["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    naive = Condition(
        type="Ready", status="True", reason="Promoted", last_transition_time=datetime(2026, 1, 1)
    )
    assert naive.dump()["lastTransitionTime"] == "2026-01-01T00:00:00Z"


def test_status_ignores_unknown_keys_and_checks_known_ones() -> None:
    status = ModelDeploymentStatus.model_validate({"phase": "Healthy", "fromTheFuture": 1})
    assert status.phase == "Healthy"
    assert "fromTheFuture" not in status.dump()
    with pytest.raises(ValidationError):
        ModelDeploymentStatus.model_validate({"phase": "Exploded"})
    with pytest.raises(ValidationError):
        Condition(type="Ready", status="Maybe", reason="X", last_transition_time=datetime.now(UTC))  # type: ignore[arg-type]


def test_empty_status_dump_is_what_a_fresh_object_reports() -> None:
    assert ModelDeploymentStatus().dump() == {
        "phase": "Pending",
        "conditions": [],
        "cloud": {"replicas": 0, "ready": 0},
        "variants": [],
        "edge": {
            "targetNodes": 0,
            "updatedNodes": 0,
            "readyNodes": 0,
            "deferredNodes": 0,
            "unmatchedNodes": 0,
            "stageIndex": 0,
            "perVariant": [],
        },
        "history": [],
    }
