"""The edge tier: which edge node runs which (revision, variant), as DaemonSets pinned to node names.

Vocabulary: a *slot* is one (revision, variant) DaemonSet; the *assignment* maps node names to slots and
is read back from the DaemonSets' node affinity; the waves behind `assign_nodes` decide how it moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.scalars import format_time
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.api.statuses import RolloutStatus, SiteAdapters, SiteDownload
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import NodeView, Observed
from kiri_operator.planning import building as B
from kiri_operator.planning import waves as W
from kiri_operator.planning.adapting import (
    BASE,
    AdapterInput,
    AdapterPlan,
    desired_sets,
    plan_adapters,
    site_commands,
    site_label,
)
from kiri_operator.planning.assigning import AssignInput, Assignment, NodePod, assign_nodes
from kiri_operator.planning.compression import CompressionPlan, manifests_to_keep
from kiri_operator.planning.placing import Placement, admits, place, selects
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.updating import DAY, Download, SpecChangeGate, gate_spec_change, site_bytes
from kiri_operator.plans import Event, Slot, TierPlan, sooner

# Restarts after which a not-Ready edge pod counts as failing (crash loop): roll back without waiting for
# the progress deadline.
CRASH_RESTARTS = 3


def plan_edge(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    revision: str,
    comp: CompressionPlan,
    settings: Settings,
) -> EdgePlan:
    out = _edge_rollout(spec, observed, owner, revision, comp, settings)
    assert out.progressing is not None and out.rolled_out is not None
    out.conditions += [out.progressing, out.rolled_out]
    if out.rolled_back is not None:
        out.conditions.append(out.rolled_back)
    elif C.is_true([Condition.from_dict(c) for c in observed.status.get("conditions") or []], C.ROLLED_BACK):
        out.conditions.append(
            Condition(C.ROLLED_BACK, "False", Reason.NEW_REVISION, f"rolling out revision {revision}")
        )
    if out.adapters is not None:
        out.conditions.append(out.adapters)
    # Manifests stay while a DaemonSet was built from them (the rollback path) and for the history limit.
    keys = {comp.key} | {
        ds.labels.get(L.COMPRESSION, "")
        for ds in observed.of_kind("DaemonSet")
        if ds.labels.get(L.COMPRESSION)
    }
    out.keep |= manifests_to_keep(observed, keys, spec.rollout.revision_history_limit)
    return out


def stored_rollout(raw: Any) -> tuple[RolloutStatus | None, str | None]:
    """status.rollout as the wave planner's state, or None and why it could not be read."""
    if not raw:
        return None, None
    try:
        return RolloutStatus.model_validate(raw), None
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'rollout'}: {e['msg']}" for e in exc.errors()[:3]
        )
        return None, f"status.rollout is unreadable ({where}); rebuilt from the DaemonSets"[:1000]


def current_assignment(observed: Observed) -> dict[str, Slot]:
    out: dict[str, Slot] = {}
    for ds in observed.of_kind("DaemonSet"):
        revision, variant = ds.labels.get(L.REVISION), ds.labels.get(L.VARIANT)
        if not revision or not variant or ds.deleting:
            continue
        for node in B.affinity_nodes(ds.body):
            out.setdefault(node, Slot(revision, variant, ds.labels.get(L.ADAPTERS, "")))
    return out


def edge_pods(observed: Observed) -> dict[str, NodePod]:
    out: dict[str, NodePod] = {}
    for pod in sorted(observed.pods, key=lambda p: (not p.ready, p.name)):
        if pod.component != L.COMPONENT_EDGE or not pod.node or not pod.revision or not pod.variant:
            continue
        failed = pod.restarts >= CRASH_RESTARTS and not pod.ready
        adapters = pod.labels.get(L.ADAPTERS, "")
        out.setdefault(pod.node, NodePod(pod.revision, pod.variant, pod.ready, failed, pod.reason, adapters))
    return out


@dataclass
class EdgePlan(TierPlan):
    progressing: Condition | None = None
    rolled_out: Condition | None = None
    fault: Condition | None = None
    status: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    rolled_back: Condition | None = None
    rollout: RolloutStatus | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stable_revision: str | None = None
    adapters: Condition | None = None
    """AdaptersRolledOut, with `spec.edge.adapters` (or a site that still serves some)."""


