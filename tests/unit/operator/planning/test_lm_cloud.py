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
from kiri_runtime.manifests import Baseline, GpuPack, Manifest, ModelInfo, Variant
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


# --- cloud.runtime.device -----------------------------------------------------------------------------------

GPU_SHA = "a" * 64


def with_gpu_pack(m: Manifest) -> Manifest:
    gpu = GpuPack(uri="model-fp16-cuda.tar", sha256=GPU_SHA, size_bytes=4600, max_abs_weight_error=1e-4)
    return m.model_copy(update={"model": m.model.model_copy(update={"gpu_pack": gpu})})


def test_a_cuda_cloud_asks_the_job_for_the_gpu_pack_under_a_key_of_its_own() -> None:
    cpu, cuda = lm_spec(), lm_spec(resources={"gpu": 1}, runtime={"device": "cuda"})
    (cpu_job,), (cuda_job,) = bodies(plan(cpu, world(cpu)), "Job"), bodies(plan(cuda, world(cuda)), "Job")
    (cpu_step,) = cpu_job["spec"]["template"]["spec"]["initContainers"]
    (cuda_step,) = cuda_job["spec"]["template"]["spec"]["initContainers"]
    assert "--gpu-pack" not in cpu_step["args"]
    assert flag(cuda_step["args"], "--gpu-pack") == "fp16"
    assert compression_key(cuda, STORE) != compression_key(cpu, STORE)
    # GPUs are for serving: the Job compresses on CPU whatever the cloud asks.
    assert "nvidia.com/gpu" not in cuda_step["resources"]["limits"]


def test_a_cuda_cloud_serves_the_gpu_pack_with_the_cuda_image_and_waits_for_a_manifest_that_has_one() -> None:
    s = lm_spec(resources={"gpu": 2}, runtime={"device": "cuda"})
    p = plan(s, published(s, with_gpu_pack(lm_manifest())))
    c = container(*bodies(p, "Deployment"))
    assert c["image"] == "ghcr.io/kiri-dev/kiri-runtime-cuda:0.1.0" == s.runtime.cuda_image
    assert flag(c["args"], "--device") == "cuda"
    assert flag(c["args"], "--model-uri") == base(s) + "model-fp16-cuda.tar"
    assert flag(c["args"], "--sha256") == GPU_SHA
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # A manifest without one (made by an older compressor) is not served on the GPU.
    p = plan(s, published(s, lm_manifest()))
    assert bodies(p, "Deployment") == []
    cond = cloud_ready(p)
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForCloudPack")
    assert cond["message"].endswith("has no fp16 GPU pack of the full model (model.gpuPack)")


def test_a_cpu_cloud_ignores_a_gpu_pack_and_its_ready_condition_names_the_gpus_it_holds_for_nothing() -> None:
    s = lm_spec(resources={"gpu": 1})
    p = plan(s, published(s, with_gpu_pack(lm_manifest())))
    (deployment,) = bodies(p, "Deployment")
    c = container(deployment)
    assert "--device" not in c["args"] and c["image"] == s.runtime.image
    assert flag(c["args"], "--model-uri") == base(s) + "model.tar"
    deployment["metadata"]["generation"] = 1
    deployment["status"] = {
        "observedGeneration": 1, "readyReplicas": 2, "availableReplicas": 2, "updatedReplicas": 2,
    }  # fmt: skip
    p = plan(
        s, world(s, manifest_configmap(s, lm_manifest()), ObjectView("Deployment", "md-cloud", deployment))
    )
    assert cloud_ready(p)["message"] == (
        "2/2 replicas ready; each pod holds 1 nvidia.com/gpu that it does not use: the language model decodes on "
        "CPU (cloud.runtime.device cpu); set device cuda, or cloud.resources.gpu 0"
    )
    s0 = lm_spec(resources={"gpu": 0})
    p = plan(
        s0, world(s0, manifest_configmap(s0, lm_manifest()), ObjectView("Deployment", "md-cloud", deployment))
    )
    assert cloud_ready(p)["message"] == "2/2 replicas ready"
