"""The opt-in vLLM cloud tier (issue 22, operator): `cloud.runtime.engine: vllm` makes the cloud Deployment vLLM's
OpenAI server on the checkpoint an init container fetched and checked, with GPUs, fp16, /health probes and the
restricted Pod Security profile; the edge reaches it through the same Service and model name; the kiri engine's
children stay as they were. Rendered children only: no GPU machine was lent to this work, vLLM itself did not run."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kiri_operator import labels as L
from kiri_operator.api.access import CREDENTIAL_KEYS
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B
from kiri_operator.planning.cloud import plan_cloud
from kiri_operator.planning.revisions import revision_key
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.vllm import vllm_deployment
from planning_worlds import SHA, observed

OWNER = B.Owner("smollm", "team-a", "uid-1")
CLOUD_URL = "http://smollm-cloud.team-a.svc:8080"
HEALTH = {"path": "/health", "port": 8080}


def lm_spec(
    runtime: dict[str, Any] | None = None, uri: str = "s3://models/smollm.tar", **cloud: Any
) -> ModelDeploymentSpec:
    body: dict[str, Any] = {
        "model": {
            "name": "smollm",
            "version": "1",
            "source": {"uri": uri, "format": "hf", "sha256": SHA},
            "evalDataUri": "s3://eval/chat.jsonl",
        },
        "cloud": {"resources": {"cpu": "8", "memory": "32Gi", "gpu": 1}, **cloud},
        "edge": {"variants": [{"name": "q4", "method": "int4"}], "collaboration": {"mode": "speculative"}},
    }
    if runtime is not None:
        body["cloud"]["runtime"] = runtime
    return ModelDeploymentSpec.model_validate(body)


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _refusal(**runtime: Any) -> str:
    with pytest.raises(ValidationError) as info:
        lm_spec(runtime)
    return "; ".join(str(e["msg"]) for e in info.value.errors())


def test_a_vllm_cloud_serves_the_fetched_checkpoint_as_the_model_name_in_fp16_on_its_gpus() -> None:
    pod = _pod(vllm_deployment(lm_spec({"engine": "vllm"}), OWNER, {}))
    (fetcher,) = pod["initContainers"]
    assert fetcher["image"] == "ghcr.io/kiri-dev/kiri-runtime:0.1.0"
    assert fetcher["command"] == ["kiri"]
    assert fetcher["args"] == [
        "checkpoint", "--source", "s3://models/smollm.tar", "--sha256", SHA, "--out", "/checkpoint",
    ]  # fmt: skip
    assert fetcher["volumeMounts"] == [
        {"name": "checkpoint", "mountPath": "/checkpoint"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    (server,) = pod["containers"]
    assert server["image"] == "docker.io/vllm/vllm-openai:v0.11.0"
    assert server["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert server["args"] == [
        "--model", "/checkpoint/model", "--served-model-name", "smollm", "--host", "0.0.0.0", "--port", "8080",
        "--dtype", "float16", "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9",
        "--max-logprobs", "20",
    ]  # fmt: skip
    limits = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert server["resources"] == {"requests": limits, "limits": limits}
    assert server["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert server["volumeMounts"] == [
        {"name": "checkpoint", "mountPath": "/checkpoint", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    assert pod["volumes"] == [
        {"name": "checkpoint", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    assert pod["nodeSelector"] == {"kiri.dev/tier": "cloud"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_vllm_is_probed_on_health_with_thirty_minutes_to_load_before_liveness_counts() -> None:
    (server,) = _pod(vllm_deployment(lm_spec({"engine": "vllm"}), OWNER, {}))["containers"]
    assert server["startupProbe"] == {
        "httpGet": HEALTH,
        "periodSeconds": 10,
        "failureThreshold": 180,
        "timeoutSeconds": 5,
    }
    assert server["readinessProbe"] == {
        "httpGet": HEALTH,
        "periodSeconds": 5,
        "failureThreshold": 3,
        "timeoutSeconds": 5,
    }
    assert server["livenessProbe"] == {
        "httpGet": HEALTH,
        "periodSeconds": 10,
        "failureThreshold": 6,
        "timeoutSeconds": 5,
    }


def test_a_vllm_pod_meets_pod_security_restricted_and_makes_no_calls_out() -> None:
    pod = _pod(vllm_deployment(lm_spec({"engine": "vllm"}), OWNER, {}))
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod["initContainers"], *pod["containers"]]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    (server,) = pod["containers"]
    assert {e["name"]: e["value"] for e in server["env"]} == {
        "HOME": "/tmp",
        "USER": "kiri",
        "LOGNAME": "kiri",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "HF_HOME": "/tmp/.cache/huggingface",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def test_vllm_settings_become_its_flags_and_each_gpu_a_tensor_parallel_rank() -> None:
    s = lm_spec(
        {
            "engine": "vllm",
            "vllm": {
                "image": "registry.example/vllm-openai:v0.10.2",
                "dtype": "bfloat16",
                "maxModelLen": 4096,
                "gpuMemoryUtilization": 0.8,
                "maxNumSeqs": 64,
                "maxLogprobs": 32,
                "extraArgs": ["--enable-prefix-caching"],
            },
        },
        resources={"cpu": "16", "memory": "64Gi", "gpu": 2},
    )
    (server,) = _pod(vllm_deployment(s, OWNER, {}))["containers"]
    assert server["image"] == "registry.example/vllm-openai:v0.10.2"
    assert server["args"] == [
        "--model", "/checkpoint/model", "--served-model-name", "smollm", "--host", "0.0.0.0", "--port", "8080",
        "--dtype", "bfloat16", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8",
        "--max-logprobs", "32", "--max-model-len", "4096", "--max-num-seqs", "64", "--enable-prefix-caching",
    ]  # fmt: skip
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_a_checkpoint_on_a_claim_is_mounted_read_only_into_both_containers() -> None:
    s = lm_spec({"engine": "vllm"}, uri="pvc://models/smollm/checkpoint.tar")
    pod = _pod(vllm_deployment(s, OWNER, {}))
    claim = {"name": "model", "mountPath": "/models", "readOnly": True}
    assert pod["initContainers"][0]["args"][2] == "file:///models/smollm/checkpoint.tar"
    assert claim in pod["initContainers"][0]["volumeMounts"]
    assert claim in pod["containers"][0]["volumeMounts"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod[
        "volumes"
    ]


def test_the_store_credentials_reach_only_the_fetching_init_container() -> None:
    body = lm_spec({"engine": "vllm"}).model_dump(mode="json", by_alias=True, exclude_none=True)
    body["model"]["source"]["credentials"] = {"secretRef": {"name": "bucket"}}
    pod = _pod(vllm_deployment(ModelDeploymentSpec.model_validate(body), OWNER, {}))
    from_secret = [e for e in pod["initContainers"][0]["env"] if "valueFrom" in e]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in from_secret} == {"bucket"}
    assert len(from_secret) == len(CREDENTIAL_KEYS)
    assert not any("valueFrom" in e for e in pod["containers"][0]["env"])


def test_the_planner_builds_the_vllm_deployment_and_the_same_service_for_engine_vllm() -> None:
    s = lm_spec({"engine": "vllm"})
    plan = plan_cloud(s, observed(), OWNER, Settings())
    deployment, service = plan.children
    assert deployment == vllm_deployment(s, OWNER, {})
    assert service == B.cloud_service(s, OWNER)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pack = B.CloudPack("http://store/team-a/smollm/k/model.tar", "e" * 64)
    kiri = plan_cloud(lm_spec(), observed(), OWNER, Settings(), pack).children[0]
    assert kiri == B.cloud_deployment(lm_spec(), OWNER, {}, pack)
    assert kiri["spec"]["template"]["spec"]["containers"][0]["name"] == "kiri-serve"


def test_edges_collaborate_with_a_vllm_cloud_through_the_same_service_and_served_name_without_a_new_revision() -> (
    None
):
    kiri, vllm = lm_spec(), lm_spec({"engine": "vllm"})
    args = {}
    for name, s in (("kiri", kiri), ("vllm", vllm)):
        ds = B.edge_daemonset(
            s, OWNER, "rev1", "comp1", "q4", B.EdgeArtifact("https://store.example/q4.tar", SHA), ["n1"], {}
        )
        args[name] = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args["kiri"] == args["vllm"]
    flags = args["vllm"]
    assert flags[flags.index("--fallback-url") + 1] == CLOUD_URL
    assert flags[flags.index("--cloud-model") + 1] == "smollm"
    # Switching engines replaces the cloud Deployment only: the edge pods' revision is the same.
    assert revision_key(B.with_default_store(kiri, None), B.store_uri(kiri)) == revision_key(
        B.with_default_store(vllm, None), B.store_uri(vllm)
    )
    assert vllm_deployment(vllm, OWNER, {})["metadata"]["name"] == L.cloud_name(OWNER.name) == "smollm-cloud"


def test_vllm_settings_without_the_vllm_engine_are_refused() -> None:
    assert _refusal(vllm={"dtype": "bfloat16"}) == (
        "Value error, cloud.runtime.vllm applies only to cloud.runtime.engine vllm"
    )


def test_kiri_serve_threads_or_batching_with_the_vllm_engine_are_refused() -> None:
    expected = (
        "Value error, cloud.runtime.threads and cloud.runtime.batching are kiri serve's; vLLM batches "
        "continuously on its own: remove them with cloud.runtime.engine vllm"
    )
    assert _refusal(engine="vllm", threads=4) == expected
    assert _refusal(engine="vllm", batching={"enabled": True}) == expected


def test_the_vllm_engine_is_refused_without_a_gpu_and_for_sources_other_than_hf() -> None:
    with pytest.raises(ValidationError) as info:
        lm_spec({"engine": "vllm"}, resources={"cpu": "8", "memory": "32Gi", "gpu": 0})
    assert info.value.errors()[0]["msg"] == (
        "Value error, cloud.runtime.engine vllm needs cloud.resources.gpu of at least 1 (the vllm-openai image "
        "runs on CUDA GPUs)"
    )
    body = lm_spec({"engine": "vllm"}).model_dump(mode="json", by_alias=True)
    body["model"]["source"]["format"] = "gguf"
    with pytest.raises(ValidationError) as info:
        ModelDeploymentSpec.model_validate(body)
    assert info.value.errors()[0]["msg"] == (
        "Value error, cloud.runtime.engine vllm serves a Hugging Face checkpoint: model.source.format must be hf "
        "(a tensor model or a GGUF is served by kiri serve)"
    )
