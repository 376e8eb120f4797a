"""Edge-cloud collaboration of a language model (issue 22, operator): `spec.edge.collaboration` is admitted
only where it can work, becomes the edge pods' `kiri serve` flags against the cloud Service, is part of the
edge revision, and changes nothing for specs that do not set it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kiri_operator import labels as L
from kiri_operator.api import ModelDeployment
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B
from kiri_operator.planning.revisions import compression_key, revision_key
from kiri_runtime import serving_cli
from planning_worlds import SHA
from planning_worlds import spec as tensor_spec

OWNER = B.Owner("smollm", "team-a", "uid-1")
CLOUD_URL = "http://smollm-cloud.team-a.svc:8080"


def lm_spec(collaboration: dict[str, Any] | None = None, **edge: Any) -> ModelDeploymentSpec:
    body: dict[str, Any] = {
        "model": {
            "name": "smollm",
            "version": "1",
            "source": {"uri": "s3://models/smollm.tar", "format": "hf", "sha256": SHA},
            "evalDataUri": "s3://eval/chat.jsonl",
        },
        "edge": {"variants": [{"name": "q4", "method": "int4"}], **edge},
    }
    if collaboration is not None:
        body["edge"]["collaboration"] = collaboration
    return ModelDeploymentSpec.model_validate(body)


def _daemonset(s: ModelDeploymentSpec) -> dict[str, Any]:
    return B.edge_daemonset(
        s, OWNER, "rev1", "comp1", "q4", B.EdgeArtifact("https://store.example/edge/q4.tar", SHA), ["n1"], {}
    )


def _args(s: ModelDeploymentSpec) -> list[str]:
    args: list[str] = _daemonset(s)["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def _revision(s: ModelDeploymentSpec) -> str:
    return revision_key(B.with_default_store(s, None), B.store_uri(s))


def _refusal(build: Any) -> str:
    with pytest.raises(ValidationError) as info:
        build()
    return "; ".join(str(e["msg"]) for e in info.value.errors())


# --- what changes nothing ------------------------------------------------------------------------------


def test_a_language_model_without_collaboration_keeps_the_keys_and_daemonset_older_operators_made() -> None:
    s = lm_spec()
    # Pinned: computed by the operator before edge.collaboration existed (main at aec0208).
    assert compression_key(B.with_default_store(s, None), B.store_uri(s)) == "83cd4fad02"
    assert _revision(s) == "97b3cfe332"
    ds = _daemonset(s)
    # The template's hash moved once since, on purpose: the exec readiness probe (kiri_runtime.probing).
    # Edge DaemonSets update OnDelete, so that rewrites them but restarts no pod.
    assert ds["metadata"]["annotations"][L.SPEC_HASH] == "0ed37239cdb4657e"
    assert _args(s)[-4:] == ["--fallback-url", CLOUD_URL, "--queue-limit", "32"]
    assert "--collaboration" not in _args(s)


# --- flags of the edge pods ----------------------------------------------------------------------------


def test_cascade_passes_its_settings_and_the_cloud_service_as_the_cloud_tier() -> None:
    s = lm_spec(
        {
            "mode": "cascade",
            "cascade": {
                "metric": "entropy",
                "threshold": 2.5,
                "window": 4,
                "cloudTokens": 16,
                "check": "handoffs",
            },
        }
    )
    assert _args(s)[-18:] == [
        "--fallback-url",
        CLOUD_URL,
        "--queue-limit",
        "32",
        "--collaboration",
        "cascade",
        "--cloud-model",
        "smollm",
        "--cascade-metric",
        "entropy",
        "--cascade-threshold",
        "2.5",
        "--cascade-window",
        "4",
        "--cascade-cloud-tokens",
        "16",
        "--cascade-check",
        "handoffs",
    ]


def test_cascade_without_settings_passes_the_documented_defaults() -> None:
    assert _args(lm_spec({"mode": "cascade"}))[-14:] == [
        "--collaboration",
        "cascade",
        "--cloud-model",
        "smollm",
        "--cascade-metric",
        "margin",
        "--cascade-threshold",
        "0.7",
        "--cascade-window",
        "1",
        "--cascade-cloud-tokens",
        "0",
        "--cascade-check",
        "full",
    ]


def test_speculative_passes_k_and_max_k() -> None:
    assert _args(lm_spec({"mode": "speculative", "speculative": {"k": 4, "maxK": 8}}))[-12:] == [
        "--fallback-url",
        CLOUD_URL,
        "--queue-limit",
        "32",
        "--collaboration",
        "speculative",
        "--cloud-model",
        "smollm",
        "--speculative-k",
        "4",
        "--speculative-max-k",
        "8",
    ]


def test_cloud_only_and_edge_only_pass_the_mode_and_no_mode_settings() -> None:
    assert _args(lm_spec({"mode": "cloud-only"}))[-4:] == [
        "--collaboration",
        "cloud-only",
        "--cloud-model",
        "smollm",
    ]
    assert _args(lm_spec({"mode": "edge-only"}))[-8:] == [
        "--fallback-url",
        CLOUD_URL,
        "--queue-limit",
        "32",
        "--collaboration",
        "edge-only",
        "--cloud-model",
        "smollm",
    ]


def test_edge_only_with_the_cloud_off_passes_no_fallback_url() -> None:
    body = lm_spec({"mode": "edge-only"}).model_dump(by_alias=True)
    body["cloud"]["replicas"] = 0
    args = _args(ModelDeploymentSpec.model_validate(body))
    assert "--fallback-url" not in args
    assert args[-4:] == ["--collaboration", "edge-only", "--cloud-model", "smollm"]


# --- revisions -----------------------------------------------------------------------------------------


def test_a_change_of_collaboration_settings_is_a_new_edge_revision_and_not_a_new_compression() -> None:
    specs = [
        lm_spec(),
        lm_spec({"mode": "edge-only"}),
        lm_spec({"mode": "cascade"}),
        lm_spec({"mode": "cascade", "cascade": {"threshold": 0.5}}),
        lm_spec({"mode": "speculative"}),
        lm_spec({"mode": "speculative", "speculative": {"k": 4}}),
        lm_spec({"mode": "cloud-only"}),
    ]
    assert len({_revision(s) for s in specs}) == 7
    assert {compression_key(B.with_default_store(s, None), B.store_uri(s)) for s in specs} == {"83cd4fad02"}


def test_mode_settings_spelled_out_at_their_defaults_are_the_same_revision() -> None:
    assert _revision(lm_spec({"mode": "cascade"})) == _revision(
        lm_spec(
            {
                "mode": "cascade",
                "cascade": {"metric": "margin", "threshold": 0.7, "window": 1, "cloudTokens": 0},
            }
        )
    )
    assert _revision(lm_spec({"mode": "speculative"})) == _revision(
        lm_spec({"mode": "speculative", "speculative": {"k": 0, "maxK": 12}})
    )


# --- admission -----------------------------------------------------------------------------------------


def test_a_tensor_model_with_collaboration_is_refused_naming_fallback() -> None:
    message = _refusal(lambda: tensor_spec(**{"edge.collaboration": {"mode": "edge-only"}}))
    assert message == (
        "Value error, edge.collaboration is for language models (model.source.format hf or gguf): a tensor "
        "model's edge forwards whole requests to the cloud (edge.fallback)"
    )


@pytest.mark.parametrize(
    ("collaboration", "expected"),
    [
        ({"mode": "speculative", "cascade": {}}, "edge.collaboration.cascade applies only to mode cascade"),
        (
            {"mode": "cascade", "speculative": {"k": 2}},
            "edge.collaboration.speculative applies only to mode speculative",
        ),
        (
            {"mode": "cascade", "cascade": {"metric": "top1", "threshold": 1.5}},
            "edge.collaboration.cascade.threshold must be between 0 and 1 for metric margin or top1",
        ),
        (
            {"mode": "speculative", "speculative": {"k": 9, "maxK": 8}},
            "edge.collaboration.speculative.k must not exceed edge.collaboration.speculative.maxK",
        ),
    ],
    ids=[
        "cascade-settings-on-speculative",
        "speculative-settings-on-cascade",
        "top1-over-one",
        "k-over-max-k",
    ],
)
def test_mode_settings_that_do_not_fit_the_mode_are_refused(
    collaboration: dict[str, Any], expected: str
) -> None:
    assert _refusal(lambda: lm_spec(collaboration)) == f"Value error, {expected}"


def test_an_entropy_threshold_above_one_nat_is_admitted_and_above_twenty_refused() -> None:
    s = lm_spec({"mode": "cascade", "cascade": {"metric": "entropy", "threshold": 3.0}})
    assert s.edge.collaboration is not None and s.edge.collaboration.cascade is not None
    assert s.edge.collaboration.cascade.threshold == 3.0
    message = _refusal(
        lambda: lm_spec({"mode": "cascade", "cascade": {"metric": "entropy", "threshold": 21}})
    )
    assert message == "Input should be less than or equal to 20"


@pytest.mark.parametrize("mode", ["cloud-only", "speculative", "cascade"])
def test_a_mode_that_needs_the_cloud_is_refused_without_one(mode: str) -> None:
    expected = (
        "Value error, edge.collaboration.mode cloud-only, speculative and cascade need the cloud tier: "
        "cloud.replicas must be at least 1 and edge.fallback.enabled true (the edge reaches the cloud Service "
        "through it)"
    )
    body = lm_spec().model_dump(by_alias=True, exclude_none=True)
    body["edge"]["collaboration"] = {"mode": mode}
    body["cloud"]["replicas"] = 0
    assert _refusal(lambda: ModelDeploymentSpec.model_validate(body)) == expected
    body["cloud"]["replicas"] = 1
    body["edge"]["fallback"]["enabled"] = False
    assert _refusal(lambda: ModelDeploymentSpec.model_validate(body)) == expected


def test_the_example_manifest_runs_a_cascade_against_its_cloud_service_gated_on_the_presets() -> None:
    path = Path(__file__).resolve().parents[4] / "examples" / "generative-collaboration.yaml"
    md = ModelDeployment.model_validate(yaml.safe_load(path.read_text()))
    owner = B.Owner("assistant", "team-a", "uid-1")
    ds = B.edge_daemonset(
        md.spec, owner, "rev1", "comp1", "q4", B.EdgeArtifact("https://store.example/q4.tar", SHA), ["n1"], {}
    )
    assert ds["spec"]["template"]["spec"]["containers"][0]["args"][-18:] == [
        "--fallback-url",
        "http://assistant-cloud.team-a.svc:8080",
        "--queue-limit",
        "8",
        "--collaboration",
        "cascade",
        "--cloud-model",
        "assistant",
        "--cascade-metric",
        "margin",
        "--cascade-threshold",
        "0.7",
        "--cascade-window",
        "2",
        "--cascade-cloud-tokens",
        "0",
        "--cascade-check",
        "full",
    ]
    assert md.spec.rollout.analysis is not None
    assert [(q.preset, q.relative_to_stable) for q in md.spec.rollout.analysis.queries] == [
        ("ttft-p95", True),
        ("itl-p95", True),
        ("error-ratio", False),
        ("handoff-ratio", True),
    ]


@pytest.mark.parametrize(
    "collaboration",
    [
        {
            "mode": "cascade",
            "cascade": {
                "metric": "entropy",
                "threshold": 2.5,
                "window": 4,
                "cloudTokens": 16,
                "check": "off",
            },
        },
        {"mode": "speculative", "speculative": {"k": 4, "maxK": 8}},
        {"mode": "cloud-only"},
    ],
    ids=["cascade", "speculative", "cloud-only"],
)
def test_kiri_serve_reads_the_edge_pods_flags_as_the_spec_says(collaboration: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser(prog="kiri")
    serving_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(_args(lm_spec(collaboration)))
    assert (args.collaboration, args.cloud_model, args.fallback_url) == (
        collaboration["mode"],
        "smollm",
        CLOUD_URL,
    )
    cascade = collaboration.get("cascade", {})
    assert (
        args.cascade_metric,
        args.cascade_threshold,
        args.cascade_window,
        args.cascade_cloud_tokens,
        args.cascade_check,
    ) == (
        cascade.get("metric", "margin"),
        cascade.get("threshold", 0.7),
        cascade.get("window", 1),
        cascade.get("cloudTokens", 0),
        cascade.get("check", "full"),
    )
    speculative = collaboration.get("speculative", {})
    assert (args.speculative_k, args.speculative_max_k) == (
        speculative.get("k", 0),
        speculative.get("maxK", 12),
    )
