"""Rollout subcommands: `kiri get`, `kiri status NAME`, `kiri wait NAME`, `kiri promote|abort|rollback NAME`.

The same commands run as a kubectl plugin (`kubectl kiri ...`, the `kubectl-kiri` entry point), so the
cluster flags are kubectl's: `--kubeconfig`, `--context`, `-n/--namespace`, `-A/--all-namespaces`, and
`-o json|yaml` prints the objects as kubectl would. `status -w` and `wait` follow the object with a WATCH.

promote, abort and rollback write one annotation (`kiri.dev/promote`, `kiri.dev/abort`,
`kiri.dev/rollback`) whose value is a fresh timestamp: the operator acts once per new value, and the spec,
which GitOps owns, is never touched. With `--site SITE` they act on that site's adapter wave instead, through
`<verb>.adapters.kiri.dev/<site>` (one key per site and verb). `status` renders the rollout as a tree, in the spirit of
`kubectl argo rollouts get rollout`. Rendering is pure (``render_*``) so it is tested without a cluster.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kiri_operator import labels as L
from kiri_operator.rollout_views import (
    WAIT_OTHER_END,
    WAIT_REACHED,
    WAIT_TIMEOUT,
    as_list,
    dump,
    find_site,
    parse_duration,
    render_list,
    render_status,
    site_label_of,
    wait_verdict,
)

if TYPE_CHECKING:
    from kiri_operator.kube import Credentials, Kube

ANNOTATIONS = {"promote": L.PROMOTE, "abort": L.ABORT, "rollback": L.ROLLBACK}
WAIT_FOR = ("healthy", "rolledback")
WAIT_EPILOG = """exit codes:
  0  the ModelDeployment reached the state asked for (its current generation observed)
  1  it reached another end state: rolled back, failed or degraded (Stalled) while waiting for healthy;
     healthy, failed or degraded while waiting for rolledback; or it is not found or was deleted
  2  the timeout passed first, or the command line is wrong"""


SITE_EPILOG = """--site SITE acts on one site's adapter wave (spec.edge.adapters), the revision left alone:
  promote   skip the bake and analysis of the site's current step
  abort     the site back to its stable adapter set now, held there until the spec changes
  rollback  the site back to its previous adapter set (or, mid-wave, as abort)"""
# A site label's value, as an annotation key's name part (`<verb>.adapters.kiri.dev/<site>`).
_SITE_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
IN_PROGRESS = ("Progressing", "Holding", "Inconclusive", "Paused")


def command_annotation(md: dict[str, Any], verb: str, site: str | None) -> tuple[str, str | None]:
    """(the annotation key that carries `verb`, or why it is refused). Pure: the handler writes the key."""
    meta = md.get("metadata") or {}
    what = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    status = md.get("status") or {}
    if site is None:
        rollout = status.get("rollout") or {}
        if verb in ("promote", "abort") and rollout.get("verdict") not in IN_PROGRESS:
            phase = status.get("phase", "Pending")
            return ANNOTATIONS[verb], f"no rollout in progress for {what} (phase {phase}); nothing to {verb}"
        return ANNOTATIONS[verb], None
    key = L.SITE_COMMANDS[verb] + site
    if not _SITE_NAME.match(site):
        return key, f"{site!r} is not a site label value (at most 63 letters, digits, '-', '_' or '.')"
    entry, why = find_site(md, site)
    if entry is None:
        return key, why
    wave = entry.get("rollout") or {}
    flying = wave.get("verdict") in IN_PROGRESS
    if verb in ("promote", "abort") and not flying:
        return key, (
            f"no adapter wave in progress on site {site} of {what} "
            f"(verdict {entry.get('verdict') or 'none'}); nothing to {verb}"
        )
    if verb == "rollback" and not flying and not entry.get("previousRevision"):
        return key, f"site {site} of {what} has no previous adapter set to roll back to"
    return key, None


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    get = subparsers.add_parser("get", help="list ModelDeployments with their rollout phase and stage")
    _common(get, name=False)
    get.add_argument("-A", "--all-namespaces", action="store_true", help="list across all namespaces")
    _output(get)
    get.set_defaults(handler=_get)

    status = subparsers.add_parser("status", help="show a ModelDeployment's rollout as a tree")
    _common(status)
    status.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="redraw at each change of the object (a watch) until Ctrl-C",
    )
    status.add_argument(
        "--site",
        default=None,
        help="show only this site's adapter wave (status.edge.adapters); with -o, print that site's entry",
    )
    _output(status)
    status.set_defaults(handler=_status)

    wait = subparsers.add_parser(
        "wait",
        help="block until a ModelDeployment is healthy (or rolled back); the exit code says which",
        description="Follow a ModelDeployment (a watch) until its current generation is healthy or rolled "
        "back, as kstatus reads it (Flux's health checks): Ready with nothing reconciling, or Stalled.",
        epilog=WAIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(wait)
    wait.add_argument(
        "--for", dest="wait_for", choices=WAIT_FOR, default="healthy", help="the state to wait for"
    )
    wait.add_argument(
        "--timeout", type=parse_duration, default=parse_duration("5m"), help="how long, e.g. 90s, 5m, 1h (5m)"
    )
    wait.set_defaults(handler=_wait)

    for verb, text in (
        ("promote", "skip the rest of this wave's bake and analysis (or a stage pause) and go on"),
        ("abort", "roll the rollout in progress back to the stable revision now"),
        ("rollback", "go back to the previous stable revision (or abort the rollout in progress)"),
    ):
        sub = subparsers.add_parser(
            verb,
            help=text,
            description=text,
            epilog=SITE_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sub)
        sub.add_argument(
            "--site",
            default=None,
            help="act on this site's adapter wave (status.edge.adapters) instead of the revision's rollout",
        )
        sub.set_defaults(handler=_command, verb=verb)


def _common(sub: argparse.ArgumentParser, name: bool = True) -> None:
    if name:
        sub.add_argument("name", help="ModelDeployment name")
    sub.add_argument("-n", "--namespace", default=None, help="namespace (default: the kubeconfig context's)")
    sub.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG") or None, help="kubeconfig file(s) (KUBECONFIG)"
    )
    sub.add_argument(
        "--context", default=None, help="the kubeconfig context to use (default: its current one)"
    )


def _output(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-o",
        "--output",
        choices=("json", "yaml"),
        default=None,
        help="print the object(s), as kubectl -o does",
    )


# --- handlers (I/O) -----------------------------------------------------------------------------------


@functools.cache
def _credentials(kubeconfig: str | None, context: str | None = None) -> Credentials:
    """Loaded once per process: the namespace and the connection both need them, and an exec plugin
    should run once."""
    from kiri_operator.kube import load_credentials

    return load_credentials(kubeconfig, context)


def _kube(args: argparse.Namespace) -> Kube:
    from kiri_operator.kube import Kube

    return Kube.from_credentials(_credentials(args.kubeconfig, args.context))


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    from kiri_operator.kube import CredentialsError

    try:
        return str(_credentials(args.kubeconfig, args.context).default_namespace or "default")
    except CredentialsError:  # the same error comes again, reported, from _kube
        return "default"


def _fail(message: str, code: int = 1) -> int:
    print(f"kiri: {message}", file=sys.stderr)
    return code


def _get(args: argparse.Namespace) -> int:
    from kiri_operator.api.names import KIND
    from kiri_operator.kube import CredentialsError, KubeError

    try:
        kube = _kube(args)
        items = kube.list(KIND, None if args.all_namespaces else _namespace(args))
    except (CredentialsError, KubeError) as exc:
        return _fail(str(exc))
    if args.output:
        print(dump(as_list(items), args.output))
    else:
        print(render_list(items, datetime.now(UTC), namespaces=args.all_namespaces))
    return 0


def _follow(kube: Kube, namespace: str, name: str, until: float | None) -> Iterator[dict[str, Any] | None]:
    """The ModelDeployment now, then again at each change (a WATCH from its resourceVersion, started again
    when the server ends it, and from the current state after a 410 Gone), and once more at each watch's end
    (so ages redraw); None when it is gone. Ends at `until` (time.monotonic()), or never."""
    from kiri_operator.api.names import KIND

    md = kube.get(KIND, namespace, name)
    yield md
    version = ((md or {}).get("metadata") or {}).get("resourceVersion")
    while until is None or time.monotonic() < until:
        left = 60.0 if until is None else min(60.0, until - time.monotonic())
        for kind, obj in kube.watch(
            KIND, namespace, name=name, resource_version=version, timeout_seconds=max(1, math.ceil(left))
        ):
            if kind == "ERROR":  # the version is too old: from the current state again
                version = None
                break
            version = (obj.get("metadata") or {}).get("resourceVersion")
            md = None if kind == "DELETED" else obj
            yield md
            if until is not None and time.monotonic() >= until:
                return
        else:
            yield md


def _status(args: argparse.Namespace) -> int:
    from kiri_operator.kube import CredentialsError, KubeError

    namespace = _namespace(args)
    try:
        kube = _kube(args)
    except CredentialsError as exc:
        return _fail(str(exc))
    try:
        for md in _follow(kube, namespace, args.name, None):
            if md is None:
                return _fail(f"ModelDeployment {namespace}/{args.name} not found")
            shown: dict[str, Any] = md
            if args.site is not None:
                entry, why = find_site(md, args.site)
                if entry is None:
                    return _fail(why)
                shown = entry
            if args.output:
                print(dump(shown, args.output), flush=True)
                if not args.watch:
                    return 0
                continue
            selector = L.md_selector(args.name)
            daemonsets = kube.list("DaemonSet", namespace, selector)
            pods = kube.list("Pod", namespace, selector)
            text = render_status(md, daemonsets, pods, datetime.now(UTC), _node_sites(kube, md), args.site)
            if not args.watch:
                print(text)
                return 0
            print("\033[2J\033[H" + text, flush=True)
    except KubeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 0
    return 0


def _node_sites(kube: Kube, md: dict[str, Any]) -> dict[str, str] | None:
    """node -> its site, for the sites section to list each site's nodes; None without adapters, or where
    the user may not list Nodes (the section then shows the status's counts alone)."""
    from kiri_operator.kube import KubeError

    if not ((md.get("status") or {}).get("edge") or {}).get("adapters"):
        return None
    label = site_label_of(md)
    try:
        nodes = kube.list("Node", None, label)
    except KubeError:
        return None
    return {
        str(meta.get("name")): str((meta.get("labels") or {}).get(label, ""))
        for meta in (n.get("metadata") or {} for n in nodes)
    }


def _wait(args: argparse.Namespace) -> int:
    from kiri_operator.kube import CredentialsError, KubeError

    namespace = _namespace(args)
    what = f"ModelDeployment {namespace}/{args.name}"
    try:
        kube = _kube(args)
    except CredentialsError as exc:
        return _fail(str(exc))
    until = time.monotonic() + args.timeout
    why = "no answer yet"
    try:
        for md in _follow(kube, namespace, args.name, until):
            if md is None:
                return _fail(f"{what} not found", WAIT_OTHER_END)
            code, why = wait_verdict(md, args.wait_for)
            if code == WAIT_REACHED:
                print(f"{what}: {why}")
                return WAIT_REACHED
            if code is not None:
                return _fail(f"{what} will not be {args.wait_for}: {why}", code)
    except KubeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return WAIT_TIMEOUT
    return _fail(
        f"timed out after {args.timeout:g}s waiting for {what} to be {args.wait_for} ({why})", WAIT_TIMEOUT
    )


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
        md = {**md, "metadata": {**(md.get("metadata") or {}), "namespace": namespace, "name": args.name}}
        key, refusal = command_annotation(md, args.verb, args.site)
        if refusal is not None:
            return _fail(refusal)
        # A fresh value every time: the operator acts once per value, so the same command twice acts twice.
        # Hence not `api.scalars.format_time`: its second precision would make two commands in one second
        # one value, and the second would do nothing.
        nonce = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        kube.annotate(KIND, namespace, args.name, {key: nonce})
    except KubeError as exc:
        return _fail(str(exc))
    status = md.get("status") or {}
    if args.site is not None:
        print(f"{args.verb}: {namespace}/{args.name} site {args.site} ({key}={nonce})")
        return 0
    stage = (status.get("edge") or {}).get("stage") or "-"
    print(f"{args.verb}: {namespace}/{args.name} (stage {stage}, {key}={nonce})")
    return 0
