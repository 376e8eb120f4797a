"""`kiri status`'s SITES section and `kiri get`'s ADAPTERS column: each site's adapter wave, built from the
status models the operator writes (`SiteAdapters`, `RolloutStatus`), so a renamed field breaks these tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiri_operator import labels as L
from kiri_operator import rollout_commands
from kiri_operator.api.statuses import (
    EdgeStatus,
    ModelDeploymentStatus,
    RolloutHistoryEntry,
    RolloutStatus,
    SiteAdapters,
)
from kiri_operator.cli import main as cli_main
from kiri_operator.conditions import Reason
from kiri_operator.kube import KubeError
from kiri_operator.planning.building import node_affinity
from kiri_operator.rollout_views import render_list, render_sites, render_status

pytestmark = pytest.mark.timeout(30)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
STABLE_A, UPDATE_A, PREVIOUS_A = "88835327ef", "50150f35b0", "0f0f0f0f0f"
STABLE_B, UPDATE_B = "12e956063d", "7a7a7a7a7a"
PREVIOUS_C = "3c3c3c3c3c"
HEADER = "SITES (adapter waves: one canary node, then the rest of the site)"
NODE_SITES = {
    "a-1": "site-a",
    "a-2": "site-a",
    "a-3": "site-a",
    "b-1": "site-b",
    "b-2": "site-b",
    "c-1": "site-c",
}


def ago(seconds: int) -> datetime:
    return NOW - timedelta(seconds=seconds)


def canary_site() -> SiteAdapters:
    """Site a's new set baking on its canary node a-1 for 40 s."""
    return SiteAdapters(
        site="site-a",
        revision=STABLE_A,
        update_revision=UPDATE_A,
        adapters=["clinic", "shop"],
        default="shop",
        nodes=3,
        updated_nodes=1,
        verdict="Progressing",
        reason=Reason.BAKING,
        message="step 1/2: baking until 2026-01-01T12:04:20Z",
        rollout=RolloutStatus(
            stable_revision=STABLE_A,
            update_revision=UPDATE_A,
            stage=0,
            step_started_at=ago(40),
            started_at=ago(40),
            verdict="Progressing",
            reason=Reason.BAKING,
        ),
    )


def rolled_back_site() -> SiteAdapters:
    """Site a's new set rolled back two minutes ago by its canary's failed analysis."""
    return SiteAdapters(
        site="site-a",
        revision=STABLE_A,
        previous_revision=PREVIOUS_A,
        update_revision=UPDATE_A,
        adapters=["clinic", "shop"],
        default="shop",
        nodes=3,
        updated_nodes=0,
        verdict="RolledBack",
        reason=Reason.ROLLED_BACK_ANALYSIS,
        message="step 1/2: analysis failed: error-ratio 0.5 > 0.05",
        rollout=RolloutStatus(
            stable_revision=STABLE_A,
            previous_stable_revision=PREVIOUS_A,
            update_revision=UPDATE_A,
            rolled_back_revisions=(UPDATE_A,),
            history=(
                RolloutHistoryEntry(
                    revision=UPDATE_A, outcome="RolledBack", reason=Reason.ROLLED_BACK_ANALYSIS, at=ago(120)
                ),
            ),
            verdict="RolledBack",
            reason=Reason.ROLLED_BACK_ANALYSIS,
        ),
    )


DEFERRAL = (
    "site site-b: adapters deferred by updatePolicy: minIntervalSeconds: last rollout started "
    "2026-01-01T11:50:00Z, the next may start at 2026-01-01T12:20:00Z"
)


def deferred_site() -> SiteAdapters:
    """Site b asked for a new set ten minutes after its last wave, with a 30-minute minInterval."""
    return SiteAdapters(
        site="site-b",
        revision=STABLE_B,
        update_revision=UPDATE_B,
        adapters=["shop"],
        default="shop",
        nodes=2,
        updated_nodes=0,
        verdict="Waiting",
        reason=Reason.UPDATE_DEFERRED,
        message=DEFERRAL,
        rollout=RolloutStatus(
            stable_revision=STABLE_B,
            update_revision=STABLE_B,
            started_at=ago(600),
            history=(
                RolloutHistoryEntry(
                    revision=STABLE_B, outcome="Promoted", reason=Reason.COMPLETED, at=ago(600)
                ),
            ),
            verdict="Completed",
            reason=Reason.COMPLETED,
        ),
    )


