"""The ModelDeployment CRD on the real API server: it is accepted and structural, the examples pass, every
manifest in the bad-manifest catalogue is rejected with a message naming the field, the API server's defaults
are the models' defaults, and the status subresource keeps everything the operator writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kiri_operator.api import CRD_NAME, GROUP, PLURAL, VERSION, ModelDeployment, ModelDeploymentStatus
from manifest_catalogue import CATALOGUE, apply_case

from .conftest import REPO_ROOT, Cluster

pytestmark = pytest.mark.timeout(120)

CRD_FILE = REPO_ROOT / "crds" / "modeldeployment.yaml"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd_installed(cluster: Cluster) -> Cluster:
    """The committed CRD, applied server-side (as GitOps tools do) and Established."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=kiri-e2e-api", "-f", str(CRD_FILE)
    )
    cluster.wait_crd_established(CRD_NAME)
    return cluster


@pytest.fixture(scope="module")
def objects(crd_installed: Cluster) -> Iterator[client.CustomObjectsApi]:
    with crd_installed.api_client() as api_client:
        yield client.CustomObjectsApi(api_client)


def test_crd_is_established_structural_and_explained(crd_installed: Cluster) -> None:
    crd = crd_installed.get_json("crd", CRD_NAME)
    conditions = {c["type"]: c for c in crd["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    # The API server flags non-structural schemas with this condition; a structural one never has it.
    assert "NonStructuralSchema" not in conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == ["mdep"]
    # The API server publishes a new CRD's OpenAPI a few seconds after Established; explain reads that.
    explained = crd_installed.wait_for(
        lambda: crd_installed.kubectl("explain", "modeldeployments.spec.rollout.stages"),
        timeout=60,
        message="kubectl explain to find the new CRD's OpenAPI schema",
    )
    assert "percent" in explained and "bakeSeconds" in explained


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_and_defaulted_like_the_models(
    example: Path, crd_installed: Cluster, namespace: str
) -> None:
    manifest = yaml.safe_load(example.read_text())
    crd_installed.kubectl("apply", "--server-side", "-n", namespace, "-f", str(example))
    stored = crd_installed.get_json(PLURAL, manifest["metadata"]["name"], "-n", namespace)
    expected = ModelDeployment.model_validate(manifest).spec.dump()
    # Quantities written as YAML numbers are kept as numbers by the API server, as strings by the models.
    stored_resources = stored["spec"]["cloud"]["resources"]
    stored["spec"]["cloud"]["resources"] = {
        k: str(v) if k in ("cpu", "memory") else v for k, v in stored_resources.items()
    }
    assert stored["spec"] == expected
    ModelDeployment.model_validate(stored)


@pytest.mark.parametrize("case", CATALOGUE["cases"], ids=lambda c: c["id"])
def test_bad_manifest_is_rejected_naming_the_field(
    case: dict[str, Any], objects: client.CustomObjectsApi
) -> None:
    manifest = apply_case(CATALOGUE["base"], case)
    if isinstance(manifest.get("metadata"), dict):
        manifest["metadata"]["name"] = f"bad-{case['id']}"[:63]
    with pytest.raises(client.ApiException) as info:
        objects.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, manifest, dry_run="All", field_validation="Strict"
        )
    assert info.value.status in (400, 422), info.value.body
    message = json.loads(info.value.body)["message"]
    assert case["field"] in message, f"{case['why']}: the API server said {message!r}"


def test_catalogue_base_is_accepted(objects: client.CustomObjectsApi) -> None:
    created = objects.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, CATALOGUE["base"], dry_run="All", field_validation="Strict"
    )
    assert created["spec"]["rollout"]["stages"][-1]["percent"] == 100


@pytest.mark.parametrize("case", CATALOGUE["good_cases"], ids=lambda c: c["id"])
def test_boundary_manifest_is_accepted(case: dict[str, Any], objects: client.CustomObjectsApi) -> None:
    manifest = apply_case(CATALOGUE["base"], case)
    manifest["metadata"]["name"] = f"good-{case['id']}"[:63]
    created = objects.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, manifest, dry_run="All", field_validation="Strict"
    )
    # What the API server stores is what the operator will parse.
    ModelDeployment.model_validate(created)


