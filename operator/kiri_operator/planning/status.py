"""Status: readiness, degradation and phase from the tiers' conditions, the Events their moves deserve, and
the history of promotions and rollbacks.

Vocabulary: a *fault* is a reason that means the world cannot run the spec (a missing node or claim); a
*failure* is a reason that means the spec's own work failed (compression); a *wave gate* is a reason a
rollout passes through on every wave, whose moves the rollout's own Events already tell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kiri_operator import conditions as C
from kiri_operator.api.scalars import format_time
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.api.statuses import ModelDeploymentStatus
from kiri_operator.conditions import Condition, Reason
from kiri_operator.observations import Observed
from kiri_operator.planning.cloud import CloudPlan
from kiri_operator.planning.compression import CompressionPlan
from kiri_operator.planning.edge import EdgePlan
from kiri_operator.plans import Event, Plan

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
        Reason.STEP_PROGRESSING,
        Reason.WAITING_READY,
        Reason.ANALYSIS_RUNNING,
        Reason.BAKING,
    }
)


@dataclass
class StatusPlan:
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    ready: bool = False
    """Everything is where the spec wants it: cloud serving, variants verified, every edge node moved."""


def plan_status(
    spec: ModelDeploymentSpec,
    observed: Observed,
    revision: str,
    cloud: CloudPlan,
    comp: CompressionPlan,
    edge: EdgePlan,
    extra: Sequence[Condition] = (),
) -> StatusPlan:
    out = StatusPlan()
    out.ready = cloud.condition.is_true and comp.condition.status == "True" and edge.complete
    assert edge.rolled_out is not None
    tiers: tuple[Condition, ...] = (cloud.condition, comp.condition, edge.rolled_out)
    if edge.adapters is not None and edge.adapters.reason == Reason.ROLLING_OUT:
        # A site's adapter wave in flight holds Ready like a revision's wave does. A refused or rolled-back
        # adapter set does not: the site serves its previous set, and AdaptersRolledOut says why.
        tiers += (edge.adapters,)
    new_conditions = cloud.conditions + comp.conditions + edge.conditions
    new_conditions += [_ready(tiers, out.ready), _degraded(tiers), *extra]
    conds, out.events = _merge_conditions(observed, new_conditions)
    # The phase from the conditions it summarizes, not from the stored Reconciling/Stalled it decides.
    phase = _phase([c for c in conds if c.type not in C.SUMMARY_TYPES])
    conds = _set_progress(observed, conds, phase)

    if observed.status.get("updateRevision") != revision:
        msg = f"revision {revision} (model {spec.model.version}, compression {comp.key})"
        out.events.append(Event("Normal", Reason.NEW_REVISION, msg))
    out.events.extend(edge.events)

    history = list(observed.status.get("history") or [])
    for entry in edge.history:
        history.append({**entry, "modelVersion": spec.model.version})
    current_revision = observed.status.get("currentRevision")
    if not current_revision and edge.stable_revision and edge.stable_revision != revision:
        current_revision = edge.stable_revision  # rebuilt from the DaemonSets after the status was lost
    if edge.rolled_back is not None and edge.stable_revision:
        current_revision = edge.stable_revision
    if out.ready and current_revision != revision:
        current_revision = revision
        history.append(
            {
                "revision": revision,
                "modelVersion": spec.model.version,
                "outcome": "Promoted",
                "reason": Reason.ROLLED_OUT,
                "time": format_time(observed.now),
            }
        )
        # Promoted says what Ready turning True would: one Event, not two.
        out.events = [e for e in out.events if e.reason != Reason.AVAILABLE]
        out.events.append(Event("Normal", Reason.PROMOTED, f"revision {revision} is serving everywhere"))
    history = history[-spec.rollout.revision_history_limit :]

    out.status = {
        "observedGeneration": observed.generation,
        "phase": phase,
        "conditions": [c.to_dict() for c in conds],
        "updateRevision": revision,
        "cloud": {"replicas": spec.cloud.replicas, "ready": cloud.ready_replicas},
        "variants": comp.variants,
        "edge": edge.status,
        "history": history,
    }
    if edge.rollout:
        out.status["rollout"] = edge.rollout
    if current_revision:
        out.status["currentRevision"] = current_revision
    return out


def _ready(tiers: tuple[Condition, ...], ready: bool) -> Condition:
    if ready:
        return Condition(C.READY, "True", Reason.AVAILABLE, "cloud serving and edge rolled out")
    blocking = next((c for c in tiers if not c.is_true), tiers[0])
    return Condition(C.READY, "False", blocking.reason, f"{blocking.type}: {blocking.message}")


def _degraded(tiers: tuple[Condition, ...]) -> Condition:
    faults = [c for c in tiers if c.is_bad and c.reason in FAULT_REASONS | FAILURE_REASONS]
    if not faults:
        return Condition(C.DEGRADED, "False", Reason.AS_EXPECTED, "")
    return Condition(
        C.DEGRADED, "True", faults[0].reason, "; ".join(f"{c.type}: {c.message}" for c in faults)
    )


def _merge_conditions(
    observed: Observed, new_conditions: list[Condition]
) -> tuple[list[Condition], list[Event]]:
    """The stored conditions with the new ones set, and the Events their moves deserve."""
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
    return conds, events


def _set_progress(observed: Observed, conds: list[Condition], phase: str) -> list[Condition]:
    """kstatus's Reconciling and Stalled set on `conds` (no Event: the conditions they summarize tell)."""
    for new in C.progress_conditions(conds, phase):
        new = replace(new, message=new.message[:4000], observed_generation=observed.generation)
        conds = C.set_condition(conds, new, observed.now)
    return conds


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
    if edge is not None and edge.reason in (Reason.PAUSED, Reason.STAGE_PAUSE):
        return "Paused"
    if C.is_true(conds, C.READY):
        return "Healthy"
    if cloud is not None or C.is_true(conds, C.EDGE_PROGRESSING):
        return "Progressing"
    return "Pending"


def invalid_spec_status(observed: Observed, message: str, reason: str = Reason.INVALID_SPEC) -> Plan:
    """A spec the API server let through but the models (or the operator's policy, with its own `reason`)
    reject: say so, touch no child."""
    conds = [Condition.from_dict(c) for c in observed.status.get("conditions") or []]
    for new in (
        Condition(C.READY, "False", reason, message[:1000]),
        Condition(C.DEGRADED, "True", reason, message[:1000]),
    ):
        conds = C.set_condition(
            conds, Condition(**{**new.__dict__, "observed_generation": observed.generation}), observed.now
        )
    conds = _set_progress(observed, conds, "Failed")
    status = dict(observed.status)
    status.update(
        observedGeneration=observed.generation, phase="Failed", conditions=[c.to_dict() for c in conds]
    )
    plan = Plan(status=normalize_status(status))
    old = C.get([Condition.from_dict(c) for c in observed.status.get("conditions") or []], C.READY)
    if old is None or old.reason != reason:
        plan.events.append(Event("Warning", reason, message[:1000]))
    return plan


def normalize_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """Through the API model and back, so the planned and the stored status compare field for field."""
    return ModelDeploymentStatus.model_validate(dict(status)).dump()
