"""Builders: one function per child object, each returning the complete object Kiri wants to exist.

Builders are pure and deterministic: the same inputs give byte-identical dicts, so the hash stored on
the object (`kiri.dev/spec-hash`) tells the check step whether a write is needed without comparing
against server-defaulted fields.

Why one module: every child body Kiri builds shares the same security contexts,
probes, volumes, metadata and hash, and the builders read best next to each other; split by tier, each
tier module would import the others' private helpers (as `planning.learning` already does).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kiri_operator import labels as L
from kiri_operator.api.access import CREDENTIAL_KEYS, StoreCredentials
from kiri_operator.api.specs import (
    DEFAULT_ARTIFACTS_URI,
    LM_FORMATS,
    CascadeSpec,
    ModelDeploymentSpec,
    SpeculativeSpec,
    Toleration,
    Variant,
    is_default_gate,
)
from kiri_operator.planning.adapting import Adapter, AdapterSet
from kiri_runtime import probing

RUNTIME_UID = 65532
MODEL_MOUNT = "/models"
ARTIFACTS_MOUNT = "/artifacts"
CACHE_MOUNT = "/var/cache/kiri"
"""Where `kiri serve` sees its cache: on edge nodes, this ModelDeployment's directory of the node cache."""
CACHE_CSI_DRIVER = "cache.kiri.dev"
"""The chart's CSI driver (csi/kiri-cache-csi) that hands each edge pod `<root>/<namespace>/<model>` of the
node cache: the namespace is the one the kubelet reports for the pod, so no pod can name another's."""
WORK_MOUNT = "/work"
NO_NODE = "kiri.dev-no-node"
"""The affinity value of a DaemonSet kept with no node (`In` needs at least one value; no node has it)."""
NODE_AFFINITY_PATH = ("spec", "template", "spec", "affinity", "nodeAffinity")


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


def canonical_hash(obj: Mapping[str, Any]) -> str:
    return L.short_hash(json.dumps(obj, sort_keys=True, separators=(",", ":")), length=16)


def finish(obj: dict[str, Any], owner: Owner) -> dict[str, Any]:
    """Add namespace, owner reference and the spec hash (computed over everything else)."""
    meta = obj.setdefault("metadata", {})
    meta["namespace"] = owner.namespace
    meta["ownerReferences"] = [L.owner_reference(owner.name, owner.uid)]
    annotations = meta.setdefault("annotations", {})
    annotations.pop(L.SPEC_HASH, None)
    annotations[L.SPEC_HASH] = canonical_hash(obj)
    return obj


def _metadata(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels), "annotations": {}}


def tolerations(items: Sequence[Toleration]) -> list[dict[str, Any]]:
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in items]


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


# The root filesystem is read-only: libraries that cache under $HOME (torch, onnxruntime) use the /tmp emptyDir.
RUNTIME_ENV = [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}]
# `kiri serve --namespace` defaults to it: pins in a node cache are keyed by namespace and model.
_SERVE_ENV = [
    *RUNTIME_ENV,
    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
]


STORE_CA_MOUNT = "/etc/kiri/store-ca"
STORE_CA_FILE = "ca.crt"


@dataclass(frozen=True)
class StoreAccess:
    """What a container that fetches from a store needs for its credentials: env and a CA volume."""

    env: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]


def store_access(credentials: StoreCredentials | None) -> StoreAccess:
    """`credentials` as the Kubernetes way has it: each known key of the Secret as an optional
    `secretKeyRef` env var (a Secret without the key leaves it unset), and the CA bundle as a read-only
    volume named by `KIRI_CA_FILE`. Every reference resolves in the pod's own namespace."""
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if credentials is None:
        return StoreAccess(env, volumes, mounts)
    if credentials.secret_ref is not None:
        secret = credentials.secret_ref.name
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in CREDENTIAL_KEYS
        ]
    bundle = credentials.ca_bundle
    if bundle is not None:
        items = [{"key": "", "path": STORE_CA_FILE}]
        if bundle.config_map_key_ref is not None:
            items[0]["key"] = bundle.config_map_key_ref.key
            volumes.append(
                {"name": "store-ca", "configMap": {"name": bundle.config_map_key_ref.name, "items": items}}
            )
        elif bundle.secret_key_ref is not None:
            items[0]["key"] = bundle.secret_key_ref.key
            volumes.append(
                {"name": "store-ca", "secret": {"secretName": bundle.secret_key_ref.name, "items": items}}
            )
        mounts.append({"name": "store-ca", "mountPath": STORE_CA_MOUNT, "readOnly": True})
        env.append({"name": "KIRI_CA_FILE", "value": f"{STORE_CA_MOUNT}/{STORE_CA_FILE}"})
    return StoreAccess(env, volumes, mounts)


