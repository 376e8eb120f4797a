"""`kiri publish-round`: the aggregator Job's last step, the round record as a ConfigMap the operator reads."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    pub = subparsers.add_parser(
        "publish-round",
        help="publish a learning round record as a ConfigMap (the aggregator Job's last step)",
    )
    pub.add_argument("--namespace", required=True)
    pub.add_argument("--name", required=True, help="ConfigMap name")
    pub.add_argument("--record", required=True, help="round.json written by `kiri aggregate`")
    pub.add_argument("--round", type=int, required=True, help="the round the record must be for")
    pub.add_argument("--owner-name", required=True, help="ModelDeployment that owns the ConfigMap")
    pub.add_argument("--owner-uid")
    pub.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    pub.set_defaults(handler=_publish)


def configmap(
    namespace: str, name: str, text: str, number: int, owner: str, uid: str | None
) -> dict[str, Any]:
    from kiri_operator import labels as L
    from kiri_runtime.learning.rounds import RECORD_FILE

    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**L.common_labels(owner, L.COMPONENT_ROUND), L.LEARNING_ROUND: str(number)},
    }
    if uid:
        # Neither controller nor blockOwnerDeletion: the record only goes with its ModelDeployment.
        meta["ownerReferences"] = [L.owner_reference(owner, uid, controller=None, block_owner_deletion=None)]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {RECORD_FILE: text}}


def _publish(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kiri_operator.kube import CredentialsError, Kube, KubeError
    from kiri_runtime.learning.rounds import RoundRecord

    try:
        with open(args.record, encoding="utf-8") as f:
            text = f.read()
        record = RoundRecord.model_validate_json(text)  # validate before publishing: the operator acts on it
    except (OSError, ValidationError) as exc:
        print(f"kiri publish-round: cannot read {args.record}: {exc}", file=sys.stderr)
        return 2
    if record.round != args.round:
        print(f"kiri publish-round: {args.record} is round {record.round}, not {args.round}", file=sys.stderr)
        return 2
    try:
        with Kube.connect(args.kubeconfig) as kube:
            kube.apply(
                configmap(args.namespace, args.name, text, record.round, args.owner_name, args.owner_uid)
            )
    except (CredentialsError, KubeError) as exc:
        print(f"kiri publish-round: {exc}", file=sys.stderr)
        return 1
    print(f"published {args.namespace}/{args.name} (round {record.round}: {record.status})")
    return 0
