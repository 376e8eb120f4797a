"""Label and annotation keys Kiri puts on (or reads from) objects, the names it gives its children, and the
owner reference that ties them to their ModelDeployment.

Children carry the recommended `app.kubernetes.io/` name, component, part-of and managed-by labels but
never `app.kubernetes.io/instance`: that is Argo CD's default tracking label, and an Application named like
the ModelDeployment would take Kiri's children for its own and prune them. Kiri finds its children by
`kiri.dev/modeldeployment` alone. An operator older than this applied the instance label; the new labels
change every child's spec hash, so the next reconcile re-applies each child, and server-side apply drops
the field Kiri's field manager owned and no longer sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

from kiri_operator.api.names import API_VERSION, KIND

MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "kiri"
NAME: Final = "app.kubernetes.io/name"
COMPONENT: Final = "app.kubernetes.io/component"
PART_OF: Final = "app.kubernetes.io/part-of"
PART_OF_VALUE: Final = "kiri"
MODEL_DEPLOYMENT: Final = "kiri.dev/modeldeployment"
REVISION: Final = "kiri.dev/revision"
COMPRESSION: Final = "kiri.dev/compression"
VARIANT: Final = "kiri.dev/variant"
# The adapter revision (a hash of a site's LoRA adapter set) an edge DaemonSet and its pods run; absent: none.
ADAPTERS: Final = "kiri.dev/adapters"
TIER: Final = "kiri.dev/tier"
# A node's memory in MiB, for nodes that do not report allocatable memory.
MEMORY_MB: Final = "kiri.dev/memory-mb"
# Federated learning: the round a Job or record belongs to, the Job's role, the (hashed) site it trains on.
LEARNING_ROUND: Final = "kiri.dev/learning-round"
LEARNING_ROLE: Final = "kiri.dev/learning-role"
SITE_NAME: Final = "kiri.dev/site-name"

# The hash of the desired object as Kiri last applied it: the cheap, normalization-proof way to know
# whether a child needs a write (the API server rewrites quantities and adds defaults, so comparing
# bodies would see differences that are not there).
SPEC_HASH: Final = "kiri.dev/spec-hash"
# Promote and abort (progressive delivery) come in as annotations so GitOps keeps owning the spec.
PROMOTE: Final = "kiri.dev/promote"
ABORT: Final = "kiri.dev/abort"
ROLLBACK: Final = "kiri.dev/rollback"
# The same commands for one site's adapter wave: `<verb>.adapters.kiri.dev/<site>` (a site label's value is a
# valid annotation name), one key per site so commands to two sites never overwrite each other.
SITE_COMMANDS: Final = {
    "promote": "promote.adapters.kiri.dev/",
    "abort": "abort.adapters.kiri.dev/",
    "rollback": "rollback.adapters.kiri.dev/",
}

MANIFEST_KEY: Final = "manifest.json"

COMPONENT_CLOUD: Final = "cloud"
COMPONENT_EDGE: Final = "edge"
COMPONENT_COMPRESS: Final = "compress"
COMPONENT_MANIFEST: Final = "manifest"
COMPONENT_LEARNING: Final = "learning"
COMPONENT_ROUND: Final = "learning-round"
COMPONENT_LEDGER: Final = "learning-ledger"

# Who records Kiri's Events (`source.component` and `reportingComponent`).
EVENT_SOURCE: Final = "kiri-operator"
REPORTING_COMPONENT: Final = "kiri.dev/operator"

FIELD_MANAGER: Final = "kiri"
MAX_NAME: Final = 63


def short_hash(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def child_name(*parts: str) -> str:
    """A DNS-1123 label made of parts; too-long names keep a readable prefix and a hash of the whole."""
    name = "-".join(p for p in parts if p)
    if len(name) <= MAX_NAME:
        return name
    digest = short_hash(name, length=8)
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def cloud_name(md: str) -> str:
    return child_name(md, "cloud")


def compress_name(md: str, compression: str) -> str:
    return child_name(md, "compress", compression)


def compressor_account_name(md: str) -> str:
    return child_name(md, "compressor")


def manifest_name(md: str, compression: str) -> str:
    return child_name(md, "manifest", compression)


def edge_name(md: str, revision: str, variant: str, adapters: str = "") -> str:
    return child_name(md, revision, variant, adapters)


def selector_labels(md: str) -> dict[str, str]:
    return {MODEL_DEPLOYMENT: md}


def common_labels(md: str, component: str) -> dict[str, str]:
    return {
        NAME: "kiri",
        PART_OF: PART_OF_VALUE,
        MANAGED_BY: MANAGED_BY_VALUE,
        COMPONENT: component,
        MODEL_DEPLOYMENT: md,
    }


def managed_selector() -> str:
    """The label selector of everything Kiri manages (its children; their pods carry MODEL_DEPLOYMENT)."""
    return f"{MANAGED_BY}={MANAGED_BY_VALUE}"


def md_selector(md: str) -> str:
    """The label selector of a ModelDeployment's children and their pods."""
    return f"{MODEL_DEPLOYMENT}={md}"


def owned_by(body: Mapping[str, Any], uid: str) -> bool:
    """Whether `body` has an ownerReference to the object whose uid is `uid`.

    Labels say which ModelDeployment an object is *for*, and anyone who may create a ConfigMap in the
    namespace can set them; the ownerReference's uid is what the API server's garbage collector acts on,
    and it names one object's life (a ModelDeployment deleted and created again has a new uid)."""
    if not uid:
        return False
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, Mapping) and r.get("uid") == uid for r in refs)


def owner_reference(
    name: str, uid: str, *, controller: bool | None = True, block_owner_deletion: bool | None = True
) -> dict[str, Any]:
    """The ownerReference to the ModelDeployment `name` (`uid`): its garbage collection takes the object
    with it. `controller` or `block_owner_deletion` None leaves that field out."""
    reference: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid}
    if controller is not None:
        reference["controller"] = controller
    if block_owner_deletion is not None:
        reference["blockOwnerDeletion"] = block_owner_deletion
    return reference
