"""The plan: what one reconcile wants the world to look like, and what it wants to say about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


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
    """Where an edge node belongs: one (revision, variant) DaemonSet."""

    revision: str
    variant: str


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    assignment: dict[str, Slot] = field(default_factory=dict)
    requeue_after: float | None = None
    """Seconds until something time-based (a grace period, a bake) needs another look."""

    @property
    def writes(self) -> list[Action]:
        return [a for a in self.actions if a.check is not Check.EXISTED]
