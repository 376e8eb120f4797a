"""Revisions: content hashes of what runs.

Two keys, so that a change pays only for what it changes:
- the *compression key* covers what the compression Job's output depends on (the model, the variants and
  their gates, the compressor image, where artifacts go). A new key means a new Job and a new manifest.
- the *revision* covers the compression key plus everything else an edge pod runs with (runtime image,
  fallback, collaboration, cache, the cloud endpoint it falls back to). A new revision means new edge DaemonSets; a
  runtime-only change reuses the verified variants without compressing again.
Variant placement (`requires`) and rollout settings are in neither: they decide where, not what.
"""

from __future__ import annotations

import json
from typing import Any

from kiri_operator.api.specs import DEFAULT_CACHE_PATH, CascadeSpec, ModelDeploymentSpec, SpeculativeSpec
from kiri_operator.labels import short_hash
from kiri_operator.planning.building import serves_gpu_pack


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def compression_inputs(spec: ModelDeploymentSpec, artifacts_uri: str) -> dict[str, Any]:
    variants = [
        v.model_dump(
            mode="json", by_alias=True, exclude_none=True, include={"name", "method", "options", "gate"}
        )
        for v in spec.edge.variants
    ]
    inputs: dict[str, Any] = {
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "variants": variants,
        "compressorImage": spec.runtime.compressor_image,
        "artifacts": artifacts_uri,
    }
    # A Job's template cannot change, and a Job that failed for want of credentials is not retried under its
    # key: who the Job runs as is part of the key (only when set, so existing keys keep their hashes).
    inputs.update(_identity(spec.runtime.compressor_service_account_name, spec))
    if serves_gpu_pack(spec):  # only when asked, so existing keys keep their hashes
        inputs["gpuPack"] = "fp16"
    return inputs


def _identity(service_account: str | None, spec: ModelDeploymentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if service_account is not None:
        out["serviceAccountName"] = service_account
    if spec.runtime.image_pull_secrets:
        out["imagePullSecrets"] = [s.name for s in spec.runtime.image_pull_secrets]
    return out


def _collaboration(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The collaboration as the edge pods run it: an unset mode section and one spelled out with its
    defaults are the same revision (the same flags)."""
    collaboration = spec.edge.collaboration
    assert collaboration is not None
    out: dict[str, Any] = {"mode": collaboration.mode}
    if collaboration.mode == "cascade":
        out["cascade"] = (collaboration.cascade or CascadeSpec()).model_dump(mode="json", by_alias=True)
    elif collaboration.mode == "speculative":
        out["speculative"] = (collaboration.speculative or SpeculativeSpec()).model_dump(
            mode="json", by_alias=True
        )
    return out


def compression_key(spec: ModelDeploymentSpec, artifacts_uri: str) -> str:
    return short_hash(_canonical(compression_inputs(spec, artifacts_uri)))


def revision_key(spec: ModelDeploymentSpec, artifacts_uri: str, extra: Any = None) -> str:
    """`extra` carries anything else baked into edge pods (e.g. pod labels), so it changes the revision."""
    inputs = {
        "compression": compression_key(spec, artifacts_uri),
        "image": spec.runtime.image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "fallback": spec.edge.fallback.model_dump(mode="json", by_alias=True, exclude_none=True),
        # The path the spec once carried stays in the hash, so no existing revision changes its name.
        "cache": {"path": DEFAULT_CACHE_PATH, "revisionsKept": spec.edge.cache.revisions_kept},
        "tolerations": [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in spec.edge.tolerations
        ],
        "cloudPort": spec.cloud.port,
        "cloudEnabled": spec.cloud.replicas > 0,
        "extra": extra,
    }
    if spec.edge.collaboration is not None:  # only when set, so existing revisions keep their hashes
        inputs["collaboration"] = _collaboration(spec)
    if spec.edge.pod_labels:  # only when set, so existing revisions keep their hashes
        inputs["podLabels"] = dict(spec.edge.pod_labels)
    # Who edge pods run as and how they reach the store: a DaemonSet's template is fixed per revision.
    inputs.update(_identity(spec.edge.service_account_name, spec))
    if spec.edge.artifacts.credentials is not None:
        inputs["credentials"] = spec.edge.artifacts.credentials.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    return short_hash(_canonical(inputs))
