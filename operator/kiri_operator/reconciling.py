"""One reconcile of one ModelDeployment: observe (caches), plan (pure), apply (kube), report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator import metering, metrics
from kiri_operator.api.scalars import parse_time
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.caches import Cache, Key
from kiri_operator.clocks import Clock, ServerClock
from kiri_operator.conditions import Reason
from kiri_operator.kinds import MODEL_DEPLOYMENT, PVC, apply_rank
from kiri_operator.kube import Kube, KubeError
from kiri_operator.observations import ObjectView, Observed, PodView
from kiri_operator.planning import Settings, admitting, invalid_spec_status, normalize_status, plan
from kiri_operator.planning import building as B
from kiri_operator.plans import Action, Check, Event, Plan, SecretRequest
from kiri_runtime import probing

if TYPE_CHECKING:
    from kiri_operator.analyzing import Analyst

log = logging.getLogger(__name__)

EVENT_REPEAT_SECONDS = 300.0
PROBE_EVENT_REASON = "Unhealthy"
"""The kubelet's reason for a failed probe's Event (pkg/kubelet/events ContainerUnhealthy)."""
# Status fields that only say how far a step has come. A change to them alone is written at most once per
# `progress_interval` per ModelDeployment; anything else in the status (phase, a condition's status or
# reason, a revision, a step, a bake's start, history) is written at once.
PROGRESS_FIELDS = {
    "cloud": ("ready",),
    "edge": ("updatedNodes", "readyNodes", "message"),
    "rollout": ("readyNodes", "progressAt", "message"),
}


def without_progress(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status minus its progress figures: counts, messages and the progress clock."""
    out = dict(status)
    for section, keys in PROGRESS_FIELDS.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    edge = out.get("edge")
    if isinstance(edge, dict) and isinstance(edge.get("perVariant"), list):
        edge["perVariant"] = [
            {k: v for k, v in pv.items() if k not in ("nodes", "ready")} for pv in edge["perVariant"]
        ]
    if isinstance(edge, dict) and isinstance(edge.get("adapters"), list):
        # A site's adapter wave: the same progress figures as the revision's, per site.
        sites = [without_progress({"edge": s, "rollout": s.get("rollout")}) for s in edge["adapters"] if s]
        edge["adapters"] = [{**s["edge"], "rollout": s["rollout"]} for s in sites]
    out["conditions"] = [{k: v for k, v in c.items() if k != "message"} for c in out.get("conditions") or []]
    return out


