"""`ModelDeployment.status`: what the operator observed and decided.

Only the operator writes it. Unknown keys are ignored when reading, so an older operator can read a newer
one's status; the CRD lists every field so the API server keeps them (it prunes unknown ones), with
`x-kubernetes-preserve-unknown-fields` only on the free-form metric maps.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from kiri_operator.api.bases import StatusModel
from kiri_operator.api.scalars import Timestamp

Phase = Literal[
    "Pending", "Compressing", "Progressing", "Paused", "Healthy", "Degraded", "RolledBack", "Failed"
]
VariantState = Literal["Pending", "Compressing", "Verified", "Rejected", "Failed"]
RolloutVerdict = Literal[
    "Waiting", "Progressing", "Holding", "Inconclusive", "Paused", "RolledBack", "Completed"
]
"""The edge rollout's verdict, the one enum from the wave planner to `status.rollout.verdict`. `Waiting` is the
edge tier's own (variants not verified yet: the wave planner has not run); `Inconclusive` is a `Holding` that
says analysis could not decide, kept apart so it goes on holding until a measurement decides."""
ConditionStatus = Literal["True", "False", "Unknown"]

PHASES: tuple[Phase, ...] = (
    "Pending",
    "Compressing",
    "Progressing",
    "Paused",
    "Healthy",
    "Degraded",
    "RolledBack",
    "Failed",
)
VARIANT_STATES: tuple[VariantState, ...] = ("Pending", "Compressing", "Verified", "Rejected", "Failed")

# The metav1.Condition grammar.
CONDITION_TYPE_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(StatusModel):
    """The metav1.Condition shape, so `kubectl wait --for=condition=Ready` works."""

    type: Annotated[str, Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)]
    """CamelCase type: Ready, Reconciling, Stalled, CloudReady, VariantsVerified, EdgeProgressing, EdgeRolledOut,
    Degraded, RolledBack."""
    status: ConditionStatus
    """`True`, `False` or `Unknown`."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=CONDITION_REASON_PATTERN)]
    """CamelCase machine-readable reason."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: Timestamp
    """When `status` last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `.metadata.generation` this condition was computed from."""


class CloudStatus(StatusModel):
    """The cloud Deployment's replicas."""

    replicas: Annotated[int, Field(ge=0)] = 0
    """Desired replicas."""
    ready: Annotated[int, Field(ge=0)] = 0
    """Ready replicas."""


class VariantStatus(StatusModel):
    """One variant of the update revision, as built and measured by the compression Job."""

    name: str
    """`spec.edge.variants[].name`."""
    state: VariantState = "Pending"
    """`Pending`, `Compressing`, `Verified` (passed its gate), `Rejected` (missed it) or `Failed` (not built)."""
    reason: str | None = None
    """Why it was rejected or failed, e.g. which gate check missed and by how much."""
    fidelity: dict[str, Any] = {}
    """Measured gate statistics, `{metric: {stat: value}}`, e.g. `{"cosine": {"mean": 0.998, "min": 0.97}}`;
    language models: `{"kl": {"mean": 0.02}, "top1Agreement": 0.93, "perplexity": {"ratio": 1.01},
    "greedyMatch": {"mean": 0.9, "tokens": 16}, "positions": 1500}`."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Artifact size."""
    sha256: str | None = None
    """Artifact digest, verified by every node that fetches it."""
    uri: str | None = None
    """Where edge nodes fetch the artifact from."""
    latency: dict[str, Any] = {}
    """Measured latency, e.g. `{"p50Ms": 1.2, "p95Ms": 2.0, "speedup": 1.8}`; language models add
    `decodeTokensPerS` and `ttftMs` (p50Ms is then ms per decoded token)."""


class VariantProgress(StatusModel):
    """Nodes on one variant of the update revision."""

    name: str
    """Variant name."""
    revision: str | None = None
    """Revision these nodes run."""
    nodes: Annotated[int, Field(ge=0)] = 0
    """Nodes assigned."""
    ready: Annotated[int, Field(ge=0)] = 0
    """Of those, nodes whose pod is Ready."""


