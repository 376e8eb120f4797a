"""The cloud tier of a language model (engine kiri) serves the full model's onnxruntime-genai pack that the
compression Job published (the manifest's `model.uri` and sha256), fetched from the artifact store as the edges
fetch their variants; until it is published CloudReady waits with the reason, and a Deployment of an earlier pack
keeps serving while a new compression runs. Rendered objects of the whole planner."""

from __future__ import annotations

from typing import Any

from kiri_operator import conditions as C
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.observations import ObjectView, Observed
from kiri_operator.planning import building as B
from kiri_operator.planning import plan
from kiri_operator.planning.revisions import compression_key
from kiri_operator.plans import Check, Plan
from kiri_runtime.manifests import Baseline, Manifest, ModelInfo, Variant
from planning_worlds import SHA, manifest_configmap, observed

STORE = "http://kiri-store.kiri-system.svc:8080"
EDGE_STORE = "https://store.example.com"
PACK_SHA = "e" * 64
Q4_SHA = "f" * 64


def lm_spec(variants: list[dict[str, Any]] | None = None, **cloud: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "smollm",
                "version": "1",
                "source": {
                    "uri": "s3://models/smollm.tar",
                    "format": "hf",
                    "sha256": SHA,
                    "credentials": {"secretRef": {"name": "bucket"}},
                },
                "evalDataUri": "s3://eval/chat.jsonl",
            },
            "cloud": {"replicas": 2, **cloud},
            "edge": {
                "variants": [{"name": "q4", "method": "int4"}] if variants is None else variants,
                "artifacts": {
                    "uri": STORE,
                    "fetchUri": EDGE_STORE,
                    "credentials": {"secretRef": {"name": "store-token"}},
                },
            },
        }
    )


def base(s: ModelDeploymentSpec) -> str:
    """Where the edges, and now the cloud, fetch this compression's artifacts."""
    return f"{EDGE_STORE}/ns/md/{compression_key(s, STORE)}/"


def lm_manifest(source_sha: str = SHA) -> Manifest:
    return Manifest(
        model=ModelInfo(
            source_uri="s3://models/smollm.tar",
            source_sha256=source_sha,
            format="hf",
            uri="model.tar",
            onnx_sha256=PACK_SHA,
            size_bytes=9000,
            kind="causal-lm",
            architecture="LlamaForCausalLM",
        ),
        baseline=Baseline(p50_latency_ms=5.0, size_bytes=9000),
        seed=0,
        variants=[
            Variant(
                name="q4",
                method="int4",
                uri="q4.tar",
                sha256=Q4_SHA,
                size_bytes=2000,
                accepted=True,
                reason="all gates passed",
            )
        ],
    )


def world(s: ModelDeploymentSpec, *children: ObjectView) -> Observed:
    return observed(children={(c.kind, c.name): c for c in children})


def published(s: ModelDeploymentSpec, m: Manifest | None = None) -> Observed:
    return world(s, manifest_configmap(s, m or lm_manifest()))


def bodies(p: Plan, kind: str) -> list[dict[str, Any]]:
    return [
        a.body for a in p.actions if a.kind == kind and a.body is not None and a.check is not Check.DELETE
    ]


def cloud_ready(p: Plan) -> dict[str, Any]:
    (cond,) = [c for c in p.status["conditions"] if c["type"] == C.CLOUD_READY]
    return dict(cond)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(c)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_before_the_pack_is_published_the_cloud_has_its_service_and_waits_for_the_compression_job() -> None:
    s = lm_spec()
    p = plan(s, world(s))
    assert bodies(p, "Deployment") == []
    assert [b["metadata"]["name"] for b in bodies(p, "Service")] == ["md-cloud"]
    assert [b["kind"] for b in bodies(p, "Job")] == ["Job"]
    cond = cloud_ready(p)
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForCloudPack")
    assert cond["message"].startswith(
        "waiting for the full model's onnxruntime-genai pack: compression Job md-"
    )


