"""Host paths are the cluster admin's, and a pod the API server refuses is said so in the conditions."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from kiri_operator import conditions as C
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.diagnosing import pod_security_refusal, pods_missing
from kiri_operator.observations import ObjectView
from kiri_operator.planning import Settings, plan
from kiri_operator.planning import building as B
from kiri_operator.planning.revisions import revision_key
from kiri_operator.plans import Check
from planning_worlds import FakeServer, manifest, observed, spec

REFUSAL = (
    'pods "md-edge-x" is forbidden: violates PodSecurity "restricted:latest": restricted volume types '
    '(volume "artifacts" uses restricted volume type "hostPath")'
)


def _cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def _jobs(s: ModelDeploymentSpec, settings: Settings | None = None) -> list[str]:
    p = plan(s, replace(observed(), pvcs=frozenset({"store"})), settings)
    return [a.name for a in p.actions if a.kind == "Job" and a.check is Check.CREATE]


def test_a_file_store_outside_the_admins_roots_is_refused_with_the_flag_that_would_allow_it():
    s = spec(**{"edge.artifacts.uri": "file:///etc"})
    p = plan(s, observed())
    verified = _cond(p.status, C.VARIANTS_VERIFIED)
    assert (verified["status"], verified["reason"]) == ("False", "HostPathNotAllowed")
    assert verified["message"] == (
        "edge.artifacts.uri '/etc' is a host path outside the cluster admin's allowed host stores (operator flag"
        " --host-store-root, chart value hostStores.roots: /var/lib/kiri/artifacts, /var/lib/kiri/site-data);"
        " use pvc:// or an http(s)/s3 store"
    )
    assert [a for a in p.actions if a.kind in ("Job", "ServiceAccount", "DaemonSet")] == []


def test_a_path_that_climbs_out_of_an_allowed_root_is_refused():
    s = spec(**{"edge.artifacts.uri": "file:///var/lib/kiri/artifacts/../../../etc"})
    assert _cond(plan(s, observed()).status, C.VARIANTS_VERIFIED)["reason"] == "HostPathNotAllowed"
    s = spec(**{"edge.artifacts.uri": "file:///var/lib/kiri/artifacts-evil"})
    assert _cond(plan(s, observed()).status, C.VARIANTS_VERIFIED)["reason"] == "HostPathNotAllowed"


def test_a_file_fetch_uri_is_held_to_the_same_roots():
    s = spec(**{"edge.artifacts.uri": "pvc://store/kiri", "edge.artifacts.fetchUri": "file:///root"})
    verified = _cond(plan(s, observed()).status, C.VARIANTS_VERIFIED)
    assert verified["reason"] == "HostPathNotAllowed"
    assert verified["message"].startswith("edge.artifacts.fetchUri '/root' is a host path outside")


def test_the_default_store_compresses_by_default_and_an_admin_can_allow_no_host_path_at_all():
    s = spec()
    assert B.store_uri(s) == "file:///var/lib/kiri/artifacts"
    assert len(_jobs(s)) == 1
    assert _jobs(s, Settings(host_store_roots=())) == []
    assert len(_jobs(spec(**{"edge.artifacts.uri": "pvc://store/kiri"}), Settings(host_store_roots=()))) == 1


def test_a_cache_path_in_the_spec_is_refused_unless_it_is_the_old_default_which_older_objects_carry():
    with pytest.raises(ValidationError, match=r"edge\.cache\.path is no longer a spec field"):
        spec(**{"edge.cache.path": "/etc"})
    assert spec(**{"edge.cache.path": "/var/lib/kiri/cache"}).edge.cache.path == "/var/lib/kiri/cache"


def test_dropping_the_cache_path_from_the_spec_renames_no_revision():
    old = spec(**{"edge.cache.path": "/var/lib/kiri/cache"})
    new = spec()
    assert revision_key(B.with_default_store(old, None), B.store_uri(old)) == revision_key(
        B.with_default_store(new, None), B.store_uri(new)
    )
    # What the operator before this change computed for the same spec (its revision was in status).
    assert revision_key(B.with_default_store(new, None), B.store_uri(new)) == "7da1048975"


def _rolled_out_to_one_wave() -> tuple[FakeServer, ModelDeploymentSpec]:
    s = spec(**{"rollout.stages": [{"percent": 100}]})
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    server.unready = {"edge-cpu-1", "edge-cpu-2", "edge-gpu"}
    server.step(s)
    return server, s


def test_edge_pods_refused_by_pod_security_turn_edge_progressing_false_quoting_the_api_server():
    server, s = _rolled_out_to_one_wave()
    ds = next(c for (k, _), c in server.world.children.items() if k == "DaemonSet")
    server.world = replace(server.world, pod_refusals={("DaemonSet", ds.name): REFUSAL})
    p = server.step(s)
    progressing = _cond(p.status, C.EDGE_PROGRESSING)
    assert (progressing["status"], progressing["reason"]) == ("False", "PodSecurityRefused")
    assert progressing["message"] == f"pods of DaemonSet {ds.name} refused: {REFUSAL}"
    assert _cond(p.status, C.EDGE_ROLLED_OUT)["reason"] == "PodSecurityRefused"
    # Without the refusal the same world is just waiting for its pods.
    server.world = replace(server.world, pod_refusals={})
    assert _cond(server.step(s).status, C.EDGE_PROGRESSING)["reason"] == "WaitingForReady"


def test_a_compression_job_refused_by_pod_security_says_so_and_is_kept_for_the_next_try():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    job = next(c for (k, _), c in server.world.children.items() if k == "Job")
    body = copy.deepcopy(dict(job.body))
    body["status"] = {"startTime": "2026-01-01T11:59:00Z"}
    server.world = replace(
        server.world,
        children={**server.world.children, ("Job", job.name): ObjectView("Job", job.name, body)},
        pod_refusals={("Job", job.name): REFUSAL},
    )
    p = plan(s, server.world)
    verified = _cond(p.status, C.VARIANTS_VERIFIED)
    assert (verified["status"], verified["reason"]) == ("False", "PodSecurityRefused")
    assert verified["message"] == f"compression Job {job.name} cannot start: {REFUSAL}"
    assert not [a for a in p.actions if a.kind == "Job" and a.check is Check.DELETE]


def test_a_cloud_deployment_whose_replica_set_was_refused_says_so_in_cloud_ready():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    dep = next(c for (k, _), c in server.world.children.items() if k == "Deployment")
    body = copy.deepcopy(dict(dep.body))
    body["status"] = {
        "observedGeneration": 1,
        "conditions": [
            {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": REFUSAL},
        ],
    }
    children = {**server.world.children, ("Deployment", dep.name): ObjectView("Deployment", dep.name, body)}
    cloud = _cond(plan(s, replace(server.world, children=children)).status, C.CLOUD_READY)
    assert (cloud["status"], cloud["reason"]) == ("False", "PodSecurityRefused")
    assert cloud["message"] == f"0/1 replicas ready: pods refused: {REFUSAL}"


def _child(kind: str, status: dict[str, Any], created: str = "2026-01-01T11:00:00Z") -> ObjectView:
    body = {"metadata": {"name": f"md-{kind.lower()}", "creationTimestamp": created}, "status": status}
    return ObjectView(kind, f"md-{kind.lower()}", body)


def test_only_children_short_of_pods_are_asked_about_so_a_steady_fleet_costs_no_reads():
    full = _child("DaemonSet", {"desiredNumberScheduled": 3, "currentNumberScheduled": 3})
    short = _child("DaemonSet", {"desiredNumberScheduled": 3, "currentNumberScheduled": 1})
    running = _child("Job", {"startTime": "2026-01-01T11:00:00Z", "active": 1})
    fresh = _child("Job", {})
    stuck = _child("Job", {"startTime": "2026-01-01T11:00:00Z"})
    done = _child("Job", {"startTime": "x", "conditions": [{"type": "Complete", "status": "True"}]})
    world = observed()
    for name, child in {"a": full, "b": short, "c": running, "d": fresh, "e": stuck, "f": done}.items():
        world = replace(world, children={**world.children, (child.kind, name): replace(child, name=name)})
    assert sorted(c.name for c in pods_missing(world)) == ["b", "e"]


def test_the_newest_pod_security_failed_create_after_the_child_was_made_is_the_one_quoted():
    ds = _child("DaemonSet", {}, created="2026-01-01T11:00:00Z")
    events = [
        {"message": "older template: violates PodSecurity x", "lastTimestamp": "2026-01-01T10:59:59Z"},
        {"message": "quota exceeded", "lastTimestamp": "2026-01-01T11:05:00Z"},
        {"message": "first: violates PodSecurity a", "lastTimestamp": "2026-01-01T11:01:00Z"},
        {"message": "newest: violates PodSecurity b", "eventTime": "2026-01-01T11:02:00.123456Z"},
    ]
    assert pod_security_refusal(ds, events) == "newest: violates PodSecurity b"
    assert pod_security_refusal(ds, events[:2]) is None


def test_a_refusal_the_event_aggregator_folded_is_quoted_without_its_combined_prefix():
    ds = _child("DaemonSet", {}, created="2026-01-01T11:00:00Z")
    events = [
        {
            "message": '(combined from similar events): Error creating: pods "p" is forbidden: violates PodSecurity '
            '"baseline:latest": hostPath volumes (volume "artifacts")',
            "lastTimestamp": "2026-01-01T11:01:00Z",
        }
    ]
    assert pod_security_refusal(ds, events) == (
        'Error creating: pods "p" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes '
        '(volume "artifacts")'
    )
