"""The pure planner: children, placement, compression gating, faults, status and the steady state."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.specs import Toleration
from kiri_operator.conditions import Reason
from kiri_operator.observations import Taint
from kiri_operator.planning import Settings, plan
from kiri_operator.planning import building as B
from kiri_operator.planning.building import affinity_nodes, store_uri
from kiri_operator.planning.placing import admits
from kiri_operator.planning.revisions import compression_key, revision_key
from kiri_operator.planning.status import WAVE_GATE_REASONS
from kiri_operator.plans import Check
from kiri_runtime import probing
from planning_worlds import FakeServer, cloud_node, edge_node, fleet, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)


def _cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def _bodies(p, kind):
    return {a.name: a.body for a in p.actions if a.kind == kind and a.body is not None}


def test_first_reconcile_creates_cloud_and_compression_but_no_edge_yet():
    s = spec()
    p = plan(s, observed())
    kinds = sorted((a.kind, a.check) for a in p.actions)
    assert all(check is Check.CREATE for _, check in kinds)
    # No ServiceAccount, Role or RoleBinding: the Job runs as the namespace's `kiri-compressor` (the chart's).
    assert {k for k, _ in kinds} == {"Deployment", "Service", "Job"}
    assert p.status["phase"] == "Compressing"
    assert _cond(p.status, C.VARIANTS_VERIFIED)["status"] == "Unknown"
    assert {v["name"]: v["state"] for v in p.status["variants"]} == {
        "fp16": "Compressing",
        "int8": "Compressing",
    }
    job = next(iter(_bodies(p, "Job").values()))
    init = job["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][0] == "compress" and "--variants-json" in init["args"]
    publish = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert publish[0] == "publish-manifest"
    assert publish[publish.index("--name") + 1] == L.manifest_name("md", compression_key(s, store_uri(s)))
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"kiri.dev/tier": "cloud"}


def test_only_the_publishing_container_of_the_compression_job_holds_an_api_token():
    p = plan(spec(), observed())
    pod = next(iter(_bodies(p, "Job").values()))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kiri-compressor"
    assert pod["automountServiceAccountToken"] is False
    token = next(v for v in pod["volumes"] if v["name"] == "kube-api-access")
    sources = token["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}
    mounts = {
        c["name"]: {m["name"] for m in c["volumeMounts"]} for c in pod["initContainers"] + pod["containers"]
    }
    assert {name for name, m in mounts.items() if "kube-api-access" in m} == {"publish"}
    (publish,) = pod["containers"]
    (mount,) = [m for m in publish["volumeMounts"] if m["name"] == "kube-api-access"]
    assert mount == {
        "name": "kube-api-access",
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": True,
    }


def test_with_create_compressor_rbac_the_role_names_the_configmaps_the_job_may_read_and_patch():
    s = spec()
    p = plan(s, observed(), Settings(create_compressor_rbac=True))
    created = {a.kind for a in p.actions if a.check is Check.CREATE}
    assert created == {"Deployment", "Service", "Job", "ServiceAccount", "Role", "RoleBinding"}
    role = _bodies(p, "Role")["md-compressor"]
    manifest_cm = L.manifest_name("md", compression_key(B.with_default_store(s, None), B.store_uri(s)))
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "patch"],
            "resourceNames": [manifest_cm],
        },
    ]
    account = _bodies(p, "ServiceAccount")["md-compressor"]
    assert account["automountServiceAccountToken"] is False
    job = next(iter(_bodies(p, "Job").values()))
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "md-compressor"


def test_cloud_deployment_runs_on_gpu_nodes_with_probes_and_hardening():
    p = plan(spec(**{"cloud.resources": {"gpu": 2, "cpu": "2", "memory": "4Gi"}}), observed())
    dep = _bodies(p, "Deployment")["md-cloud"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"kiri.dev/tier": "cloud"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Readiness by exec: the probe prints the server's not-ready reason into the kubelet's Event.
    assert c["readinessProbe"]["exec"]["command"] == ["python3", "-I", "-S", "-c", probing.SOURCE, "8080"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["args"][c["args"].index("--sha256") + 1] == "ab" * 32
    owner = dep["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ModelDeployment" and owner["uid"] == "uid-1" and owner["controller"] is True


def test_verified_variants_roll_onto_matching_nodes_and_unmatched_are_reported():
    s = spec()
    server = FakeServer(observed())
    first = server.step(s)
    assert any(e.reason == Reason.UNMATCHED_NODES and "edge-arm" in e.message for e in first.events)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    p = server.step(s)
    dss = _bodies(p, "DaemonSet")
    rev = revision_key(s, store_uri(s))
    assert set(dss) == {f"md-{rev}-fp16", f"md-{rev}-int8"}
    assert affinity_nodes(dss[f"md-{rev}-fp16"]) == ["edge-gpu"]
    assert affinity_nodes(dss[f"md-{rev}-int8"]) == ["edge-cpu-1", "edge-cpu-2"]
    args = dss[f"md-{rev}-int8"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--sha256") + 1] == "d" * 64
    assert (
        args[args.index("--model-uri") + 1]
        == f"file:///var/lib/kiri/artifacts/ns/md/{compression_key(s, store_uri(s))}/int8.onnx"
    )
    assert args[args.index("--fallback-url") + 1] == "http://md-cloud.ns.svc:8080"
    assert p.status["edge"]["unmatchedNodes"] == 2
    assert p.status["edge"]["targetNodes"] == 3
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.VERIFIED
    # Next round the pods are Ready: the revision is promoted and everything is Healthy.
    p2 = server.step(s)
    assert p2.status["phase"] == "Healthy", p2.status
    assert p2.status["currentRevision"] == rev
    assert p2.status["history"][-1]["outcome"] == "Promoted"
    assert _cond(p2.status, C.READY)["status"] == "True"
    assert p2.status["edge"]["readyNodes"] == 3


def test_steady_state_makes_no_writes_and_metadata_changes_change_nothing():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s)
    before = server.writes
    p = server.step(s)
    assert p.writes == [] and p.events == []
    assert server.writes == before
    server.world = replace(server.world, annotations={"team": "vision"})
    p = server.step(s)
    assert p.writes == [] and server.writes == before


def test_rejected_variant_is_never_rolled_out_and_nodes_fall_through():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": False, "int8": True}))
    p = server.step(s)
    dss = _bodies(p, "DaemonSet")
    assert all(not name.endswith("-fp16") for name in dss)
    # edge-gpu is amd64 with memory: it falls through to the accepted int8 variant.
    (int8,) = dss.values()
    assert affinity_nodes(int8) == ["edge-cpu-1", "edge-cpu-2", "edge-gpu"]
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.PARTIALLY_REJECTED
    states = {v["name"]: v["state"] for v in p.status["variants"]}
    assert states == {"fp16": "Rejected", "int8": "Verified"}


def test_all_rejected_fails_without_edge_workloads():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": False, "int8": False}))
    p = server.step(s)
    assert _bodies(p, "DaemonSet") == {}
    assert p.status["phase"] == "Failed"
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.ALL_REJECTED
    assert _cond(p.status, C.DEGRADED)["status"] == "True"


def test_failed_job_is_reported_once_and_not_retried():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.fail_job(L.compress_name("md", compression_key(s, store_uri(s))), "DeadlineExceeded")
    p = server.step(s)
    verified = _cond(p.status, C.VARIANTS_VERIFIED)
    assert verified["status"] == "False" and verified["reason"] == Reason.COMPRESSION_FAILED
    assert "DeadlineExceeded" in verified["message"]
    assert [a for a in p.actions if a.kind == "Job" and a.check is not Check.EXISTED] == []
    assert any(e.type == "Warning" and e.reason == Reason.COMPRESSION_FAILED for e in p.events)
    again = server.step(s)
    assert again.writes == [] and again.events == []


def test_completed_job_without_manifest_fails_after_the_grace_period():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    name = L.compress_name("md", compression_key(s, store_uri(s)))
    job = server.world.children[("Job", name)]
    body = dict(job.body)
    body["status"] = {
        "completionTime": "2026-01-01T12:00:00Z",
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    server.world = replace(
        server.world, children={**server.world.children, ("Job", name): replace(job, body=body)}
    )
    settings = Settings(manifest_grace_seconds=10)
    p = server.step(s, settings)
    assert _cond(p.status, C.VARIANTS_VERIFIED)["status"] == "Unknown"
    assert p.requeue_after is not None and p.requeue_after <= 10
    server.world = replace(server.world, now=server.world.now.replace(minute=5))
    p = server.step(s, settings)
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.COMPRESSION_FAILED


@pytest.mark.parametrize("skew_minutes", [10, -10])
def test_the_manifest_grace_is_measured_on_the_api_servers_clock_whatever_the_operators_clock_says(
    skew_minutes: int,
):
    """completionTime is set by the Job controller: comparing it with an operator clock 10 minutes ahead
    failed a Job that had just completed, before its manifest could show up."""
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    name = L.compress_name("md", compression_key(B.with_default_store(s, None), B.store_uri(s)))
    job = server.world.children[("Job", name)]
    body = dict(job.body)
    body["status"] = {
        "completionTime": "2026-01-01T12:00:00Z",
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    completed = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    server.world = replace(
        server.world,
        children={**server.world.children, ("Job", name): replace(job, body=body)},
        now=completed + timedelta(minutes=skew_minutes, seconds=1),
        server_now=completed + timedelta(seconds=1),
    )
    settings = Settings(manifest_grace_seconds=10)
    p = server.step(s, settings)
    assert _cond(p.status, C.VARIANTS_VERIFIED)["status"] == "Unknown"
    assert p.requeue_after is not None and 8 <= p.requeue_after <= 10
    server.world = replace(
        server.world,
        now=completed + timedelta(minutes=skew_minutes, seconds=11),
        server_now=completed + timedelta(seconds=11),
    )
    p = server.step(s, settings)
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.COMPRESSION_FAILED


def test_no_gpu_node_blocks_the_cloud_tier_with_a_reason():
    s = spec(**{"cloud.resources": {"gpu": 8}})
    p = plan(s, observed())
    assert "Deployment" not in {a.kind for a in p.actions}
    cloud = _cond(p.status, C.CLOUD_READY)
    assert cloud["reason"] == Reason.NO_GPU_NODE and "8" in cloud["message"]
    assert p.status["phase"] == "Degraded"
    assert any(e.type == "Warning" and e.reason == Reason.NO_GPU_NODE for e in p.events)


def test_no_cloud_node_at_all_blocks_cloud_and_compression():
    nodes = (edge_node("e1"),)
    p = plan(spec(), observed(nodes))
    assert {a.kind for a in p.actions if a.check is Check.CREATE} == set()
    assert _cond(p.status, C.CLOUD_READY)["reason"] == Reason.NO_CLOUD_NODE
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.NO_CLOUD_NODE


def test_missing_pvc_creates_nothing_that_would_need_it():
    s = spec(**{"model.source": {"uri": "pvc://models/resnet.onnx", "sha256": "ab" * 32}})
    p = plan(s, observed())
    assert not any(a.kind in ("Deployment", "Job") for a in p.actions)
    assert _cond(p.status, C.CLOUD_READY)["reason"] == Reason.MISSING_PVC
    assert p.status["phase"] == "Degraded"
    # Once the claim exists the Deployment mounts it read-only and the runtime reads a file:// URI.
    p = plan(s, replace(observed(), pvcs=frozenset({"models"})))
    pod = _bodies(p, "Deployment")["md-cloud"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    args = pod["containers"][0]["args"]
    assert args[args.index("--model-uri") + 1] == "file:///models/resnet.onnx"


def test_no_edge_node_matching_any_variant_is_a_fault():
    s = spec()
    nodes = (cloud_node(), edge_node("arm-1", arch="arm64"), edge_node("arm-2", arch="arm64"))
    server = FakeServer(observed(nodes))
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    p = server.step(s)
    assert _bodies(p, "DaemonSet") == {}
    rolled = _cond(p.status, C.EDGE_ROLLED_OUT)
    assert rolled["reason"] == Reason.NO_MATCHING_EDGE_NODE
    assert p.status["phase"] == "Degraded" and p.status["edge"]["unmatchedNodes"] == 2


def test_new_revision_moves_nodes_and_drops_the_old_daemonsets():
    s1 = spec()
    server = FakeServer(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    server.step(s1)
    server.step(s1)
    rev1 = server.world.status["currentRevision"]
    # maxUnavailable 100%: the one default stage moves every node at once (waves are tested in rollout/).
    s2 = spec(**{"runtime.image": "example/kiri:2", "rollout.maxUnavailable": "100%"})
    assert compression_key(s2, store_uri(s2)) == compression_key(s1, store_uri(s1))
    p = server.step(s2)  # runtime-only change: same manifest, new DaemonSets, no new Job
    rev2 = p.status["updateRevision"]
    assert rev2 != rev1
    assert not any(a.kind == "Job" and a.check is Check.CREATE for a in p.actions)
    created = {a.name for a in p.actions if a.kind == "DaemonSet" and a.check is Check.CREATE}
    assert created == {f"md-{rev2}-fp16", f"md-{rev2}-int8"}
    # The stable revision's DaemonSets stay (emptied) until the new one is promoted, then go.
    repinned = {a.name: a.body for a in p.actions if a.kind == "DaemonSet" and a.check is Check.UPDATE}
    assert set(repinned) == {f"md-{rev1}-fp16", f"md-{rev1}-int8"}
    assert all(affinity_nodes(b) == [] for b in repinned.values())
    p = server.step(s2)
    assert p.status["currentRevision"] == rev2
    p = server.step(s2)
    # The previous stable revision's DaemonSets stay, empty, so `kiri rollback` needs no rebuild.
    assert not [a for a in p.actions if a.check is Check.DELETE]
    kept = {n for (kind, n) in server.world.children if kind == "DaemonSet"}
    assert {f"md-{rev1}-fp16", f"md-{rev1}-int8"} <= kept


def test_offline_nodes_are_deferred_not_waited_for():
    s = spec()
    nodes = tuple(replace(n, ready=False) if n.name == "edge-cpu-2" else n for n in observed().nodes)
    server = FakeServer(observed(nodes))
    server.unready = {"edge-cpu-2"}
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    server.step(s)
    p = server.step(s)
    assert p.status["edge"]["deferredNodes"] == 1
    assert _cond(p.status, C.EDGE_ROLLED_OUT)["status"] == "True"


def test_manifest_for_another_model_is_refused():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}, source_sha="ef" * 32))
    p = server.step(s)
    assert _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.MANIFEST_INVALID
    assert _bodies(p, "DaemonSet") == {}


def test_cloud_only_deployment_needs_no_compression():
    s = spec(**{"edge.variants": []})
    server = FakeServer(observed())
    p = server.step(s)
    assert {a.kind for a in p.actions} == {"Deployment", "Service"}
    p = server.step(s)
    assert (
        p.status["phase"] == "Healthy"
        and _cond(p.status, C.VARIANTS_VERIFIED)["reason"] == Reason.NO_VARIANTS
    )


def test_daemonset_hash_ignores_the_node_list_and_matches_a_recomputation():
    from kiri_operator.planning import building as B

    s = spec()
    owner = B.Owner("md", "ns", "uid-1")
    art = B.EdgeArtifact("file:///a/int8.onnx", "d" * 64)
    one = B.edge_daemonset(s, owner, "r1", "c1", "int8", art, ["n1"], {})
    many = B.edge_daemonset(s, owner, "r1", "c1", "int8", art, ["n1", "n2", "n3"], {})
    assert one["metadata"]["annotations"][L.SPEC_HASH] == many["metadata"]["annotations"][L.SPEC_HASH]
    assert B.edge_template_hash(many) == many["metadata"]["annotations"][L.SPEC_HASH]
    assert affinity_nodes(B.repin_daemonset(many, ["n9"])) == ["n9"]
    other = B.edge_daemonset(
        s, owner, "r1", "c1", "int8", B.EdgeArtifact("file:///b.onnx", "e" * 64), ["n1"], {}
    )
    assert other["metadata"]["annotations"][L.SPEC_HASH] != one["metadata"]["annotations"][L.SPEC_HASH]


def test_a_relabelled_node_changes_variant_within_the_revision():
    s = spec()
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s)
    nodes = tuple(
        replace(n, labels={**n.labels, "kiri.dev/accelerator": "gpu"}) if n.name == "edge-cpu-1" else n
        for n in server.world.nodes
    )
    server.world = replace(server.world, nodes=nodes)
    server.step(s)
    pinned = {
        k[1].rsplit("-", 1)[1]: affinity_nodes(v.body)
        for k, v in server.world.children.items()
        if k[0] == "DaemonSet"
    }
    assert pinned == {"fp16": ["edge-cpu-1", "edge-gpu"], "int8": ["edge-cpu-2"]}


def test_a_staged_rollout_tells_its_waves_in_rollout_events_not_condition_churn():
    # Events are API writes: a wave's gates (WaitingForReady -> Baking -> next step) are one StepStarted,
    # not an Event per condition that mirrors the gate. Leaving a pause is still an Event.
    s1 = spec(**{"rollout.stages": [{"nodes": 1, "bakeSeconds": 3}, {"percent": 100}]})
    server = FakeServer(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    assert server.world.status["phase"] == "Healthy"
    s2 = spec(
        **{
            "runtime.image": "example/kiri:2",
            "rollout.stages": [{"nodes": 1, "bakeSeconds": 3}, {"percent": 100}],
        }
    )
    server.unready = {"edge-gpu", "edge-cpu-1", "edge-cpu-2"}  # the canary waits for readiness first
    reasons: list[str] = []
    for _ in range(2):
        reasons += [e.reason for e in server.step(s2).events]
    assert _cond(server.world.status, C.EDGE_PROGRESSING)["reason"] == "WaitingForReady"
    server.unready = set()
    for _ in range(10):
        reasons += [e.reason for e in server.step(s2).events]
    assert server.world.status["currentRevision"] == server.world.status["updateRevision"]
    assert not set(reasons) & WAVE_GATE_REASONS, reasons
    assert reasons.count("StepStarted") == 2 and reasons.count("RolloutCompleted") == 1
    assert "Promoted" in reasons and "Available" not in reasons  # Promoted says it
    # Before this change a rollout of two steps wrote about ten more Events than these.
    assert len(reasons) <= 8, reasons

    s3 = spec(
        **{
            "runtime.image": "example/kiri:3",
            "rollout.stages": [{"nodes": 1, "bakeSeconds": 3}, {"percent": 100}],
            "rollout.paused": True,
        }
    )
    paused = [e.reason for _ in range(2) for e in server.step(s3).events]
    assert "Paused" in paused
    resumed = spec(
        **{
            "runtime.image": "example/kiri:3",
            "rollout.stages": [{"nodes": 1, "bakeSeconds": 3}, {"percent": 100}],
        }
    )
    reasons = [e.reason for e in server.step(resumed).events]
    assert set(reasons) & WAVE_GATE_REASONS, reasons  # out of a pause into a gate is news


def test_edge_progressing_says_why_edge_pods_are_not_ready_when_the_pods_say():
    s = spec(**{"rollout.stages": [{"percent": 100}]})
    server = FakeServer(observed())
    server.step(s)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    server.unready = {"edge-cpu-1", "edge-cpu-2"}
    server.unready_reason = (
        "kiri-serve: CrashLoopBackOff: cache dir /var/cache/kiri not writable by uid 65532"
    )
    server.step(s)
    p = server.step(s)
    progressing = _cond(p.status, C.EDGE_PROGRESSING)
    assert progressing["reason"] == "WaitingForReady"
    assert progressing["message"].endswith(
        "; 2 pods not ready: kiri-serve: CrashLoopBackOff: cache dir /var/cache/kiri not writable by uid 65532"
    )
    assert _cond(p.status, C.READY)["message"].endswith("not writable by uid 65532")


REAL_TAINT = Taint("kiri.dev/node-kind", "real", "NoSchedule")


def test_a_tainted_edge_node_the_pods_do_not_tolerate_is_no_target_and_one_they_tolerate_is():
    tainted = replace(edge_node("edge-cpu-3"), taints=(REAL_TAINT,))
    world = observed(nodes=(*fleet(), tainted))
    plain = spec()
    server = FakeServer(world)
    server.step(plain)
    server.publish(plain, manifest({"fp16": True, "int8": True}))
    dss = _bodies(server.step(plain), "DaemonSet")
    rev = revision_key(plain, store_uri(plain))
    # Before, the first rollout waited for edge-cpu-3, where the DaemonSet controller never makes a pod.
    assert affinity_nodes(dss[f"md-{rev}-int8"]) == ["edge-cpu-1", "edge-cpu-2"]
    tolerant = spec(
        edge={
            **plain.edge.model_dump(mode="json", by_alias=True, exclude_none=True),
            "tolerations": [{"key": "kiri.dev/node-kind", "operator": "Equal", "value": "real"}],
        }
    )
    server = FakeServer(world)
    server.step(tolerant)
    server.publish(tolerant, manifest({"fp16": True, "int8": True}))
    dss = _bodies(server.step(tolerant), "DaemonSet")
    rev = revision_key(tolerant, store_uri(tolerant))
    assert affinity_nodes(dss[f"md-{rev}-int8"]) == ["edge-cpu-1", "edge-cpu-2", "edge-cpu-3"]


@pytest.mark.parametrize(
    ("toleration", "taint", "admitted"),
    [
        (None, REAL_TAINT, False),
        ({"key": "kiri.dev/node-kind", "value": "real"}, REAL_TAINT, True),
        ({"key": "kiri.dev/node-kind", "value": "other"}, REAL_TAINT, False),
        ({"key": "kiri.dev/node-kind", "operator": "Exists"}, REAL_TAINT, True),
        ({"key": "kiri.dev/node-kind", "operator": "Exists", "effect": "NoExecute"}, REAL_TAINT, False),
        ({"key": "kiri.dev/node-kind", "operator": "Exists", "effect": "NoSchedule"}, REAL_TAINT, True),
        (None, Taint("kiri.dev/node-kind", "real", "PreferNoSchedule"), True),
        (None, Taint("kiri.dev/site-down", "", "NoExecute"), False),
        # The DaemonSet controller tolerates the node conditions' taints on every pod it makes.
        (None, Taint("node.kubernetes.io/unreachable", "", "NoExecute"), True),
        (None, Taint("node.kubernetes.io/unschedulable", "", "NoSchedule"), True),
    ],
)
def test_an_edge_pod_runs_on_a_node_only_when_it_tolerates_each_taint_that_keeps_pods_off(
    toleration, taint, admitted
):
    tolerations = [Toleration.model_validate(toleration)] if toleration else []
    assert admits(tolerations, replace(edge_node("n"), taints=(taint,))) is admitted
