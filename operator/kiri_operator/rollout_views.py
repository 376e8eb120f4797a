"""What the rollout commands show, as pure code tested without a cluster: the `kiri get` table, the
`kiri status` tree, kubectl's `-o json|yaml` and `--timeout` spellings, and `kiri wait`'s verdict."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kiri_operator import labels as L

if TYPE_CHECKING:
    from kiri_operator.api.statuses import Phase, SiteAdapters

# `kiri wait`'s exit codes (documented in its --help and docs/gitops.md).
WAIT_REACHED, WAIT_OTHER_END, WAIT_TIMEOUT = 0, 1, 2
ICONS = {
    "Healthy": "✔",
    "Progressing": "◌",
    "Paused": "॥",
    "RolledBack": "↶",
    "Degraded": "✖",
    "Failed": "✖",
    "Compressing": "◌",
    "Pending": "…",
}


# --- pure: durations, formats, wait verdicts -------------------------------------------------------------

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """kubectl's `--timeout` spelling in seconds: `90s`, `5m`, `1h30m`, or a plain number of seconds."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        found = _DURATION.match(text)
        if not text or found is None or not any(found.groups()):
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 5m, 1h30m)") from None
        hours, minutes, seconds = (float(g or 0) for g in found.groups())
        value = hours * 3600 + minutes * 60 + seconds
    if value <= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r}")
    return value


def dump(obj: Any, output: str) -> str:
    """`obj` as `kubectl -o json|yaml` prints it."""
    if output == "json":
        return json.dumps(obj, indent=4)
    import yaml

    return str(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)).rstrip("\n")


