"""`kiri get`, `kiri status` rendering from a real planned status, and the commands' argument parsing."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from adapter_worlds import CLINIC, SHOP, SHOP2_SHA, SITE_NODES, adapter, daemonsets, lm_spec, site, started
from kiri_operator import rollout_commands
from kiri_operator.cli import build_parser
from kiri_operator.cli import main as cli_main
from kiri_operator.rollout_commands import command_annotation
from kiri_operator.rollout_views import age, render_list, render_status
from planning_worlds import NOW, FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

STAGED = {"rollout.stages": [{"nodes": 1, "bakeSeconds": 30}, {"percent": 100}]}


def mid_wave() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    s1 = spec(**STAGED)
    server = FakeServer(observed())
    server.step(s1)
    server.publish(s1, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s1)
    s2 = spec(**{**STAGED, "runtime.image": "example/kiri:2"})
    for _ in range(3):
        server.step(s2)
    md = {
        "metadata": {"name": "md", "namespace": "ns", "creationTimestamp": "2026-01-01T11:00:00Z"},
        "spec": s2.dump(),
        "status": dict(server.world.status),
    }
    daemonsets = [dict(c.body) for (kind, _), c in server.world.children.items() if kind == "DaemonSet"]
    pods = [
        {
            "metadata": {"labels": dict(p.labels)},
            "spec": {"nodeName": p.node},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True" if p.ready else "False"}],
            },
        }
        for p in server.world.pods
    ]
    return md, daemonsets, pods


def test_status_tree_shows_stage_revisions_and_nodes() -> None:
    md, daemonsets, pods = mid_wave()
    text = render_status(md, daemonsets, pods, NOW + timedelta(seconds=10))
    status = md["status"]
    update, stable = status["updateRevision"], status["rollout"]["stableRevision"]
    assert "Status:        ◌ Progressing" in text
    assert "Baking" in text
    assert "Stage:       1/2 (1 nodes)" in text
    assert f"⟳ {update} (update)" in text
    assert f"⟳ {stable} (stable)" in text
    # The canary sits under the update revision, the other two under stable, each with its pod state.
    update_block = text.split(f"⟳ {update} (update)")[1].split("⟳")[0]
    assert "edge-cpu-1" in update_block and "✔ Ready" in update_block
    assert "edge-gpu" in text.split(f"⟳ {stable} (stable)")[1]
    assert "HISTORY" in text and "Promoted" in text
    assert "EdgeProgressing" in text


def test_get_lists_phase_and_stage() -> None:
    md, _, _ = mid_wave()
    text = render_list([md], NOW)
    header, row = text.splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "UPDATED", "READY", "TARGET", "AGE"]
    assert row.split()[:3] == ["md", "Progressing", "1/2"]
    assert render_list([], NOW) == "No ModelDeployments found."


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (125, "2m5s"), (7260, "2h1m"), (200000, "2d")])
def test_age(seconds: int, text: str) -> None:
    assert age((NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"), NOW) == text


@pytest.mark.parametrize("verb", ["promote", "abort", "rollback", "status"])
def test_commands_parse(verb: str) -> None:
    args = build_parser().parse_args([verb, "demo", "-n", "shop"])
    assert (args.name, args.namespace) == ("demo", "shop")
    assert callable(args.handler)


def test_status_tree_shows_each_sites_adapter_wave_and_the_adapter_set_of_each_daemonset() -> None:
    server = started([SHOP, CLINIC])
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    server.step(s2)
    status = dict(server.world.status)
    md = {"metadata": {"name": "md", "namespace": "ns"}, "spec": s2.dump(), "status": status}
    node_sites = {n: s for s, names in SITE_NODES.items() for n in names}
    text = render_status(md, list(daemonsets(server).values()), [], NOW + timedelta(seconds=10), node_sites)
    a, b = site(status, "site-a"), site(status, "site-b")
    sites = text.split("\nSITES (adapter waves: one canary node, then the rest of the site)\n")[1]
    block_a, block_b = sites.split("\n\nHISTORY\n")[0].split("\n\n")
    # The planner's own status: site a's new set on its canary, site b untouched.
    assert block_a.splitlines() == [
        "Site:          site-a",
        "  Status:      ◌ Progressing",
        f"  Message:     WaitingForReady: {a['message']}",
        "  Adapters:    clinic, shop (default shop)",
        f"  Revisions:   stable {a['revision']}, update {a['updateRevision']} (updating), previous -",
        "  Step:        1/2: canary node (started 5s ago)",
        f"  Nodes:       1 of 3 on {a['updateRevision']}",
        f"    ⟳ {a['updateRevision']} (update): a-1 (not Ready)",
        f"    ⟳ {a['revision']} (stable): a-2 (not Ready), a-3 (not Ready)",
    ]
    assert block_b.splitlines() == [
        "Site:          site-b",
        "  Status:      ✔ Healthy",
        f"  Message:     RolloutCompleted: {b['message']}",
        "  Adapters:    shop (default shop)",
        f"  Revisions:   stable {b['revision']}, previous -",
        f"  Nodes:       2 of 2 on {b['revision']}",
        f"    ⟳ {b['revision']} (stable): b-1 (not Ready), b-2 (not Ready)",
    ]
    assert f"q4 + adapters {a['updateRevision']}  1 node(s)" in text
    assert f"q4 + adapters {a['revision']}  2 node(s)" in text
    assert f"q4 + adapters {b['revision']}  2 node(s)" in text


# --- commands on a site's adapter wave ----------------------------------------------------------------


class AnnotatingKube:
    """The ModelDeployment as the planner left it; records the annotations a command writes."""

    def __init__(self, md: dict[str, Any]) -> None:
        self.md = md
        self.written: list[dict[str, str]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.md

    def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.written.append(annotations)


def _site_a_mid_wave() -> tuple[Any, Any]:
    """Site a's new clinic adapter baking on its canary (an hour's bake); site b steady."""
    baking = {"stages": [{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}]}
    server = started([SHOP, CLINIC], **baking)
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])], **baking)
    for _ in range(3):
        server.step(s2)
    assert site(server.world.status, "site-a")["reason"] == "Baking"
    return server, s2


def _md(server: Any) -> dict[str, Any]:
    return {"metadata": {"name": "md", "namespace": "ns"}, "status": dict(server.world.status)}


def _run(monkeypatch: pytest.MonkeyPatch, kube: AnnotatingKube, *argv: str) -> int:
    monkeypatch.setattr(rollout_commands, "_kube", lambda args: kube)
    return cli_main([*argv, "md", "-n", "ns"])


def test_abort_with_a_site_writes_that_sites_annotation_and_the_operator_returns_the_site_to_its_stable_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server, s2 = _site_a_mid_wave()
    stable = site(server.world.status, "site-a")["revision"]
    kube = AnnotatingKube(_md(server))
    assert _run(monkeypatch, kube, "abort", "--site", "site-a") == 0
    assert [list(a) for a in kube.written] == [["abort.adapters.kiri.dev/site-a"]]
    assert capsys.readouterr().out.startswith("abort: ns/md site site-a (abort.adapters.kiri.dev/site-a=")
    server.world = replace(server.world, annotations={**server.world.annotations, **kube.written[0]})
    p = server.step(s2)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("RolledBack", "Aborted", stable)
    assert p.status["currentRevision"] == p.status["updateRevision"]  # the revision's rollout untouched


def test_promote_and_abort_of_a_site_without_a_wave_in_flight_are_refused_with_the_sites_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = _site_a_mid_wave()
    kube = AnnotatingKube(_md(server))
    assert _run(monkeypatch, kube, "promote", "--site", "site-b") == 1
    assert capsys.readouterr().err == (
        "kiri: no adapter wave in progress on site site-b of ns/md (verdict Completed); nothing to promote\n"
    )
    assert _run(monkeypatch, kube, "rollback", "--site", "site-b") == 1
    assert (
        capsys.readouterr().err == "kiri: site site-b of ns/md has no previous adapter set to roll back to\n"
    )
    assert _run(monkeypatch, kube, "abort", "--site", "site-c") == 1
    assert capsys.readouterr().err == (
        "kiri: ns/md has no adapters for site site-c (sites with adapters: site-a, site-b)\n"
    )
    assert _run(monkeypatch, kube, "abort", "--site", "not a site") == 1
    assert capsys.readouterr().err == (
        "kiri: 'not a site' is not a site label value (at most 63 letters, digits, '-', '_' or '.')\n"
    )
    assert kube.written == []


def test_without_a_site_the_commands_still_act_on_the_revisions_rollout() -> None:
    server, _ = _site_a_mid_wave()
    md = _md(server)
    # The revision is settled while site a's adapters roll: nothing of the revision's to promote.
    assert command_annotation(md, "promote", None) == (
        "kiri.dev/promote",
        "no rollout in progress for ns/md (phase Progressing); nothing to promote",
    )
    assert command_annotation(md, "rollback", None) == ("kiri.dev/rollback", None)
    assert command_annotation(md, "promote", "site-a") == ("promote.adapters.kiri.dev/site-a", None)
