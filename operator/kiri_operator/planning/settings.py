"""The operator's own settings that shape a plan (flags and chart values, not the ModelDeployment)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
"""The Service the Prometheus Operator (kube-prometheus-stack) puts in front of a Prometheus in `monitoring`."""


@dataclass(frozen=True)
class Settings:
    compression_deadline_seconds: int = 3600
    """activeDeadlineSeconds of compression Jobs."""
    manifest_grace_seconds: float = 120.0
    """How long a completed Job may take to have its manifest show up before it counts as failed."""
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    allowed_prometheus: tuple[str, ...] = (DEFAULT_PROMETHEUS,)
    """The only Prometheus base URLs an analysis may name (`--allowed-prometheus`); others are refused."""
    compressor_service_account: str = "kiri-compressor"
    """The ServiceAccount compression and learning Jobs run as, when the operator makes none: the chart (or
    the cluster admin) makes it, with its Role, in each namespace that may hold ModelDeployments."""
    create_compressor_rbac: bool = False
    """The operator makes a ServiceAccount, Role and RoleBinding per ModelDeployment (`<md>-compressor`),
    the Role naming the ConfigMaps it may read and patch. Off unless the chart says so: it needs the
    operator to hold create on roles, rolebindings and serviceaccounts."""
