"""The observed world for one reconcile: what the planner may look at, read once, then frozen.

Everything here is plain data built by `kube` (the only module that talks to the API). The planner
never reaches past it, which is what lets the planning tests run without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kiri_operator import labels as L
from kiri_runtime.manifests import Manifest

Outcome = Literal["Successful", "Failed", "Inconclusive", "Error"]
"""What analysis found: of one query (`planning.verdicts.judge_query`) or of a whole measurement."""


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = ""


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    unschedulable: bool = False
    allocatable: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True)
class ObjectView:
    """A child object as the API server returned it (a JSON dict), with shortcuts to what we compare."""

    kind: str
    name: str
    body: Mapping[str, Any]

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.body.get("metadata") or {}
        return meta if isinstance(meta, Mapping) else {}

    @property
    def labels(self) -> Mapping[str, str]:
        return self.metadata.get("labels") or {}

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.metadata.get("annotations") or {}

    @property
    def spec_hash(self) -> str | None:
        return self.annotations.get(L.SPEC_HASH)

    @property
    def status(self) -> Mapping[str, Any]:
        status = self.body.get("status") or {}
        return status if isinstance(status, Mapping) else {}

    @property
    def created(self) -> str:
        return str(self.metadata.get("creationTimestamp") or "")

    @property
    def deleting(self) -> bool:
        return bool(self.metadata.get("deletionTimestamp"))


@dataclass(frozen=True)
class PodView:
    name: str
    node: str | None
    ready: bool
    phase: str
    labels: Mapping[str, str] = field(default_factory=dict)
    restarts: int = 0
    reason: str = ""
    """Why the pod is not Ready, as the kubelet recorded it on the pod, or in the Event of its failed
    readiness probe (`diagnosing.probe_reason`); "" when neither says."""
    not_ready_since: str = ""
    """When its Ready condition last turned False (RFC 3339, the kubelet's clock); "" when Ready or unknown."""

    @property
    def component(self) -> str | None:
        return self.labels.get(L.COMPONENT)

    @property
    def revision(self) -> str | None:
        return self.labels.get(L.REVISION)

    @property
    def variant(self) -> str | None:
        return self.labels.get(L.VARIANT)


@dataclass(frozen=True)
class ManifestView:
    """A published compression manifest, or why it could not be read."""

    compression: str
    manifest: Manifest | None = None
    error: str | None = None


@dataclass(frozen=True)
class Measurement:
    """One analysis measurement of the update revision, taken by `analyzing` when the wave planner said it
    was due (`planning.waves.analysis_due`)."""

    at: datetime
    outcome: Outcome
    message: str = ""


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    uid: str
    generation: int
    now: datetime
    status: Mapping[str, Any] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    nodes: tuple[NodeView, ...] = ()
    children: Mapping[tuple[str, str], ObjectView] = field(default_factory=dict)
    pods: tuple[PodView, ...] = ()
    pvcs: frozenset[str] | None = None
    """Names of the PersistentVolumeClaims in the namespace; None when not looked up."""
    measurement: Measurement | None = None
    """The analysis measurement taken for this reconcile (analyzing.measure_due), when one was due."""
    pod_refusals: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(kind, name) of a child whose controller could not create its pods because Pod Security admission
    refused them, and the API server's message (from the controller's FailedCreate Event)."""
    measuring: bool = False
    """A due measurement is being taken off the reconcile worker (analyzing.Analyst); its end queues this
    ModelDeployment again, so the planner need not look back soon."""
    server_now: datetime | None = None
    """The API server's time (`clocks.ServerClock`), for timestamps the control plane set itself; `now`
    (the operator's clock) is for the ones the operator wrote. None: taken to be `now`."""
    site_measurements: Mapping[str, Measurement] = field(default_factory=dict)
    """site -> the analysis measurement of its adapter wave taken for this reconcile
    (analyzing.site_dues), when one was due."""
    sites_measuring: frozenset[str] = frozenset()
    """Sites whose adapter wave's due measurement is being taken off the reconcile worker."""
    not_owned: tuple[ObjectView, ...] = ()
    """Objects labelled for this ModelDeployment but not owned by it (`labels.owned_by`): left out of
    `children`, so the planner neither trusts (a manifest, a round record), updates nor deletes them."""

    @property
    def server_time(self) -> datetime:
        return self.server_now or self.now

    def child(self, kind: str, name: str) -> ObjectView | None:
        return self.children.get((kind, name))

    def refusal(self, kind: str, name: str) -> str | None:
        return self.pod_refusals.get((kind, name))

    def of_kind(self, kind: str) -> list[ObjectView]:
        return sorted((c for (k, _), c in self.children.items() if k == kind), key=lambda c: c.name)
