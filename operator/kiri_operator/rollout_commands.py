"""Rollout subcommands: `kiri get`, `kiri status NAME`, `kiri promote|abort|rollback NAME`.

promote, abort and rollback write one annotation (`kiri.dev/promote`, `kiri.dev/abort`,
`kiri.dev/rollback`) whose value is a fresh timestamp: the operator acts once per new value, and the spec,
which GitOps owns, is never touched. `status` renders the rollout as a tree, in the spirit of
`kubectl argo rollouts get rollout`. Rendering is pure (``render_*``) so it is tested without a cluster.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kiri_operator import labels as L

if TYPE_CHECKING:
    from kiri_operator.kube import Credentials, Kube

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
ANNOTATIONS = {"promote": L.PROMOTE, "abort": L.ABORT, "rollback": L.ROLLBACK}


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    get = subparsers.add_parser("get", help="list ModelDeployments with their rollout phase and stage")
    _common(get, name=False)
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.set_defaults(handler=_get)

    status = subparsers.add_parser("status", help="show a ModelDeployment's rollout as a tree")
    _common(status)
    status.add_argument("-w", "--watch", action="store_true", help="redraw every 2 seconds until Ctrl-C")
    status.set_defaults(handler=_status)

    for verb, text in (
        ("promote", "skip the rest of this wave's bake and analysis (or a stage pause) and go on"),
        ("abort", "roll the rollout in progress back to the stable revision now"),
        ("rollback", "go back to the previous stable revision (or abort the rollout in progress)"),
    ):
        sub = subparsers.add_parser(verb, help=text, description=text)
        _common(sub)
        sub.set_defaults(handler=_command, verb=verb)


def _common(sub: argparse.ArgumentParser, name: bool = True) -> None:
    if name:
        sub.add_argument("name", help="ModelDeployment name")
    sub.add_argument("-n", "--namespace", default=None, help="namespace (default: the kubeconfig context's)")
    sub.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)


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
    """The rollout tree: summary, then revision -> variant DaemonSet -> nodes, history and conditions."""
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


# --- handlers (I/O) -----------------------------------------------------------------------------------


@functools.cache
def _credentials(kubeconfig: str | None) -> Credentials:
    """Loaded once per process: the namespace and the connection both need them, and an exec plugin
    should run once."""
    from kiri_operator.kube import load_credentials

    return load_credentials(kubeconfig)


def _kube(args: argparse.Namespace) -> Kube:
    from kiri_operator.kube import Kube

    return Kube.from_credentials(_credentials(args.kubeconfig))


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    from kiri_operator.kube import CredentialsError

    try:
        return str(_credentials(args.kubeconfig).default_namespace or "default")
    except CredentialsError:  # the same error comes again, reported, from _kube
        return "default"


def _fail(message: str) -> int:
    print(f"kiri: {message}", file=sys.stderr)
    return 1


def _get(args: argparse.Namespace) -> int:
    from kiri_operator.api.names import KIND
    from kiri_operator.kube import CredentialsError, KubeError

    try:
        kube = _kube(args)
        items = kube.list(KIND, None if args.all_namespaces else _namespace(args))
    except (CredentialsError, KubeError) as exc:
        return _fail(str(exc))
    print(render_list(items, datetime.now(UTC), namespaces=args.all_namespaces))
    return 0


def _status(args: argparse.Namespace) -> int:
    from kiri_operator.api.names import KIND
    from kiri_operator.kube import CredentialsError, KubeError

    namespace = _namespace(args)
    try:
        kube = _kube(args)
    except CredentialsError as exc:
        return _fail(str(exc))
    while True:
        try:
            md = kube.get(KIND, namespace, args.name)
            if md is None:
                return _fail(f"ModelDeployment {namespace}/{args.name} not found")
            selector = L.md_selector(args.name)
            daemonsets = kube.list("DaemonSet", namespace, selector)
            pods = kube.list("Pod", namespace, selector)
        except KubeError as exc:
            return _fail(str(exc))
        text = render_status(md, daemonsets, pods, datetime.now(UTC))
        if not args.watch:
            print(text)
            return 0
        print("\033[2J\033[H" + text, flush=True)
        try:
            time.sleep(2)
        except KeyboardInterrupt:
            return 0


def _command(args: argparse.Namespace) -> int:
    from kiri_operator.api.names import KIND
    from kiri_operator.kube import CredentialsError, KubeError

    namespace = _namespace(args)
    try:
        kube = _kube(args)
    except CredentialsError as exc:
        return _fail(str(exc))
    try:
        md = kube.get(KIND, namespace, args.name)
        if md is None:
            return _fail(f"ModelDeployment {namespace}/{args.name} not found")
        status = md.get("status") or {}
        rollout = status.get("rollout") or {}
        in_progress = rollout.get("verdict") in ("Progressing", "Holding", "Inconclusive", "Paused")
        if args.verb in ("promote", "abort") and not in_progress:
            phase = status.get("phase", "Pending")
            return _fail(
                f"no rollout in progress for {namespace}/{args.name} (phase {phase}); nothing to {args.verb}"
            )
        # A fresh value every time: the operator acts once per value, so the same command twice acts twice.
        # Hence not `api.scalars.format_time`: its second precision would make two commands in one second
        # one value, and the second would do nothing.
        nonce = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        kube.annotate(KIND, namespace, args.name, {ANNOTATIONS[args.verb]: nonce})
    except KubeError as exc:
        return _fail(str(exc))
    stage = (status.get("edge") or {}).get("stage") or "-"
    print(f"{args.verb}: {namespace}/{args.name} (stage {stage}, {ANNOTATIONS[args.verb]}={nonce})")
    return 0
