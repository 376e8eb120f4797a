"""Why a child is short of pods, or a serving pod not ready, when its own status does not say: read from the
namespace's Events (FailedCreate from the pod controllers, Unhealthy from the kubelet's probes) and carried into
`Observed` for the planner's conditions.

Events are costly to read: a LIST scans every Event of a namespace, thousands mid-rollout at scale. So they are
read only about what lingers (`Lingering`: in the state for EVENT_GRACE_SECONDS), at most once per namespace and
reason every EVENT_LIST_SECONDS (`NamespaceEvents`), and shared by every ModelDeployment and worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.scalars import parse_time
from kiri_operator.caches import Key
from kiri_operator.kube import Kube, KubeError
from kiri_operator.observations import ObjectView, Observed, PodView
from kiri_operator.planning import building as B
from kiri_runtime import probing

log = logging.getLogger(__name__)

PROBE_EVENT_REASON = "Unhealthy"
"""The kubelet's reason for a failed probe's Event (pkg/kubelet/events ContainerUnhealthy)."""


def pods_missing(observed: Observed) -> list[ObjectView]:
    """Children whose controller has fewer pods than it wants, for no reason the status tells: a DaemonSet
    short of its scheduled pods, a Job with no pod running and no outcome. (A Deployment says it itself:
    its ReplicaFailure condition, which the planner reads.)"""
    out = []
    for ds in observed.of_kind("DaemonSet"):
        st = ds.status
        if int(st.get("desiredNumberScheduled") or 0) > int(st.get("currentNumberScheduled") or 0):
            out.append(ds)
    for job in observed.of_kind("Job"):
        done = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in job.status.get("conditions") or []
        )
        # startTime: the Job controller has synced it (a Job just created has no status yet).
        started = job.status.get("startTime")
        if started and not done and not job.status.get("active") and not job.status.get("succeeded"):
            out.append(job)
    return out


def pod_security_refusal(child: ObjectView, events: Iterable[Mapping[str, Any]]) -> str | None:
    """The newest FailedCreate message about `child` that quotes a Pod Security refusal, if any came after
    the child was made (an older one is about a pod template that is gone)."""
    best: tuple[datetime, str] | None = None
    for ev in events:
        message = str(ev.get("message") or "")
        if C.POD_SECURITY_MARK not in message:
            continue
        at = _event_time(ev)
        if at is None:
            continue
        if child.created:
            try:
                if at < parse_time(child.created):
                    continue
            except ValueError:
                pass
        if best is None or at > best[0]:
            best = (at, message.removeprefix(_COMBINED_EVENTS))
    return best[1] if best is not None else None


def probe_reason(pod: PodView, events: Iterable[Mapping[str, Any]]) -> str | None:
    """What the pod's readiness probe printed (`kiri_runtime.probing`) in its newest "Readiness probe
    failed" Event from the time it has been not ready, if any: "readiness probe: <output>".

    An Event counts if it was last seen after the pod's Ready condition turned False, less the probe's
    failure window (the failures that turned it False come before the transition) and a margin for the
    kubelet's clock. The kubelet keeps one Event per message, bumping its count and last timestamp, and
    after 25 Warnings about one pod sends one per 5 minutes (client-go's spam filter): a reason that
    changes late may show late, and one that is gone is never quoted as current, since a Ready pod is not
    asked."""
    since: datetime | None = None
    if pod.not_ready_since:
        try:
            since = parse_time(pod.not_ready_since)
        except ValueError:
            since = None
    best: tuple[datetime, str] | None = None
    for ev in events:
        involved = ev.get("involvedObject") or {}
        if involved.get("name") != pod.name:
            continue
        said = probing.reason_from_event(str(ev.get("message") or ""))
        if said is None:
            continue
        at = _event_time(ev)
        if at is None or (since is not None and (since - at).total_seconds() > PROBE_WINDOW_SECONDS):
            continue
        if best is None or at > best[0]:
            best = (at, said)
    return f"readiness probe: {best[1]}" if best is not None else None


PROBE_WINDOW_SECONDS = B.READY_PERIOD * B.READY_FAILURES + 15
EVENT_LIST_SECONDS = 10.0
"""How old a namespace's view of one Event reason may be (`NamespaceEvents`). Probe Events are asked for
only while a serving pod runs not ready with no reason on the pod object; FailedCreate only while a child
is short of pods; both only once that has lasted EVENT_GRACE_SECONDS."""
EVENT_GRACE_SECONDS = 10.0
"""How long a child stays short of pods, or a serving pod runs not ready saying nothing, before the operator
reads Events about it (`Lingering`). In a rollout pods come and turn ready within seconds, while a refusal or
a failing probe lasts. Each read is a LIST that scans every Event of the namespace (thousands mid-rollout at
scale): reading them for every passing shortfall loaded the API server enough to slow every other call of a
1,000-node rollout."""


def _event_time(ev: Mapping[str, Any]) -> datetime | None:
    stamp = (
        ev.get("lastTimestamp") or ev.get("eventTime") or (ev.get("metadata") or {}).get("creationTimestamp")
    )
    try:
        # eventTime (events.k8s.io) is a MicroTime: drop the fraction, second precision is enough here.
        return parse_time(str(stamp).split(".")[0].removesuffix("Z") + "Z")
    except ValueError:
        return None


_COMBINED_EVENTS = "(combined from similar events): "
"""The prefix client-go's event aggregator puts on a message once it folds repeats of an Event into one:
it says nothing about the refusal, so the condition quotes the API server's message without it."""


class NamespaceEvents:
    """A namespace's Events of one reason (FailedCreate from the pod controllers, Unhealthy from the
    kubelet's probes), one LIST per `ttl` at most, shared by every ModelDeployment there.

    During a rollout most DaemonSets are short of pods and many pods run not ready for a while. One LIST
    per short child per reconcile was 803 LISTs in a 1,000-node rollout and held each reconcile about
    1.7 s. A refusal is persistent (the controller retries with backoff and says it again) and a probe
    fails every period, so a view up to `ttl` old still finds them. Workers share it: a race costs one
    extra LIST."""

    def __init__(
        self, kube: Kube, ttl: float = EVENT_LIST_SECONDS, monotonic: Callable[[], float] | None = None
    ) -> None:
        self.kube = kube
        self.ttl = ttl
        self._monotonic = monotonic or (lambda: time.monotonic())
        self._seen: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}

    def about(self, namespace: str, reason: str, kind: str, names: Collection[str]) -> list[dict[str, Any]]:
        """The Events with `reason` about the objects of `kind` named `names`."""
        return [
            ev
            for ev in self._of(namespace, reason)
            if (ev.get("involvedObject") or {}).get("kind") == kind
            and (ev.get("involvedObject") or {}).get("name") in names
        ]

    def _of(self, namespace: str, reason: str) -> list[dict[str, Any]]:
        now = self._monotonic()
        seen = self._seen.get((namespace, reason))
        if seen is not None and now - seen[0] < self.ttl:
            return seen[1]
        try:
            events = self.kube.events_with_reason(namespace, None, reason)
        except KubeError as exc:
            log.warning("cannot read the %s Events of namespace %s: %s", reason, namespace, exc)
            return seen[1] if seen is not None else []
        self._seen[(namespace, reason)] = (now, events)
        return events


