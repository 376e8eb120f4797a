"""Condition types, reason constants and the set/get helpers (the `metav1.Condition` rules).

A condition's `lastTransitionTime` moves only when its status flips, so re-computing the same status on
every reconcile writes nothing. Reasons are CamelCase constants so that alerts and tests match on them
rather than on messages.

`Reconciling` and `Stalled` are kstatus's two standard conditions (sigs.k8s.io/cli-utils, what Flux,
kpt and Config Sync read): `Reconciling=True` is kstatus `InProgress`, `Stalled=True` is `Failed`, and with
neither True, `Ready=True` is `Current`. They summarize the others and are never both True
(`progress_conditions`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, Literal

from kiri_operator.api.scalars import format_time, parse_time

Status = Literal["True", "False", "Unknown"]

READY: Final = "Ready"
RECONCILING: Final = "Reconciling"
STALLED: Final = "Stalled"
CLOUD_READY: Final = "CloudReady"
VARIANTS_VERIFIED: Final = "VariantsVerified"
EDGE_PROGRESSING: Final = "EdgeProgressing"
EDGE_ROLLED_OUT: Final = "EdgeRolledOut"
DEGRADED: Final = "Degraded"
ROLLED_BACK: Final = "RolledBack"
ADAPTERS_ROLLED_OUT: Final = "AdaptersRolledOut"

TYPES: Final = (
    READY,
    RECONCILING,
    STALLED,
    CLOUD_READY,
    VARIANTS_VERIFIED,
    EDGE_PROGRESSING,
    EDGE_ROLLED_OUT,
    DEGRADED,
    ROLLED_BACK,
    ADAPTERS_ROLLED_OUT,
)

# For these types True is the bad news, so a True status is a Warning event.
NEGATIVE_POLARITY: Final = frozenset({DEGRADED, ROLLED_BACK, STALLED})
# Summaries of the other conditions: their moves are told by the Events of the conditions they summarize.
SUMMARY_TYPES: Final = frozenset({RECONCILING, STALLED})


POD_SECURITY_MARK: Final = "violates PodSecurity"
"""What the API server's Pod Security admission puts in every refusal, and so in the FailedCreate Events and
ReplicaFailure conditions of the controllers whose pods it refused."""


class Reason:
    """Reasons, one constant per distinct cause (Argo Rollouts' utils/conditions style)."""

    # Ready / Degraded
    AVAILABLE: Final = "Available"
    RECONCILING: Final = "Reconciling"
    AS_EXPECTED: Final = "AsExpected"
    INVALID_SPEC: Final = "InvalidSpec"
    PROMETHEUS_NOT_ALLOWED: Final = "PrometheusNotAllowed"
    """The analysis names a Prometheus outside the operator's allow-list (planning/admitting.py)."""
    # Reconciling=False while Stalled=True
    STALLED: Final = "Stalled"
    # Events no condition carries: revisions, children, writes, learning rounds
    NEW_REVISION: Final = "NewRevision"
    PROMOTED: Final = "Promoted"
    CREATED: Final = "Created"
    DELETED: Final = "Deleted"
    APPLY_FAILED: Final = "ApplyFailed"
    # An object labelled for the ModelDeployment but not owned by it (no ownerReference with its uid):
    # a forged manifest or round record is ignored, never trusted, updated or deleted.
    NOT_OWNED: Final = "NotOwnedIgnored"
    LEARNING_ROUND: Final = "LearningRound"
    LEARNED_MODEL_ADOPTED: Final = "LearnedModelAdopted"
    LEARNED_MODEL_DEFERRED: Final = "LearnedModelDeferred"
    # LearningProgressing: True with LearningRound while rounds remain, LearningComplete once none does; False
    # while a round's aggregation failed (AggregationFailed) or cannot start (see below)
    LEARNING_COMPLETE: Final = "LearningComplete"
    AGGREGATION_FAILED: Final = "AggregationFailed"
    AGGREGATION_RETRYING: Final = "AggregationRetrying"
    # A language model's rounds export each learned adapter for a LoRA-ready variant: none is built yet
    WAITING_FOR_LORA_READY_VARIANT: Final = "WaitingForLoraReadyVariant"
    NO_LORA_READY_VARIANT: Final = "NoLoraReadyVariant"
    # Cloud
    DEPLOYMENT_AVAILABLE: Final = "DeploymentAvailable"
    DEPLOYMENT_PROGRESSING: Final = "DeploymentProgressing"
    DEPLOYMENT_UNAVAILABLE: Final = "DeploymentUnavailable"
    CLOUD_DISABLED: Final = "CloudDisabled"
    NO_GPU_NODE: Final = "NoGPUNode"
    NO_CLOUD_NODE: Final = "NoCloudNode"
    # A language model's cloud tier (engine kiri) waits for the compression Job's pack of the full model.
    WAITING_FOR_CLOUD_PACK: Final = "WaitingForCloudPack"
    MISSING_PVC: Final = "MissingPVC"
    # Any tier: a host path the admin did not allow, or pods the API server's Pod Security admission refused
    HOST_PATH_NOT_ALLOWED: Final = "HostPathNotAllowed"
    POD_SECURITY_REFUSED: Final = "PodSecurityRefused"
    # Compression
    NO_VARIANTS: Final = "NoVariants"
    COMPRESSING: Final = "Compressing"
    VERIFIED: Final = "Verified"
    PARTIALLY_REJECTED: Final = "PartiallyRejected"
    ALL_REJECTED: Final = "AllRejected"
    COMPRESSION_FAILED: Final = "CompressionFailed"
    MANIFEST_INVALID: Final = "ManifestInvalid"
    # Edge
    ROLLING_OUT: Final = "RollingOut"
    WAITING_FOR_VARIANTS: Final = "WaitingForVariants"
    UPDATE_DEFERRED: Final = "UpdateDeferred"
    """A new revision waits for `spec.rollout.updatePolicy` (interval or bandwidth) before it rolls out."""
    ROLLED_OUT: Final = "RolledOut"
    NODES_NOT_READY: Final = "NodesNotReady"
    NO_EDGE_NODES: Final = "NoEdgeNodes"
    NO_MATCHING_EDGE_NODE: Final = "NoMatchingEdgeNode"
    UNMATCHED_NODES: Final = "UnmatchedNodes"
    NO_EDGE_VARIANTS: Final = "NoEdgeVariants"
    # Waves (planning.waves): conditions, Events and status.rollout history entries
    STEP_PROGRESSING: Final = "WaveProgressing"
    WAITING_READY: Final = "WaitingForReady"
    ANALYSIS_RUNNING: Final = "AnalysisRunning"
    INCONCLUSIVE: Final = "AnalysisInconclusive"
    ANALYSIS_ERROR: Final = "AnalysisError"
    BAKING: Final = "Baking"
    PAUSED: Final = "Paused"
    STAGE_PAUSE: Final = "StagePause"
    OFFLINE_WAIT: Final = "WaitingForOfflineNodes"
    COMPLETED: Final = "RolloutCompleted"
    ROLLED_BACK_PODS: Final = "PodsFailed"
    ROLLED_BACK_DEADLINE: Final = "ProgressDeadlineExceeded"
    ROLLED_BACK_ANALYSIS: Final = "AnalysisFailed"
    ROLLED_BACK_ABORT: Final = "Aborted"
    ROLLED_BACK_OFFLINE: Final = "NodeOffline"
    ROLLED_BACK_MANUAL: Final = "ManualRollback"
    KNOWN_BAD: Final = "RevisionRolledBack"
    NO_NODES: Final = "NoEligibleNodes"
    INITIAL_FAILING: Final = "InitialRolloutFailing"
    BANDWIDTH: Final = "BandwidthCapBelowVariantSize"
    ROLLOUT_STARTED: Final = "RolloutStarted"
    ROLLOUT_SUPERSEDED: Final = "RolloutSuperseded"
    STEP_STARTED: Final = "StepStarted"
    ANALYSIS_PASSED: Final = "AnalysisPassed"
    ROLLED_BACK: Final = "RolledBack"
    # Per-site LoRA adapters (planning.adapting): AdaptersRolledOut, status.edge.adapters[].reason, Events
    ADAPTER_WORSE_THAN_BASE: Final = "AdapterWorseThanBase"
    """An adapter's declared held-out metric is worse than the base model's: the site keeps what it serves."""
    ADAPTER_HURTS_OTHER_SITES: Final = "AdapterHurtsOtherSites"
    """An adapter's declared regression on another site's held-out text exceeds
    `updatePolicy.maxOtherSiteRegression`: the site keeps what it serves."""
    WAITING_FOR_REVISION_ROLLOUT: Final = "WaitingForRevisionRollout"
    """A site's new adapters wait for the revision rollout in flight to end."""
    # Lost or unreadable rollout memory, and reconciles that fail outright
    ROLLOUT_STATUS_INVALID: Final = "RolloutStatusInvalid"
    STABLE_REVISION_REBUILT: Final = "StableRevisionRebuilt"
    STABLE_REVISION_UNKNOWN: Final = "StableRevisionUnknown"
    RECONCILE_FAILED: Final = "ReconcileFailed"


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
        }
        if self.last_transition_time is not None:
            out["lastTransitionTime"] = format_time(self.last_transition_time)
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        status = str(data.get("status", "Unknown"))
        if status not in ("True", "False", "Unknown"):
            status = "Unknown"
        ltt = data.get("lastTransitionTime")
        generation = data.get("observedGeneration")
        return cls(
            type=str(data.get("type", "")),
            status=status,  # type: ignore[arg-type]
            reason=str(data.get("reason", "")),
            message=str(data.get("message", "")),
            last_transition_time=parse_time(ltt) if isinstance(ltt, str) else None,
            observed_generation=int(generation) if isinstance(generation, int) else None,
        )

    @property
    def is_true(self) -> bool:
        return self.status == "True"

    @property
    def is_bad(self) -> bool:
        """Whether this condition, as it stands, is something an operator should look at."""
        if self.type == RECONCILING:  # work under way is neither good nor bad news
            return False
        if self.type in NEGATIVE_POLARITY:
            return self.status == "True"
        return self.status == "False"