class EdgeStatus(StatusModel):
    """Edge rollout progress of the update revision."""

    target_nodes: Annotated[int, Field(ge=0)] = 0
    """Edge nodes matching `spec.edge.nodeSelector` and some variant's `requires`."""
    updated_nodes: Annotated[int, Field(ge=0)] = 0
    """Nodes assigned to the update revision."""
    ready_nodes: Annotated[int, Field(ge=0)] = 0
    """Updated nodes whose pod is Ready."""
    deferred_nodes: Annotated[int, Field(ge=0)] = 0
    """Offline (NotReady) nodes skipped for now; they converge when they come back."""
    unmatched_nodes: Annotated[int, Field(ge=0)] = 0
    """Edge nodes no variant's `requires` matches; they run nothing."""
    stage_index: Annotated[int, Field(ge=0)] = 0
    """Index into `spec.rollout.stages` of the wave in progress (or last completed)."""
    stage: str | None = None
    """Human-readable wave, e.g. `2/4 (25%)` or `site-b 1/3`; the `Stage` printer column."""
    stage_started_at: Timestamp | None = None
    """When the current wave started; bake time counts from when its nodes were all Ready."""
    per_variant: list[VariantProgress] = []
    """Node counts per variant."""
    adapters: list[SiteAdapters] | None = None
    """Per site with LoRA adapters (`spec.edge.adapters`): the adapter revision it serves, the previous one,
    and its own small rollout."""


class HistoryEntry(StatusModel):
    """One revision's fate."""

    revision: str
    """Revision hash."""
    model_version: str
    """`spec.model.version` of that revision."""
    outcome: str
    """`Promoted`, `RolledBack`, `Aborted`, `Superseded` or `Failed`."""
    reason: str = ""
    """Why, e.g. which gate failed."""
    time: Timestamp
    """When the outcome was decided."""


class SkippedSite(StatusModel):
    """A site that did not count in a learning round."""

    site: str
    """The site (value of `spec.learning.siteLabel`)."""
    reason: str
    """Why: offline or straggler, update rejected, or over its privacy budget."""


class LearningRound(StatusModel):
    """One federated round, as recorded by the aggregator."""

    round: Annotated[int, Field(ge=1)]
    """Round number, from 1."""
    outcome: str
    """`Accepted`, `Skipped` (too few updates by the deadline) or `Refused` (privacy budget)."""
    reason: str = ""
    """Why it was skipped or refused."""
    participants: list[str] = []
    """Sites whose update counted."""
    skipped: list[SkippedSite] = []
    """Sites that did not count, and why."""
    loss: float | None = None
    """Held-out loss of the round's global model."""
    accuracy: float | None = None
    """Held-out accuracy of the round's global model."""
    improvement: float | None = None
    """Accuracy gain over the model the round started from (loss decrease for regression)."""
    epsilon: float = 0.0
    """Largest per-site epsilon after this round."""
    model_sha256: str | None = None
    """Digest of the published weights of an accepted round."""
    time: Timestamp | None = None
    """When the round closed."""


class UpdateDecision(StatusModel):
    """The update policy's verdict on the newest learned revision."""

    allowed: bool
    """True: it rolls out. False: deferred."""
    reason: str = ""
    """Why it was deferred, e.g. `minIntervalSeconds: 1800s left`."""
    round: Annotated[int, Field(ge=1)] | None = None
    """The learning round that produced it."""
    retry_after_seconds: Annotated[int, Field(ge=0)] | None = None
    """When a deferral on time or bandwidth lifts, if it does on its own."""
    time: Timestamp | None = None
    """When the decision was made."""


class LearnedModel(StatusModel):
    """The learned weights the edge is built from, once the update policy allowed them."""

    round: Annotated[int, Field(ge=1)]
    """The learning round that produced them."""
    uri: str
    """Where the weights are (in the artifact store)."""
    sha256: str
    """Their digest."""
    adopted_at: Timestamp
    """When the update policy allowed them; `minIntervalSeconds` counts from here."""


class LearnedAdapterHeldOut(StatusModel):
    """Held-out perplexity: `federated`, on `learning.evalDataUri`, measured by the round's ServerApp;
    `perSite`, on the site's own held-out text (one document in ten of its file), measured by the site."""

    metric: Literal["perplexity"] = "perplexity"
    """Always `perplexity` (lower is better)."""
    base: Annotated[float, Field(ge=0)] | None = None
    """The base model's (the first round's start: every B is zero)."""
    current: Annotated[float, Field(ge=0)] | None = None
    """The round's start: the previous round's adapter (absent for round 1)."""
    adapter: Annotated[float, Field(ge=0)]
    """The new adapter's."""