def base_site() -> SiteAdapters:
    """Site c, dropped from spec.edge.adapters, back on the base model."""
    return SiteAdapters(
        site="site-c",
        revision="base",
        previous_revision=PREVIOUS_C,
        update_revision="base",
        nodes=1,
        updated_nodes=1,
        verdict="Completed",
        reason=Reason.COMPLETED,
        message="revision base is stable",
        rollout=RolloutStatus(
            stable_revision="base",
            previous_stable_revision=PREVIOUS_C,
            update_revision="base",
            verdict="Completed",
            reason=Reason.COMPLETED,
        ),
    )


def md_of(*sites: SiteAdapters) -> dict[str, Any]:
    status = ModelDeploymentStatus(phase="Healthy", edge=EdgeStatus(adapters=list(sites)))
    return {
        "metadata": {"name": "assistant", "namespace": "shop", "creationTimestamp": "2026-01-01T11:00:00Z"},
        "spec": {},
        "status": status.dump(),
    }


def daemonset(adapters: str | None, nodes: list[str]) -> dict[str, Any]:
    labels = {L.REVISION: "dfbc2da7ef", L.VARIANT: "q4", **({L.ADAPTERS: adapters} if adapters else {})}
    return {
        "metadata": {"name": f"assistant-dfbc2da7ef-q4-{adapters or ''}".rstrip("-"), "labels": labels},
        "spec": {"template": {"spec": {"affinity": {"nodeAffinity": node_affinity(nodes)}}}},
    }


