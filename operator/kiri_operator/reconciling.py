"""One reconcile of one ModelDeployment: observe (caches), plan (pure), apply (kube), report."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator import metering, metrics
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.caches import Cache, Key
from kiri_operator.clocks import Clock, ServerClock
from kiri_operator.conditions import Reason
from kiri_operator.diagnosing import Diagnosis
from kiri_operator.kinds import MODEL_DEPLOYMENT, PVC, apply_rank
from kiri_operator.kube import Kube, KubeError
from kiri_operator.planning import Settings, admitting, invalid_spec_status, normalize_status, plan
from kiri_operator.plans import SECRET_SUPERNODE_KEY, SECRET_TLS, Action, Check, Event, Plan, SecretRequest

if TYPE_CHECKING:
    from kiri_operator.analyzing import Analyst

log = logging.getLogger(__name__)

EVENT_REPEAT_SECONDS = 300.0
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
        # A site's adapter wave: the same progress figures as the revision's, per site. A site's own
        # `adapters` (its adapter names) is kept out of the call: it is not a list of sites.
        edge["adapters"] = [_site_without_progress(s) for s in edge["adapters"] if isinstance(s, Mapping)]
    out["conditions"] = [{k: v for k, v in c.items() if k != "message"} for c in out.get("conditions") or []]
    return out


def _site_without_progress(site: Mapping[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in site.items() if k not in ("adapters", "rollout")}
    stripped = without_progress({"edge": rest, "rollout": site.get("rollout")})
    return {**stripped["edge"], "adapters": site.get("adapters"), "rollout": stripped["rollout"]}


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


def secret_body(request: SecretRequest) -> dict[str, Any]:
    """The Secret's body: fresh key material (a CA and server certificate, or a SuperNode's key pair), base64,
    made here and handed to the API."""
    import base64

    from kiri_operator.planning.federation import secret_object
    from kiri_runtime.learning import certificates, node_keys

    if request.kind == SECRET_SUPERNODE_KEY:
        files = node_keys.make().as_secret_data()
    elif request.kind == SECRET_TLS:
        files = certificates.make(list(request.names)).as_secret_data()
    else:
        raise ValueError(f"unknown kind of Secret {request.kind!r}")
    return secret_object(request, {k: base64.b64encode(v).decode() for k, v in files.items()})


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
        self.diagnosis = Diagnosis(kube)
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
            self.diagnosis.forget(key)
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
        observed = self.diagnosis.diagnose(key, observed)
        server_clock = getattr(self.kube, "server_clock", None)
        if isinstance(server_clock, ServerClock):
            observed = replace(observed, server_now=server_clock.now())
        if (
            spec is not None
            and spec.rollout.analysis is not None
            and admitting.refusal(spec, self.settings) is None
        ):
            # Metric analysis is I/O, so it belongs to observe; the planner said (in status) whether it is due.
            # The sites' adapter waves are judged by the same analysis, each on its own turn.
            if self.analyst is not None:
                measurement, measuring = self.analyst.take(key, spec, observed.status, now)
                by_site, sites_measuring = self.analyst.take_sites(key, spec, observed.status, now)
            else:
                from kiri_operator import analyzing

                measuring, sites_measuring = False, frozenset()
                measurement = analyzing.measure_due(spec, observed.namespace, observed.status, now)
                by_site = analyzing.measure_sites_due(spec, observed.namespace, observed.status, now)
            if measurement is not None or measuring:
                observed = replace(observed, measurement=measurement, measuring=measuring)
            if by_site or sites_measuring:
                observed = replace(observed, site_measurements=by_site, sites_measuring=sites_measuring)
        p: Plan = (
            invalid_spec_status(observed, error or "")
            if spec is None
            else plan(spec, observed, self.settings)
        )
        return self._apply(key, md, observed.status, p)

    def _create_secrets(self, p: Plan, outcome: Outcome, events: list[Event]) -> None:
        """Each requested Secret of key material (TLS, SuperNode keys) once per operator life: a 409 means it
        exists (made earlier, or by the previous leader). The operator may only create Secrets, never read
        them: the key stays in it."""
        for request in p.secrets:
            seen = (request.namespace, request.name, request.owner_uid)
            if seen in self._secrets_made:
                continue
            try:
                body = secret_body(request)
            except Exception as exc:  # one child's failure must not stop the reconcile of the others
                outcome.error = f"Secret {request.name}: {type(exc).__name__}: {exc}"
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
                    with self.cache.writing(action.kind, key[0], action.name):
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
                with self.cache.writing(MODEL_DEPLOYMENT.kind, *key):
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
                with self.cache.writing(MODEL_DEPLOYMENT.kind, *key):
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