def _policy_gate(
    spec: ModelDeploymentSpec,
    observed: Observed,
    eligible: list[NodeView],
    placement: Placement,
    sizes: dict[str, int],
    stored: RolloutStatus | None,
    revision: str,
    stable_revision: str | None,
) -> tuple[SpecChangeGate | None, list[SiteDownload], dict[str, int]]:
    """`spec.rollout.updatePolicy` on a new revision, whatever made it (a spec change or a learned model):
    the gate, the downloads of the last 24 hours that it counted, and what this revision costs each site."""
    now = observed.now
    recent = [d for d in ((stored.downloads or ()) if stored is not None else ()) if now - d.time < DAY]
    label = site_label(spec)
    site_by_node = {n.name: n.labels.get(label, "") for n in eligible}
    cost = site_bytes(placement.variants, site_by_node, sizes)
    gate = gate_spec_change(
        spec.rollout.update_policy,
        revision=revision,
        stable_revision=stable_revision,
        rollout_revision=stored.update_revision if stored is not None else None,
        last_started_at=stored.started_at if stored is not None else None,
        downloads=[Download(d.site, d.bytes, d.time) for d in recent],
        bytes_per_site=cost,
        now=now,
    )
    return gate, recent, cost


def _edge_rollout(
    spec: ModelDeploymentSpec,
    observed: Observed,
    owner: B.Owner,
    revision: str,
    comp: CompressionPlan,
    settings: Settings,
) -> EdgePlan:
    out = EdgePlan()
    if not spec.edge.variants:
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", Reason.NO_EDGE_VARIANTS, "no edge variants")
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "True", Reason.NO_EDGE_VARIANTS, "no edge variants")
        out.complete = True
        return out
    eligible = [
        n for n in observed.nodes if selects(spec.edge.node_selector, n) and admits(spec.edge.tolerations, n)
    ]
    matching: Placement = place(spec.edge.variants, eligible)
    verified = comp.manifest is not None and bool(comp.accepted)
    placement = place(spec.edge.variants, eligible, comp.accepted) if verified else matching
    current = current_assignment(observed)
    pods = edge_pods(observed)
    status = observed.status
    stored, unreadable = stored_rollout(status.get("rollout"))
    if unreadable is not None:
        # Garbage in status.rollout (a hand edit, a bad restore) would fail every reconcile: rebuild the
        # planner's memory from the DaemonSets instead, and say so once, loudly.
        out.events.append(Event("Warning", Reason.ROLLOUT_STATUS_INVALID, unreadable))
    sizes = {v.name: v.size_bytes or 0 for v in comp.manifest.variants} if comp.manifest else {}
    stable_revision = (
        status.get("currentRevision") if isinstance(status.get("currentRevision"), str) else None
    )
    gate, recent, cost = _policy_gate(
        spec, observed, eligible, placement, sizes, stored, revision, stable_revision
    )
    deferred = gate.decision if gate is not None and not gate.decision.allowed else None
    if deferred is not None and deferred.retry_after_seconds is not None:
        out.requeue_after = float(max(1, deferred.retry_after_seconds))
    held = _held_by_adapters(status, revision, stable_revision, stored) if deferred is None else None
    why_deferred = f"updatePolicy: {deferred.reason}" if deferred is not None else held
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
            annotations=observed.annotations,
            now=observed.now,
            rollout_status=stored,
            variant_sizes={v.name: v.size_bytes or 0 for v in comp.manifest.variants}
            if comp.manifest
            else {},
            measurement=observed.measurement,
            measuring=observed.measuring,
            deferred_by_policy=why_deferred,
        )
    )
    out.events.extend(result.events)
    out.rollout = result.rollout
    if (
        out.rollout is not None
        and out.rollout.update_revision == revision
        and revision != stable_revision
        and (stored is None or stored.update_revision != revision)
    ):
        # This reconcile starts the rollout: the update policy counts its start and its downloads.
        fresh = [SiteDownload(site=k, bytes=v, time=observed.now) for k, v in sorted(cost.items()) if v > 0]
        out.rollout = out.rollout.model_copy(
            update={"started_at": observed.now, "downloads": (*recent, *fresh) or None}
        )
    out.history = [
        {
            "revision": h.revision,
            "outcome": h.outcome,
            "reason": h.reason,
            "time": format_time(h.at),
            "message": h.message or "",
        }
        for h in result.rolled_back
    ]
    out.requeue_after = sooner(out.requeue_after, result.requeue_after)
    out.stable_revision = result.rollout.stable_revision if result.rollout is not None else None

    existing = {
        (ds.labels.get(L.REVISION) or "", ds.labels.get(L.VARIANT) or "", ds.labels.get(L.ADAPTERS, "")): ds
        for ds in observed.of_kind("DaemonSet")
    }
    adapters = _plan_adapters(spec, observed, eligible, result, current, pods, recent, stable_revision)
    out.events.extend(adapters.events)
    out.requeue_after = sooner(out.requeue_after, adapters.requeue_after)
    if adapters.downloads and out.rollout is not None:
        out.rollout = out.rollout.model_copy(
            update={"downloads": (*(out.rollout.downloads or ()), *adapters.downloads)}
        )

    def buildable(slot: Slot) -> bool:
        return slot.revision == revision and (not slot.adapters or slot.adapters in adapters.sets)

    groups: dict[Slot, list[str]] = {}
    for node, base_slot in result.nodes.items():
        serves = adapters.nodes.get(node, BASE)
        slot = replace(base_slot, adapters="" if serves == BASE else serves)
        if not buildable(slot) and (slot.revision, slot.variant, slot.adapters) not in existing:
            # No spec and no DaemonSet to run this pairing from (a revision rolled back under adapters it
            # never ran with): the node stays where it is.
            slot = current.get(node, replace(base_slot, adapters=""))
        groups.setdefault(slot, []).append(node)
    spec_adapters = {a.revision for a in desired_sets(spec).values()}
    for rev, variant, ads in existing:
        slot = Slot(rev, variant, ads)
        if slot in groups or rev not in result.keep_revisions:
            continue
        # Empty DaemonSets the spec rebuilds go; the others are the rollback path (of a revision, or of a
        # site's adapters).
        from_spec = rev == revision and ads in spec_adapters
        if (not ads and rev != revision) or (ads and ads in adapters.keep and not from_spec):
            groups[slot] = []
    for slot, nodes in sorted(groups.items(), key=lambda kv: (kv[0].revision, kv[0].variant, kv[0].adapters)):
        if buildable(slot) and comp.manifest is not None:
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
                    adapters.sets.get(slot.adapters) if slot.adapters else None,
                )
            )
        else:
            ds = existing.get((slot.revision, slot.variant, slot.adapters))
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
        "deferredNodes": len(result.deferred),
        "unmatchedNodes": n_unmatched,
        "stageIndex": result.stage_index,
        "perVariant": per_variant,
    }
    if adapters.sites:
        out.status["adapters"] = [site.dump() for site in adapters.sites]
    if result.stage:
        out.status["stage"] = result.stage
    if result.stage_started_at is not None:
        out.status["stageStartedAt"] = format_time(result.stage_started_at)

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

    verdict = result.verdict
    if out.fault is not None:
        out.rolled_out = out.fault
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", out.fault.reason, out.fault.message)
    elif verdict.kind == "Waiting":
        if comp.condition.status == "False":
            reason, msg = comp.condition.reason, "no verified variant to roll out"
            out.progressing = Condition(C.EDGE_PROGRESSING, "False", reason, msg)
        elif verdict.reason == Reason.UPDATE_DEFERRED:
            out.progressing = Condition(C.EDGE_PROGRESSING, "True", Reason.UPDATE_DEFERRED, verdict.message)
        else:
            out.progressing = Condition(
                C.EDGE_PROGRESSING, "True", Reason.WAITING_FOR_VARIANTS, verdict.message
            )
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", verdict.reason, verdict.message)
    elif verdict.kind == "Progressing":
        # The wave's reason says which gate it is at: WaitingForReady, AnalysisRunning, Baking.
        out.progressing = Condition(C.EDGE_PROGRESSING, "True", verdict.reason, verdict.message)
        waiting = verdict.reason == Reason.WAITING_READY
        out.rolled_out = Condition(
            C.EDGE_ROLLED_OUT,
            "False",
            Reason.NODES_NOT_READY if waiting else Reason.ROLLING_OUT,
            verdict.message,
        )
    elif verdict.kind in ("Holding", "Inconclusive", "Paused"):
        # The wave's own reason (AnalysisInconclusive, Paused, WaitingForOfflineNodes, ...) is the news.
        out.progressing = Condition(C.EDGE_PROGRESSING, "True", verdict.reason, verdict.message)
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", verdict.reason, verdict.message)
    elif verdict.kind == "RolledBack":
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", C.ROLLED_BACK, verdict.message)
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", C.ROLLED_BACK, verdict.message)
        out.rolled_back = Condition(C.ROLLED_BACK, "True", verdict.reason, verdict.message)
    else:
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", Reason.ROLLED_OUT, verdict.message)
        msg = verdict.message
        if n_unmatched:
            msg += f"; {n_unmatched} node(s) match no variant"
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "True", Reason.ROLLED_OUT, msg)
        out.complete = True
    refused = [
        (ds.name, m) for ds in observed.of_kind("DaemonSet") if (m := observed.refusal("DaemonSet", ds.name))
    ]
    if refused and not out.complete and out.fault is None and out.rolled_back is None:
        # The wave waits on pods the API server will not admit: say so, not just "waiting for ready".
        name, message = refused[0]
        msg = f"pods of DaemonSet {name} refused: {message}"[:1000]
        out.progressing = Condition(C.EDGE_PROGRESSING, "False", Reason.POD_SECURITY_REFUSED, msg)
        out.rolled_out = Condition(C.EDGE_ROLLED_OUT, "False", Reason.POD_SECURITY_REFUSED, msg)
    if spec.edge.adapters or adapters.sites:
        out.adapters = _adapters_condition(adapters)
        out.complete = out.complete and not adapters.in_progress
    if unreadable is not None and out.progressing is not None:
        # Only this reconcile says it: the status written with it holds the rebuilt state.
        out.progressing = replace(out.progressing, reason=Reason.ROLLOUT_STATUS_INVALID, message=unreadable)
    return out


