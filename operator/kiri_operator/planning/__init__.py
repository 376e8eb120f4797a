"""Planning: `plan(spec, observed) -> Plan`. Pure: no Kubernetes client, no kopf, no clock, no I/O.

The order is the order of dependencies: the model source, the cloud tier, compression (which gates the
edge), edge placement and assignment, then status and events computed from all of the above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlparse

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.api.statuses import ModelDeploymentStatus
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import ManifestView, ObjectView, Observed
from kiri_operator.planning import building as B
from kiri_operator.planning import learning
from kiri_operator.planning import waves as W
from kiri_operator.planning.assigning import AssignInput, Assignment, NodePod, assign_nodes
from kiri_operator.planning.checking import check
from kiri_operator.planning.placing import Placement, parse_quantity, place, selects
from kiri_operator.planning.revisions import compression_key, revision_key
from kiri_operator.plans import Check, Event, Plan, Slot
from kiri_runtime.manifests import Manifest, loads

GPU = "nvidia.com/gpu"
# Restarts after which a not-Ready edge pod counts as failing (crash loop): roll back without waiting for
# the progress deadline.
CRASH_RESTARTS = 3
FAULT_REASONS = frozenset(
    {
        Reason.MISSING_PVC,
        Reason.NO_GPU_NODE,
        Reason.NO_CLOUD_NODE,
        Reason.NO_EDGE_NODES,
        Reason.NO_MATCHING_EDGE_NODE,
    }
)
FAILURE_REASONS = frozenset({Reason.COMPRESSION_FAILED, Reason.ALL_REJECTED, Reason.MANIFEST_INVALID})
# The gates a wave passes through. Moves between them are told by the rollout's own Events (StepStarted,
# RolloutCompleted, Promoted), so the conditions that mirror them add none: about ten Events per wave
# were most of the operator's API writes at fleet scale. A move into or out of any other reason (a
# pause, a hold, a fault, a rollback) is still an Event.
WAVE_GATE_REASONS = frozenset(
    {
        Reason.ROLLING_OUT,
        Reason.NODES_NOT_READY,
        Reason.ROLLED_OUT,
        W.REASON_STEP_PROGRESSING,
        W.REASON_WAITING_READY,
        W.REASON_ANALYSIS_RUNNING,
        W.REASON_BAKING,
    }
)


@dataclass(frozen=True)
class Settings:
    compression_deadline_seconds: int = 3600
    """activeDeadlineSeconds of compression Jobs."""
    manifest_grace_seconds: float = 120.0
    """How long a completed Job may take to have its manifest show up before it counts as failed."""
    pod_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Compression:
    key: str
    condition: Condition
    manifest: Manifest | None = None
    accepted: frozenset[str] = frozenset()
    variants: list[dict[str, Any]] = field(default_factory=list)
    requeue_after: float | None = None


def read_manifest(cm: ObjectView) -> ManifestView:
    key = cm.labels.get(L.COMPRESSION, "")
    data = cm.body.get("data") or {}
    text = data.get(L.MANIFEST_KEY)
    if not isinstance(text, str):
        return ManifestView(key, error=f"ConfigMap {cm.name} has no {L.MANIFEST_KEY}")
    try:
        return ManifestView(key, manifest=loads(text))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError, as is bad JSON.
        return ManifestView(key, error=f"ConfigMap {cm.name}: {str(exc)[:500]}")


def _job_outcome(job: ObjectView) -> tuple[str, str, str | None]:
    """('failed'|'complete'|'running', message, completion time)."""
    for cond in job.status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Failed":
            reason = cond.get("reason") or "Failed"
            return "failed", f"{reason}: {cond.get('message') or 'the Job failed'}", None
        if cond.get("type") == "Complete":
            return "complete", "", job.status.get("completionTime") or cond.get("lastTransitionTime")
    return "running", "", None


def _seconds_since(stamp: str | None, now: datetime) -> float:
    if not stamp:
        return 0.0
    try:
        return (now - C.parse_time(stamp)).total_seconds()
    except ValueError:
        return 0.0


def _variant_status(spec: ModelDeploymentSpec, manifest: Manifest, fetch_base: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for wanted in spec.edge.variants:
        got = manifest.variant(wanted.name)
        if got is None:
            out.append({"name": wanted.name, "state": "Rejected", "reason": "missing from the manifest"})
            continue
        entry: dict[str, Any] = {
            "name": got.name,
            "state": "Verified" if got.accepted and got.uri and got.sha256 else "Rejected",
            "reason": got.reason,
        }
        if got.fidelity is not None:
            fid: dict[str, Any] = {
                "cosine": got.fidelity.cosine.model_dump(by_alias=True),
                "maxAbsError": got.fidelity.max_abs_error,
                "samples": got.fidelity.samples,
            }
            if got.fidelity.top1_agreement is not None:
                fid["top1Agreement"] = got.fidelity.top1_agreement
            entry["fidelity"] = fid
        if got.latency is not None:
            entry["latency"] = {"p50Ms": got.latency.p50_ms, "ratioVsFp32": got.latency.ratio_vs_fp32}
        if got.size_bytes is not None:
            entry["sizeBytes"] = got.size_bytes
        if got.sha256:
            entry["sha256"] = got.sha256
        if got.uri and entry["state"] == "Verified":
            entry["uri"] = B.resolve_uri(fetch_base, got.uri)
        out.append(entry)
    return out


def _compression(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    key: str,
    settings: Settings,
) -> _Compression:
    if not spec.edge.variants:
        return _Compression(
            key, Condition(C.VARIANTS_VERIFIED, "True", Reason.NO_VARIANTS, "no edge variants")
        )
    cm = observed.child("ConfigMap", L.manifest_name(owner.name, key))
    fetch_base = B.artifact_dir(spec, owner, key).fetch_base
    if cm is not None:
        view = read_manifest(cm)
        if view.manifest is None:
            cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.MANIFEST_INVALID, view.error or "")
            return _Compression(key, cond)
        manifest = view.manifest
        if manifest.model.source_sha256.lower() != spec.model.source.sha256.lower():
            msg = f"manifest {cm.name} was built from sha256 {manifest.model.source_sha256}, not the spec's model"
            return _Compression(key, Condition(C.VARIANTS_VERIFIED, "False", Reason.MANIFEST_INVALID, msg))
        variants = _variant_status(spec, manifest, fetch_base)
        accepted = frozenset(v["name"] for v in variants if v["state"] == "Verified")
        rejected = [f"{v['name']} ({v.get('reason', '')})" for v in variants if v["state"] != "Verified"]
        if not accepted:
            cond = Condition(
                C.VARIANTS_VERIFIED, "False", Reason.ALL_REJECTED, "rejected: " + "; ".join(rejected)
            )
        elif rejected:
            msg = f"accepted: {', '.join(sorted(accepted))}; rejected: {'; '.join(rejected)}"
            cond = Condition(C.VARIANTS_VERIFIED, "True", Reason.PARTIALLY_REJECTED, msg)
        else:
            cond = Condition(
                C.VARIANTS_VERIFIED, "True", Reason.VERIFIED, f"accepted: {', '.join(sorted(accepted))}"
            )
        return _Compression(key, cond, manifest, accepted, variants)

    pending = [{"name": v.name, "state": "Compressing"} for v in spec.edge.variants]
    job = observed.child("Job", L.compress_name(owner.name, key))
    if job is not None:
        outcome, message, completed = _job_outcome(job)
        if outcome == "failed":
            failed = [
                {"name": v.name, "state": "Failed", "reason": message[:256]} for v in spec.edge.variants
            ]
            msg = f"compression Job {job.name} failed: {message}"
            return _Compression(
                key, Condition(C.VARIANTS_VERIFIED, "False", Reason.COMPRESSION_FAILED, msg), variants=failed
            )
        if outcome == "complete":
            waited = _seconds_since(completed, observed.now)
            if waited >= settings.manifest_grace_seconds:
                msg = f"compression Job {job.name} completed but published no manifest ConfigMap"
                failed = [
                    {"name": v.name, "state": "Failed", "reason": "no manifest"} for v in spec.edge.variants
                ]
                cond = Condition(C.VARIANTS_VERIFIED, "False", Reason.COMPRESSION_FAILED, msg)
                return _Compression(key, cond, variants=failed)
            cond = Condition(C.VARIANTS_VERIFIED, "Unknown", Reason.COMPRESSING, "waiting for the manifest")
            return _Compression(
                key, cond, variants=pending, requeue_after=settings.manifest_grace_seconds - waited
            )
    msg = f"compression Job {L.compress_name(owner.name, key)} is building and verifying the variants"
    return _Compression(
        key, Condition(C.VARIANTS_VERIFIED, "Unknown", Reason.COMPRESSING, msg), variants=pending
    )


def _cloud_fault(spec: ModelDeploymentSpec, observed: Observed) -> Condition | None:
    """Why the cloud tier cannot be scheduled at all, if it cannot."""
    candidates = [n for n in observed.nodes if selects(spec.cloud.node_selector, n)]
    if not candidates:
        sel = ",".join(f"{k}={v}" for k, v in sorted(spec.cloud.node_selector.items()))
        return Condition(
            C.CLOUD_READY, "False", Reason.NO_CLOUD_NODE, f"no node matches the cloud nodeSelector {sel}"
        )
    need = spec.cloud.resources.gpu
    if need > 0 and spec.cloud.replicas > 0:
        fits = [n for n in candidates if (parse_quantity(n.allocatable.get(GPU, "0")) or 0) >= need]
        if not fits:
            most = max((parse_quantity(n.allocatable.get(GPU, "0")) or 0) for n in candidates)
            return Condition(
                C.CLOUD_READY,
                "False",
                Reason.NO_GPU_NODE,
                f"no cloud node has {need} allocatable {GPU} (at most {most:g} among {len(candidates)} node(s))",
            )
    return None


def _source_fault(spec: ModelDeploymentSpec, observed: Observed) -> str | None:
    for uri in (spec.model.source.uri, spec.edge.artifacts.uri):
        parsed = urlparse(uri)
        if parsed.scheme != "pvc" or observed.pvcs is None:
            continue
        if parsed.netloc not in observed.pvcs:
            return f"PersistentVolumeClaim {parsed.netloc!r} (from {uri}) not found in namespace {observed.namespace}"
    return None


def _cloud_condition(spec: ModelDeploymentSpec, deployment: ObjectView | None) -> tuple[Condition, int]:
    if spec.cloud.replicas == 0:
        return Condition(C.CLOUD_READY, "True", Reason.CLOUD_DISABLED, "spec.cloud.replicas is 0"), 0
    if deployment is None:
        return Condition(C.CLOUD_READY, "False", Reason.DEPLOYMENT_PROGRESSING, "creating the Deployment"), 0
    status = deployment.status
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    fresh = int(status.get("observedGeneration") or 0) >= int(deployment.metadata.get("generation") or 0)
    want = spec.cloud.replicas
    if fresh and available >= want and updated >= want and ready >= want:
        return Condition(
            C.CLOUD_READY, "True", Reason.DEPLOYMENT_AVAILABLE, f"{ready}/{want} replicas ready"
        ), ready
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            msg = f"{ready}/{want} replicas ready: {cond.get('message', '')}"
            return Condition(C.CLOUD_READY, "False", Reason.DEPLOYMENT_UNAVAILABLE, msg), ready
    return Condition(
        C.CLOUD_READY, "False", Reason.DEPLOYMENT_PROGRESSING, f"{ready}/{want} replicas ready"
    ), ready


def current_assignment(observed: Observed) -> dict[str, Slot]:
    out: dict[str, Slot] = {}
    for ds in observed.of_kind("DaemonSet"):
        revision, variant = ds.labels.get(L.REVISION), ds.labels.get(L.VARIANT)
        if not revision or not variant or ds.deleting:
            continue
        for node in B.affinity_nodes(ds.body):
            out.setdefault(node, Slot(revision, variant))
    return out


def edge_pods(observed: Observed) -> dict[str, NodePod]:
    out: dict[str, NodePod] = {}
    for pod in sorted(observed.pods, key=lambda p: (not p.ready, p.name)):
        if pod.component != L.COMPONENT_EDGE or not pod.node or not pod.revision or not pod.variant:
            continue
        failed = pod.restarts >= CRASH_RESTARTS and not pod.ready
        out.setdefault(pod.node, NodePod(pod.revision, pod.variant, pod.ready, failed))
    return out


@dataclass
class _Edge:
    children: list[dict[str, Any]] = field(default_factory=list)
    keep: set[tuple[str, str]] = field(default_factory=set)
    progressing: Condition | None = None
    rolled_out: Condition | None = None
    fault: Condition | None = None
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    complete: bool = False
    rolled_back: Condition | None = None
    rollout: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    requeue_after: float | None = None
    stable_revision: str | None = None


def _edge(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    revision: str,
    comp: _Compression,
    settings: Settings,
) -> _Edge:
    out = _Edge()
    if not spec.edge.variants:
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", Reason.NO_EDGE_VARIANTS, "no edge variants")
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "True", Reason.NO_EDGE_VARIANTS, "no edge variants")
        out.complete = True
        return out
    eligible = [n for n in observed.nodes if selects(spec.edge.node_selector, n)]
    matching: Placement = place(spec.edge.variants, eligible)
    verified = comp.manifest is not None and bool(comp.accepted)
    placement = place(spec.edge.variants, eligible, comp.accepted) if verified else matching
    current = current_assignment(observed)
    pods = edge_pods(observed)
    status = observed.status
    result: Assignment = assign_nodes(
        AssignInput(
            rollout=spec.rollout,
            nodes=eligible,
            desired=placement.variants if verified else {},
            update_revision=revision,
            stable_revision=status.get("currentRevision")
            if isinstance(status.get("currentRevision"), str)
            else None,
            verified=verified,
            current=current,
            pods=pods,
            edge_status=status.get("edge") or {},
            annotations=observed.annotations,
            now=observed.now,
            rollout_state=status.get("rollout") or {},
            variant_sizes={v.name: v.size_bytes or 0 for v in comp.manifest.variants}
            if comp.manifest
            else {},
            measurement=observed.measurement,
        )
    )
    out.events.extend(result.events)
    out.rollout = result.rollout
    out.history = result.history
    out.requeue_after = result.requeue_after
    out.stable_revision = result.rollout.get("stableRevision")

    groups: dict[Slot, list[str]] = {}
    for node, slot in result.nodes.items():
        groups.setdefault(slot, []).append(node)
    existing = {
        (ds.labels.get(L.REVISION), ds.labels.get(L.VARIANT)): ds for ds in observed.of_kind("DaemonSet")
    }
    for rev, variant in existing:
        slot = Slot(rev or "", variant or "")
        # Empty DaemonSets of the update revision go: the spec rebuilds them; older ones are the rollback path.
        if slot not in groups and rev in result.keep_revisions and rev != revision:
            groups[slot] = []
    for slot, nodes in sorted(groups.items(), key=lambda kv: (kv[0].revision, kv[0].variant)):
        if slot.revision == revision and comp.manifest is not None:
            got = comp.manifest.variant(slot.variant)
            if got is None or not got.uri or not got.sha256 or slot.variant not in comp.accepted:
                continue
            fetch_base = B.artifact_dir(spec, owner, comp.key).fetch_base
            artifact = B.EdgeArtifact(uri=B.resolve_uri(fetch_base, got.uri), sha256=got.sha256)
            out.children.append(
                B.edge_daemonset(
                    spec,
                    owner,
                    revision,
                    comp.key,
                    slot.variant,
                    artifact,
                    nodes,
                    {**settings.pod_labels, **spec.edge.pod_labels},
                )
            )
        else:
            ds = existing.get((slot.revision, slot.variant))
            if ds is not None:
                out.children.append(B.repin_daemonset(ds.body, nodes))

    n_unmatched = len(matching.unmatched)
    target = len(eligible) - n_unmatched
    updated = [n for n, s in result.nodes.items() if s.revision == revision]
    ready = [n for n in updated if (p := pods.get(n)) is not None and p.ready and p.revision == revision]
    per_variant = []
    for v in spec.edge.variants:
        on = [n for n in updated if result.nodes[n].variant == v.name]
        if on:
            rdy = [n for n in on if n in ready and pods[n].variant == v.name]
            per_variant.append({"name": v.name, "revision": revision, "nodes": len(on), "ready": len(rdy)})
    out.status = {
        "targetNodes": target,
        "updatedNodes": len(updated),
        "readyNodes": len(ready),
        "deferredNodes": len(result.state.get("deferredNodes", [])),
        "unmatchedNodes": n_unmatched,
        "stageIndex": int(result.state.get("stageIndex", 0)),
        "perVariant": per_variant,
    }
    if result.state.get("stage"):
        out.status["stage"] = result.state["stage"]
    if result.state.get("stageStartedAt"):
        out.status["stageStartedAt"] = result.state["stageStartedAt"]

    if not eligible:
        sel = ",".join(f"{k}={v}" for k, v in sorted(spec.edge.node_selector.items()))
        out.fault = Condition(
            C.EDGE_ROLLED_OUT, "False", Reason.NO_EDGE_NODES, f"no node matches the edge nodeSelector {sel}"
        )
    elif target == 0:
        msg = f"no edge node matches any variant's requires ({n_unmatched} node(s) checked)"
        out.fault = Condition(C.EDGE_ROLLED_OUT, "False", Reason.NO_MATCHING_EDGE_NODE, msg)
    old_unmatched = (status.get("edge") or {}).get("unmatchedNodes")
    if matching.unmatched and old_unmatched != n_unmatched:
        names = ", ".join(matching.unmatched[:20]) + (" ..." if n_unmatched > 20 else "")
        out.events.append(
            Event("Warning", Reason.UNMATCHED_NODES, f"{n_unmatched} edge node(s) match no variant: {names}")
        )

    if out.fault is not None:
        out.rolled_out = out.fault
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", out.fault.reason, out.fault.message)
    elif result.verdict == "Waiting":
        if comp.condition.status == "False":
            reason, msg = comp.condition.reason, "no verified variant to roll out"
            out.progressing = Condition(C.EDGE_PROGRESSING, "False", reason, msg)
        else:
            out.progressing = Condition(
                C.EDGE_PROGRESSING, "True", Reason.WAITING_FOR_VARIANTS, result.message
            )
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", Reason.WAITING_FOR_VARIANTS, result.message)
    elif result.verdict == "Progressing":
        # The wave's reason says which gate it is at: WaitingForReady, AnalysisRunning, Baking.
        out.progressing = Condition(
            C.EDGE_PROGRESSING, "True", result.reason or Reason.ROLLING_OUT, result.message
        )
        waiting = result.reason in ("", "WaitingForReady")
        out.rolled_out = Condition(
            C.EDGE_ROLLED_OUT,
            "False",
            Reason.NODES_NOT_READY if waiting else Reason.ROLLING_OUT,
            result.message,
        )
    elif result.verdict in ("Holding", "Paused"):
        # The wave's own reason (AnalysisInconclusive, Paused, WaitingForOfflineNodes, ...) is the news.
        out.progressing = Condition(C.EDGE_PROGRESSING, "True", result.reason, result.message)
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", result.reason, result.message)
    elif result.verdict == "RolledBack":
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", C.ROLLED_BACK, result.message)
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", C.ROLLED_BACK, result.message)
        out.rolled_back = Condition(C.ROLLED_BACK, "True", result.reason, result.message)
    else:
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", Reason.ROLLED_OUT, result.message)
        msg = result.message
        if n_unmatched:
            msg += f"; {n_unmatched} node(s) match no variant"
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "True", Reason.ROLLED_OUT, msg)
        out.complete = True
    return out


def _manifests_to_keep(observed: Observed, keys: set[str], limit: int) -> set[tuple[str, str]]:
    cms = [c for c in observed.of_kind("ConfigMap") if c.labels.get(L.COMPONENT) == L.COMPONENT_MANIFEST]
    newest = sorted(cms, key=lambda c: c.created, reverse=True)[:limit]
    return {("ConfigMap", c.name) for c in cms if c.labels.get(L.COMPRESSION) in keys} | {
        ("ConfigMap", c.name) for c in newest
    }


def _phase(conds: list[Condition]) -> str:
    get = {c.type: c for c in conds}
    verified, cloud = get.get(C.VARIANTS_VERIFIED), get.get(C.CLOUD_READY)
    if any(c.reason in FAILURE_REASONS or c.reason == Reason.INVALID_SPEC for c in conds if c.is_bad):
        return "Failed"
    if any(c.reason in FAULT_REASONS for c in conds if c.is_bad):
        return "Degraded"
    if verified is not None and verified.status == "Unknown":
        return "Compressing"
    if C.is_true(conds, C.ROLLED_BACK):
        return "RolledBack"
    edge = get.get(C.EDGE_PROGRESSING)
    if edge is not None and edge.reason in ("Paused", "StagePause"):
        return "Paused"
    if C.is_true(conds, C.READY):
        return "Healthy"
    if cloud is not None or C.is_true(conds, C.EDGE_PROGRESSING):
        return "Progressing"
    return "Pending"


def invalid_spec_status(observed: Observed, message: str) -> Plan:
    """A spec the API server let through but the models reject: say so, touch no child."""
    conds = [Condition.from_dict(c) for c in observed.status.get("conditions") or []]
    for new in (
        Condition(C.READY, "False", Reason.INVALID_SPEC, message[:1000]),
        Condition(C.DEGRADED, "True", Reason.INVALID_SPEC, message[:1000]),
    ):
        conds = C.set_condition(
            conds, Condition(**{**new.__dict__, "observed_generation": observed.generation}), observed.now
        )
    status = dict(observed.status)
    status.update(
        observedGeneration=observed.generation, phase="Failed", conditions=[c.to_dict() for c in conds]
    )
    plan = Plan(status=normalize_status(status))
    old = C.get([Condition.from_dict(c) for c in observed.status.get("conditions") or []], C.READY)
    if old is None or old.reason != Reason.INVALID_SPEC:
        plan.events.append(Event("Warning", Reason.INVALID_SPEC, message[:1000]))
    return plan


def normalize_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """Through the API model and back, so the planned and the stored status compare field for field."""
    return ModelDeploymentStatus.model_validate(dict(status)).dump()


def plan(spec: ModelDeploymentSpec, observed: Observed, settings: Settings | None = None) -> Plan:
    settings = settings or Settings()
    owner = B.Owner(observed.name, observed.namespace, observed.uid)
    # With an adopted learned model, the edge (compression, revision, waves) is built from it; the cloud is not.
    espec = learning.effective_spec(spec, observed.status.get("learning"))
    ckey = compression_key(espec, spec.edge.artifacts.uri)
    revision = revision_key(espec, spec.edge.artifacts.uri, dict(settings.pod_labels) or None)
    desired: list[dict[str, Any]] = []
    keep: set[tuple[str, str]] = set()
    new_conditions: list[Condition] = []
    requeue: float | None = None

    def hold(kind: str, name: str) -> None:
        # A child we cannot build right now stays as it is: no half-made replacement, no deletion.
        if observed.child(kind, name) is not None:
            keep.add((kind, name))

    # -- model source and cloud ------------------------------------------------------------------
    source_fault = _source_fault(spec, observed)
    cloud_fault = _cloud_fault(spec, observed)
    deployment = observed.child("Deployment", L.cloud_name(owner.name))
    if source_fault is not None:
        cloud_cond = Condition(C.CLOUD_READY, "False", Reason.MISSING_PVC, source_fault)
        hold("Deployment", L.cloud_name(owner.name))
        hold("Service", L.cloud_name(owner.name))
        cloud_ready = 0
    elif cloud_fault is not None:
        cloud_cond = cloud_fault
        hold("Deployment", L.cloud_name(owner.name))
        hold("Service", L.cloud_name(owner.name))
        cloud_ready = 0
    else:
        desired.append(B.cloud_deployment(spec, owner, settings.pod_labels))
        desired.append(B.cloud_service(spec, owner))
        cloud_cond, cloud_ready = _cloud_condition(spec, deployment)
    new_conditions.append(cloud_cond)

    # -- compression -------------------------------------------------------------------------------
    no_cloud_node = cloud_fault is not None and cloud_fault.reason == Reason.NO_CLOUD_NODE
    if source_fault is not None and spec.edge.variants:
        comp = _Compression(ckey, Condition(C.VARIANTS_VERIFIED, "False", Reason.MISSING_PVC, source_fault))
        hold("Job", L.compress_name(owner.name, ckey))
    else:
        comp = _compression(espec, observed, owner, ckey, settings)
        if (
            no_cloud_node
            and comp.manifest is None
            and spec.edge.variants
            and comp.condition.status == "Unknown"
        ):
            assert cloud_fault is not None
            comp.condition = Condition(
                C.VARIANTS_VERIFIED, "False", Reason.NO_CLOUD_NODE, cloud_fault.message
            )
    if spec.edge.variants and source_fault is None:
        desired.extend(B.compressor_account(owner))
        job_name = L.compress_name(owner.name, ckey)
        if comp.manifest is None and comp.condition.status == "Unknown":
            desired.append(
                B.compression_job(
                    espec, owner, ckey, settings.pod_labels, settings.compression_deadline_seconds
                )
            )
        elif observed.child("Job", job_name) is not None:
            keep.add(("Job", job_name))
    requeue = comp.requeue_after
    new_conditions.append(comp.condition)

    # -- edge ----------------------------------------------------------------------------------------
    edge = _edge(espec, observed, owner, revision, comp, settings)
    desired.extend(edge.children)
    assert edge.progressing is not None and edge.rolled_out is not None
    new_conditions += [edge.progressing, edge.rolled_out]
    if edge.rolled_back is not None:
        new_conditions.append(edge.rolled_back)
    elif C.is_true([Condition.from_dict(c) for c in observed.status.get("conditions") or []], C.ROLLED_BACK):
        new_conditions.append(
            Condition(C.ROLLED_BACK, "False", "NewRevision", f"rolling out revision {revision}")
        )
    manifest_keys = {ckey} | {
        ds.labels.get(L.COMPRESSION, "")
        for ds in observed.of_kind("DaemonSet")
        if ds.labels.get(L.COMPRESSION)
    }
    keep |= _manifests_to_keep(observed, manifest_keys, spec.rollout.revision_history_limit)

    # -- readiness, degradation, status ------------------------------------------------------------------
    variants_ok = comp.condition.status == "True"
    all_ok = cloud_cond.is_true and variants_ok and edge.complete
    if all_ok:
        ready = Condition(C.READY, "True", Reason.AVAILABLE, "cloud serving and edge rolled out")
    else:
        blocking = next(
            (c for c in (cloud_cond, comp.condition, edge.rolled_out) if not c.is_true), cloud_cond
        )
        ready = Condition(C.READY, "False", blocking.reason, f"{blocking.type}: {blocking.message}")
    faults = [
        c
        for c in (cloud_cond, comp.condition, edge.rolled_out)
        if c.is_bad and c.reason in FAULT_REASONS | FAILURE_REASONS
    ]
    if faults:
        degraded = Condition(
            C.DEGRADED, "True", faults[0].reason, "; ".join(f"{c.type}: {c.message}" for c in faults)
        )
    else:
        degraded = Condition(C.DEGRADED, "False", Reason.AS_EXPECTED, "")
    new_conditions += [ready, degraded]

    old_conditions = [Condition.from_dict(c) for c in observed.status.get("conditions") or []]
    conds = list(old_conditions)
    events: list[Event] = []
    for new in new_conditions:
        new = Condition(
            new.type, new.status, new.reason, new.message[:4000], observed_generation=observed.generation
        )
        old = C.get(old_conditions, new.type)
        problem = new.is_bad and new.reason in FAULT_REASONS | FAILURE_REASONS
        # First appearances are news only when they are problems; after that, every move is, except one
        # from gate to gate of a wave (or from Available into the first gate: that is RolloutStarted).
        gate_to_gate = (
            old is not None
            and new.reason in WAVE_GATE_REASONS
            and old.reason in WAVE_GATE_REASONS | {Reason.AVAILABLE}
        )
        if C.changed(old, new) and (old is not None or problem) and not gate_to_gate:
            etype: Literal["Normal", "Warning"] = "Warning" if problem and new.type != C.READY else "Normal"
            events.append(Event(etype, new.reason, f"{new.type} is {new.status}: {new.message}"[:1000]))
        conds = C.set_condition(conds, new, observed.now)

    old_update = observed.status.get("updateRevision")
    if old_update != revision:
        events.append(
            Event(
                "Normal",
                "NewRevision",
                f"revision {revision} (model {spec.model.version}, compression {ckey})",
            )
        )
    events.extend(edge.events)

    history = list(observed.status.get("history") or [])
    for entry in edge.history:
        history.append({**entry, "modelVersion": spec.model.version})
    current_revision = observed.status.get("currentRevision")
    if edge.rolled_back is not None and edge.stable_revision:
        current_revision = edge.stable_revision
    if all_ok and current_revision != revision:
        current_revision = revision
        history.append(
            {
                "revision": revision,
                "modelVersion": spec.model.version,
                "outcome": "Promoted",
                "reason": Reason.ROLLED_OUT,
                "time": C.format_time(observed.now),
            }
        )
        # Promoted says what Ready turning True would: one Event, not two.
        events = [e for e in events if e.reason != Reason.AVAILABLE]
        events.append(Event("Normal", "Promoted", f"revision {revision} is serving everywhere"))
    history = history[-spec.rollout.revision_history_limit :]

    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "phase": _phase(conds),
        "conditions": [c.to_dict() for c in conds],
        "updateRevision": revision,
        "cloud": {"replicas": spec.cloud.replicas, "ready": cloud_ready},
        "variants": comp.variants,
        "edge": edge.status,
        "history": history,
    }
    if edge.rollout:
        status["rollout"] = edge.rollout
    if current_revision:
        status["currentRevision"] = current_revision

    if spec.learning is not None:
        sizes = (
            {v.name: v.size_bytes for v in comp.manifest.accepted() if v.size_bytes} if comp.manifest else {}
        )
        lp = learning.plan_learning(spec, observed, owner, variant_sizes=sizes)
        names = {(d["kind"], d["metadata"]["name"]) for d in desired}
        desired += [d for d in lp.children if (d["kind"], d["metadata"]["name"]) not in names]
        keep |= lp.keep
        if lp.status is not None:
            status["learning"] = lp.status
        events.extend(lp.events)
        if lp.requeue_after is not None:
            requeue = min(requeue, lp.requeue_after) if requeue is not None else lp.requeue_after
    actions = check(desired, observed, keep)
    for action in actions:
        if action.check is Check.CREATE:
            events.append(Event("Normal", "Created", f"created {action.kind} {action.name}"))
        elif action.check is Check.DELETE:
            events.append(Event("Normal", "Deleted", f"deleted {action.kind} {action.name}"))
    if comp.condition.status == "Unknown" or not all_ok:
        requeue = min(requeue, 30.0) if requeue is not None else 30.0
    if edge.requeue_after is not None:
        requeue = min(requeue, edge.requeue_after) if requeue is not None else edge.requeue_after
    return Plan(
        actions=actions,
        status=normalize_status(status),
        events=events,
        assignment={},
        requeue_after=requeue,
    )
