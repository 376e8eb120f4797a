"""The plan: what one reconcile wants the world to look like, and what it wants to say about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from kiri_operator.conditions import Condition


class Check(StrEnum):
    """The outcome of comparing one desired child with what is there (KServe's CheckResult)."""

    CREATE = "Create"
    UPDATE = "Update"
    EXISTED = "Existed"
    DELETE = "Delete"


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Action:
    check: Check
    kind: str
    name: str
    body: dict[str, Any] | None = None
    """The full desired object for CREATE and UPDATE; None for EXISTED and DELETE."""


@dataclass(frozen=True)
class Slot:
    """Where an edge node belongs: one (revision, variant, adapters) DaemonSet."""

    revision: str
    variant: str
    adapters: str = ""
    """The site's adapter revision the pods load (planning/adapting); "" for none."""


@dataclass
class TierPlan:
    """What one tier (cloud, compression, edge, learning) contributes to a plan."""

    children: list[dict[str, Any]] = field(default_factory=list)
    """Desired child objects."""
    keep: set[tuple[str, str]] = field(default_factory=set)
    """(kind, name) of existing children that stay as they are although not desired."""
    conditions: list[Condition] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def add(self, other: TierPlan) -> None:
        """Fold another tier's children, keeps, events and requeue into this one (conditions stay apart)."""
        names = {(c["kind"], c["metadata"]["name"]) for c in self.children}
        self.children += [c for c in other.children if (c["kind"], c["metadata"]["name"]) not in names]
        self.keep |= other.keep
        self.events += other.events
        self.requeue_after = sooner(self.requeue_after, other.requeue_after)


def sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two requeue delays, None meaning no requeue."""
    if a is None:
        return b
    return a if b is None else min(a, b)


SECRET_TLS: Final = "tls"
"""A private CA and the SuperLink's server certificate (`kiri_runtime.learning.certificates`)."""
SECRET_SUPERNODE_KEY: Final = "supernode-key"
"""One site's SuperNode authentication key pair (`kiri_runtime.learning.node_keys`)."""


@dataclass(frozen=True)
class SecretRequest:
    """A Secret of key material the reconciler creates once and never reads back (`planning/federation.py`):
    the plan names it, the key material is made at the moment of the create and exists nowhere else."""

    namespace: str
    name: str
    names: tuple[str, ...]
    """DNS names (or IPs) the server certificate is for (`SECRET_TLS`); empty for a key pair."""
    owner: str
    owner_uid: str
    labels: tuple[tuple[str, str], ...] = ()
    kind: str = SECRET_TLS
    """What to make: `SECRET_TLS` or `SECRET_SUPERNODE_KEY`."""


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    secrets: list[SecretRequest] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    """Seconds until something time-based (a grace period, a bake) needs another look."""

    @property
    def writes(self) -> list[Action]:
        return [a for a in self.actions if a.check is not Check.EXISTED]