def stored_adapters(status: Any) -> dict[str, SiteAdapters]:
    """status.edge.adapters per site; an unreadable entry is dropped (the site starts from its DaemonSets)."""
    out: dict[str, SiteAdapters] = {}
    for raw in ((status.get("edge") or {}).get("adapters") or []) if isinstance(status, dict) else []:
        try:
            site = SiteAdapters.model_validate(raw)
        except ValidationError:
            continue
        out[site.site] = site
    return out


def _held_by_adapters(
    status: Any, revision: str, stable_revision: str | None, stored: RolloutStatus | None
) -> str | None:
    """Why a new revision waits: an adapter wave is in flight (one change at a time per node)."""
    if stable_revision is None or revision == stable_revision:
        return None
    if stored is not None and stored.update_revision == revision:
        return None  # its rollout has started: a gate never stops a wave midway
    flying = sorted(s.site for s in stored_adapters(status).values() if s.rollout and s.rollout.in_progress)
    if not flying:
        return None
    return f"waiting for the adapter rollout of site {', '.join(flying)} to end"


def _plan_adapters(
    spec: ModelDeploymentSpec,
    observed: Observed,
    eligible: list[NodeView],
    result: Assignment,
    current: dict[str, Slot],
    pods: dict[str, NodePod],
    recent: list[SiteDownload],
    stable_revision: str | None,
) -> AdapterPlan:
    """The adapter waves over the nodes the revision waves placed."""
    placed = [n for n in eligible if n.name in result.nodes]
    adapter_pods = {}
    for node, pod in pods.items():
        slot = result.nodes.get(node)
        on_slot = slot is not None and pod.revision == slot.revision and pod.variant == slot.variant
        adapter_pods[node] = W.NodePod(pod.adapters or BASE, pod.ready and on_slot, pod.failed, pod.reason)
    rollout = result.rollout
    recorded = {}
    for ds in observed.of_kind("DaemonSet"):
        revision = ds.labels.get(L.ADAPTERS)
        if not revision or revision in recorded:
            continue
        found = B.recorded_adapters(ds.body)
        if found is not None and found.revision == revision:  # the label and the args agree: Kiri built it
            recorded[revision] = found
    return plan_adapters(
        AdapterInput(
            rollout=spec.rollout,
            sites=desired_sets(spec),
            nodes=placed,
            site_label=site_label(spec),
            current={n: s.adapters or BASE for n, s in current.items()},
            pods=adapter_pods,
            stored=stored_adapters(observed.status),
            now=observed.now,
            revision_settled=rollout is None or not rollout.in_progress,
            first_rollout=stable_revision is None and (rollout is None or rollout.stable_revision is None),
            update_policy=spec.rollout.update_policy,
            downloads=recent,
            revision_started_at=rollout.started_at if rollout is not None else None,
            recorded=recorded,
            measurements=observed.site_measurements,
            measuring=observed.sites_measuring,
            commands=site_commands(observed.annotations),
        )
    )


