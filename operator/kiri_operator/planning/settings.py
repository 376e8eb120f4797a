"""The operator's own settings that shape a plan (flags and chart values, not the ModelDeployment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    compression_deadline_seconds: int = 3600
    """activeDeadlineSeconds of compression Jobs."""
    manifest_grace_seconds: float = 120.0
    """How long a completed Job may take to have its manifest show up before it counts as failed."""
    default_artifacts_uri: str | None = None
    """The store of ModelDeployments that name none (`edge.artifacts.uri` unset): the chart's in-cluster
    store; None: the built-in host path `file:///var/lib/kiri/artifacts`."""
    pod_labels: Mapping[str, str] = field(default_factory=dict)