def not_ready_note(reasons: Iterable[str]) -> str:
    """ "; N pods not ready: <reason>" for the reason most of these pods give (ties: the first by name), so
    a condition says why it waits, not only that it does; "" when no pod says."""
    counts = Counter(r for r in reasons if r)
    if not counts:
        return ""
    reason, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    more = f" (and {sum(counts.values()) - count} for other reasons)" if len(counts) > 1 else ""
    return f"; {count} pods not ready: {reason}{more}"


def get(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Iterable[Condition], type_: str) -> bool:
    found = get(conditions, type_)
    return found is not None and found.is_true


def set_condition(conditions: Sequence[Condition], new: Condition, now: datetime) -> list[Condition]:
    """Insert or replace `new.type`, keeping the old transition time unless the status flipped."""
    old = get(conditions, new.type)
    if old is not None and old.status == new.status and old.last_transition_time is not None:
        stamped = replace(new, last_transition_time=old.last_transition_time)
    else:
        stamped = replace(new, last_transition_time=now.replace(microsecond=0))
    out = [c for c in conditions if c.type != new.type]
    out.append(stamped)
    return sort(out)


def sort(conditions: Iterable[Condition]) -> list[Condition]:
    """Stable order (the order of TYPES, unknown types last) so status diffs are content diffs only."""
    order = {t: i for i, t in enumerate(TYPES)}
    return sorted(conditions, key=lambda c: (order.get(c.type, len(order)), c.type))