def progress_only(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two statuses differ in progress figures alone (and so may wait to be written)."""
    return without_progress(old) == without_progress(new)


@dataclass
class Outcome:
    writes: int = 0
    requeue_after: float | None = None
    error: str | None = None
    status_written: bool = False
    status_deferred: bool = False


def _order(actions: Iterable[Action]) -> list[Action]:
    writes = [a for a in actions if a.check in (Check.CREATE, Check.UPDATE)]
    deletes = [a for a in actions if a.check is Check.DELETE]
    return sorted(writes, key=lambda a: apply_rank(a.kind)) + deletes


def _pvcs_needed(spec: ModelDeploymentSpec) -> list[str]:
    claims = []
    for uri in (spec.model.source.uri, spec.edge.artifacts.uri or ""):
        parsed = urlparse(uri)
        if parsed.scheme == "pvc" and parsed.netloc:
            claims.append(parsed.netloc)
    return claims


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


def secret_body(request: SecretRequest) -> dict[str, Any]:
    """The TLS Secret's body: a fresh CA and server certificate, base64, made here and handed to the API."""
    import base64

    from kiri_operator.planning.federation import tls_secret
    from kiri_runtime.learning import certificates

    files = certificates.make(list(request.names)).as_secret_data()
    return tls_secret(request, {k: base64.b64encode(v).decode() for k, v in files.items()})


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
is short of pods."""


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


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        settings: Settings | None = None,
        progress_interval: float = 10.0,
        analyst: Analyst | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: the operator's one clock (every timestamp written and every plan's `now`); the Kube
        client's by default, so Events and status agree."""
        self.clock = clock or getattr(kube, "clock", None) or Clock()
        self.kube = kube
        self.cache = cache
        self.analyst = analyst
        """`analyzing.Analyst`: measurements off the worker; None measures in the reconcile (tests, tools)."""
        self.settings = settings or Settings()
        self.progress_interval = progress_interval
        self._recent_events: dict[tuple[Key, str, str, str], float] = {}
        self._status_written_at: dict[Key, float] = {}
        self.events = NamespaceEvents(kube)
        self._secrets_made: set[tuple[str, str, str]] = set()

    def reconcile(self, key: Key) -> Outcome:
        started = time.perf_counter()
        try:
            outcome = self._reconcile(key)
        except Exception as exc:
            log.exception("reconcile of %s/%s failed", *key)
            metrics.RECONCILE_SECONDS.labels("error").observe(time.perf_counter() - started)
            self._report_failure(key, exc)
            return Outcome(error=str(exc))
        result = "error" if outcome.error else ("changed" if outcome.writes else "unchanged")
        metrics.RECONCILE_SECONDS.labels(result).observe(time.perf_counter() - started)
        return outcome

    def _reconcile(self, key: Key) -> Outcome:
        md = self.cache.md(key)
        if md is None or (md.get("metadata") or {}).get("deletionTimestamp"):
            # Children carry owner references: the garbage collector removes them with their owner.
            metrics.set_nodes(key[0], key[1], {})
            self._status_written_at.pop(key, None)
            return Outcome()
        now = self.clock.now()
        try:
            spec: ModelDeploymentSpec | None = ModelDeploymentSpec.model_validate(md.get("spec") or {})
            error = None
        except ValidationError as exc:
            spec, error = (
                None,
                "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()),
            )
        pvcs: frozenset[str] | None = None
        if spec is not None and (claims := _pvcs_needed(spec)):
            pvcs = frozenset(c for c in claims if self.kube.get(PVC.kind, key[0], c) is not None)
        observed = self.cache.observe(key, now, pvcs)
        if observed is None:
            return Outcome()
        if refusals := self._pod_refusals(observed):
            observed = replace(observed, pod_refusals=refusals)
        observed = self._with_probe_reasons(key, observed)
        server_clock = getattr(self.kube, "server_clock", None)
        if isinstance(server_clock, ServerClock):
            observed = replace(observed, server_now=server_clock.now())
        if (
            spec is not None
            and spec.rollout.analysis is not None
            and admitting.refusal(spec, self.settings) is None
        ):
            # Metric analysis is I/O, so it belongs to observe; the planner said (in status) whether it is due.
            if self.analyst is not None:
                measurement, measuring = self.analyst.take(key, spec, observed.status, now)
            else:
                from kiri_operator import analyzing

                measuring = False
                measurement = analyzing.measure_due(spec, observed.namespace, observed.status, now)
            if measurement is not None or measuring:
                observed = replace(observed, measurement=measurement, measuring=measuring)
        p: Plan = (
            invalid_spec_status(observed, error or "")
            if spec is None
            else plan(spec, observed, self.settings)
        )
        return self._apply(key, md, observed.status, p)

    def _pod_refusals(self, observed: Observed) -> dict[tuple[str, str], str]:
        """Why the children short of pods are short, from their namespace's FailedCreate Events."""
        out: dict[tuple[str, str], str] = {}
        for child in pods_missing(observed):
            events = self.events.about(observed.namespace, "FailedCreate", child.kind, {child.name})
            if (message := pod_security_refusal(child, events)) is not None:
                out[(child.kind, child.name)] = message
        return out

    def _with_probe_reasons(self, key: Key, observed: Observed) -> Observed:
        """The serving pods that run not ready and say nothing on the pod object get the reason their
        readiness probe printed into the kubelet's Events (`NamespaceEvents`: one LIST per namespace at most
        every EVENT_LIST_SECONDS; between reads the last answer stands)."""
        silent = [
            p
            for p in observed.pods
            if not p.ready
            and not p.reason
            and p.phase == "Running"
            and p.component in (L.COMPONENT_CLOUD, L.COMPONENT_EDGE)
        ]
        if not silent:
            return observed
        mine = self.events.about(observed.namespace, PROBE_EVENT_REASON, "Pod", {p.name for p in silent})
        said = {p.name: r for p in silent if (r := probe_reason(p, mine)) is not None}
        if not said:
            return observed
        pods = tuple(replace(p, reason=said[p.name]) if p.name in said else p for p in observed.pods)
        return replace(observed, pods=pods)

    def _create_secrets(self, p: Plan, outcome: Outcome, events: list[Event]) -> None:
        """Each requested TLS Secret once per operator life: a 409 means it exists (made earlier, or by the
        previous leader). The operator may only create Secrets, never read them: the key stays in it."""
        for request in p.secrets:
            seen = (request.namespace, request.name, request.owner_uid)
            if seen in self._secrets_made:
                continue
            try:
                body = secret_body(request)
            except Exception as exc:  # one child's failure must not stop the reconcile of the others
                outcome.error = f"TLS Secret {request.name}: {type(exc).__name__}: {exc}"
                events.append(Event("Warning", Reason.APPLY_FAILED, outcome.error[:1000]))
                continue
            try:
                self.kube.create(body)
                events.append(Event("Normal", Reason.CREATED, f"created Secret {request.name}"))
                outcome.writes += 1
            except KubeError as exc:
                if exc.status != 409:
                    outcome.error = str(exc)
                    events.append(
                        Event(
                            "Warning",
                            Reason.APPLY_FAILED,
                            f"Create Secret {request.name}: {exc.message}"[:1000],
                        )
                    )
                    continue
            self._secrets_made.add(seen)

    def _apply(self, key: Key, md: dict[str, Any], old_status: Any, p: Plan) -> Outcome:
        outcome = Outcome(requeue_after=p.requeue_after)
        events = list(p.events)
        self._create_secrets(p, outcome, events)
        for action in _order(p.actions):
            try:
                if action.check is Check.DELETE:
                    self.kube.delete(action.kind, key[0], action.name)
                    self.cache.remove_child(
                        action.kind,
                        {
                            "metadata": {
                                "namespace": key[0],
                                "name": action.name,
                                "labels": L.selector_labels(key[1]),
                            }
                        },
                    )
                else:
                    assert action.body is not None
                    self.cache.put_child(action.kind, self.kube.apply(action.body), own=True)
                metrics.RECONCILE_WRITES.labels(action.kind, action.check.value).inc()
                outcome.writes += 1
            except KubeError as exc:
                # One refused child does not stop the others; the next reconcile retries it.
                outcome.error = str(exc)
                events.append(
                    Event(
                        "Warning",
                        Reason.APPLY_FAILED,
                        f"{action.check.value} {action.kind} {action.name}: {exc.message}"[:1000],
                    )
                )
        try:
            stored = normalize_status(old_status or {})
        except ValidationError:
            stored = {}  # a status the model cannot read is rewritten whole by the plan
        wait = self.progress_interval - (time.monotonic() - self._status_written_at.get(key, -1e9))
        if p.status == stored:
            pass  # nothing to write
        elif wait > 0 and progress_only(stored, p.status):
            # A wave's pods turn Ready one by one: one patch per pod would be most of the operator's
            # writes at fleet scale. The figures catch up by the end of the interval, or sooner with
            # the next change that matters (the wave's last pod Ready is one: it starts the bake).
            asked = outcome.requeue_after
            outcome.requeue_after = wait if asked is None else min(asked, wait)
            outcome.status_deferred = True
        else:
            try:
                self.cache.put_md(self.kube.apply_status(key[0], key[1], p.status), own=True)
                self._status_written_at[key] = time.monotonic()
                metrics.RECONCILE_WRITES.labels(MODEL_DEPLOYMENT.kind, "Status").inc()
                outcome.writes += 1
                outcome.status_written = True
            except KubeError as exc:
                if exc.status != 404:  # deleted meanwhile: nothing left to report on
                    outcome.error = str(exc)
        self._emit(key, md, events)
        self._node_metrics(key, p.status)
        metering.meter(key[0], key[1], p.status)
        return outcome

    def _report_failure(self, key: Key, exc: Exception) -> None:
        """A reconcile that raised says so where users look: a condition with a reason, and an Event.

        Best effort, from the stored status (the plan never came): the same failure repeated writes
        nothing new, and an API server that is down fails this too (the log has it)."""
        md = self.cache.md(key)
        if md is None:
            return
        message = f"{type(exc).__name__}: {exc}"[:1000]
        try:
            status = dict(md.get("status") or {})
            stored = [C.Condition.from_dict(c) for c in status.get("conditions") or [] if isinstance(c, dict)]
            conditions = C.reconcile_failed(stored, message, self.clock.now())
            if [c.to_dict() for c in conditions] != status.get("conditions"):
                status["conditions"] = [c.to_dict() for c in conditions]
                self.cache.put_md(self.kube.apply_status(key[0], key[1], status), own=True)
            self._emit(key, md, [Event("Warning", Reason.RECONCILE_FAILED, message)])
        except Exception as report_exc:  # never let the report hide the failure it reports
            log.warning("reporting the failed reconcile of %s/%s: %s", *key, report_exc)

    def _emit(self, key: Key, md: dict[str, Any], events: Iterable[Event]) -> None:
        for event in events:
            # A retried failure repeats its event each time: one per five minutes is enough to see it.
            seen = (key, event.type, event.reason, event.message)
            now = time.monotonic()
            if now - self._recent_events.get(seen, -1e9) < EVENT_REPEAT_SECONDS:
                continue
            self._recent_events[seen] = now
            if len(self._recent_events) > 10000:
                self._recent_events = {
                    k: t for k, t in self._recent_events.items() if now - t < EVENT_REPEAT_SECONDS
                }
            self.kube.event(md, event)
            metrics.RECONCILE_WRITES.labels("Event", event.reason).inc()

    @staticmethod
    def _node_metrics(key: Key, status: dict[str, Any]) -> None:
        edge = status.get("edge") or {}
        counts: dict[tuple[str, str], int] = {}
        for v in edge.get("perVariant") or []:
            counts[(v["name"], "ready")] = int(v.get("ready", 0))
            counts[(v["name"], "updating")] = int(v.get("nodes", 0)) - int(v.get("ready", 0))
        counts[("", "deferred")] = int(edge.get("deferredNodes", 0))
        counts[("", "unmatched")] = int(edge.get("unmatchedNodes", 0))
        metrics.set_nodes(key[0], key[1], counts)
