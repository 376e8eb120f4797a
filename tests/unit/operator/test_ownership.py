"""The operator trusts only what its ModelDeployment owns: an object that carries the labels but no
ownerReference with the ModelDeployment's uid (a forged manifest or round record) is ignored, with an Event,
and never updated or deleted."""

from __future__ import annotations

import copy
from typing import Any

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.caches import Cache
from kiri_operator.conditions import Reason
from kiri_operator.planning import learning, plan
from kiri_operator.plans import Check
from planning_worlds import NOW, fleet, manifest, manifest_configmap, spec

UID = "uid-1"


def md_body() -> dict[str, Any]:
    return {"metadata": {"name": "md", "namespace": "ns", "uid": UID, "generation": 1}, "spec": {}}


def cache_with(*children: dict[str, Any]) -> Cache:
    cache = Cache()
    cache.put_md(md_body())
    for node in fleet():
        cache.nodes[node.name] = node
    for child in children:
        cache.put_child(child["kind"], child)
    return cache


def forged_manifest(owner_uid: str | None) -> dict[str, Any]:
    body = copy.deepcopy(dict(manifest_configmap(spec(), manifest({"fp16": True, "int8": True})).body))
    if owner_uid is not None:
        body["metadata"]["ownerReferences"] = [L.owner_reference("md", owner_uid)]
    return body


def test_owned_by_needs_an_owner_reference_with_the_uid_not_the_labels() -> None:
    assert L.owned_by({"metadata": {"ownerReferences": [L.owner_reference("md", UID)]}}, UID)
    assert not L.owned_by({"metadata": {"ownerReferences": [L.owner_reference("md", "uid-0")]}}, UID)
    assert not L.owned_by({"metadata": {"labels": L.common_labels("md", L.COMPONENT_MANIFEST)}}, UID)
    # Another object's reference with the right name is not ownership either.
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "md", "uid": "uid-9"}
    assert not L.owned_by({"metadata": {"ownerReferences": [other]}}, UID)
    assert not L.owned_by({"metadata": {"ownerReferences": [L.owner_reference("md", "")]}}, "")


def test_a_manifest_without_or_with_a_wrong_owner_is_ignored_with_an_event_and_never_deleted() -> None:
    for owner_uid in (None, "uid-of-a-deleted-md"):
        cm = forged_manifest(owner_uid)
        observed = cache_with(cm).observe(("ns", "md"), NOW, frozenset())
        assert observed is not None
        assert observed.child("ConfigMap", cm["metadata"]["name"]) is None
        assert [(v.kind, v.name) for v in observed.not_owned] == [("ConfigMap", cm["metadata"]["name"])]
        p = plan(spec(), observed)
        verified = next(c for c in p.status["conditions"] if c["type"] == C.VARIANTS_VERIFIED)
        # The forged manifest accepted nothing: the variants are still being compressed.
        assert (verified["status"], verified["reason"]) == ("Unknown", Reason.COMPRESSING)
        assert not [a for a in p.actions if a.kind == "DaemonSet"]
        assert not [a for a in p.actions if a.check is Check.DELETE]
        warnings = [e for e in p.events if e.reason == Reason.NOT_OWNED]
        assert len(warnings) == 1 and warnings[0].type == "Warning"
        assert cm["metadata"]["name"] in warnings[0].message


def test_the_same_manifest_owned_by_the_modeldeployment_is_trusted() -> None:
    cm = forged_manifest(UID)
    observed = cache_with(cm).observe(("ns", "md"), NOW, frozenset())
    assert observed is not None and observed.not_owned == ()
    p = plan(spec(), observed)
    verified = next(c for c in p.status["conditions"] if c["type"] == C.VARIANTS_VERIFIED)
    assert (verified["status"], verified["reason"]) == ("True", Reason.VERIFIED)
    assert not [e for e in p.events if e.reason == Reason.NOT_OWNED]


def test_a_round_record_without_the_owner_is_not_read() -> None:
    record = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": learning.record_name("md", 1),
            "namespace": "ns",
            "labels": {**L.common_labels("md", L.COMPONENT_ROUND), L.LEARNING_ROUND: "1"},
        },
        "data": {learning.RECORD_FILE: "{}"},
    }
    observed = cache_with(record).observe(("ns", "md"), NOW, frozenset())
    assert observed is not None
    assert observed.of_kind("ConfigMap") == []
    assert learning.read_records(observed) == []
    assert [v.name for v in observed.not_owned] == [learning.record_name("md", 1)]
