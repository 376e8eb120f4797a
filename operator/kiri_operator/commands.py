"""Operator-side subcommands: `kiri operator` and `kiri publish-manifest`.

Each handler imports its implementation lazily, so `kiri --help` stays fast. (Rollout commands such as
promote, abort and status live in their own registrar module.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    op = subparsers.add_parser(
        "operator",
        help="run the Kiri operator against the current KUBECONFIG",
        description="Reconcile ModelDeployments into cloud Deployments, compression Jobs and edge DaemonSets.",
    )
    op.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: all namespaces)",
    )
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    op.add_argument(
        "--standalone",
        action="store_true",
        help="accepted for kopf compatibility; Kiri always runs without peering objects",
    )
    op.add_argument("--workers", type=int, default=4, help="ModelDeployments reconciled in parallel")
    op.add_argument("--resync-seconds", type=float, default=60.0, help="periodic re-reconcile of everything")
    op.add_argument(
        "--status-progress-seconds",
        type=float,
        default=10.0,
        help="write a status change of progress figures alone (counts, messages) at most this often "
        "per ModelDeployment; phase, conditions, revisions and steps are written at once (0: always at once)",
    )
    op.add_argument(
        "--compression-deadline", type=int, default=3600, help="activeDeadlineSeconds of compression Jobs"
    )
    op.add_argument(
        "--manifest-grace",
        type=float,
        default=120.0,
        help="seconds a completed compression Job may take to have its manifest appear before it counts as failed",
    )
    op.add_argument(
        "--allowed-prometheus",
        action="append",
        default=None,
        metavar="URL[,URL...]",
        help="the only Prometheus base URLs an analysis may name (repeatable, or comma-separated; an empty "
        "value allows none); other addresses are refused with Ready=False/PrometheusNotAllowed "
        "(default: $KIRI_ALLOWED_PROMETHEUS, else http://prometheus-operated.monitoring.svc:9090)",
    )
    op.add_argument(
        "--clock-offset-seconds",
        type=float,
        default=0.0,
        help="fault injection for tests: run the operator's clock this far ahead (negative: behind) of "
        "the machine's, as a node whose clock is off the API server's would",
    )
    op.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    op.add_argument("--log-level", default="INFO")
    op.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    op.add_argument(
        "--compressor-service-account",
        default="kiri-compressor",
        help="ServiceAccount of compression and learning Jobs, made by the chart or an admin in each "
        "namespace (default: %(default)s)",
    )
    op.add_argument(
        "--create-compressor-rbac",
        action="store_true",
        help="make a ServiceAccount, Role and RoleBinding per ModelDeployment for its Jobs instead (needs "
        "create on serviceaccounts, roles and rolebindings; the chart grants it only when asked)",
    )
    election = op.add_argument_group(
        "leader election",
        "Run several replicas: the one holding a coordination.k8s.io Lease reconciles, the others watch and "
        "stand by (kube-controller-manager's flags and defaults).",
    )
    election.add_argument(
        "--leader-elect", action="store_true", help="take part in leader election before reconciling"
    )
    election.add_argument(
        "--leader-elect-resource-name",
        default="kiri-operator",
        help="name of the Lease (default: %(default)s)",
    )
    election.add_argument(
        "--leader-elect-resource-namespace",
        default=os.environ.get("KIRI_OPERATOR_NAMESPACE") or None,
        help="namespace of the Lease (default: $KIRI_OPERATOR_NAMESPACE, which the chart sets)",
    )
    election.add_argument(
        "--leader-elect-lease-duration",
        type=float,
        default=15.0,
        help="seconds a standby waits, after it last saw the Lease renewed, before taking it (default: %(default)s)",
    )
    election.add_argument(
        "--leader-elect-renew-deadline",
        type=float,
        default=10.0,
        help="seconds the leader keeps acting without a successful renew; below the lease duration, so a "
        "leader that cannot renew stops writing before a standby may take over (default: %(default)s)",
    )
    election.add_argument(
        "--leader-elect-retry-period",
        type=float,
        default=2.0,
        help="seconds between tries to take or renew the Lease (default: %(default)s)",
    )
    op.set_defaults(handler=_operator)

    pub = subparsers.add_parser(
        "publish-manifest",
        help="publish a compression manifest as a ConfigMap (the compression Job's last step)",
    )
    pub.add_argument("--namespace", required=True)
    pub.add_argument("--name", required=True, help="ConfigMap name")
    pub.add_argument("--manifest", required=True, help="manifest.json written by `kiri compress`")
    pub.add_argument("--compression", required=True, help="compression key (label kiri.dev/compression)")
    pub.add_argument("--owner-name", help="ModelDeployment that owns the ConfigMap")
    pub.add_argument("--owner-uid")
    pub.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    pub.set_defaults(handler=_publish)


def _operator(args: argparse.Namespace) -> int:
    # kopf imports the kubernetes client only to recognise its types, Kiri talks httpx: ~10 MiB less RSS.
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
    from kiri_operator import handlers
    from kiri_operator.kube.leasing import Timing
    from kiri_operator.memos import Config, LeaderElection
    from kiri_operator.planning import Settings
    from kiri_operator.planning.settings import DEFAULT_PROMETHEUS

    election = None
    if args.leader_elect:
        if not args.leader_elect_resource_namespace:
            print(
                "kiri operator: --leader-elect needs --leader-elect-resource-namespace "
                "(or $KIRI_OPERATOR_NAMESPACE)",
                file=sys.stderr,
            )
            return 2
        try:
            timing = Timing(
                args.leader_elect_lease_duration,
                args.leader_elect_renew_deadline,
                args.leader_elect_retry_period,
            )
        except ValueError as exc:
            print(f"kiri operator: {exc}", file=sys.stderr)
            return 2
        election = LeaderElection(
            args.leader_elect_resource_namespace, args.leader_elect_resource_name, timing
        )

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kiri_runtime import redaction

    redaction.install()  # httpx logs full URLs (Prometheus, the API server); no credential may reach a log
    # kopf logs every handled watch event at INFO; with a fleet of nodes that drowns Kiri's own lines.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = Config(
        namespaces=list(args.namespace),
        metrics_port=args.metrics_port or None,
        workers=args.workers,
        resync_seconds=args.resync_seconds,
        status_progress_seconds=args.status_progress_seconds,
        kubeconfig=args.kubeconfig,
        liveness=args.liveness,
        clock_offset_seconds=args.clock_offset_seconds,
        leader_election=election,
        settings=Settings(
            compression_deadline_seconds=args.compression_deadline,
            manifest_grace_seconds=args.manifest_grace,
            allowed_prometheus=allowed_prometheus(
                args.allowed_prometheus, os.environ.get("KIRI_ALLOWED_PROMETHEUS"), DEFAULT_PROMETHEUS
            ),
            compressor_service_account=args.compressor_service_account,
            create_compressor_rbac=args.create_compressor_rbac,
        ),
    )
    return handlers.run(config)


def allowed_prometheus(flags: list[str] | None, env: str | None, default: str) -> tuple[str, ...]:
    """The allow-list from the flags (each comma-separated), else the environment, else `default`."""
    given = flags if flags is not None else ([env] if env is not None else [default])
    return tuple(a.strip() for flag in given for a in flag.split(",") if a.strip())


def _publish(args: argparse.Namespace) -> int:
    from kiri_operator.kube import CredentialsError, Kube, KubeError
    from kiri_runtime.manifests import dumps, load

    try:
        manifest = load(args.manifest)  # validate before publishing: the operator gates on it
    except (OSError, ValueError) as exc:
        print(f"kiri publish-manifest: cannot read {args.manifest}: {exc}", file=sys.stderr)
        return 2
    try:
        with Kube.connect(args.kubeconfig) as kube:
            kube.publish(
                manifest_configmap(
                    args.namespace,
                    args.name,
                    dumps(manifest),
                    args.compression,
                    args.owner_name,
                    args.owner_uid,
                )
            )
    except (CredentialsError, KubeError) as exc:
        print(f"kiri publish-manifest: {exc}", file=sys.stderr)
        return 1
    print(f"published {args.namespace}/{args.name}")
    return 0


def manifest_configmap(
    namespace: str, name: str, text: str, compression: str, owner_name: str | None, owner_uid: str | None
) -> dict[str, Any]:
    """The compression Job's last step: the manifest as a ConfigMap owned by its ModelDeployment."""
    from kiri_operator import labels as L

    md = owner_name or ""
    cm_labels = {**L.common_labels(md, L.COMPONENT_MANIFEST), L.COMPRESSION: compression} if md else {}
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": cm_labels}
    if owner_name and owner_uid:
        # blockOwnerDeletion True would need update on the owner's finalizers
        # (OwnerReferencesPermissionEnforcement), which the compressor's Role does not grant.
        meta["ownerReferences"] = [L.owner_reference(owner_name, owner_uid, block_owner_deletion=False)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {L.MANIFEST_KEY: text}}
