"""`kiri get`, `kiri status` rendering from a real planned status, and the commands' argument parsing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from adapter_worlds import CLINIC, SHOP, SHOP2_SHA, adapter, daemonsets, lm_spec, site, started
from kiri_operator.cli import build_parser
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


def test_status_tree_shows_each_sites_adapters_and_the_adapter_set_of_each_daemonset() -> None:
    server = started([SHOP, CLINIC])
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    server.step(s2)
    status = dict(server.world.status)
    md = {"metadata": {"name": "md", "namespace": "ns"}, "spec": s2.dump(), "status": status}
    text = render_status(md, list(daemonsets(server).values()), [], NOW + timedelta(seconds=10))
    a, b = site(status, "site-a"), site(status, "site-b")
    table = text.split("\nADAPTERS\n")[1].split("\n\n")[0].splitlines()
    assert table[0].split() == ["SITE", "SERVING", "PREVIOUS", "UPDATE", "NODES", "VERDICT", "REASON"]
    assert table[1].split() == [
        "site-a",
        a["revision"],
        "-",
        a["updateRevision"],
        "1/3",
        "Progressing",
        "WaitingForReady",
    ]
    assert table[2].split() == [
        "site-b",
        b["revision"],
        "-",
        b["revision"],
        "2/2",
        "Completed",
        "RolloutCompleted",
    ]
    assert f"q4 + adapters {a['updateRevision']}  1 node(s)" in text
    assert f"q4 + adapters {a['revision']}  2 node(s)" in text
    assert f"q4 + adapters {b['revision']}  2 node(s)" in text
