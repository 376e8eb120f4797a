"""Per-site LoRA adapters: which adapter revision each edge node runs, site by site, in small waves.

Pure: ``plan_adapters(AdapterInput) -> AdapterPlan``, no clock, no I/O.

Vocabulary, as in :mod:`kiri_operator.planning.waves`: a site's *adapter set* is the adapters
``spec.edge.adapters`` names for it and its default; its *adapter revision* is a hash of that set (``base``
when it has none). Each site is a rollout of its own over its own nodes, planned by the same wave planner
(``waves.plan_waves``) with a fixed two-step policy: one canary node of the site, then the rest, through the
same gates (failed pods, ``progressDeadlineSeconds``, every online node Ready, the first stage's bake).
A failure moves the site's nodes back to the site's stable adapter revision (``status.edge.adapters[].revision``);
the other sites are never touched. Each site's memory is its own ``RolloutStatus``
(``status.edge.adapters[].rollout``).

Before a site's wave starts, two checks, cheapest first:
1. the held-out gates: an adapter whose producer measured it worse than the base on the site's held-out text
   (``heldOut``) is refused (``AdapterWorseThanBase``), and so is one that hurts another site's held-out text
   (``heldOut.worstOtherSite``) by more than ``updatePolicy.maxOtherSiteRegression``
   (``AdapterHurtsOtherSites``); the site keeps what it serves;
2. ``spec.rollout.updatePolicy``: ``minImprovement`` on the smallest held-out gain among the adapters new
   to the site (over ``heldOut.current``, else the base), the interval since the site's last adapter rollout
   (or the revision's), and the bytes the site's nodes would fetch (new adapters only) within
   ``maxBytesPerDay``, counted together with the revision's downloads.

During a site's wave, the wave planner's own gates apply to it as to a revision's: ``spec.rollout.analysis``
(the measurements ``analyzing.site_dues`` takes on the pods of the wave's adapter revision come in as
``AdapterInput.measurements``; a failed one rolls the site back) and the site's promote/abort/rollback
commands (``<verb>.adapters.kiri.dev/<site>`` annotations, ``site_commands``).

A site's wave starts only while no revision rollout is in flight (the edge tier holds a new revision while
an adapter wave is in flight), so a failure is never blamed on the wrong change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from kiri_operator import labels as L
from kiri_operator.api.specs import HeldOutMetric, ModelDeploymentSpec, RolloutSpec, UpdatePolicy
from kiri_operator.api.statuses import RolloutStatus, SiteAdapters, SiteDownload
from kiri_operator.conditions import Reason
from kiri_operator.labels import short_hash
from kiri_operator.observations import Measurement, NodeView
from kiri_operator.planning import waves as W
from kiri_operator.planning.stepping import EdgeNode, RolloutPolicy, Stage, policy_of
from kiri_operator.planning.updating import DAY, Candidate, Download, UpdateDecision, decide
from kiri_operator.plans import Event

BASE = "base"
"""The adapter revision of a site with no adapter (the runtime's `model:base`)."""
DEFAULT_SITE_LABEL = "kiri.dev/site"
REFUSALS = (Reason.ADAPTER_WORSE_THAN_BASE, Reason.ADAPTER_HURTS_OTHER_SITES)
"""The held-out gates' reasons: the site's set is refused, not deferred."""
# The wave planner sizes waves by a node's "variant": every node of a site fetches the same adapters.
_ADAPTERS_VARIANT = "adapters"


def site_label(spec: ModelDeploymentSpec) -> str:
    """The node label that names a node's site: learning's, else `kiri.dev/site`."""
    return spec.learning.site_label if spec.learning is not None else DEFAULT_SITE_LABEL


@dataclass(frozen=True)
class Adapter:
    """One adapter as a pod loads it; size and held-out metric when the spec says them (an adapter set read
    back from a DaemonSet has neither)."""

    name: str
    uri: str
    sha256: str
    size_bytes: int = 0
    held_out: HeldOutMetric | None = None


@dataclass(frozen=True)
class AdapterSet:
    """One site's adapters and default, as `kiri serve --adapter/--default-adapter` take them."""

    adapters: tuple[Adapter, ...] = ()
    default: str | None = None

    @property
    def revision(self) -> str:
        if not self.adapters:
            return BASE
        body = {
            "adapters": [{"name": a.name, "uri": a.uri, "sha256": a.sha256.lower()} for a in self.adapters],
            "default": self.default,
        }
        return short_hash(json.dumps(body, sort_keys=True, separators=(",", ":")))

    def worse_than_base(self) -> list[Adapter]:
        return [a for a in self.adapters if a.held_out is not None and a.held_out.worse()]

    def hurting_other_sites(self, bound: float | None) -> list[Adapter]:
        """Adapters whose declared regression on another site's held-out text exceeds `bound`."""
        if bound is None:
            return []
        return [
            a
            for a in self.adapters
            if a.held_out is not None and (r := a.held_out.other_site_regression()) is not None and r > bound
        ]


def desired_sets(spec: ModelDeploymentSpec) -> dict[str, AdapterSet]:
    """site -> the adapter set the spec asks of it (sites the spec names only)."""
    sites = sorted({s for a in spec.edge.adapters for s in a.sites})
    out: dict[str, AdapterSet] = {}
    for site in sites:
        mine = sorted((a for a in spec.edge.adapters if site in a.sites), key=lambda a: a.name)
        default = next((a.name for a in mine if a.default), None)
        adapters = tuple(Adapter(a.name, a.uri, a.sha256.lower(), a.size_bytes, a.held_out) for a in mine)
        out[site] = AdapterSet(adapters, default)
    return out


def site_policy(rollout: RolloutSpec) -> RolloutPolicy:
    """A site's adapter wave: one canary node (with the first stage's bake), then every node of the site.

    The rollout's other settings apply as they are, analysis included (`analyzing.site_dues` runs its
    queries on the pods of the wave's adapter revision); `groupBy` does not (a site is one group)."""
    base = policy_of(rollout)
    bake = float(rollout.stages[0].bake_seconds) if rollout.stages else 0.0
    return RolloutPolicy(
        stages=(Stage(nodes=1, bake_seconds=bake), Stage(percent=100)),
        group_by=None,
        max_unavailable=base.max_unavailable,
        offline_nodes=base.offline_nodes,
        progress_deadline_seconds=base.progress_deadline_seconds,
        analysis=base.analysis,
        max_concurrent_downloads=base.max_concurrent_downloads,
        max_bytes_per_wave=base.max_bytes_per_wave,
        paused=base.paused,
    )


@dataclass(frozen=True)
class AdapterInput:
    rollout: RolloutSpec
    sites: Mapping[str, AdapterSet]
    """The spec's adapter set per site it names."""
    nodes: Sequence[NodeView]
    """The edge nodes that hold a slot."""
    site_label: str
    current: Mapping[str, str]
    """node -> the adapter revision its DaemonSet runs now (`BASE` for none)."""
    pods: Mapping[str, W.NodePod]
    """node -> its edge pod as the site's wave sees it: `revision` is the pod's adapter revision (`BASE` for
    none), `ready` only on the revision and variant its node is assigned to (a pod being replaced is not)."""
    stored: Mapping[str, SiteAdapters]
    """status.edge.adapters as stored, per site."""
    now: datetime
    revision_settled: bool = True
    """No revision rollout is in flight: a site's adapter wave may start."""
    first_rollout: bool = False
    """No revision has reached the edge yet: nothing runs, so nothing to protect."""
    update_policy: UpdatePolicy | None = None
    downloads: Sequence[SiteDownload] = ()
    """Downloads of the last 24 hours (revisions' and adapters'), for `maxBytesPerDay`."""
    revision_started_at: datetime | None = None
    """When the last revision rollout started, for `minIntervalSeconds`."""
    recorded: Mapping[str, AdapterSet] = field(default_factory=dict)
    """Adapter sets the spec no longer names, read back from their DaemonSets (a site's stable or previous
    set after a change): a new revision's DaemonSets are built with them, and a rollback finds them."""
    measurements: Mapping[str, Measurement] = field(default_factory=dict)
    """site -> the analysis measurement of its wave taken for this plan (`analyzing.site_dues`)."""
    measuring: frozenset[str] = frozenset()
    """Sites whose due measurement is being taken elsewhere."""
    commands: Mapping[str, W.Commands] = field(default_factory=dict)
    """site -> the promote/abort/rollback nonces of its adapter wave (`site_commands`)."""


def site_commands(annotations: Mapping[str, str]) -> dict[str, W.Commands]:
    """site -> its adapter wave's commands, from the `<verb>.adapters.kiri.dev/<site>` annotations."""
    found: dict[str, dict[str, str]] = {}
    for key, value in annotations.items():
        for verb, prefix in L.SITE_COMMANDS.items():
            if key.startswith(prefix) and len(key) > len(prefix) and value:
                found.setdefault(key[len(prefix) :], {})[verb] = value
    return {site: W.Commands(**verbs) for site, verbs in found.items()}


@dataclass
class AdapterPlan:
    nodes: dict[str, str] = field(default_factory=dict)
    """node -> adapter revision."""
    sets: dict[str, AdapterSet] = field(default_factory=dict)
    """adapter revision -> its set, for the revisions the spec can build (`BASE` included)."""
    keep: frozenset[str] = frozenset()
    """Adapter revisions whose DaemonSets stay even with no node: each site's stable and previous."""
    sites: list[SiteAdapters] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    downloads: list[SiteDownload] = field(default_factory=list)
    """What the adapter waves started by this plan make each site download."""
    requeue_after: float | None = None
    in_progress: tuple[str, ...] = ()
    """Sites whose adapter wave is in flight."""
    refused: tuple[SiteAdapters, ...] = ()
    """Sites whose adapters the held-out gate refused."""
    rolled_back: tuple[SiteAdapters, ...] = ()
    """Sites whose adapter wave rolled back (now or earlier, the same revision still asked)."""


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def plan_adapters(inp: AdapterInput) -> AdapterPlan:
    out = AdapterPlan(sets={BASE: AdapterSet(), **inp.recorded})
    out.sets.update({s.revision: s for s in inp.sites.values()})
    by_site: dict[str, list[NodeView]] = {}
    for node in sorted(inp.nodes, key=lambda n: n.name):
        site = node.labels.get(inp.site_label, "")
        by_site.setdefault(site, []).append(node)
    for node in by_site.pop("", []):
        out.nodes[node.name] = BASE  # a node of no site serves no adapter
    # A site the spec does not name, that has no memory and runs no adapter, has nothing to plan: its nodes
    # serve the base model, and a ModelDeployment without adapters says nothing about sites.
    serving = {s for s, nodes in by_site.items() if any(inp.current.get(n.name, BASE) != BASE for n in nodes)}
    sites = sorted(set(inp.sites) | set(inp.stored) | serving)
    for site in set(by_site) - set(sites):
        out.nodes.update((n.name, BASE) for n in by_site[site])
    keep: set[str] = {BASE}
    in_progress, refused, rolled_back = [], [], []
    for site in sites:
        st = _plan_site(inp, out, site, by_site.get(site, []))
        if st.rollout is not None:
            keep.update(r for r in (st.rollout.stable_revision, st.rollout.previous_stable_revision) if r)
            keep.update(r for r in (st.rollout.update_revision,) if r and st.rollout.in_progress)
            if st.rollout.in_progress:
                in_progress.append(site)
        if st.reason in REFUSALS:
            refused.append(st)
        elif st.verdict == "RolledBack":
            rolled_back.append(st)
        # A site the spec dropped stays while it remembers adapters (served, previous or rolling out).
        remembers = {st.revision, st.previous_revision} - {None, BASE}
        if site in inp.sites or remembers or (st.rollout is not None and st.rollout.in_progress):
            out.sites.append(st)
    out.keep = frozenset(keep)
    out.in_progress = tuple(in_progress)
    out.refused = tuple(refused)
    out.rolled_back = tuple(rolled_back)
    return out


def _initial_state(inp: AdapterInput, site: str, nodes: Sequence[NodeView], target: str) -> RolloutStatus:
    """A site with no memory: a site where nothing runs yet starts on its target (nothing to protect); one
    that runs starts from what most of its nodes run, so the change goes through the waves."""
    running = [inp.current[n.name] for n in nodes if n.name in inp.current]
    # Commands given before this memory existed were for another wave: none acts on this one.
    cmd = inp.commands.get(site, W.Commands())
    handled = {"handled_promote": cmd.promote, "handled_abort": cmd.abort, "handled_rollback": cmd.rollback}
    if inp.first_rollout or not running:
        return RolloutStatus(stable_revision=target, update_revision=target, **handled)
    stable = max(sorted(set(running)), key=running.count)
    return RolloutStatus(stable_revision=stable, update_revision=stable, **handled)


def _plan_site(inp: AdapterInput, out: AdapterPlan, site: str, nodes: Sequence[NodeView]) -> SiteAdapters:
    desired = inp.sites.get(site, AdapterSet())
    wanted = desired.revision
    stored = inp.stored.get(site)
    bound = inp.update_policy.max_other_site_regression if inp.update_policy is not None else None
    worse_here, hurting = desired.worse_than_base(), desired.hurting_other_sites(bound)
    worse = bool(worse_here or hurting)  # the held-out gates refuse the set: the site keeps what it serves
    gate_reason, gate_message = "", ""
    if worse_here:
        names = ", ".join(
            f"{a.name} ({a.held_out.metric} {a.held_out.adapter:g} vs base {a.held_out.base:g})"
            for a in worse_here
            if a.held_out is not None
        )
        gate_reason = Reason.ADAPTER_WORSE_THAN_BASE
        gate_message = (
            f"site {site}: adapter {names} is worse than the base model on held-out text; not rolled out"
        )
    elif hurting:
        gate_reason = Reason.ADAPTER_HURTS_OTHER_SITES
        gate_message = f"site {site}: " + "; ".join(_hurt(a, bound) for a in hurting) + "; not rolled out"
    state = stored.rollout if stored is not None and stored.rollout is not None else None
    if state is None:
        state = _initial_state(inp, site, nodes, BASE if worse else wanted)
    stable = state.stable_revision or BASE
    in_flight = state.in_progress
    target = wanted
    if worse:
        target = stable
    elif target != stable and state.update_revision != target:
        # A new wave would start: only once the revision has settled, and within the update policy.
        if not inp.revision_settled:
            target = state.update_revision if in_flight and state.update_revision else stable
            gate_reason = Reason.WAITING_FOR_REVISION_ROLLOUT
            gate_message = f"site {site}: adapters wait for the revision rollout in flight to end"
        elif target not in state.rolled_back_revisions:
            decision, cost = _policy(inp, site, nodes, desired, stable, state, out.sets)
            if not decision.allowed:
                target = state.update_revision if in_flight and state.update_revision else stable
                gate_reason = Reason.UPDATE_DEFERRED
                gate_message = f"site {site}: adapters deferred by updatePolicy: {decision.reason}"
                if decision.retry_after_seconds is not None:
                    out.requeue_after = _sooner(
                        out.requeue_after, float(max(1, decision.retry_after_seconds))
                    )
            elif cost > 0:
                out.downloads.append(SiteDownload(site=site, bytes=cost, time=inp.now))
    observed = W.Observed(
        update_revision=target,
        nodes=[EdgeNode(n.name, {}, n.ready, _ADAPTERS_VARIANT) for n in nodes],
        assignment={n.name: inp.current[n.name] for n in nodes if n.name in inp.current},
        pods={n.name: p for n in nodes if (p := inp.pods.get(n.name)) is not None},
        variant_sizes={_ADAPTERS_VARIANT: _new_bytes(desired, stable, out.sets)},
        measurement=inp.measurements.get(site),
        measuring=site in inp.measuring,
        commands=inp.commands.get(site, W.Commands()),
    )
    started = state.update_revision != target and target != stable
    plan = W.plan_waves(site_policy(inp.rollout), observed, state, inp.now)
    new_state = plan.state
    if started and new_state.in_progress:
        new_state = new_state.model_copy(update={"started_at": inp.now})
    for event in plan.events:
        out.events.append(Event(event.type, event.reason, f"adapters of site {site}: {event.message}"))
    verdict, reason, message = plan.verdict.kind, plan.verdict.reason, plan.verdict.message
    if gate_reason:
        told = stored is not None and stored.reason == gate_reason
        if gate_reason in REFUSALS and not told:
            out.events.append(Event("Warning", gate_reason, gate_message))
        verdict = "Holding" if gate_reason in REFUSALS else "Waiting"
        if not new_state.in_progress:
            reason, message = gate_reason, gate_message
    out.requeue_after = _sooner(out.requeue_after, plan.requeue_after)
    out.nodes.update(plan.assignment)
    shown = inp.sites.get(site, AdapterSet())
    return SiteAdapters(
        site=site,
        revision=new_state.stable_revision,
        previous_revision=new_state.previous_stable_revision,
        update_revision=wanted,
        adapters=[a.name for a in shown.adapters],
        default=shown.default,
        nodes=len(nodes),
        updated_nodes=sum(1 for n in nodes if plan.assignment.get(n.name) == wanted),
        verdict=verdict,
        reason=reason,
        message=message[:1000],
        rollout=new_state,
    )


def _hurt(a: Adapter, bound: float | None) -> str:
    m = a.held_out
    assert m is not None and m.worst_other_site is not None
    other = m.worst_other_site
    where = f"site {other.site}" if other.site else "another site"
    return (
        f"adapter {a.name} hurts {where} by {m.other_site_regression():.4g} ({m.metric} {other.adapter:g} vs "
        f"base {other.base:g} on its held-out text), more than maxOtherSiteRegression {bound:g}"
    )


def _new_bytes(desired: AdapterSet, stable: str, sets: Mapping[str, AdapterSet]) -> int:
    """Bytes one node fetches to move from `stable` to `desired`: the adapters it does not hold yet (a
    node's cache keeps what it has by digest). A stable set known neither from the spec nor from a
    DaemonSet counts as holding nothing."""
    held = {a.sha256.lower() for a in sets.get(stable, AdapterSet()).adapters}
    return sum(a.size_bytes for a in desired.adapters if a.sha256.lower() not in held)


def _policy(
    inp: AdapterInput,
    site: str,
    nodes: Sequence[NodeView],
    desired: AdapterSet,
    stable: str,
    state: RolloutStatus,
    sets: Mapping[str, AdapterSet],
) -> tuple[UpdateDecision, int]:
    """`updatePolicy` on a site's new adapter wave, and the bytes its nodes would fetch. `minImprovement`
    weighs the new adapters whose producer measured them (`heldOut`) by the smallest gain among them; a set
    with none measured is the user's decision, as a spec change is."""
    cost = _new_bytes(desired, stable, sets) * len(nodes)
    last = max((t for t in (state.started_at, inp.revision_started_at) if t is not None), default=None)
    recent = [Download(d.site, d.bytes, d.time) for d in inp.downloads if inp.now - d.time < DAY]
    held = {a.sha256.lower() for a in sets.get(stable, AdapterSet()).adapters}
    measured = [a for a in desired.adapters if a.held_out is not None and a.sha256.lower() not in held]
    least = min(measured, key=lambda a: a.held_out.gain() if a.held_out is not None else 0.0, default=None)
    gain = least.held_out.gain() if least is not None and least.held_out is not None else None
    decision = decide(
        inp.update_policy,
        Candidate(desired.revision, {site: cost}, learned=gain is not None, improvement=gain),
        now=inp.now,
        last_rollout_at=last,
        downloads=recent,
    )
    if least is not None and least.held_out is not None and decision.reason.startswith("minImprovement"):
        m = least.held_out
        against = (
            f"the current adapter's {m.current:g}" if m.current is not None else f"the base's {m.base:g}"
        )
        decision = replace(
            decision,
            reason=f"{decision.reason} (adapter {least.name}: {m.metric} {m.adapter:g} against {against})",
        )
    return decision, cost