def pod_identity(
    spec: ModelDeploymentSpec, service_account: str | None, pod: dict[str, Any]
) -> dict[str, Any]:
    """`pod` (a pod spec) with the service account and image pull secrets the spec names; a field that is
    unset stays out, so children built before these fields existed keep their hashes."""
    if service_account is not None:
        pod["serviceAccountName"] = service_account
    if spec.runtime.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.runtime.image_pull_secrets]
    return pod


def node_cache_volume(owner: Owner) -> dict[str, Any]:
    """An edge pod's node cache: a CSI ephemeral volume, so the pod passes Pod Security "restricted".

    The driver (a chart DaemonSet, the only holder of the host directory) bind-mounts
    `<edgeCache.root>/<pod namespace>/<model>`, made and owned by the runtime's uid, so no tenant's pods can
    read, fill or evict another's (all runtimes share one uid), and the cache outlives pods and revisions: a
    rollback finds its artifact there. Where the root is, is the cluster admin's choice, never the spec's.
    """
    return {
        "name": "cache",
        "csi": {"driver": CACHE_CSI_DRIVER, "volumeAttributes": {"model": owner.name}},
    }


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


READY_PERIOD, READY_FAILURES = 5, 3


def readiness_probe(port: int) -> dict[str, Any]:
    """An exec probe (`kiri_runtime.probing`) rather than httpGet: it asks `/v2/health/ready` the same way,
    and its output, the server's not-ready reason, lands in the kubelet's `Unhealthy` Event, which the
    operator quotes in status (an httpGet probe keeps only the status code). The timeout leaves room for
    the Python start on a busy node (the probe itself gives the server 4 s)."""
    return {
        "exec": {"command": probing.command(port)},
        "periodSeconds": READY_PERIOD,
        "failureThreshold": READY_FAILURES,
        "timeoutSeconds": 5,
    }


@dataclass(frozen=True)
class Source:
    """How pods reach the full model: the URI they pass to the runtime, plus a volume for pvc:// sources."""

    uri: str
    claim: str | None = None