def test_the_published_pack_is_what_the_cloud_serves_with_its_sha256_fetched_like_the_edge_variants() -> None:
    s = lm_spec()
    p = plan(s, published(s))
    (deployment,) = bodies(p, "Deployment")
    assert deployment == B.cloud_deployment(
        s, B.Owner("md", "ns", "uid-1"), {}, B.CloudPack(base(s) + "model.tar", PACK_SHA)
    )
    c = container(deployment)
    assert flag(c["args"], "--model-uri") == base(s) + "model.tar"
    assert flag(c["args"], "--sha256") == PACK_SHA
    assert "s3://models/smollm.tar" not in c["args"]
    assert flag(c["args"], "--variant") == "full"
    # The store's credentials (the pack comes from there), not the model source's.
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets == {"store-token"}
    assert (cloud_ready(p)["status"], cloud_ready(p)["reason"]) == ("False", "DeploymentProgressing")


def test_the_cloud_pack_is_not_an_edge_variant() -> None:
    s = lm_spec()
    p = plan(s, published(s))
    assert [v["name"] for v in p.status["variants"]] == ["q4"]
    (ds,) = bodies(p, "DaemonSet")
    assert flag(container(ds)["args"], "--model-uri") == base(s) + "q4.tar"


def test_a_pack_on_a_file_store_is_mounted_read_only_as_the_edges_mount_it() -> None:
    s = ModelDeploymentSpec.model_validate(
        {
            **lm_spec().model_dump(mode="json", by_alias=True, exclude_none=True),
            "edge": {
                "variants": [{"name": "q4", "method": "int4"}],
                "artifacts": {"uri": "file:///srv/kiri"},
            },
        }
    )
    pack = B.CloudPack("file:///srv/kiri/ns/md/abc/model.tar", PACK_SHA)
    pod = B.cloud_deployment(s, B.Owner("md", "ns", "uid-1"), {}, pack)["spec"]["template"]["spec"]
    assert {"name": "artifacts", "hostPath": {"path": "/srv/kiri/ns/md", "type": "Directory"}} in pod[
        "volumes"
    ]
    assert {"name": "artifacts", "mountPath": "/srv/kiri/ns/md", "readOnly": True} in container_of(pod)[
        "volumeMounts"
    ]
    assert flag(container_of(pod)["args"], "--model-uri") == "file:///srv/kiri/ns/md/abc/model.tar"


def container_of(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["containers"]
    return dict(c)


def test_a_new_compression_keeps_the_deployment_of_the_last_pack_serving_until_its_own_is_published() -> None:
    old = lm_spec()
    deployment = plan(old, published(old))
    (body,) = bodies(deployment, "Deployment")
    served = ObjectView("Deployment", "md-cloud", body)
    new = lm_spec([{"name": "q4", "method": "int4", "options": {"blockSize": 64}}])
    p = plan(new, world(new, served))
    assert [(a.kind, a.check) for a in p.actions if a.kind == "Deployment"] == []
    assert cloud_ready(p)["reason"] == "DeploymentProgressing"


def test_without_edge_variants_no_pack_is_built_and_cloud_ready_says_what_to_do() -> None:
    s = lm_spec([])
    p = plan(s, world(s))
    assert bodies(p, "Deployment") == [] and bodies(p, "Job") == []
    cond = cloud_ready(p)
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForCloudPack")
    assert "with no edge.variants none is built" in cond["message"]
    assert "cloud.runtime.engine vllm" in cond["message"]


def test_a_failed_compression_is_the_reason_the_cloud_has_no_pack() -> None:
    s = lm_spec()
    job = bodies(plan(s, world(s)), "Job")[0]
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    p = plan(s, world(s, ObjectView("Job", job["metadata"]["name"], job)))
    cond = cloud_ready(p)
    assert cond["reason"] == "WaitingForCloudPack"
    assert cond["message"].startswith(
        f"no onnxruntime-genai pack of the full model: compression Job {job['metadata']['name']} failed: "
        "BackoffLimitExceeded"
    )


def test_a_vllm_cloud_serves_the_source_and_waits_for_no_pack() -> None:
    s = lm_spec(resources={"cpu": "8", "memory": "32Gi", "gpu": 1}, runtime={"engine": "vllm"})
    p = plan(s, world(s))
    (deployment,) = bodies(p, "Deployment")
    assert cloud_ready(p)["reason"] != "WaitingForCloudPack"
    assert deployment["spec"]["template"]["spec"]["initContainers"][0]["name"]