def pod(adapters: str | None, node: str, ready: bool = True) -> dict[str, Any]:
    labels = {L.REVISION: "dfbc2da7ef", **({L.ADAPTERS: adapters} if adapters else {})}
    return {
        "metadata": {"labels": labels},
        "spec": {"nodeName": node},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


DAEMONSETS = [
    daemonset(UPDATE_A, ["a-1"]),
    daemonset(STABLE_A, ["a-2", "a-3"]),
    daemonset(STABLE_B, ["b-1", "b-2"]),
    daemonset(None, ["c-1"]),
]
PODS = [
    pod(UPDATE_A, "a-1"),
    pod(STABLE_A, "a-2"),
    pod(STABLE_A, "a-3", ready=False),
    pod(STABLE_B, "b-1"),
    pod(STABLE_B, "b-2"),
    pod(None, "c-1"),
]


def test_a_site_mid_canary_shows_its_step_the_update_revision_on_the_canary_node_and_the_rest_on_stable() -> (
    None
):
    assert render_sites(md_of(canary_site()), DAEMONSETS, PODS, NOW, NODE_SITES) == [
        HEADER,
        "Site:          site-a",
        "  Status:      ◌ Progressing",
        "  Message:     Baking: step 1/2: baking until 2026-01-01T12:04:20Z",
        "  Adapters:    clinic, shop (default shop)",
        f"  Revisions:   stable {STABLE_A}, update {UPDATE_A} (updating), previous -",
        "  Step:        1/2: canary node (started 40s ago)",
        f"  Nodes:       1 of 3 on {UPDATE_A}",
        f"    ⟳ {UPDATE_A} (update): a-1",
        f"    ⟳ {STABLE_A} (stable): a-2, a-3 (not Ready)",
    ]


def test_a_rolled_back_site_shows_why_the_revision_it_went_back_to_and_that_the_set_is_not_rolled_out_again() -> (
    None
):
    back = [daemonset(STABLE_A, ["a-1", "a-2", "a-3"]), daemonset(UPDATE_A, [])]
    pods = [pod(STABLE_A, "a-1"), pod(STABLE_A, "a-2"), pod(STABLE_A, "a-3")]
    assert render_sites(md_of(rolled_back_site()), back, pods, NOW, NODE_SITES) == [
        HEADER,
        "Site:          site-a",
        "  Status:      ↶ RolledBack",
        "  Message:     AnalysisFailed: step 1/2: analysis failed: error-ratio 0.5 > 0.05",
        "  Adapters:    clinic, shop (default shop)",
        f"  Revisions:   stable {STABLE_A}, update {UPDATE_A} (rolled back), previous {PREVIOUS_A}",
        f"  Nodes:       0 of 3 on {UPDATE_A}",
        f"    ⟳ {STABLE_A} (stable): a-1, a-2, a-3",
        f"  Rolled back: {UPDATE_A} (not rolled out again)",
        f"  Last wave:   {UPDATE_A} RolledBack (AnalysisFailed) 2m0s ago",
    ]


def test_a_site_deferred_by_the_update_policy_shows_the_deferral_with_its_retry_time() -> None:
    assert render_sites(md_of(deferred_site()), DAEMONSETS, PODS, NOW, NODE_SITES) == [
        HEADER,
        "Site:          site-b",
        "  Status:      … Pending",
        f"  Message:     UpdateDeferred: {DEFERRAL}",
        "  Adapters:    shop (default shop)",
        f"  Revisions:   stable {STABLE_B}, update {UPDATE_B} (deferred by updatePolicy), previous -",
        f"  Nodes:       0 of 2 on {UPDATE_B}",
        f"    ⟳ {STABLE_B} (stable): b-1, b-2",
        f"  Last wave:   {STABLE_B} Promoted (RolloutCompleted) 10m0s ago",
    ]


def test_a_site_with_no_adapters_serves_the_base_model() -> None:
    assert render_sites(md_of(base_site()), DAEMONSETS, PODS, NOW, NODE_SITES) == [
        HEADER,
        "Site:          site-c",
        "  Status:      ✔ Healthy",
        "  Message:     RolloutCompleted: revision base is stable",
        "  Adapters:    none (the base model)",
        f"  Revisions:   stable base, previous {PREVIOUS_C}",
        "  Nodes:       1 of 1 on base",
        "    ⟳ base (stable): c-1",
    ]


def test_a_set_the_held_out_gate_refused_is_degraded_and_the_site_keeps_its_set() -> None:
    refused = deferred_site().model_copy(
        update={
            "verdict": "Holding",
            "reason": Reason.ADAPTER_WORSE_THAN_BASE,
            "message": "site site-b: adapter shop (perplexity 12 vs base 10) is worse than the base model on "
            "held-out text; not rolled out",
        }
    )
    lines = render_sites(md_of(refused), [], [], NOW, None)
    assert lines[2:6] == [
        "  Status:      ✖ Degraded",
        "  Message:     AdapterWorseThanBase: site site-b: adapter shop (perplexity 12 vs base 10) is worse "
        "than the base model on held-out text; not rolled out",
        "  Adapters:    shop (default shop)",
        f"  Revisions:   stable {STABLE_B}, update {UPDATE_B} (refused), previous -",
    ]


def test_without_the_nodes_sites_each_site_shows_its_counts_and_no_node_names() -> None:
    lines = render_sites(md_of(canary_site(), base_site()), DAEMONSETS, PODS, NOW, None)
    assert [line for line in lines if "⟳" in line] == []
    assert f"  Nodes:       1 of 3 on {UPDATE_A}" in lines
    assert "  Nodes:       1 of 1 on base" in lines
    # One blank line between two sites.
    assert lines.index("Site:          site-c") == lines.index("") + 1


def test_status_shows_every_site_in_the_status_order_and_only_the_one_site_asked_for() -> None:
    md = md_of(canary_site(), deferred_site(), base_site())
    everything = render_status(md, DAEMONSETS, PODS, NOW, NODE_SITES)
    sites = everything.split(f"\n{HEADER}\n")[1].split("\n\n")
    assert [s.splitlines()[0] for s in sites[:3]] == [
        "Site:          site-a",
        "Site:          site-b",
        "Site:          site-c",
    ]
    only_b = render_status(md, DAEMONSETS, PODS, NOW, NODE_SITES, site="site-b")
    assert (
        only_b.split(f"\n{HEADER}\n")[1].split("\n\n")[0].splitlines()
        == render_sites(md, DAEMONSETS, PODS, NOW, NODE_SITES, site="site-b")[1:]
    )
    assert "site-a" not in only_b and "site-c" not in only_b


def test_status_without_adapters_has_no_sites_section() -> None:
    md = md_of()
    assert md["status"]["edge"].get("adapters") == []
    assert "SITES" not in render_status(md, [], [], NOW)


def test_get_counts_the_sites_serving_their_asked_set_only_when_some_deployment_has_adapters() -> None:
    with_sites = md_of(canary_site(), deferred_site(), base_site())
    without = {**md_of(), "metadata": {"name": "classifier", "namespace": "shop"}}
    header, first, second = render_list([with_sites, without], NOW).splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "UPDATED", "READY", "TARGET", "ADAPTERS", "AGE"]
    assert first.split()[6] == "1/3"  # site c serves base as asked; a is mid-wave, b deferred
    assert second.split()[6] == "-"
    assert "ADAPTERS" not in render_list([without], NOW)


