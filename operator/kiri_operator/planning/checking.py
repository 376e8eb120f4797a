"""The check step: compare desired children with observed ones, apart from applying anything."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from kiri_operator import labels as L
from kiri_operator.kinds import immutable
from kiri_operator.observations import ObjectView, Observed
from kiri_operator.planning.building import affinity_nodes
from kiri_operator.plans import Action, Check


def _same(desired: dict[str, Any], observed: ObjectView) -> bool:
    want = desired.get("metadata", {}).get("annotations", {}).get(L.SPEC_HASH)
    if want is None or want != observed.spec_hash:
        return False
    if desired["kind"] == "DaemonSet":
        # DaemonSet hashes leave the node list out so nodes can move between revisions; compare it here.
        return affinity_nodes(desired) == affinity_nodes(observed.body)
    return True


def check(
    desired: Sequence[dict[str, Any]], observed: Observed, keep: Collection[tuple[str, str]] = ()
) -> list[Action]:
    """CREATE what is missing, UPDATE what differs, DELETE owned children nobody wants (unless kept)."""
    actions: list[Action] = []
    wanted: set[tuple[str, str]] = set()
    for obj in desired:
        key = (obj["kind"], obj["metadata"]["name"])
        wanted.add(key)
        current = observed.child(*key)
        if current is None:
            actions.append(Action(Check.CREATE, key[0], key[1], obj))
        elif current.deleting or _same(obj, current) or immutable(key[0]):
            actions.append(Action(Check.EXISTED, key[0], key[1]))
        else:
            actions.append(Action(Check.UPDATE, key[0], key[1], obj))
    for key, current in sorted(observed.children.items()):
        if key in wanted or key in keep or current.deleting:
            continue
        actions.append(Action(Check.DELETE, key[0], key[1]))
    return actions