def as_list(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several objects as kubectl prints them: one `v1` List."""
    return {"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {"resourceVersion": ""}}


def wait_verdict(md: Mapping[str, Any], wait_for: str) -> tuple[int | None, str]:
    """Whether `kiri wait --for=wait_for` is over for this object: (WAIT_REACHED or WAIT_OTHER_END, why), or
    (None, why not yet). An end state counts only once the operator has observed the object's generation;
    `Stalled` and `Reconciling` are read as kstatus reads them, and `phase` for objects an operator older
    than those conditions wrote."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    phase = str(status.get("phase") or "Pending")
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if not status or (generation is not None and observed != generation):
        return None, f"waiting for the operator to observe generation {generation}"

    def true(type_: str) -> bool:
        return (conditions.get(type_) or {}).get("status") == "True"

    def said(type_: str) -> str:
        c = conditions.get(type_) or {}
        return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")

    if true("RolledBack") and (true("Stalled") or phase == "RolledBack"):
        message = f"rolled back to {status.get('currentRevision')} ({said('RolledBack')})"
        return (WAIT_REACHED if wait_for == "rolledback" else WAIT_OTHER_END), message
    if true("Stalled") or phase in ("Failed", "Degraded"):
        return WAIT_OTHER_END, f"{phase}: {said('Stalled') or said('Ready')}"
    if true("Ready") and not true("Reconciling") and phase == "Healthy":
        message = f"healthy: revision {status.get('currentRevision')} serving everywhere"
        return (WAIT_REACHED if wait_for == "healthy" else WAIT_OTHER_END), message
    return None, f"{phase}: {said('Reconciling') or said('Ready')}"


# --- pure rendering -----------------------------------------------------------------------------------


def _parse(ts: str | None) -> datetime | None:
    # Any RFC 3339 time, not only `api.scalars.parse_time`'s second-precision one: the annotations of
    # promote, abort and rollback carry microseconds.
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(ts: str | datetime | None, now: datetime) -> str:
    """`kubectl`-style age: 45s, 3m12s, 2h5m, 4d."""
    then = ts if isinstance(ts, datetime) else _parse(ts)
    if then is None:
        return "-"
    s = max(0, int((now - then).total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render_list(items: Sequence[Mapping[str, Any]], now: datetime, namespaces: bool = False) -> str:
    """`kiri get`'s table. ADAPTERS, shown when some ModelDeployment has per-site adapters, counts the sites
    that serve the adapter revision the spec asks of them, out of the sites with adapters."""
    adapters = any(((md.get("status") or {}).get("edge") or {}).get("adapters") for md in items)
    header = [
        *(["NAMESPACE"] if namespaces else []),
        "NAME",
        "PHASE",
        "STAGE",
        "UPDATED",
        "READY",
        "TARGET",
        *(["ADAPTERS"] if adapters else []),
        "AGE",
    ]
    rows = [header]
    for md in items:
        meta, status = md.get("metadata") or {}, md.get("status") or {}
        edge = status.get("edge") or {}
        rows.append(
            [
                *([str(meta.get("namespace", ""))] if namespaces else []),
                str(meta.get("name", "")),
                str(status.get("phase", "Pending")),
                str(edge.get("stage") or "-"),
                str(edge.get("updatedNodes", 0)),
                str(edge.get("readyNodes", 0)),
                str(edge.get("targetNodes", 0)),
                *([_sites_serving(edge.get("adapters") or [])] if adapters else []),
                age(meta.get("creationTimestamp"), now),
            ]
        )
    if len(rows) == 1:
        return "No ModelDeployments found."
    return _table(rows)


def _sites_serving(sites: Sequence[Mapping[str, Any]]) -> str:
    if not sites:
        return "-"
    serving = sum(1 for s in sites if s.get("revision") == s.get("updateRevision"))
    return f"{serving}/{len(sites)}"


def _short(revision: str | None) -> str:
    return revision or "-"


def render_status(
    md: Mapping[str, Any],
    daemonsets: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    node_sites: Mapping[str, str] | None = None,
    site: str | None = None,
) -> str:
    """The rollout tree: summary, then revision -> variant DaemonSet -> nodes, each site's adapter wave
    (`render_sites`; only `site`'s with one), history and conditions."""
    meta, spec, status = md.get("metadata") or {}, md.get("spec") or {}, md.get("status") or {}
    edge, rollout = status.get("edge") or {}, status.get("rollout") or {}
    rollout_spec = spec.get("rollout") or {}
    phase = str(status.get("phase", "Pending"))
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    progressing = conditions.get("EdgeProgressing") or {}
    stable = rollout.get("stableRevision") or status.get("currentRevision")
    update = status.get("updateRevision")
    stages = rollout_spec.get("stages") or [{"percent": 100}]
    strategy = f"{len(stages)} stages"
    if rollout_spec.get("groupBy"):
        strategy += f", site by site ({rollout_spec['groupBy']})"
    if rollout_spec.get("paused"):
        strategy += ", paused"
    lines = [
        f"Name:          {meta.get('name', '')}",
        f"Namespace:     {meta.get('namespace', '')}",
        f"Status:        {ICONS.get(phase, '?')} {phase}",
    ]
    message = progressing.get("message") or rollout.get("message")
    if message:
        lines.append(f"Message:       {progressing.get('reason', '')}: {message}")
    lines += [
        f"Strategy:      waves: {strategy}",
        f"  Stage:       {edge.get('stage') or '-'} (started {age(edge.get('stageStartedAt'), now)} ago)",
        f"  Nodes:       {edge.get('updatedNodes', 0)} updated, {edge.get('readyNodes', 0)} ready, "
        f"{edge.get('targetNodes', 0)} target, {edge.get('deferredNodes', 0)} offline",
        f"Revisions:     stable {_short(stable)}, update {_short(update)}",
    ]
    if rollout.get("rolledBackRevisions"):
        lines.append(f"  Rolled back: {', '.join(rollout['rolledBackRevisions'])} (not rolled out again)")
    analysis = rollout_spec.get("analysis")
    if analysis:
        names = ", ".join(q.get("name", "") for q in analysis.get("queries") or [])
        lines.append(f"Analysis:      {analysis.get('prometheus', {}).get('address', '')}: {names}")

    pods_by_node: dict[tuple[str, str], Mapping[str, Any]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            pods_by_node[(labels.get(L.REVISION, ""), node)] = pod
    by_revision: dict[str, list[tuple[str, list[str]]]] = {}
    for ds in sorted(daemonsets, key=lambda d: str((d.get("metadata") or {}).get("name"))):
        labels = (ds.get("metadata") or {}).get("labels") or {}
        revision, variant = labels.get(L.REVISION, "?"), labels.get(L.VARIANT, "?")
        if labels.get(L.ADAPTERS):
            variant += f" + adapters {labels[L.ADAPTERS]}"
        by_revision.setdefault(revision, []).append((variant, _affinity_nodes(ds)))
    lines += ["", "REVISION / VARIANT / NODE                        POD"]
    order = sorted(by_revision, key=lambda r: (r != update, r != stable, r))
    for revision in order:
        tags = [t for t, r in (("update", update), ("stable", stable)) if r == revision]
        lines.append(f"⟳ {revision}" + (f" ({', '.join(tags)})" if tags else ""))
        variants = by_revision[revision]
        for vi, (variant, nodes) in enumerate(variants):
            last_variant = vi == len(variants) - 1
            lines.append(f"{'└' if last_variant else '├'}── {variant}  {len(nodes)} node(s)")
            for ni, node in enumerate(nodes):
                found = pods_by_node.get((revision, node))
                lines.append(
                    f"{' ' if last_variant else '│'}   {'└' if ni == len(nodes) - 1 else '├'}── "
                    f"{node.ljust(32)} {_pod_state(found)}"
                )
    if edge.get("adapters"):
        lines += ["", *render_sites(md, daemonsets, pods, now, node_sites, site)]
    history = status.get("history") or []
    if history:
        lines += ["", "HISTORY"]
        rows = [["TIME", "REVISION", "MODEL", "OUTCOME", "REASON"]]
        rows += [
            [
                str(h.get("time", "")),
                str(h.get("revision", "")),
                str(h.get("modelVersion", "")),
                str(h.get("outcome", "")),
                str(h.get("reason", "")),
            ]
            for h in history
        ]
        lines.append(_table(rows))
    if conditions:
        lines += ["", "CONDITIONS"]
        rows = [["TYPE", "STATUS", "REASON", "AGE"]]
        rows += [
            [
                str(t),
                str(c.get("status", "")),
                str(c.get("reason", "")),
                age(c.get("lastTransitionTime"), now),
            ]
            for t, c in conditions.items()
        ]
        lines.append(_table(rows))
    return "\n".join(lines)


def _affinity_nodes(ds: Mapping[str, Any]) -> list[str]:
    from kiri_operator.planning.building import affinity_nodes

    return affinity_nodes(ds)


def _pod_state(pod: Mapping[str, Any] | None) -> str:
    if pod is None:
        return "-"
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
    text = "✔ Ready" if ready else f"◌ {status.get('phase', 'Pending')}, not Ready"
    return text + (f" ({restarts} restarts)" if restarts else "")


# --- per-site adapter waves (status.edge.adapters) ------------------------------------------------------

DEFAULT_SITE_LABEL = "kiri.dev/site"
BASE = "base"
"""The adapter revision of a site with no adapter (`planning.adapting.BASE`)."""
# A site's wave is the fixed two-step policy of `planning.adapting.site_policy`.
SITE_STEPS = ("canary node", "rest of the site")
# Node names shown per adapter revision of a site; the rest are counted.
SITE_NODE_NAMES = 8


def site_label_of(md: Mapping[str, Any]) -> str:
    """The node label that names a node's site: `spec.learning.siteLabel`, else `kiri.dev/site`."""
    learning = (md.get("spec") or {}).get("learning") or {}
    return str(learning.get("siteLabel") or DEFAULT_SITE_LABEL)


def find_site(md: Mapping[str, Any], site: str) -> tuple[dict[str, Any] | None, str]:
    """(`status.edge.adapters[]` of `site`, "") or (None, why there is none)."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    entries = [s for s in (status.get("edge") or {}).get("adapters") or [] if isinstance(s, dict)]
    for entry in entries:
        if entry.get("site") == site:
            return entry, ""
    known = ", ".join(sorted(str(s.get("site")) for s in entries)) or "none"
    what = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    return None, f"{what} has no adapters for site {site} (sites with adapters: {known})"


def site_phase(entry: SiteAdapters) -> Phase:
    """A site's adapter wave in the ModelDeployment's phase words: `Progressing` while a wave is in flight,
    `Paused`, `RolledBack` (the site went back to its stable set), `Degraded` (the held-out gates refused
    the set the spec asks), `Pending` (a new set waits: the update policy or a revision rollout), `Healthy`
    (the site serves what the spec asks)."""
    from kiri_operator.conditions import Reason

    flying = entry.rollout is not None and entry.rollout.in_progress
    if entry.verdict == "Paused":
        return "Paused"
    if entry.verdict == "RolledBack":
        return "RolledBack"
    if entry.reason in (Reason.ADAPTER_WORSE_THAN_BASE, Reason.ADAPTER_HURTS_OTHER_SITES):
        return "Degraded"
    if flying or entry.verdict in ("Progressing", "Holding", "Inconclusive"):
        return "Progressing"
    if entry.verdict == "Completed":
        return "Healthy"
    return "Pending"


def _update_state(entry: SiteAdapters, phase: Phase) -> str:
    """What became of the adapter revision the spec asks of the site."""
    wave = entry.rollout
    if entry.update_revision == entry.revision:
        return "serving"
    if wave is not None and wave.in_progress and wave.update_revision == entry.update_revision:
        return "updating"
    if wave is not None and entry.update_revision in wave.rolled_back_revisions:
        return "rolled back"
    if phase == "Degraded":
        return "refused"
    from kiri_operator.conditions import Reason

    waiting = {
        Reason.UPDATE_DEFERRED: "deferred by updatePolicy",
        Reason.WAITING_FOR_REVISION_ROLLOUT: "waiting for the revision rollout",
    }
    return waiting.get(entry.reason, "not rolled out")


def _nodes_by_adapters(
    daemonsets: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[str, bool]]:
    """node -> (the adapter revision of the DaemonSet it is pinned to, whether that pod is Ready)."""
    ready: dict[tuple[str, str], bool] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            conditions = (pod.get("status") or {}).get("conditions") or []
            ok = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            key = (labels.get(L.ADAPTERS) or BASE, node)
            ready[key] = ready.get(key, False) or ok
    out: dict[str, tuple[str, bool]] = {}
    for ds in daemonsets:
        revision = ((ds.get("metadata") or {}).get("labels") or {}).get(L.ADAPTERS) or BASE
        for node in _affinity_nodes(ds):
            out[node] = (revision, ready.get((revision, node), False))
    return out


def _node_names(nodes: Sequence[tuple[str, bool]]) -> str:
    shown = [n + ("" if ok else " (not Ready)") for n, ok in nodes[:SITE_NODE_NAMES]]
    more = len(nodes) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def render_site(
    entry: SiteAdapters,
    now: datetime,
    nodes: Mapping[str, tuple[str, bool]] | None = None,
) -> list[str]:
    """One site's adapter wave, as `kubectl argo rollouts get rollout` shows a rollout: status, message,
    adapters, revisions, wave step, nodes and the last wave's end. `nodes` (node -> (adapter revision,
    Ready)) are this site's nodes, when the caller could tell which nodes are the site's."""
    wave = entry.rollout
    phase = site_phase(entry)
    flying = wave is not None and wave.in_progress
    lines = [f"Site:          {entry.site}", f"  Status:      {ICONS.get(phase, '?')} {phase}"]
    if entry.reason or entry.message:
        lines.append(f"  Message:     {': '.join(t for t in (entry.reason, entry.message) if t)}")
    if entry.adapters:
        default = f"default {entry.default}" if entry.default else "no default: the bare name gets the base"
        lines.append(f"  Adapters:    {', '.join(entry.adapters)} ({default})")
    else:
        lines.append("  Adapters:    none (the base model)")
    revisions = f"stable {_short(entry.revision)}"
    if entry.update_revision != entry.revision:
        revisions += f", update {_short(entry.update_revision)} ({_update_state(entry, phase)})"
    if wave is not None and flying and wave.update_revision != entry.update_revision:
        revisions += f", wave of {_short(wave.update_revision)} in flight"
    lines.append(f"  Revisions:   {revisions}, previous {_short(entry.previous_revision)}")
    if wave is not None and flying:
        step = min(wave.stage, len(SITE_STEPS) - 1)
        lines.append(
            f"  Step:        {step + 1}/{len(SITE_STEPS)}: {SITE_STEPS[step]} "
            f"(started {age(wave.step_started_at, now)} ago)"
        )
    lines.append(f"  Nodes:       {entry.updated_nodes} of {entry.nodes} on {_short(entry.update_revision)}")
    if nodes:
        by_revision: dict[str, list[tuple[str, bool]]] = {}
        for node, (revision, ready) in sorted(nodes.items()):
            by_revision.setdefault(revision, []).append((node, ready))
        wave_revision = wave.update_revision if wave is not None and flying else entry.update_revision
        order = sorted(by_revision, key=lambda r: (r != wave_revision, r != entry.revision, r))
        for revision in order:
            tags = ["update"] if revision == wave_revision != entry.revision else []
            tags += ["stable"] if revision == entry.revision else []
            tag = f" ({', '.join(tags)})" if tags else ""
            lines.append(f"    ⟳ {revision}{tag}: {_node_names(by_revision[revision])}")
    if wave is not None and wave.rolled_back_revisions:
        lines.append(f"  Rolled back: {', '.join(wave.rolled_back_revisions)} (not rolled out again)")
    if wave is not None and wave.history:
        last = wave.history[-1]
        lines.append(f"  Last wave:   {last.revision} {last.outcome} ({last.reason}) {age(last.at, now)} ago")
    return lines


def render_sites(
    md: Mapping[str, Any],
    daemonsets: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
    node_sites: Mapping[str, str] | None = None,
    site: str | None = None,
) -> list[str]:
    """The SITES section of `kiri status`: each site's adapter wave (`status.edge.adapters`), or only
    `site`'s. `node_sites` (node -> its site label's value) lets each site list its nodes by the adapter
    revision they run; without it the counts of the status stand alone."""
    from pydantic import ValidationError

    from kiri_operator.api.statuses import SiteAdapters

    lines = ["SITES (adapter waves: one canary node, then the rest of the site)"]
    entries = ((md.get("status") or {}).get("edge") or {}).get("adapters") or []
    by_node = _nodes_by_adapters(daemonsets, pods) if node_sites is not None else {}
    for raw in entries:
        if site is not None and raw.get("site") != site:
            continue
        try:
            entry = SiteAdapters.model_validate(raw)
        except ValidationError as exc:
            lines.append(
                f"Site:          {raw.get('site', '?')}: unreadable status ({exc.error_count()} errors)"
            )
            continue
        mine = None
        if node_sites is not None:
            mine = {n: v for n, v in by_node.items() if node_sites.get(n) == entry.site}
        lines += [*([""] if len(lines) > 1 else []), *render_site(entry, now, mine)]
    return lines