class LearnedAdapter(StatusModel):
    """A language model's newest learned adapter: served as `<model.name>:<learning.adapterName>` on every
    learning site once its adapter wave passes (`status.edge.adapters`)."""

    site: str | None = None
    """perSite: the site that trained and keeps it (its SuperNode serves it to the site's edge pods)."""
    round: Annotated[int, Field(ge=1)]
    """The learning round that produced it."""
    uri: str
    """Where the edge fetches its `.onnx_adapter`."""
    sha256: str
    """Its digest."""
    size_bytes: Annotated[int, Field(ge=0)]
    """Its size: what `rollout.updatePolicy.maxBytesPerDay` charges each node that fetches it."""
    held_out: LearnedAdapterHeldOut
    """How it scores against the base and the previous adapter: the gates of its waves."""


class SiteDownload(StatusModel):
    """Bytes a site's nodes fetch for one rollout (or adopted learned revision), for `maxBytesPerDay`."""

    site: str
    """The site."""
    bytes: Annotated[int, Field(ge=0)]
    """Bytes charged: for a learned revision, nodes at the site times the largest accepted variant; for a
    rollout, the variant each node of the site gets."""
    time: Timestamp
    """When the revision was adopted, or its rollout started."""


class LearningRetry(StatusModel):
    """A round whose aggregation failed: when, why, and when the next attempt starts."""

    round: Annotated[int, Field(ge=1)]
    """The round."""
    attempt: Annotated[int, Field(ge=1)] = 1
    """The attempt that failed (or, after `retryAt`, the one running)."""
    failed_at: Timestamp | None = None
    """When the attempt's aggregator Job failed."""
    reason: str | None = None
    """The Job's failure."""
    retry_at: Timestamp | None = None
    """When the next attempt starts (exponential backoff with jitter, 30 s to 10 min)."""
    last_failure: str | None = None
    """Why the previous attempt failed (while a retry runs)."""


class LearningStatus(StatusModel):
    """Federated learning progress."""

    rounds_completed: Annotated[int, Field(ge=0)] = 0
    """Rounds that closed, whatever their outcome."""
    epsilon_spent: float = 0.0
    """Largest per-site epsilon so far."""
    rounds: list[LearningRound] = []
    """The most recent rounds, newest last."""
    update: UpdateDecision | None = None
    """The update policy's verdict on the newest accepted round."""
    next_round_at: Timestamp | None = None
    """When the next round starts."""
    active_round: Annotated[int, Field(ge=1)] | None = None
    """The round whose Jobs are running."""
    model: LearnedModel | None = None
    """The adopted learned weights: the edge's model source while set."""
    adapter: LearnedAdapter | None = None
    """A language model's newest learned adapter (its rounds train LoRA adapters, not weights)."""
    site_adapters: list[LearnedAdapter] = []
    """A perSite language model: each site's newest adapter, kept on the site."""
    downloads: list[SiteDownload] = []
    """Adoptions in the last 24 hours, per site."""
    retry: LearningRetry | None = None
    """Set while a round is retried after its aggregation failed."""


class RolloutHistoryEntry(StatusModel):
    """One rollout's end, as the wave planner remembers it."""

    model_config = ConfigDict(frozen=True)

    revision: str
    """Revision hash."""
    outcome: Literal["Promoted", "RolledBack"]
    """`Promoted` (reached every step) or `RolledBack`."""
    reason: str = ""
    """Why, e.g. `RolloutCompleted` or the failed gate."""
    at: Timestamp
    """When."""
    message: str | None = None
    """What a rollback said."""