def _adapters_condition(plan: AdapterPlan) -> Condition:
    """AdaptersRolledOut: True once every site serves the adapters the spec asks of it."""
    bad = plan.refused or plan.rolled_back
    if bad:
        reason = bad[0].reason if plan.refused else C.ROLLED_BACK
        # The gates' messages name their site; a wave's (a failed analysis, a deadline) do not.
        said = [
            s.message if s.message.startswith(f"site {s.site}:") else f"site {s.site}: {s.message}"
            for s in bad
        ]
        return Condition(C.ADAPTERS_ROLLED_OUT, "False", reason, "; ".join(said)[:1000])
    if plan.in_progress:
        waiting = [s for s in plan.sites if s.site in plan.in_progress]
        msg = "; ".join(f"site {s.site}: {s.message}" for s in waiting)
        return Condition(C.ADAPTERS_ROLLED_OUT, "False", Reason.ROLLING_OUT, msg[:1000])
    held = [s for s in plan.sites if s.verdict == "Waiting"]
    if held:
        msg = "; ".join(s.message for s in held)
        return Condition(C.ADAPTERS_ROLLED_OUT, "False", held[0].reason, msg[:1000])
    n = len(plan.sites)
    return Condition(C.ADAPTERS_ROLLED_OUT, "True", Reason.ROLLED_OUT, f"{n} site(s) serve their adapters")