def changed(old: Condition | None, new: Condition) -> bool:
    """Whether the change deserves an event: status or reason moved."""
    return old is None or old.status != new.status or old.reason != new.reason


# Phases (`status.phase`) in which the operator cannot move on by itself: the spec's own work failed, the
# world lacks what the spec needs, or the rollout was rolled back (the same spec stays rolled back).
STALLED_PHASES: Final = frozenset({"Failed", "Degraded", "RolledBack"})
# Wave holds that need a person rather than time: the first rollout's pods fail (no stable revision to
# roll back to), or analysis cannot be evaluated (Prometheus unreachable or a query it rejects). Other holds
# (inconclusive analysis, offline nodes with `Wait`, a pause) are a rollout still under way.
STALLING_GATE_REASONS: Final = frozenset(
    {Reason.INITIAL_FAILING, Reason.ANALYSIS_ERROR, Reason.STABLE_REVISION_UNKNOWN}
)


def progress_conditions(conditions: Sequence[Condition], phase: str) -> tuple[Condition, Condition]:
    """kstatus's `Reconciling` and `Stalled` from the other conditions and the phase.

    Stalled=True (kstatus `Failed`): phase Failed or Degraded (reason and message of `Degraded`), phase
    RolledBack (those of `RolledBack`), or a wave held by a gate in `STALLING_GATE_REASONS`. Otherwise
    Reconciling=True (kstatus `InProgress`) unless the phase is Healthy, with the reason of the condition
    that says what moves: `VariantsVerified` while compressing, else `EdgeProgressing` when True (the
    wave's gate: WaitingForReady, Baking, StagePause, ...), else `Ready`'s. Never both True: kstatus reads the first
    True one in list order, so both would make the answer depend on order.
    """
    by_type = {c.type: c for c in conditions}
    edge = by_type.get(EDGE_PROGRESSING)
    cause: Condition | None = None
    if phase in STALLED_PHASES:
        cause = by_type.get(ROLLED_BACK if phase == "RolledBack" else DEGRADED)
    elif edge is not None and edge.is_true and edge.reason in STALLING_GATE_REASONS:
        cause = edge
    if cause is not None:
        return (
            Condition(RECONCILING, "False", Reason.STALLED, f"stalled: {cause.reason}"),
            Condition(STALLED, "True", cause.reason, cause.message),
        )
    stalled = Condition(STALLED, "False", Reason.AS_EXPECTED, "")
    if phase == "Healthy":
        return Condition(RECONCILING, "False", Reason.AVAILABLE, ""), stalled
    verified = by_type.get(VARIANTS_VERIFIED)
    if verified is not None and verified.status == "Unknown":
        source = verified
    elif edge is not None and edge.is_true:
        source = edge
    else:
        source = by_type.get(READY) or Condition(READY, "Unknown", Reason.RECONCILING, "")
    return Condition(RECONCILING, "True", source.reason, source.message), stalled


def reconcile_failed(conditions: Sequence[Condition], message: str, now: datetime) -> list[Condition]:
    """The stored conditions with a reconcile that raised on top: Degraded and Stalled True with reason
    `ReconcileFailed` (kstatus then reads Failed), Reconciling False. The next reconcile that gets through
    recomputes all three from the tiers, which is the recovery."""
    out = list(conditions)
    for new in (
        Condition(DEGRADED, "True", Reason.RECONCILE_FAILED, message),
        Condition(STALLED, "True", Reason.RECONCILE_FAILED, message),
        Condition(RECONCILING, "False", Reason.STALLED, f"stalled: {Reason.RECONCILE_FAILED}"),
    ):
        out = set_condition(out, new, now)
    return out
