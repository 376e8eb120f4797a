"""What the operator keeps in kopf's memo: its configuration and its runtime state.

kopf hands every handler a `memo`: the startup, login and cleanup handlers the operator's own, each watched
object a shallow copy of it. One `Runtime` under one key (`memo.kiri`) is therefore the same object in
all of them, and what startup puts in it (the client, the caches, the queue, the reconciler) every event
handler sees.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiri_operator import kinds
from kiri_operator.caches import Cache, Key
from kiri_operator.kube import Kube
from kiri_operator.kube.leasing import Elector, Timing
from kiri_operator.planning import Settings
from kiri_operator.queueing import WorkQueue
from kiri_operator.reconciling import Reconciler

if TYPE_CHECKING:
    from kiri_operator.analyzing import Analyst

MEMO_KEY = "kiri"


@dataclass(frozen=True)
class LeaderElection:
    """Where the leader Lease lives and its timings (`kiri operator --leader-elect ...`)."""

    namespace: str
    name: str = "kiri-operator"
    timing: Timing = field(default_factory=Timing)


@dataclass
class Config:
    namespaces: list[str] = field(default_factory=list)
    """Empty: every namespace."""
    metrics_port: int | None = None
    workers: int = 4
    resync_seconds: float = 60.0
    status_progress_seconds: float = 10.0
    """How often a status change of progress figures alone (counts, messages) may be written."""
    kubeconfig: str | None = None
    settings: Settings = field(default_factory=Settings)
    liveness: str | None = None  # kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz
    clock_offset_seconds: float = 0.0
    """Shifts the operator's clock (fault tests: an operator minutes off the API server's clock)."""
    leader_election: LeaderElection | None = None
    """None: this process reconciles alone (one replica)."""

    @property
    def child_kinds(self) -> tuple[str, ...]:
        """The child kinds this operator watches and lists (no account kinds unless it makes them)."""
        return tuple(k.kind for k in kinds.children(self.settings.create_compressor_rbac))

    @property
    def scopes(self) -> list[str | None]:
        """The namespaces to list, None meaning all of them."""
        return list(self.namespaces) or [None]


@dataclass
class Runtime:
    config: Config = field(default_factory=Config)
    cache: Cache = field(default_factory=Cache)
    queue: WorkQueue[Key] | None = None
    reconciler: Reconciler | None = None
    kube: Kube | None = None
    analyst: Analyst | None = None
    elector: Elector | None = None
    """Set with leader election: only while it leads does this replica reconcile (and write)."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    event_at: dict[Key, float] = field(default_factory=dict)
    """When the oldest watch event not yet reconciled queued each key (for the event-to-status latency)."""
    relist_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a watch replaying a LIST (kopf's events of type None): `syncing.relister` relists every kind."""
    pods_heard_at: dict[str | None, float] = field(default_factory=dict)
    """When a pod watch event last came, by namespace (None: any namespace), for the resync's pod LIST."""

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading()

    def heard_pod(self, namespace: str | None) -> None:
        now = time.monotonic()
        self.pods_heard_at[namespace] = now
        self.pods_heard_at[None] = now

    def enqueue(self, key: Key | None, watched: bool = True) -> None:
        """Queue a known ModelDeployment for a reconcile; `watched`: because of a watch event."""
        if key is not None and self.queue is not None and key in self.cache.mds:
            if watched:
                self.event_at.setdefault(key, time.monotonic())
            self.queue.add(key)


def memo(config: Config) -> dict[str, Any]:
    """The memo entries of an operator run with `config`."""
    return {MEMO_KEY: Runtime(config=config)}


def runtime(memo: Any) -> Runtime:
    """The Runtime in a kopf memo (the operator's or an object's shallow copy of it)."""
    found = memo[MEMO_KEY]
    assert isinstance(found, Runtime)
    return found