# --- the command ------------------------------------------------------------------------------------


class ReadingKube:
    """The objects `kiri status` reads; Node LIST may be forbidden, as for a namespaced user."""

    def __init__(self, md: dict[str, Any], nodes_forbidden: bool = False) -> None:
        self.md, self.nodes_forbidden = md, nodes_forbidden
        self.listed: list[tuple[str, str | None, str | None]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.md

    def list(
        self, kind: str, namespace: str | None = None, selector: str | None = None
    ) -> list[dict[str, Any]]:
        self.listed.append((kind, namespace, selector))
        if kind == "DaemonSet":
            return DAEMONSETS
        if kind == "Pod":
            return PODS
        if self.nodes_forbidden:
            raise KubeError(403, "list", "/api/v1/nodes", 'nodes is forbidden: cannot list resource "nodes"')
        return [{"metadata": {"name": n, "labels": {"kiri.dev/site": s}}} for n, s in NODE_SITES.items()]


def _run(monkeypatch: pytest.MonkeyPatch, kube: ReadingKube, *argv: str) -> int:
    monkeypatch.setattr(rollout_commands, "_kube", lambda args: kube)
    return cli_main(["status", "assistant", "-n", "shop", *argv])


def test_status_site_lists_the_sites_nodes_through_their_site_label(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    md = {**md_of(canary_site(), deferred_site()), "spec": {"learning": {"siteLabel": "kiri.dev/site"}}}
    kube = ReadingKube(md)
    assert _run(monkeypatch, kube, "--site", "site-a") == 0
    out = capsys.readouterr().out
    assert f"    ⟳ {UPDATE_A} (update): a-1\n    ⟳ {STABLE_A} (stable): a-2, a-3 (not Ready)\n" in out
    assert "site-b" not in out
    assert ("Node", None, "kiri.dev/site") in kube.listed


def test_status_where_nodes_may_not_be_listed_still_shows_each_sites_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = ReadingKube(md_of(canary_site()), nodes_forbidden=True)
    assert _run(monkeypatch, kube) == 0
    out = capsys.readouterr().out
    assert f"  Nodes:       1 of 3 on {UPDATE_A}\n" in out
    assert f"⟳ {UPDATE_A} (update): a-1" not in out


def test_status_site_json_prints_that_sites_entry_and_an_unknown_site_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    md = md_of(canary_site(), deferred_site())
    assert _run(monkeypatch, ReadingKube(md), "--site", "site-b", "-o", "json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert SiteAdapters.model_validate(printed) == deferred_site()
    assert printed["reason"] == "UpdateDeferred" and printed["message"] == DEFERRAL

    assert _run(monkeypatch, ReadingKube(md), "--site", "site-z") == 1
    assert capsys.readouterr().err == (
        "kiri: shop/assistant has no adapters for site site-z (sites with adapters: site-a, site-b)\n"
    )
