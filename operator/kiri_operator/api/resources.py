"""The whole ModelDeployment object, for reading manifests and API responses in one call."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kiri_operator.api.bases import ApiModel
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.api.statuses import ModelDeploymentStatus


class ModelDeployment(ApiModel):
    """apiVersion, kind, metadata, spec and status. `metadata` stays a plain dict (the API server owns it)."""

    api_version: Literal["kiri.dev/v1alpha1"] = "kiri.dev/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None