def model_source(uri: str) -> Source:
    """`pvc://claim/path` becomes a read-only PVC mount and a file:// URI; other schemes pass through."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        path = parsed.path.lstrip("/")
        return Source(uri=f"file://{MODEL_MOUNT}/{path}", claim=parsed.netloc)
    return Source(uri=uri)


def source_volumes(source: Source) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if source.claim is None:
        return [], []
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
    mount = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
    return [volume], [mount]


def cloud_service_url(owner: Owner, port: int) -> str:
    return f"http://{L.cloud_name(owner.name)}.{owner.namespace}.svc:{port}"


def serves_gpu_pack(spec: ModelDeploymentSpec) -> bool:
    """Whether a language model's cloud tier decodes on the GPU (`cloud.runtime.device: cuda`, which the API
    allows for engine kiri and language models only): then the compression Job also builds the full model's
    fp16 CUDA pack, and the cloud pods serve it with `--device cuda` from `runtime.cudaImage`."""
    return spec.cloud.runtime.device == "cuda" and spec.model.source.format in LM_FORMATS


@dataclass(frozen=True)
class CloudPack:
    """The full model as the compression Job published it for the cloud tier of a language model: the
    onnxruntime-genai pack (the manifest's `model.uri`, resolved to the store's fetch URI) and its sha256."""

    uri: str
    sha256: str
    device: str = "cpu"
    """`cuda`: the fp16 GPU pack (the manifest's `model.gpuPack`), served on the GPU."""


def cloud_deployment(
    spec: ModelDeploymentSpec, owner: Owner, pod_labels: Mapping[str, str], pack: CloudPack | None = None
) -> dict[str, Any]:
    """The cloud tier's `kiri serve`. It serves the model source as it is (an ONNX model), or, for a language
    model, `pack`: `kiri serve` loads a packed onnxruntime-genai model, not a raw hf or gguf checkpoint, so the
    planner builds this only once the compression Job has published one (planning.cloud)."""
    cloud = spec.cloud
    source = model_source(spec.model.source.uri)
    labels = L.common_labels(owner.name, L.COMPONENT_CLOUD)
    selector = {L.MODEL_DEPLOYMENT: owner.name, L.COMPONENT: L.COMPONENT_CLOUD}
    if pack is None:
        model_uri, sha256 = source.uri, spec.model.source.sha256
        volumes, mounts = source_volumes(source)
        access = store_access(spec.model.source.credentials)
    else:
        # Fetched from the artifact store as the edges fetch their variants (same URI, volume, credentials).
        model_uri, volumes, mounts = edge_fetch(spec, owner, pack.uri)
        sha256 = pack.sha256
        access = store_access(spec.edge.artifacts.credentials)
    args = [
        "serve",
        "--model-uri",
        model_uri,
        "--name",
        spec.model.name,
        "--sha256",
        sha256,
        "--model-version",
        spec.model.version,
        "--variant",
        "full",
        "--host",
        "0.0.0.0",
        "--port",
        str(cloud.port),
        "--cache-dir",
        CACHE_MOUNT,
    ]
    if cloud.runtime.threads is not None:
        args += ["--threads", str(cloud.runtime.threads)]
    image = spec.runtime.image
    if pack is not None and pack.device == "cuda":
        args += ["--device", "cuda"]
        image = spec.runtime.cuda_image
    if cloud.runtime.batching.enabled:
        args += [
            "--batching",
            "--max-batch-size",
            str(cloud.runtime.batching.max_batch_size),
            "--max-wait-ms",
            str(cloud.runtime.batching.max_wait_ms),
        ]
    resources: dict[str, Any] = {"cpu": cloud.resources.cpu, "memory": cloud.resources.memory}
    if cloud.resources.gpu > 0:
        resources["nvidia.com/gpu"] = str(cloud.resources.gpu)
    volumes += [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    mounts += [{"name": "cache", "mountPath": CACHE_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes += access.volumes
    mounts += access.mounts
    container = {
        "name": "kiri-serve",
        "image": image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["kiri"],
        "args": args,
        "ports": [{"name": "http", "containerPort": cloud.port, "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": readiness_probe(cloud.port),
        "livenessProbe": _probe("/v2/health/live", cloud.port, 10, 6),
        "securityContext": container_security(),
        "env": [*copy.deepcopy(_SERVE_ENV), *access.env],
        "volumeMounts": mounts,
    }
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(L.cloud_name(owner.name), labels),
        "spec": {
            "replicas": cloud.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**pod_labels, **labels}},
                "spec": pod_identity(
                    spec,
                    cloud.service_account_name,
                    {
                        "automountServiceAccountToken": False,
                        "nodeSelector": dict(cloud.node_selector),
                        "tolerations": tolerations(cloud.tolerations),
                        "securityContext": pod_security(),
                        "containers": [container],
                        "volumes": volumes,
                    },
                ),
            },
        },
    }
    return finish(obj, owner)


def cloud_service(spec: ModelDeploymentSpec, owner: Owner) -> dict[str, Any]:
    labels = L.common_labels(owner.name, L.COMPONENT_CLOUD)
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(L.cloud_name(owner.name), labels),
        "spec": {
            "type": "ClusterIP",
            "selector": {L.MODEL_DEPLOYMENT: owner.name, L.COMPONENT: L.COMPONENT_CLOUD},
            "ports": [{"name": "http", "port": spec.cloud.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return finish(obj, owner)


@dataclass(frozen=True)
class ArtifactDir:
    """One compression's directory in the artifact store: where the Job writes, and the URI edges fetch."""

    volume: dict[str, Any]
    mount_path: str
    """Where the Job sees the store."""
    out_dir: str
    """The Job's output directory (under mount_path)."""
    fetch_base: str
    """URI of out_dir as edge nodes fetch it (ends with '/')."""
    upload_to: str | None = None
    """An http(s) store: the URL the Job's publish step PUTs out_dir's files to (out_dir is then local)."""


def artifact_dir(spec: ModelDeploymentSpec, owner: Owner, compression: str) -> ArtifactDir:
    store = spec.edge.artifacts
    uri = store_uri(spec)
    rel = f"{owner.namespace}/{owner.name}/{compression}"
    parsed = urlparse(uri)
    upload_to = None
    if parsed.scheme in ("http", "https"):
        # An HTTP store (the chart's `kiri store`): the Job writes to its own scratch volume, and its publish
        # step uploads there before it publishes the manifest ConfigMap.
        volume = {"name": "artifacts", "emptyDir": {}}
        out_dir = f"{ARTIFACTS_MOUNT}/{rel}"
        mount = ARTIFACTS_MOUNT
        upload_to = f"{uri.rstrip('/')}/{rel}/"
    elif parsed.scheme == "pvc":
        sub = parsed.path.strip("/")
        volume = {"name": "artifacts", "persistentVolumeClaim": {"claimName": parsed.netloc}}
        out_dir = "/".join(p for p in (ARTIFACTS_MOUNT, sub, rel) if p)
        mount = ARTIFACTS_MOUNT
    else:
        # file:// (and anything else the Job cannot write to directly) is a host path on the cloud node, one
        # the admin allowed (Settings.host_store_roots). Only this compression's own directory is mounted: the
        # compressor (which loads a tenant's model) never sees another namespace's or model's files.
        base = parsed.path.rstrip("/") or "/var/lib/kiri/artifacts"
        out_dir = f"{base}/{rel}"
        volume = {"name": "artifacts", "hostPath": {"path": out_dir, "type": "DirectoryOrCreate"}}
        mount = out_dir
    fetch = (store.fetch_uri or uri).rstrip("/")
    return ArtifactDir(
        volume=volume, mount_path=mount, out_dir=out_dir, fetch_base=f"{fetch}/{rel}/", upload_to=upload_to
    )


def store_uri(spec: ModelDeploymentSpec) -> str:
    """The store the Job writes to: the spec's, else the built-in host path (the planner fills an unset one
    with the operator's default store first: `with_default_store`)."""
    return spec.edge.artifacts.uri or DEFAULT_ARTIFACTS_URI


def with_default_store(spec: ModelDeploymentSpec, default_uri: str | None) -> ModelDeploymentSpec:
    """`spec` with `edge.artifacts.uri` filled in when unset: the operator's default store (the chart's
    in-cluster store), else the built-in host path."""
    if spec.edge.artifacts.uri:
        return spec
    artifacts = spec.edge.artifacts.model_copy(update={"uri": default_uri or DEFAULT_ARTIFACTS_URI})
    return spec.model_copy(update={"edge": spec.edge.model_copy(update={"artifacts": artifacts})})


def edge_fetch(
    spec: ModelDeploymentSpec, owner: Owner, uri: str
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The URI an edge runtime fetches `uri` by, and the read-only volume (with its mount) that takes.

    `pvc://claim/path` is no fetch scheme: the claim is mounted read-only and the runtime reads a file://
    path in it (the claim must allow ReadOnlyMany or ReadWriteMany to reach many nodes). A `file://` store is
    a directory on every edge node (e.g. an NFS mount the cluster admin provides): only this ModelDeployment's
    `<root>/<namespace>/<name>` of it is mounted, read-only, at its own path, as type Directory so a node
    without it says so in the pod's events instead of serving from an empty directory. It fails Pod Security
    "baseline" (a hostPath), so it is for namespaces the admin trusts. http(s):// and s3:// need no volume."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        volume = {
            "name": "artifacts",
            "persistentVolumeClaim": {"claimName": parsed.netloc, "readOnly": True},
        }
        mount = {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT, "readOnly": True}
        return f"file://{ARTIFACTS_MOUNT}/{parsed.path.lstrip('/')}", [volume], [mount]
    if parsed.scheme == "file":
        store = spec.edge.artifacts
        root = urlparse(store.fetch_uri or store_uri(spec)).path.rstrip("/")
        own = f"{root}/{owner.namespace}/{owner.name}"
        volume = {"name": "artifacts", "hostPath": {"path": own, "type": "Directory"}}
        return uri, [volume], [{"name": "artifacts", "mountPath": own, "readOnly": True}]
    return uri, [], []


def resolve_uri(base: str, uri: str) -> str:
    """Manifest URIs may be relative to the manifest's directory; edges need absolute ones."""
    if "://" in uri:
        return uri
    return base + uri.lstrip("./")


def compression_variants_json(variants: Sequence[Variant], *, language_model: bool = False) -> str:
    """The Job's `--variants-json`. For a language model the API's default gate (cosine) is left out, so the
    compressor applies the method's language-model default (kl and top1-agreement)."""
    payload = []
    for v in variants:
        item = v.model_dump(
            mode="json", by_alias=True, exclude_none=True, include={"name", "method", "options", "gate"}
        )
        if language_model and is_default_gate(v.gate):
            del item["gate"]
        payload.append(item)
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def compression_job(
    spec: ModelDeploymentSpec,
    owner: Owner,
    compression: str,
    pod_labels: Mapping[str, str],
    deadline_seconds: int,
    service_account: str,
) -> dict[str, Any]:
    source = model_source(spec.model.source.uri)
    store = artifact_dir(spec, owner, compression)
    labels = {**L.common_labels(owner.name, L.COMPONENT_COMPRESS), L.COMPRESSION: compression}
    manifest_path = f"{store.out_dir}/{L.MANIFEST_KEY}"
    source_args = ["--source", source.uri, "--format", spec.model.source.format]
    fmt: str = spec.model.source.format  # "factory" only in learning.effective_spec's copy
    if fmt == "factory" and spec.learning is not None and spec.learning.trainable is not None:
        # A learned revision (planning/learning.py): the trainable factory with the adopted round's weights.
        source_args = [
            "--source",
            spec.learning.trainable.factory,
            "--format",
            "factory",
            "--state-dict",
            source.uri,
        ]
    compress_args = [
        "compress",
        *source_args,
        "--sha256",
        spec.model.source.sha256,
        "--out",
        store.out_dir,
        "--variants-json",
        compression_variants_json(spec.edge.variants, language_model=fmt in LM_FORMATS),
        "--model-name",
        spec.model.name,
        "--model-version",
        spec.model.version,
    ]
    if spec.model.eval_data_uri:
        compress_args += ["--eval-data", spec.model.eval_data_uri]
    if serves_gpu_pack(spec):
        compress_args += ["--gpu-pack", "fp16"]
    publish_args = [
        "publish-manifest",
        "--namespace",
        owner.namespace,
        "--name",
        L.manifest_name(owner.name, compression),
        "--manifest",
        manifest_path,
        "--owner-name",
        owner.name,
        "--owner-uid",
        owner.uid,
        "--compression",
        compression,
    ]
    if store.upload_to:
        publish_args += ["--upload-to", store.upload_to]
    volumes, mounts = source_volumes(source)
    volumes += [store.volume, {"name": "tmp", "emptyDir": {}}]
    mounts += [{"name": "artifacts", "mountPath": store.mount_path}, {"name": "tmp", "mountPath": "/tmp"}]
    # Compressing holds the full model in memory, like serving it; GPUs are not needed.
    resources = {"cpu": spec.cloud.resources.cpu, "memory": spec.cloud.resources.memory}
    # Only the compress step fetches (the model, the eval data): the store's credentials go there alone.
    access = store_access(spec.model.source.credentials)
    volumes += access.volumes

    def container(name: str, args: list[str], fetches: bool = False, api: bool = False) -> dict[str, Any]:
        return {
            "name": name,
            "image": spec.runtime.compressor_image,
            "imagePullPolicy": spec.runtime.image_pull_policy,
            "command": ["kiri"],
            "args": args,
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "securityContext": container_security(),
            "env": [*(dict(e) for e in RUNTIME_ENV), *(copy.deepcopy(access.env) if fetches else [])],
            "volumeMounts": [
                *copy.deepcopy(mounts),
                *(copy.deepcopy(access.mounts) if fetches else []),
                *([api_token_mount()] if api else []),
            ],
        }

    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(L.compress_name(owner.name, compression), labels),
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": deadline_seconds,
            "template": {
                "metadata": {"labels": {**pod_labels, **labels}},
                "spec": pod_identity(
                    spec,
                    spec.runtime.compressor_service_account_name or service_account,
                    {
                        "restartPolicy": "Never",
                        # The compressor runs the user's model (a factory is their code): only the publishing
                        # container gets the token, projected, short-lived.
                        "automountServiceAccountToken": False,
                        "nodeSelector": dict(spec.cloud.node_selector),
                        "tolerations": tolerations(spec.cloud.tolerations),
                        "securityContext": pod_security(),
                        # Compress first, then publish: the manifest only appears once every variant is
                        # measured.
                        "initContainers": [container("compress", compress_args, fetches=True)],
                        "containers": [container("publish", publish_args, api=True)],
                        "volumes": [*volumes, api_token_volume()],
                    },
                ),
            },
        },
    }
    return finish(obj, owner)


API_TOKEN_VOLUME = "kube-api-access"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_SECONDS = 600
"""The shortest expiry the API server allows; the kubelet renews the token in the file before it ends."""


def api_token_volume() -> dict[str, Any]:
    """The pod's ServiceAccount token, CA and namespace as a projected volume, for the containers that
    publish through the API alone. Pods set automountServiceAccountToken false, so the container that runs
    untrusted input (the compressor on a user's model, a trainer) never holds the token."""
    return {
        "name": API_TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": API_TOKEN_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ],
        },
    }


def api_token_mount() -> dict[str, Any]:
    return {"name": API_TOKEN_VOLUME, "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}


def job_service_account(owner: Owner, settings_account: str, per_md: bool) -> str:
    """The Jobs' ServiceAccount: the operator's per-ModelDeployment one, or the namespace's from the chart."""
    return L.compressor_account_name(owner.name) if per_md else settings_account


def compressor_account(owner: Owner, config_maps: Sequence[str]) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding letting the Jobs publish their ConfigMaps, and nothing else.

    `create` cannot be limited to names in Kubernetes RBAC (the name is not known to the authorizer before
    the object exists), so it is granted alone: a create never changes an existing ConfigMap, and what the
    Jobs create is trusted only when owned by the ModelDeployment (`labels.owned_by`). Reading and patching
    are limited to `config_maps`, the names the Jobs write (manifest, round record, privacy ledger)."""
    name = L.compressor_account_name(owner.name)
    labels = L.common_labels(owner.name, L.COMPONENT_COMPRESS)
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(name, labels),
        # The Jobs mount a projected token in their publishing container alone.
        "automountServiceAccountToken": False,
    }
    rules: list[dict[str, Any]] = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]
    if config_maps:
        rules.append(
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["get", "patch"],
                "resourceNames": sorted(set(config_maps)),
            }
        )
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(name, labels),
        "rules": rules,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(name, labels),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }
    return [finish(account, owner), finish(role, owner), finish(binding, owner)]


@dataclass(frozen=True)
class EdgeArtifact:
    uri: str
    sha256: str


def node_affinity(nodes: Sequence[str]) -> dict[str, Any]:
    # The API server allows one value per metadata.name field selector, so one term (ORed) per node,
    # as the DaemonSet controller itself does when it pins a pod.
    values = sorted(set(nodes)) or [NO_NODE]
    terms = [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [v]}]} for v in values]
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}


def affinity_nodes(ds: Mapping[str, Any]) -> list[str]:
    """The node names a DaemonSet built by `edge_daemonset` is pinned to."""
    node: Any = ds
    for key in NODE_AFFINITY_PATH:
        node = node.get(key) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        return []
    terms = (node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    names: list[str] = []
    for term in terms:
        for field in term.get("matchFields") or []:
            if field.get("key") == "metadata.name" and field.get("operator") == "In":
                names.extend(v for v in field.get("values") or [] if v != NO_NODE)
    return sorted(set(names))


def edge_template_hash(ds: Mapping[str, Any]) -> str:
    """The spec hash of a DaemonSet, blind to its node list (nodes move between revisions without rebuilds)."""
    blank = copy.deepcopy(dict(ds))
    meta = blank.get("metadata", {})
    meta.get("annotations", {}).pop(L.SPEC_HASH, None)
    spec = blank["spec"]["template"]["spec"]
    spec["affinity"] = {"nodeAffinity": node_affinity([])}
    return canonical_hash(blank)


def collaboration_args(spec: ModelDeploymentSpec) -> list[str]:
    """`kiri serve` flags of the edge's collaboration with the cloud tier; none when the spec sets none (the
    runtime's default, edge-only, and the DaemonSets of specs without the field stay as they were). The
    cloud tier is the `--fallback-url` above (the cloud Service); the admission rules make sure it is there."""
    collaboration = spec.edge.collaboration
    if collaboration is None:
        return []
    args = ["--collaboration", collaboration.mode, "--cloud-model", spec.model.name]
    if collaboration.mode == "cascade":
        cascade = collaboration.cascade or CascadeSpec()
        args += [
            "--cascade-metric",
            cascade.metric,
            "--cascade-threshold",
            str(cascade.threshold),
            "--cascade-window",
            str(cascade.window),
            "--cascade-cloud-tokens",
            str(cascade.cloud_tokens),
            "--cascade-check",
            cascade.check,
        ]
    elif collaboration.mode == "speculative":
        speculative = collaboration.speculative or SpeculativeSpec()
        args += ["--speculative-k", str(speculative.k), "--speculative-max-k", str(speculative.max_k)]
    return args


def edge_daemonset(
    spec: ModelDeploymentSpec,
    owner: Owner,
    revision: str,
    compression: str,
    variant: str,
    artifact: EdgeArtifact,
    nodes: Sequence[str],
    pod_labels: Mapping[str, str],
    adapters: AdapterSet | None = None,
) -> dict[str, Any]:
    """One (revision, variant) DaemonSet; with `adapters`, the one of a site's adapter revision too (its
    name, labels and selector carry the adapter revision, its pods load the adapters)."""
    edge = spec.edge
    port = spec.cloud.port
    adapter_revision = adapters.revision if adapters is not None and adapters.adapters else ""
    labels = {
        **L.common_labels(owner.name, L.COMPONENT_EDGE),
        L.REVISION: revision,
        L.COMPRESSION: compression,
        L.VARIANT: variant,
    }
    selector = {
        L.MODEL_DEPLOYMENT: owner.name,
        L.COMPONENT: L.COMPONENT_EDGE,
        L.REVISION: revision,
        L.VARIANT: variant,
    }
    if adapter_revision:
        labels[L.ADAPTERS] = adapter_revision
        selector[L.ADAPTERS] = adapter_revision
    fetch_uri, store_volumes, store_mounts = edge_fetch(spec, owner, artifact.uri)
    access = store_access(edge.artifacts.credentials)
    store_volumes += access.volumes
    store_mounts += access.mounts
    args = [
        "serve",
        "--model-uri",
        fetch_uri,
        "--name",
        spec.model.name,
        "--sha256",
        artifact.sha256,
        "--model-version",
        spec.model.version,
        "--variant",
        variant,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--cache-dir",
        CACHE_MOUNT,
        "--revisions-kept",
        str(edge.cache.revisions_kept),
    ]
    if edge.fallback.enabled and spec.cloud.replicas > 0:
        args += [
            "--fallback-url",
            cloud_service_url(owner, port),
            "--queue-limit",
            str(edge.fallback.queue_limit),
        ]
        if edge.fallback.confidence_threshold is not None:
            args += ["--confidence-threshold", str(edge.fallback.confidence_threshold)]
    args += collaboration_args(spec)
    if adapter_revision and adapters is not None:
        args += adapter_args(adapters)
    container = {
        "name": "kiri-serve",
        "image": spec.runtime.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": ["kiri"],
        "args": args,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        "readinessProbe": readiness_probe(port),
        "livenessProbe": _probe("/v2/health/live", port, 10, 6),
        "securityContext": container_security(),
        "env": [*copy.deepcopy(_SERVE_ENV), *access.env],
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            *store_mounts,
        ],
    }
    obj: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(L.edge_name(owner.name, revision, variant, adapter_revision), labels),
        "spec": {
            "selector": {"matchLabels": selector},
            # OnDelete: the template of one revision changes only by its node list, and that must not
            # restart the pods of nodes already on it (RollingUpdate did, one by one, at every wave). Pods
            # still come and go with the node list: the controller removes a daemon pod from a node the
            # affinity no longer allows, whatever the strategy.
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": {**pod_labels, **labels}},
                "spec": pod_identity(
                    spec,
                    edge.service_account_name,
                    {
                        "automountServiceAccountToken": False,
                        "affinity": {"nodeAffinity": node_affinity([])},
                        "tolerations": tolerations(edge.tolerations),
                        "securityContext": pod_security(),
                        "containers": [container],
                        "volumes": [
                            node_cache_volume(owner),
                            {"name": "tmp", "emptyDir": {}},
                            *store_volumes,
                        ],
                    },
                ),
            },
        },
    }
    obj["metadata"]["namespace"] = owner.namespace
    obj["metadata"]["ownerReferences"] = [L.owner_reference(owner.name, owner.uid)]
    # Hash with the empty node list first (no copy of a thousand-term affinity), then pin the nodes.
    obj["metadata"]["annotations"][L.SPEC_HASH] = canonical_hash(obj)
    obj["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": node_affinity(nodes)}
    return obj


def adapter_args(adapters: AdapterSet) -> list[str]:
    """`kiri serve`'s `--adapter` (the JSON form, so the runtime verifies each digest) and
    `--default-adapter`."""
    args: list[str] = []
    for a in adapters.adapters:
        body = {"name": a.name, "uri": a.uri, "sha256": a.sha256.lower()}
        args += ["--adapter", json.dumps(body, separators=(",", ":"))]
    if adapters.default is not None:
        args += ["--default-adapter", adapters.default]
    return args


def recorded_adapters(body: Mapping[str, Any]) -> AdapterSet | None:
    """The adapter set an edge DaemonSet's pods load, read back from its `kiri serve` args (the inverse of
    `adapter_args`); None when they do not parse (not a body Kiri built)."""
    try:
        args = list(body["spec"]["template"]["spec"]["containers"][0]["args"])
    except (KeyError, IndexError, TypeError):
        return None
    adapters: list[Adapter] = []
    default: str | None = None
    for flag, value in itertools.pairwise(args):
        if flag == "--default-adapter" and isinstance(value, str):
            default = value
        elif flag == "--adapter":
            try:
                item = json.loads(value)
                adapters.append(Adapter(str(item["name"]), str(item["uri"]), str(item["sha256"])))
            except (TypeError, ValueError, KeyError):
                return None
    return AdapterSet(tuple(adapters), default) if adapters else None


def repin_daemonset(observed: Mapping[str, Any], nodes: Sequence[str]) -> dict[str, Any]:
    """An existing DaemonSet of another revision, moved to `nodes`: rebuilt from what Kiri applied to it.

    The spec of an older revision is gone, so its DaemonSet is the record of it. Only the fields Kiri sets
    are carried over (server defaults stay the server's), and the node list is replaced.
    """
    meta = observed.get("metadata", {})
    spec = observed.get("spec", {})
    template = copy.deepcopy(spec.get("template", {}))
    template.get("metadata", {}).pop("creationTimestamp", None)
    template.setdefault("spec", {}).setdefault("affinity", {})["nodeAffinity"] = node_affinity(nodes)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {L.SPEC_HASH: (meta.get("annotations") or {}).get(L.SPEC_HASH, "")},
            "ownerReferences": copy.deepcopy(meta.get("ownerReferences") or []),
        },
        "spec": {
            "selector": copy.deepcopy(spec.get("selector", {})),
            "updateStrategy": copy.deepcopy(spec.get("updateStrategy", {})),
            "template": template,
        },
    }