class RolloutStatus(StatusModel):
    """The wave planner's memory (`planning.waves`): position, timers, handled commands, failed revisions.
    Everything else is recomputed from the cluster on every reconcile. Times are whole seconds, as
    `metav1.Time` holds them, so a state read back equals the state that was written."""

    model_config = ConfigDict(frozen=True)

    stable_revision: str | None = None
    """The last revision that reached every step; what a rollback goes back to."""
    update_revision: str | None = None
    """The revision being (or last) rolled out."""
    previous_stable_revision: str | None = None
    """The stable revision before this one: where a manual rollback goes."""
    group: str | None = None
    """The `groupBy` value of the step in progress (none without `groupBy`)."""
    stage: int = 0
    """Index of the step in progress in `spec.rollout.stages`, within its group."""
    step_started_at: Timestamp | None = None
    """When the step in progress started."""
    progress_at: Timestamp | None = None
    """Last progress (a node moved or became Ready), for `progressDeadlineSeconds`."""
    ready_nodes: int = 0
    """Nodes Ready on the update revision at the last progress."""
    ready_at: Timestamp | None = None
    """When every online node of the step became Ready: analysis and bake count from here."""
    last_measured_at: Timestamp | None = None
    """The last analysis measurement of this step."""
    analysis_passed_at: Timestamp | None = None
    """When this step's analysis passed."""
    promoted: bool = False
    """This step was promoted by hand: bake and analysis skipped."""
    handled_promote: str | None = None
    """The last `kiri.dev/promote` annotation value acted on."""
    handled_abort: str | None = None
    """The last `kiri.dev/abort` annotation value acted on."""
    handled_rollback: str | None = None
    """The last `kiri.dev/rollback` annotation value acted on."""
    rolled_back_revisions: tuple[str, ...] = ()
    """Revisions rolled back, newest last: the same spec applied again is not rolled out again."""
    started_at: Timestamp | None = None
    """When the rollout of `updateRevision` started: `updatePolicy.minIntervalSeconds` counts from it."""
    downloads: tuple[SiteDownload, ...] | None = None
    """What each rollout of the last 24 hours made each site download: `updatePolicy.maxBytesPerDay` counts
    it, whether the revision came from a spec change or a learning round."""
    history: tuple[RolloutHistoryEntry, ...] = ()
    """The last rollouts' ends, newest last."""
    verdict: RolloutVerdict | None = None
    """The last plan's verdict."""
    reason: str = ""
    """Its reason."""
    message: str = ""
    """Its message."""
    stable_variants: dict[str, str] | None = None
    """node -> the variant it ran on the stable revision, for the nodes off stable (so they go back to it)."""

    @property
    def in_progress(self) -> bool:
        return (
            self.update_revision is not None
            and self.update_revision != self.stable_revision
            and self.update_revision not in self.rolled_back_revisions
        )


class SiteAdapters(StatusModel):
    """One site's LoRA adapters. An adapter revision is a hash of the site's adapter set (names, URIs,
    digests) and its default; `base` is no adapter at all."""

    site: str
    """The site label's value."""
    revision: str | None = None
    """The adapter revision every node of the site has served since its last rollout ended: what a
    rollback goes back to."""
    previous_revision: str | None = None
    """The revision the site served before `revision`."""
    update_revision: str | None = None
    """The revision the spec asks of this site (equal to `revision` once rolled out)."""
    adapters: list[str] = []
    """Names of the adapters of `updateRevision`."""
    default: str | None = None
    """The default adapter of `updateRevision` (what a bare model name gets)."""
    nodes: Annotated[int, Field(ge=0)] = 0
    """The site's edge nodes."""
    updated_nodes: Annotated[int, Field(ge=0)] = 0
    """Nodes assigned to `updateRevision`."""
    verdict: RolloutVerdict | None = None
    """The site's adapter rollout verdict."""
    reason: str = ""
    """Its reason (e.g. `AdapterWorseThanBase`, `WaitingForReady`, `RollingBack`)."""
    message: str = ""
    """Its message."""
    rollout: Annotated[
        RolloutStatus | None, Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = None
    """The site's wave bookkeeping, as `status.rollout` is the revision's. Internal."""


class ModelDeploymentStatus(StatusModel):
    """What the operator observed and decided. Written only by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `.metadata.generation` this status was computed from."""
    phase: Phase = "Pending"
    """One-word summary: `Pending`, `Compressing`, `Progressing`, `Paused`, `Healthy`, `Degraded`, `RolledBack`
    or `Failed`. Conditions carry the details."""
    conditions: Annotated[
        list[Condition],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = []
    """Ready, Reconciling, Stalled, CloudReady, VariantsVerified, EdgeProgressing, EdgeRolledOut, Degraded,
    RolledBack. `Reconciling` and `Stalled` are kstatus's (what Flux reads): Reconciling=True while a rollout
    moves, Stalled=True when it cannot (rolled back, a gate that needs a person, a fault, an invalid spec)."""
    current_revision: str | None = None
    """The last revision fully rolled out and promoted (the rollback target)."""
    update_revision: str | None = None
    """The revision the spec asks for; equal to `currentRevision` once promoted."""
    cloud: CloudStatus = Field(default_factory=CloudStatus)
    """The cloud Deployment's replicas."""
    variants: list[VariantStatus] = []
    """Variants of the update revision and their measurements."""
    edge: EdgeStatus = Field(default_factory=EdgeStatus)
    """Edge rollout progress."""
    history: list[HistoryEntry] = []
    """Newest last, at most `spec.rollout.revisionHistoryLimit` entries."""
    learning: LearningStatus | None = None
    """Federated learning rounds, privacy spent and update policy decisions (with `spec.learning`)."""
    rollout: Annotated[
        RolloutStatus | None, Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = None
    """The wave controller's bookkeeping (stable revision, stage, timers, handled promote/abort requests), kept
    here so a restarted operator resumes where it stopped. Internal: its keys may change between versions."""
