"""What the operator's own policy refuses in a spec the API server accepted. Pure.

The API server knows the schema; it cannot know the operator's settings. A spec that asks for something the
cluster administrator did not allow is refused whole, with `Ready=False` and the reason, and nothing of it is
applied (as for an invalid spec): for now, an analysis Prometheus outside the allow-list
(`Settings.allowed_prometheus`), which would have the operator send requests wherever a tenant points it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.conditions import Reason
from kiri_operator.planning.settings import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_address(address: str) -> str | None:
    """`scheme://host:port/path` of a Prometheus base URL, host lower-case, port explicit, no trailing
    slash; None when it is no plain http(s) URL (userinfo, a query or a fragment make it none)."""
    try:
        parts = urlsplit(address.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return None
    port = port if port is not None else _DEFAULT_PORTS[parts.scheme]
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def prometheus_allowed(address: str, allowed: Iterable[str]) -> bool:
    """Whether `address` is one of `allowed` (compared normalized: `http://p:80/` equals `http://p`)."""
    mine = normalize_address(address)
    return mine is not None and mine in {normalize_address(a) for a in allowed}


def refusal(spec: ModelDeploymentSpec, settings: Settings) -> tuple[str, str] | None:
    """(reason, message) when the operator refuses `spec`, else None. The message never repeats what a
    refused address carries beyond its scheme, host, port and path (it may hold credentials)."""
    analysis = spec.rollout.analysis
    if analysis is not None and not prometheus_allowed(
        analysis.prometheus.address, settings.allowed_prometheus
    ):
        shown = normalize_address(analysis.prometheus.address) or "an address that is no plain http(s) URL"
        allowed = ", ".join(settings.allowed_prometheus) or "none"
        return (
            Reason.PROMETHEUS_NOT_ALLOWED,
            f"spec.rollout.analysis.prometheus.address: {shown} is not a Prometheus this operator may query "
            f"(allowed: {allowed}); the cluster administrator sets the list (chart value "
            "analysis.allowedPrometheus)",
        )
    return None
