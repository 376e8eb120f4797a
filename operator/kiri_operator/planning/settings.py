"""The operator's own settings that shape a plan (flags and chart values, not the ModelDeployment)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

DEFAULT_HOST_STORE_ROOTS = ("/var/lib/kiri/artifacts", "/var/lib/kiri/site-data")
"""The chart's default allow-list: the default artifact store and learning site data of the API's defaults."""

DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
"""The Service the Prometheus Operator (kube-prometheus-stack) puts in front of a Prometheus in `monitoring`."""


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
    host_store_roots: tuple[str, ...] = DEFAULT_HOST_STORE_ROOTS
    """Host directories a ModelDeployment may name (`file://` artifact stores, learning site data): the
    cluster admin's allow-list (chart value `hostStores.roots`). Empty: no host path at all."""

    def host_path_refusal(self, field_name: str, path: str) -> str | None:
        """Why `path` (from `field_name`) may not be used, or None when it is under an allowed root."""
        clean = posixpath.normpath(path)
        for root in self.host_store_roots:
            root = posixpath.normpath(root)
            if clean == root or clean.startswith(root.rstrip("/") + "/"):
                return None
        allowed = ", ".join(self.host_store_roots) or "none"
        return (
            f"{field_name} {path!r} is a host path outside the cluster admin's allowed host stores"
            f" (operator flag --host-store-root, chart value hostStores.roots: {allowed}); use pvc:// or an"
            " http(s)/s3 store"
        )

    def file_uri_refusal(self, fields: Iterable[tuple[str, str | None]]) -> str | None:
        """The first refusal among `(field, uri)` pairs whose scheme is file://."""
        for name, uri in fields:
            if uri and urlparse(uri).scheme == "file":
                refusal = self.host_path_refusal(name, urlparse(uri).path or "/")
                if refusal is not None:
                    return refusal
        return None

    allowed_prometheus: tuple[str, ...] = (DEFAULT_PROMETHEUS,)
    """The only Prometheus base URLs an analysis may name (`--allowed-prometheus`); others are refused."""
    compressor_service_account: str = "kiri-compressor"
    """The ServiceAccount compression and learning Jobs run as, when the operator makes none: the chart (or
    the cluster admin) makes it, with its Role, in each namespace that may hold ModelDeployments."""
    create_compressor_rbac: bool = False
    """The operator makes a ServiceAccount, Role and RoleBinding per ModelDeployment (`<md>-compressor`),
    the Role naming the ConfigMaps it may read and patch. Off unless the chart says so: it needs the
    operator to hold create on roles, rolebindings and serviceaccounts."""
