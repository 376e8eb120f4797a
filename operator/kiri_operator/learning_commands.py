"""`kiri publish-round`: the aggregator Job's last step, the round record as a ConfigMap the operator reads;
and the privacy ledger kept in a ConfigMap (`ledgers.FACTORIES["configmap"]`, for `kiri aggregate --ledger`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

LEDGER_WRITE_TRIES = 5


class ConfigMapLedger:
    """The privacy ledger in a ConfigMap the ModelDeployment owns: in the API, not on one node's disk.

    Appends are read-modify-write guarded by the ConfigMap's resourceVersion (a conflict reads again), so a
    second aggregator cannot lose a spend the first wrote."""

    def __init__(self, kube: Any, namespace: str, name: str, owner: str, uid: str | None) -> None:
        self.kube, self.namespace, self.name, self.owner, self.uid = kube, namespace, name, owner, uid

    def _read(self) -> tuple[list[dict[str, Any]], str | None]:
        from kiri_runtime.learning import ledgers

        cm = self.kube.get("ConfigMap", self.namespace, self.name)
        if cm is None:
            return [], None
        return ledgers.parse((cm.get("data") or {}).get(ledgers.LEDGER_KEY)), cm["metadata"].get(
            "resourceVersion"
        )

    def spent(self) -> dict[str, int]:
        from kiri_runtime.learning import ledgers

        return ledgers.counts(self._read()[0])

    def spend(self, number: int, sites: Any, epsilon: Any) -> None:
        from kiri_operator import labels as L
        from kiri_operator.kube import KubeError
        from kiri_runtime.learning import ledgers

        for _ in range(LEDGER_WRITE_TRIES):
            spends, version = self._read()
            meta: dict[str, Any] = {
                "name": self.name,
                "namespace": self.namespace,
                "labels": L.common_labels(self.owner, L.COMPONENT_LEDGER),
            }
            if version is not None:
                meta["resourceVersion"] = version  # a write since our read fails with 409: read again
            if self.uid:
                meta["ownerReferences"] = [
                    L.owner_reference(self.owner, self.uid, controller=None, block_owner_deletion=None)
                ]
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta,
                "data": {
                    ledgers.LEDGER_KEY: ledgers.render([*spends, ledgers.entry(number, sites, epsilon)])
                },
            }
            try:
                self.kube.apply(body)
                return
            except KubeError as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(
            f"the ledger {self.namespace}/{self.name} kept changing under {LEDGER_WRITE_TRIES} writes"
        )


def _configmap_ledger(target: str, options: Any) -> ConfigMapLedger:
    from kiri_operator.kube import Kube

    namespace, _, name = target.partition("/")
    if not namespace or not name:
        raise ValueError(f"--ledger configmap:{target}: give configmap:NAMESPACE/NAME")
    owner, _, uid = str(options.get("owner") or "").partition(":")
    return ConfigMapLedger(
        Kube.connect(os.environ.get("KUBECONFIG") or None), namespace, name, owner, uid or None
    )


def register_ledger() -> None:
    from kiri_runtime.learning import ledgers

    ledgers.FACTORIES["configmap"] = _configmap_ledger


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    register_ledger()
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
            kube.publish(
                configmap(args.namespace, args.name, text, record.round, args.owner_name, args.owner_uid)
            )
    except (CredentialsError, KubeError) as exc:
        print(f"kiri publish-round: {exc}", file=sys.stderr)
        return 1
    print(f"published {args.namespace}/{args.name} (round {record.round}: {record.status})")
    return 0
