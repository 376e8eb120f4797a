"""The cloud Deployment of `cloud.runtime.engine: vllm`: vLLM's OpenAI server on GPU nodes.

Two containers in one pod, so the model arrives the way every Kiri tier gets it (fetched, its sha256 checked)
and vLLM never reaches a model hub:
- init `checkpoint` (the Kiri runtime image): `kiri checkpoint` fetches the `hf` source tar (file, http(s),
  s3, or a `pvc://` claim), checks its sha256, unpacks it into the `checkpoint` emptyDir and links the
  checkpoint directory at `/checkpoint/model`;
- `vllm`: `python3 -m vllm.entrypoints.openai.api_server --model /checkpoint/model --served-model-name
  <model.name>`, `--dtype` (float16 by default), one tensor-parallel rank per GPU, `/health` probes (a
  startup probe gives loading and CUDA-graph capture up to 30 minutes).

Security as for `kiri serve`: non-root (uid 65532; the image runs as any uid once HOME and every cache
point at the `/tmp` emptyDir and USER names the user, since the uid has no passwd entry), read-only root
filesystem, no capabilities, no service account token; `/dev/shm` is a memory emptyDir (NCCL between
tensor-parallel ranks). `HF_HUB_OFFLINE` and no usage stats: the pod makes no calls out.

The Service is the one `kiri serve` has (`building.cloud_service`: port `http`), so an edge in a
collaboration mode reaches vLLM at the same URL, through `/v1/completions` on token ids (docs/operations.md
"A vLLM cloud tier").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kiri_operator import labels as L
from kiri_operator.api.engines import VllmSpec
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.planning import building as B

CHECKPOINT_MOUNT = "/checkpoint"
CHECKPOINT_DIR = f"{CHECKPOINT_MOUNT}/model"
"""What `kiri checkpoint --out /checkpoint` links to the unpacked checkpoint directory."""
VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
STARTUP_SECONDS = 1800
"""Loading weights and capturing CUDA graphs of a large model takes minutes; liveness waits this long."""
_VLLM_ENV = [
    {"name": "HOME", "value": "/tmp"},
    # The uid has no passwd entry: getpass.getuser() (torch's compile caches) reads these first.
    {"name": "USER", "value": "kiri"},
    {"name": "LOGNAME", "value": "kiri"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    {"name": "HF_HOME", "value": "/tmp/.cache/huggingface"},
    {"name": "HF_HUB_OFFLINE", "value": "1"},
    {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    {"name": "DO_NOT_TRACK", "value": "1"},
]


def vllm_args(spec: ModelDeploymentSpec) -> list[str]:
    """The OpenAI server's flags: Kiri's first (model, name, address, dtype, parallelism), then the spec's."""
    vllm = spec.cloud.runtime.vllm or VllmSpec()
    args = [
        "--model",
        CHECKPOINT_DIR,
        "--served-model-name",
        spec.model.name,
        "--host",
        "0.0.0.0",
        "--port",
        str(spec.cloud.port),
        "--dtype",
        vllm.dtype,
        "--tensor-parallel-size",
        str(spec.cloud.resources.gpu),
        "--gpu-memory-utilization",
        str(vllm.gpu_memory_utilization),
        "--max-logprobs",
        str(vllm.max_logprobs),
    ]
    if vllm.max_model_len is not None:
        args += ["--max-model-len", str(vllm.max_model_len)]
    if vllm.max_num_seqs is not None:
        args += ["--max-num-seqs", str(vllm.max_num_seqs)]
    return args + list(vllm.extra_args)


def _probe(port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def vllm_deployment(
    spec: ModelDeploymentSpec, owner: B.Owner, pod_labels: Mapping[str, str]
) -> dict[str, Any]:
    cloud = spec.cloud
    vllm = cloud.runtime.vllm or VllmSpec()
    source = B.model_source(spec.model.source.uri)
    labels = L.common_labels(owner.name, L.COMPONENT_CLOUD)
    selector = {L.MODEL_DEPLOYMENT: owner.name, L.COMPONENT: L.COMPONENT_CLOUD}
    resources: dict[str, Any] = {
        "cpu": cloud.resources.cpu,
        "memory": cloud.resources.memory,
        "nvidia.com/gpu": str(cloud.resources.gpu),
    }
    access = B.store_access(spec.model.source.credentials)
    source_volumes, source_mounts = B.source_volumes(source)
    checkpoint = {"name": "checkpoint", "mountPath": CHECKPOINT_MOUNT}
    tmp = {"name": "tmp", "mountPath": "/tmp"}
    fetcher = {
        "name": "checkpoint",
        "image": spec.runtime.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["kiri"],
        "args": [
            "checkpoint",
            "--source",
            source.uri,
            "--sha256",
            spec.model.source.sha256,
            "--out",
            CHECKPOINT_MOUNT,
        ],
        "resources": {
            "requests": {"cpu": cloud.resources.cpu, "memory": cloud.resources.memory},
            "limits": {"cpu": cloud.resources.cpu, "memory": cloud.resources.memory},
        },
        "securityContext": B.container_security(),
        "env": [*copy.deepcopy(B.RUNTIME_ENV), *access.env],
        "volumeMounts": [*source_mounts, checkpoint, tmp, *access.mounts],
    }
    server = {
        "name": "vllm",
        "image": vllm.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": list(VLLM_COMMAND),
        "args": vllm_args(spec),
        "ports": [{"name": "http", "containerPort": cloud.port, "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "startupProbe": _probe(cloud.port, 10, STARTUP_SECONDS // 10),
        "readinessProbe": _probe(cloud.port, 5, 3),
        "livenessProbe": _probe(cloud.port, 10, 6),
        "securityContext": B.container_security(),
        "env": copy.deepcopy(_VLLM_ENV),
        # The source claim too: for a checkpoint directory on a claim, /checkpoint/model links into it.
        "volumeMounts": [
            *source_mounts,
            {**checkpoint, "readOnly": True},
            tmp,
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": L.cloud_name(owner.name), "labels": dict(labels), "annotations": {}},
        "spec": {
            "replicas": cloud.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**pod_labels, **labels}},
                "spec": B.pod_identity(
                    spec,
                    cloud.service_account_name,
                    {
                        "automountServiceAccountToken": False,
                        "nodeSelector": dict(cloud.node_selector),
                        "tolerations": B.tolerations(cloud.tolerations),
                        "securityContext": B.pod_security(),
                        "initContainers": [fetcher],
                        "containers": [server],
                        "volumes": [
                            *source_volumes,
                            {"name": "checkpoint", "emptyDir": {}},
                            {"name": "tmp", "emptyDir": {}},
                            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                            *access.volumes,
                        ],
                    },
                ),
            },
        },
    }
    return B.finish(obj, owner)
