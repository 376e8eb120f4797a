"""The one registry of the kinds Kiri reads and writes: group, version, plural, scope, and, for its children,
the order they are applied in.

The client (`kube`) builds its paths and metric labels from it, the handlers watch the children and the
warm-up lists them from it, the reconciler applies in its order and the check step asks it which kinds
the API server will not change in place.

Why here and not in `kube/`: it is plain data with no I/O, and the pure planning reads it; a module of
the `kube` package would import the package first, and with it httpx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from kiri_operator.api.names import GROUP as MD_GROUP
from kiri_operator.api.names import KIND as MD_KIND
from kiri_operator.api.names import PLURAL as MD_PLURAL
from kiri_operator.api.names import VERSION as MD_VERSION

LAST: Final = 99
"""The apply rank of a kind with none (applied after every child kind)."""


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    """"" for the core group."""
    version: str
    plural: str
    namespaced: bool = True
    child: bool = False
    """Kiri creates it, labels it managed-by Kiri, owns it through the ModelDeployment, and watches it."""
    apply_order: int = LAST
    """Children are applied in this order, dependencies first."""
    immutable: bool = False
    """The API server refuses to change its spec: a difference waits for a new name instead."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        parts = [self.prefix]
        if self.namespaced and namespace:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)


def _child(kind: str, group: str, plural: str, apply_order: int, immutable: bool = False) -> Kind:
    return Kind(kind, group, "v1", plural, child=True, apply_order=apply_order, immutable=immutable)


# Children in the order the warm-up lists them; `apply_order` puts dependencies first: the Job's account
# before the Job, the Service before the pods that fall back to it, the learning pods' NetworkPolicies before
# the pods they guard.
CHILDREN: Final = (
    _child("Deployment", "apps", "deployments", 4),
    _child("Service", "", "services", 3),
    _child("Job", "batch", "jobs", 5, immutable=True),
    _child("DaemonSet", "apps", "daemonsets", 6),
    _child("ConfigMap", "", "configmaps", 7),
    _child("ServiceAccount", "", "serviceaccounts", 0),
    _child("Role", "rbac.authorization.k8s.io", "roles", 1),
    _child("RoleBinding", "rbac.authorization.k8s.io", "rolebindings", 2),
    _child("NetworkPolicy", "networking.k8s.io", "networkpolicies", 3),
)
MODEL_DEPLOYMENT: Final = Kind(MD_KIND, MD_GROUP, MD_VERSION, MD_PLURAL)
POD: Final = Kind("Pod", "", "v1", "pods")
NODE: Final = Kind("Node", "", "v1", "nodes", namespaced=False)
EVENT: Final = Kind("Event", "", "v1", "events")
PVC: Final = Kind("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims")
LEASE: Final = Kind("Lease", "coordination.k8s.io", "v1", "leases")
"""The leader-election Lease of replicated operators (`kube.leasing`); never a child."""

SECRET: Final = Kind("Secret", "", "v1", "secrets")
"""Only ever created (the learning rounds' TLS Secret): never watched, listed or read, so no key reaches the
operator's memory after the create."""
KINDS: Final[dict[str, Kind]] = {
    k.kind: k for k in (*CHILDREN, POD, PVC, EVENT, NODE, MODEL_DEPLOYMENT, LEASE, SECRET)
}
CHILD_KINDS: Final = tuple(k.kind for k in CHILDREN)
ACCOUNT_KINDS: Final = frozenset({"ServiceAccount", "Role", "RoleBinding"})
"""The Jobs' per-ModelDeployment account: made, watched and listed only when the operator makes it
(`Settings.create_compressor_rbac`); otherwise the operator needs no access to these kinds at all."""


def children(accounts: bool) -> tuple[Kind, ...]:
    """The child kinds an operator watches and lists: all of them, or all but the account kinds."""
    return tuple(k for k in CHILDREN if accounts or k.kind not in ACCOUNT_KINDS)


def apply_rank(kind: str) -> int:
    found = KINDS.get(kind)
    return found.apply_order if found is not None else LAST


def immutable(kind: str) -> bool:
    found = KINDS.get(kind)
    return found is not None and found.immutable