def test_explicit_nulls_are_pruned_then_defaulted(objects: client.CustomObjectsApi, namespace: str) -> None:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "minimal.yaml").read_text())
    manifest["metadata"] = {"name": "nulls"}
    manifest["spec"]["model"]["signature"] = None
    manifest["spec"]["cloud"] = {"replicas": None, "runtime": None}
    manifest["spec"]["rollout"] = {"analysis": None, "maxUnavailable": None}
    created = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    spec = created["spec"]
    assert "signature" not in spec["model"]
    assert spec["cloud"]["replicas"] == 1
    assert spec["cloud"]["runtime"]["batching"]["maxBatchSize"] == 8
    assert "analysis" not in spec["rollout"]
    assert spec["rollout"]["maxUnavailable"] == 1


def test_status_subresource_keeps_what_the_operator_writes(
    crd_installed: Cluster, objects: client.CustomObjectsApi, namespace: str
) -> None:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "full.yaml").read_text())
    created = objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    name = created["metadata"]["name"]
    status = ModelDeploymentStatus.model_validate(
        {
            "observedGeneration": created["metadata"]["generation"],
            "phase": "Progressing",
            "conditions": [
                {
                    "type": "EdgeProgressing",
                    "status": "True",
                    "reason": "WaveInProgress",
                    "message": "wave 2/4: 3 of 6 nodes updated",
                    "lastTransitionTime": "2026-11-26T05:44:09Z",
                    "observedGeneration": created["metadata"]["generation"],
                }
            ],
            "currentRevision": "7c1e0a9b",
            "updateRevision": "d34db33f",
            "cloud": {"replicas": 2, "ready": 2},
            "variants": [
                {
                    "name": "int8-cpu",
                    "state": "Verified",
                    "fidelity": {"cosine": {"mean": 0.9991, "p5": 0.997}, "top1-agreement": {"mean": 0.99}},
                    "sizeBytes": 26214400,
                    "sha256": "ab" * 32,
                    "uri": "file:///var/lib/kiri/artifacts/x/int8-cpu.onnx",
                    "latency": {"p50Ms": 3.2, "p95Ms": 4.1, "speedup": 2.1},
                },
                {"name": "fp16-gpu", "state": "Rejected", "reason": "cosine min 0.9981 < 0.999"},
            ],
            "edge": {
                "targetNodes": 6,
                "updatedNodes": 3,
                "readyNodes": 2,
                "deferredNodes": 1,
                "unmatchedNodes": 0,
                "stageIndex": 1,
                "stage": "2/4 (25%)",
                "stageStartedAt": "2026-11-26T05:40:00Z",
                "perVariant": [{"name": "int8-cpu", "revision": "d34db33f", "nodes": 3, "ready": 2}],
            },
            "history": [
                {
                    "revision": "7c1e0a9b",
                    "modelVersion": "2.2.0",
                    "outcome": "Promoted",
                    "reason": "all waves healthy",
                    "time": "2026-11-25T10:00:00Z",
                }
            ],
            "rollout": {"stableRevision": "7c1e0a9b", "stage": 1, "promoted": False, "history": []},
        }
    )
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status.dump()}
    )
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert stored["status"] == status.dump()
    assert ModelDeploymentStatus.model_validate(stored["status"]) == status

    table = crd_installed.kubectl("get", "mdep", name, "-n", namespace, "-o", "wide")
    header, row = table.strip().splitlines()
    assert header.split() == [
        "NAME", "PHASE", "CLOUD", "UPDATED", "TARGET", "STAGE", "REVISION", "UPDATE", "MODEL", "AGE"
    ]  # fmt: skip
    assert row.split()[:6] == [name, "Progressing", "2", "3", "6", "2/4"]
    assert "7c1e0a9b" in row and "d34db33f" in row and "2.3.0" in row
    assert name in crd_installed.kubectl("get", "kiri", "-n", namespace, "-o", "name")


def test_status_writes_are_validated_too(objects: client.CustomObjectsApi, namespace: str) -> None:
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "minimal.yaml").read_text())
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    with pytest.raises(client.ApiException) as info:
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "classifier", {"status": {"phase": "Exploded"}}
        )
    assert "status.phase" in json.loads(info.value.body)["message"]
