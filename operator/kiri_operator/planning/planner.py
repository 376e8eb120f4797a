"""The planner: `plan(spec, observed) -> Plan`, the tiers in the order of their dependencies.

The model source and the cloud tier's faults come first (a missing claim or cloud node holds compression),
then compression (which gates the edge, and publishes a language model's cloud pack), the cloud tier, the
edge, status from all of them, and the learning loop's children.
Pure: no Kubernetes client, no kopf, no clock, no I/O.
"""

from __future__ import annotations

from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.conditions import Reason
from kiri_operator.observations import Observed
from kiri_operator.planning import admitting, learned_adapters, learning
from kiri_operator.planning import building as B
from kiri_operator.planning.checking import check
from kiri_operator.planning.cloud import cloud_faults, plan_cloud, serves_pack
from kiri_operator.planning.compression import cloud_pack, plan_compression
from kiri_operator.planning.edge import plan_edge
from kiri_operator.planning.revisions import compression_key, revision_key
from kiri_operator.planning.settings import Settings
from kiri_operator.planning.status import invalid_spec_status, normalize_status, plan_status
from kiri_operator.plans import Check, Event, Plan, TierPlan, sooner

# While anything is unfinished (compressing, a wave in flight), look again at least this often.
UNFINISHED_REQUEUE_SECONDS = 30.0


def plan(spec: ModelDeploymentSpec, observed: Observed, settings: Settings | None = None) -> Plan:
    settings = settings or Settings()
    # The learning loop writes its rounds in place (no upload to an HTTP store yet): a ModelDeployment that
    # learns keeps the built-in host path unless it names a store.
    spec = B.with_default_store(spec, None if spec.learning is not None else settings.default_artifacts_uri)
    if refused := admitting.refusal(spec, settings):
        return invalid_spec_status(observed, refused[1], refused[0])
    owner = B.Owner(observed.name, observed.namespace, observed.uid)
    # With an adopted learned model, the edge (compression, revision, waves) is built from it; the cloud is not.
    # A language model's learned adapter joins edge.adapters: its waves are the adapter waves.
    learning_sites = learning.sites(spec, observed) if spec.learning is not None else []
    espec = learning.effective_spec(spec, observed.status.get("learning"), learning_sites)
    ckey = compression_key(espec, B.store_uri(spec))
    revision = revision_key(espec, B.store_uri(spec), dict(settings.pod_labels) or None)

    faults = cloud_faults(spec, observed)
    comp = plan_compression(espec, observed, owner, ckey, faults, settings)
    # A language model's cloud serves the pack its compression published. (An adopted learned model is a
    # factory model, whose manifest has no causal-lm pack: cloud_pack says so rather than serve it.)
    pack, waiting = cloud_pack(spec, comp, owner) if serves_pack(spec) else (None, "")
    cloud = plan_cloud(spec, observed, owner, settings, pack, waiting, faults)
    edge = plan_edge(espec, observed, owner, revision, comp, settings)
    lp = None
    if spec.learning is not None:
        sizes = (
            {v.name: v.size_bytes for v in comp.manifest.accepted() if v.size_bytes} if comp.manifest else {}
        )
        account = B.job_service_account(
            owner, settings.compressor_service_account, settings.create_compressor_rbac
        )
        lp = learning.plan_learning(
            spec,
            observed,
            owner,
            variant_sizes=sizes,
            service_account=account,
            settings=settings,
            layout=learned_adapters.lora_layout(comp.manifest)
            if learned_adapters.learns_adapter(spec)
            else None,
        )
    extra = [lp.condition] if lp is not None and lp.condition is not None else []
    status = plan_status(spec, observed, revision, cloud, comp, edge, extra)

    whole = TierPlan()
    for tier in (cloud, comp, edge):
        whole.add(tier)
    whole.events = status.events
    if lp is not None:
        if lp.status is not None:
            status.status["learning"] = lp.status
        whole.add(
            TierPlan(children=lp.children, keep=lp.keep, events=lp.events, requeue_after=lp.requeue_after)
        )

    if settings.create_compressor_rbac:
        # One account for the Jobs of both tiers, naming every ConfigMap they write.
        names = []
        if espec.edge.variants and cloud.source_fault is None:
            names.append(L.manifest_name(owner.name, ckey))
        if spec.learning is not None:
            names.append(learning.ledger_name(owner.name))
            active = (lp.status or {}).get("activeRound") if lp is not None else None
            if isinstance(active, int):
                names.append(learning.record_name(owner.name, active))
        if names:
            whole.children.extend(B.compressor_account(owner, names))

    actions = check(whole.children, observed, whole.keep)
    for action in actions:
        if action.check is Check.CREATE:
            whole.events.append(Event("Normal", Reason.CREATED, f"created {action.kind} {action.name}"))
        elif action.check is Check.DELETE:
            whole.events.append(Event("Normal", Reason.DELETED, f"deleted {action.kind} {action.name}"))
    for view in observed.not_owned:
        whole.events.append(
            Event(
                "Warning",
                Reason.NOT_OWNED,
                f"ignored {view.kind} {view.name}: it carries this ModelDeployment's labels but no "
                f"ownerReference to it (uid {observed.uid}); Kiri trusts, updates and deletes only what it owns",
            )
        )
    requeue = whole.requeue_after
    if comp.unknown or not status.ready:
        requeue = sooner(requeue, UNFINISHED_REQUEUE_SECONDS)
    return Plan(
        actions=actions,
        secrets=list(lp.secrets) if lp is not None else [],
        status=normalize_status(status.status),
        events=whole.events,
        requeue_after=requeue,
    )
