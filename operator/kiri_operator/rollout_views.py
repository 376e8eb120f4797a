"""What the rollout commands show, as pure code tested without a cluster: the `kiri get` table, the
`kiri status` tree, kubectl's `-o json|yaml` and `--timeout` spellings, and `kiri wait`'s verdict."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from kiri_operator import labels as L

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


def age(ts: str | None, now: datetime) -> str:
    """`kubectl`-style age: 45s, 3m12s, 2h5m, 4d."""
    then = _parse(ts)
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
    header = [
        *(["NAMESPACE"] if namespaces else []),
        "NAME",
        "PHASE",
        "STAGE",
        "UPDATED",
        "READY",
        "TARGET",
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
                age(meta.get("creationTimestamp"), now),
            ]
        )
    if len(rows) == 1:
        return "No ModelDeployments found."
    return _table(rows)


def _short(revision: str | None) -> str:
    return revision or "-"


def render_status(
    md: Mapping[str, Any],
    daemonsets: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    now: datetime,
) -> str:
    """The rollout tree: summary, then revision -> variant DaemonSet -> nodes, each site's adapters, history
    and conditions."""
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
    sites = edge.get("adapters") or []
    if sites:
        lines += ["", "ADAPTERS"]
        rows = [["SITE", "SERVING", "PREVIOUS", "UPDATE", "NODES", "VERDICT", "REASON"]]
        rows += [
            [
                str(a.get("site", "")),
                _short(a.get("revision")),
                _short(a.get("previousRevision")),
                _short(a.get("updateRevision")),
                f"{a.get('updatedNodes', 0)}/{a.get('nodes', 0)}",
                str(a.get("verdict") or "-"),
                str(a.get("reason") or "-"),
            ]
            for a in sites
        ]
        lines.append(_table(rows))
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