class Lingering:
    """Since when each thing of a ModelDeployment has been in some state, as seen by this operator: which of
    them have been in it for at least `grace` seconds. Memory only: after a restart the grace starts again,
    which delays a reason by `grace`, never loses it (the state and the level-based reconcile remain)."""

    def __init__(
        self, grace: float = EVENT_GRACE_SECONDS, monotonic: Callable[[], float] | None = None
    ) -> None:
        self.grace = grace
        self._monotonic = monotonic or (lambda: time.monotonic())
        self._since: dict[Key, dict[tuple[str, str], float]] = {}

    def lingering(self, key: Key, now_in_state: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of `now_in_state` (the things in the state now), those in it for `grace` seconds at least; what is
        no longer in the state is forgotten."""
        now = self._monotonic()
        before = self._since.get(key, {})
        since = {thing: before.get(thing, now) for thing in now_in_state}
        if since:
            self._since[key] = since
        else:
            self._since.pop(key, None)
        return {thing for thing, at in since.items() if now - at >= self.grace}

    def forget(self, key: Key) -> None:
        self._since.pop(key, None)


class Diagnosis:
    """The reasons Events give, for one operator: its Event reads and what has lingered since when."""

    def __init__(self, kube: Kube) -> None:
        self.events = NamespaceEvents(kube)
        self._short_of_pods = Lingering()
        self._silently_unready = Lingering()

    def diagnose(self, key: Key, observed: Observed) -> Observed:
        """`observed` with the refusals of the children short of pods and the probe output of the silent
        pods not ready, those that have lingered."""
        if refusals := self._pod_refusals(key, observed):
            observed = replace(observed, pod_refusals=refusals)
        return self._with_probe_reasons(key, observed)

    def forget(self, key: Key) -> None:
        self._short_of_pods.forget(key)
        self._silently_unready.forget(key)

    def _pod_refusals(self, key: Key, observed: Observed) -> dict[tuple[str, str], str]:
        """Why the children short of pods for EVENT_GRACE_SECONDS are short, from their namespace's
        FailedCreate Events."""
        out: dict[tuple[str, str], str] = {}
        missing = pods_missing(observed)
        lingering = self._short_of_pods.lingering(key, [(c.kind, c.name) for c in missing])
        for child in missing:
            if (child.kind, child.name) not in lingering:
                continue
            events = self.events.about(observed.namespace, "FailedCreate", child.kind, {child.name})
            if (message := pod_security_refusal(child, events)) is not None:
                out[(child.kind, child.name)] = message
        return out

    def _with_probe_reasons(self, key: Key, observed: Observed) -> Observed:
        """The serving pods that have run not ready for EVENT_GRACE_SECONDS and say nothing on the pod object
        get the reason their readiness probe printed into the kubelet's Events (`NamespaceEvents`: one LIST per
        namespace at most every EVENT_LIST_SECONDS; between reads the last answer stands)."""
        silent = [
            p
            for p in observed.pods
            if not p.ready
            and not p.reason
            and p.phase == "Running"
            and p.component in (L.COMPONENT_CLOUD, L.COMPONENT_EDGE)
        ]
        lingering = self._silently_unready.lingering(key, [("Pod", p.name) for p in silent])
        silent = [p for p in silent if ("Pod", p.name) in lingering]
        if not silent:
            return observed
        mine = self.events.about(observed.namespace, PROBE_EVENT_REASON, "Pod", {p.name for p in silent})
        said = {p.name: r for p in silent if (r := probe_reason(p, mine)) is not None}
        if not said:
            return observed
        pods = tuple(replace(p, reason=said[p.name]) if p.name in said else p for p in observed.pods)
        return replace(observed, pods=pods)
