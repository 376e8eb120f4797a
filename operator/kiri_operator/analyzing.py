"""The Prometheus analysis provider: runs a wave's PromQL queries and judges them.

I/O only: HTTP to Prometheus's ``/api/v1/query_range`` (and ``/api/v1/query`` while the window is shorter
than one interval). The judgement is pure and lives in :mod:`kiri_operator.planning.verdicts`; when to
measure is decided by :func:`kiri_operator.planning.waves.analysis_due`.

Each measurement is a range query from one interval after the wave became Ready until now, one point per
``interval``: the query is evaluated by Prometheus at every interval of the wave, so failures and samples
accumulate without Kiri counting them, and an operator restart loses nothing.

``$revision``, ``$stableRevision``, ``$variant`` and ``$namespace`` in a query are replaced before it runs. ``$variant`` becomes
the update revision's variants joined by ``|``: use it with ``=~``. Edge pods carry the
``kiri.dev/revision`` and ``kiri.dev/variant`` labels; a Kubernetes service-discovery scrape config
relabels them to ``revision`` and ``variant`` (see docs/architecture.md, "Progressive delivery").

A site's adapter wave (``planning.adapting``) is judged by the same queries on its own turn
(``site_dues``): ``$revision`` and ``$stableRevision`` are the settled revision, ``$adapters`` and
``$stableAdapters`` the wave's and the site's stable adapter revisions (regular expressions on the pods'
``adapters`` target label, from ``kiri.dev/adapters``; "" for the base model); a revision's own wave gets
``.*`` for both, every pod of the revision.

A measurement does not run on a reconcile worker: the operator's :class:`Analyst` takes it on a thread of
its own, and the reconcile that found it due goes on (the wave holds, "analysis running"); when it ends the
ModelDeployment is queued again and the next reconcile hands it to the planner. It is also bounded whatever
Prometheus (or whatever answers at its address) does, so the analyst's threads are not held either: a connect timeout, a read timeout, and one deadline (``DEADLINE_S``) for all the queries of a
measurement together, checked between the chunks of an answer, so a server that trickles bytes cannot hold
the worker either; an answer larger than ``MAX_ANSWER_BYTES`` is refused. A query cut off by the deadline
is an analysis error: the wave holds (inconclusive), it never rolls back on it. Only the addresses the
administrator allowed are ever asked (``planning.admitting``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import ValidationError

from kiri_operator.api.statuses import RolloutStatus, SiteAdapters
from kiri_operator.observations import Measurement
from kiri_operator.planning import verdicts
from kiri_operator.planning.adapting import BASE, site_policy
from kiri_operator.planning.stepping import policy_of
from kiri_operator.planning.waves import analysis_due

if TYPE_CHECKING:
    from kiri_operator.api.specs import ModelDeploymentSpec

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
"""Read timeout of one request (no byte for this long fails it)."""
CONNECT_TIMEOUT_S = 3.0
DEADLINE_S = 15.0
"""All the queries of one measurement, together, end within this; the rest fail as analysis errors."""
MAX_ANSWER_BYTES = 4 << 20
"""A Prometheus answer to one scalar query is a few hundred bytes; anything this large is not one."""


class QuerySpec(Protocol):
    """What a query needs; ``api.specs.AnalysisQuery`` has these attributes."""

    @property
    def name(self) -> str: ...
    @property
    def promql(self) -> str: ...
    @property
    def success_condition(self) -> str: ...
    @property
    def interval(self) -> int: ...
    @property
    def failure_limit(self) -> int: ...
    @property
    def min_samples(self) -> int: ...


class PrometheusError(RuntimeError):
    """Prometheus could not answer: unreachable, an HTTP error, or a query it rejected."""


@dataclass(frozen=True)
class Substitutions:
    revision: str
    namespace: str
    variants: Sequence[str] = ()
    stable_revision: str = ""
    """The last revision that reached every node (the one not-yet-updated nodes run); empty on a first rollout."""
    adapters: str = ".*"
    """A regular expression on the pods' adapter revision (the `adapters` target label): `.*` (every pod) in
    a revision's rollout; in a site's adapter wave the wave's adapter revision, "" for the base model."""
    stable_adapters: str = ".*"
    """The same for the site's stable adapter revision (what its nodes not yet updated run)."""

    def apply(self, query: str) -> str:
        variant = "|".join(sorted(set(self.variants)))
        # `$stableRevision` before `$revision`, which is its suffix; `$adapters` is no suffix of
        # `$stableAdapters` (case).
        return (
            query.replace("$stableRevision", self.stable_revision)
            .replace("$stableAdapters", self.stable_adapters)
            .replace("$adapters", self.adapters)
            .replace("$revision", self.revision)
            .replace("$namespace", self.namespace)
            .replace("$variant", variant)
        )


def _float(raw: Any) -> float | None:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def parse_points(payload: Mapping[str, Any]) -> list[float | None]:
    """Values of a Prometheus query answer, oldest first. One series only: several would be ambiguous."""
    if payload.get("status") != "success":
        raise PrometheusError(f"{payload.get('errorType', 'error')}: {payload.get('error', 'no detail')}")
    data = payload.get("data") or {}
    kind = data.get("resultType")
    result = data.get("result")
    if kind == "scalar":
        return [_float(result[1])] if isinstance(result, list) and len(result) == 2 else []
    if not isinstance(result, list):
        raise PrometheusError(f"unexpected answer of type {kind!r}")
    if len(result) > 1:
        raise PrometheusError(f"the query returned {len(result)} series; aggregate it to one (sum, max, ...)")
    if not result:
        return []
    series = result[0]
    if kind == "vector":
        return [_float(series.get("value", [None, None])[1])]
    if kind == "matrix":
        return [_float(v[1]) for v in series.get("values", [])]
    raise PrometheusError(f"unexpected answer of type {kind!r}")


def _unix(t: datetime) -> float:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def _read(response: httpx.Response, base: str, deadline: float) -> bytes:
    """The body, chunk by chunk, within the deadline and the size cap."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise PrometheusError(f"Prometheus at {base} answered more than {MAX_ANSWER_BYTES} bytes")
        if time.monotonic() > deadline:
            raise PrometheusError(f"Prometheus at {base} did not answer within the measurement's deadline")
    return bytes(body)


def fetch_points(
    client: httpx.Client,
    address: str,
    query: str,
    start: datetime,
    end: datetime,
    step: float,
    *,
    deadline: float | None = None,
) -> list[float | None]:
    """The query evaluated every ``step`` seconds over [start, end]; an instant query if that is empty.
    ``deadline`` (``time.monotonic()``) bounds the whole request, however slowly the bytes come."""
    base = address.rstrip("/")
    deadline = time.monotonic() + DEADLINE_S if deadline is None else deadline
    left = deadline - time.monotonic()
    if left <= 0:
        raise PrometheusError(f"Prometheus at {base} not asked: the measurement's deadline has passed")
    timeout = httpx.Timeout(min(left, DEFAULT_TIMEOUT_S), connect=min(left, CONNECT_TIMEOUT_S))
    params: dict[str, str | float]
    if end < start:
        url, params = f"{base}/api/v1/query", {"query": query, "time": _unix(end)}
    else:
        url = f"{base}/api/v1/query_range"
        params = {"query": query, "start": _unix(start), "end": _unix(end), "step": step}
    try:
        with client.stream("GET", url, params=params, timeout=timeout) as response:
            status, body = response.status_code, _read(response, base, deadline)
    except httpx.HTTPError as exc:
        raise PrometheusError(f"Prometheus at {base} unreachable: {type(exc).__name__}: {exc}") from exc
    try:
        payload = json.loads(body)
    except ValueError:
        raise PrometheusError(f"Prometheus at {base} answered HTTP {status}, not JSON") from None
    if not isinstance(payload, dict):
        raise PrometheusError(f"Prometheus at {base} answered HTTP {status}, not a Prometheus answer")
    if status != 200 and payload.get("status") == "success":
        raise PrometheusError(f"Prometheus at {base} answered HTTP {status}")
    return parse_points(payload)


def rule_of(spec: QuerySpec) -> verdicts.QueryRule:
    return verdicts.QueryRule(
        name=spec.name,
        condition=verdicts.parse_condition(spec.success_condition),
        failure_limit=spec.failure_limit,
        min_samples=spec.min_samples,
    )


def judge(
    client: httpx.Client,
    address: str,
    query: QuerySpec,
    substitutions: Substitutions,
    since: datetime,
    now: datetime,
    deadline: float | None = None,
) -> verdicts.QueryVerdict:
    try:
        rule = rule_of(query)
        start = since + timedelta(seconds=query.interval)
        points = fetch_points(
            client,
            address,
            substitutions.apply(query.promql),
            start,
            now,
            query.interval,
            deadline=deadline,
        )
    except (PrometheusError, ValueError) as exc:
        return verdicts.query_error(query.name, str(exc))
    return verdicts.judge_query(rule, points)


def measure_sync(
    address: str,
    queries: Sequence[QuerySpec],
    substitutions: Substitutions,
    since: datetime,
    now: datetime,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline_s: float = DEADLINE_S,
) -> tuple[Measurement, list[verdicts.QueryVerdict]]:
    """One measurement of every query over the wave so far (``since``: when the wave became Ready), all of
    it within ``deadline_s``. Redirects are not followed: the allowed address is the one asked."""
    deadline = time.monotonic() + deadline_s
    timeout_ = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
    with httpx.Client(timeout=timeout_, follow_redirects=False) as client:
        found = [judge(client, address, q, substitutions, since, now, deadline) for q in queries]
    outcome, message = verdicts.combine(found)
    return Measurement(at=now, outcome=outcome, message=message), found


async def measure(
    address: str,
    queries: Sequence[QuerySpec],
    substitutions: Substitutions,
    since: datetime,
    now: datetime,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deadline_s: float = DEADLINE_S,
) -> tuple[Measurement, list[verdicts.QueryVerdict]]:
    """:func:`measure_sync` off the event loop."""
    return await asyncio.to_thread(
        measure_sync, address, queries, substitutions, since, now, timeout=timeout, deadline_s=deadline_s
    )


@dataclass(frozen=True)
class Due:
    """A measurement the wave planner says is due: what to ask, and which wave and turn it is for."""

    address: str
    queries: Sequence[QuerySpec]
    substitutions: Substitutions
    since: datetime
    turn: tuple[str, datetime, datetime | None]
    """(update revision, when its wave became Ready, the last measurement's time): one measurement each."""


def due(spec: ModelDeploymentSpec, namespace: str, status: Mapping[str, Any], now: datetime) -> Due | None:
    """The measurement the wave planner wants now (it decides from status), or None."""
    analysis = spec.rollout.analysis
    if analysis is None:
        return None
    policy = policy_of(spec.rollout)
    try:
        state = RolloutStatus.model_validate(status.get("rollout") or {})
    except ValidationError:
        return None  # the planner reports and rebuilds an unreadable status.rollout
    if not analysis_due(policy, state, now) or state.ready_at is None or state.update_revision is None:
        return None
    substitutions = Substitutions(
        revision=state.update_revision,
        namespace=namespace,
        variants=[v.name for v in spec.edge.variants],
        stable_revision=state.stable_revision or "",
    )
    turn = (state.update_revision, state.ready_at, state.last_measured_at)
    return Due(analysis.prometheus.address, analysis.queries, substitutions, state.ready_at, turn)


def adapter_regex(adapter_revision: str) -> str:
    """`$adapters` for one adapter revision: pods of the base model carry no `kiri.dev/adapters` label, and
    Prometheus matches a missing label with ""."""
    return "" if adapter_revision == BASE else adapter_revision


def site_dues(
    spec: ModelDeploymentSpec, namespace: str, status: Mapping[str, Any], now: datetime
) -> dict[str, Due]:
    """site -> the measurement its adapter wave wants now (`status.edge.adapters[].rollout`), judged by the
    same `spec.rollout.analysis` as a revision's wave, on the pods of the wave's adapter revision."""
    analysis = spec.rollout.analysis
    edge = status.get("edge")
    sites = edge.get("adapters") if isinstance(edge, Mapping) else None
    if analysis is None or not isinstance(sites, list):
        return {}
    rollout = status.get("rollout")
    # Adapter waves run only while no revision rolls out: the nodes all run the stable revision.
    revision = rollout.get("stableRevision") if isinstance(rollout, Mapping) else None
    if not isinstance(revision, str) or not revision:
        return {}
    policy = site_policy(spec.rollout)
    out: dict[str, Due] = {}
    for raw in sites:
        try:
            entry = SiteAdapters.model_validate(raw)
        except ValidationError:
            continue  # the planner rebuilds an unreadable entry from the DaemonSets
        state = entry.rollout
        if state is None or not analysis_due(policy, state, now):
            continue
        if state.ready_at is None or state.update_revision is None:
            continue
        substitutions = Substitutions(
            revision=revision,
            namespace=namespace,
            variants=[v.name for v in spec.edge.variants],
            stable_revision=revision,
            adapters=adapter_regex(state.update_revision),
            stable_adapters=adapter_regex(state.stable_revision or BASE),
        )
        turn = (state.update_revision, state.ready_at, state.last_measured_at)
        out[entry.site] = Due(
            analysis.prometheus.address, analysis.queries, substitutions, state.ready_at, turn
        )
    return out


def _take(d: Due, now: datetime) -> Measurement:
    measurement, _ = measure_sync(d.address, d.queries, d.substitutions, d.since, now)
    what = f"revision {d.substitutions.revision}"
    if d.substitutions.adapters != ".*":
        what += f" with adapters {d.substitutions.adapters or BASE}"
    log.info("analysis of %s: %s (%s)", what, measurement.outcome, measurement.message)
    return measurement


def measure_sites_due(
    spec: ModelDeploymentSpec, namespace: str, status: Mapping[str, Any], now: datetime
) -> dict[str, Measurement]:
    """site -> the measurement of its adapter wave that reconcile should hand to the planner now."""
    return {site: _take(d, now) for site, d in site_dues(spec, namespace, status, now).items()}


def measure_due(
    spec: ModelDeploymentSpec, namespace: str, status: Mapping[str, Any], now: datetime
) -> Measurement | None:
    """The measurement reconcile should hand to the planner now, taken here and now; None when none is due."""
    d = due(spec, namespace, status, now)
    return None if d is None else _take(d, now)


class Analyst:
    """Takes the due measurements on threads of its own, so a slow Prometheus holds no reconcile worker.

    `take` is called by each reconcile: it starts the measurement the first time it is due and answers
    "measuring" until it ends; `on_done(key)` (thread-safe: it is called from the analyst's thread) then
    queues the ModelDeployment, and the next reconcile gets the measurement, once. A result for a turn that
    is no longer due (another revision, a new wave, a measurement already applied) is dropped.
    """

    def __init__(
        self,
        on_done: Callable[[tuple[str, str]], None],
        threads: int = 2,
        take: Callable[[Due, datetime], Measurement] = _take,
    ) -> None:
        self._on_done = on_done
        self._take = take
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kiri-analyst")
        self._lock = threading.Lock()
        # (ModelDeployment, subject) -> the measurement being taken; subject "" is the revision's wave,
        # `site:<site>` a site's adapter wave.
        self._running: dict[tuple[tuple[str, str], str], tuple[Due, Future[Measurement]]] = {}

    def take(
        self, key: tuple[str, str], spec: ModelDeploymentSpec, status: Mapping[str, Any], now: datetime
    ) -> tuple[Measurement | None, bool]:
        """(the measurement for the planner or None, whether one is being taken)."""
        return self._turn(key, "", due(spec, key[0], status, now), now)

    def take_sites(
        self, key: tuple[str, str], spec: ModelDeploymentSpec, status: Mapping[str, Any], now: datetime
    ) -> tuple[dict[str, Measurement], frozenset[str]]:
        """The same for each site's adapter wave: (site -> measurement for the planner, sites measuring)."""
        dues = site_dues(spec, key[0], status, now)
        with self._lock:
            gone = [s for k, s in self._running if k == key and s and s[len("site:") :] not in dues]
            for subject in gone:
                self._running.pop((key, subject), None)
        found: dict[str, Measurement] = {}
        measuring: set[str] = set()
        for site, d in sorted(dues.items()):
            measurement, busy = self._turn(key, f"site:{site}", d, now)
            if measurement is not None:
                found[site] = measurement
            if busy:
                measuring.add(site)
        return found, frozenset(measuring)

    def _turn(
        self, key: tuple[str, str], subject: str, d: Due | None, now: datetime
    ) -> tuple[Measurement | None, bool]:
        """One wave's turn: `subject` is "" for the revision's wave, `site:<site>` for a site's adapters."""
        slot = (key, subject)
        with self._lock:
            current = self._running.get(slot)
            if d is None:
                self._running.pop(slot, None)
                return None, False
            if current is not None and current[0].turn == d.turn and current[0].address == d.address:
                future = current[1]
                if not future.done():
                    return None, True
                del self._running[slot]
                try:
                    return future.result(), False
                except Exception as exc:  # a bug in the measuring, not Prometheus: hold, say why
                    log.exception("analysis of %s/%s failed", *key)
                    return Measurement(at=now, outcome="Error", message=f"{type(exc).__name__}: {exc}"), False
            future = self._pool.submit(self._take, d, now)
            self._running[slot] = (d, future)
        future.add_done_callback(lambda _: self._on_done(key))
        return None, True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
