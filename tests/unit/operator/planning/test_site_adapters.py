"""Per-site LoRA adapters (issue 23, operator) through the whole `plan()`: each site's edge pods load that
site's adapters and default; a change to one site's adapters rolls out on that site alone (one canary node,
then the rest) with the rollout's health gates, and rolls back to the site's previous adapters when it fails;
an adapter measured worse than the base on held-out text never rolls out; the update policy counts adapter
bytes. Runs on the simulated API server of tests/planning_worlds.py."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest

from adapter_worlds import (
    CLINIC,
    CLINIC_SHA,
    SHOP,
    SHOP2_SHA,
    SHOP_SHA,
    SITE_NODES,
    adapter,
    adapters_by_node,
    cond,
    daemonsets,
    lm_spec,
    serve_args,
    site,
    started,
)
from kiri_operator import conditions as C
from kiri_operator import labels as L
from kiri_operator.api.scalars import format_time
from kiri_operator.planning.building import affinity_nodes
from planning_worlds import NOW

pytestmark = pytest.mark.timeout(30)

# --- what the pods run ---------------------------------------------------------------------------------


def test_each_sites_edge_pods_load_that_sites_adapters_and_its_default() -> None:
    server = started([SHOP, CLINIC])
    by_node = adapters_by_node(server)
    rev_a, rev_b = by_node["a-1"], by_node["b-1"]
    assert {by_node[n] for n in SITE_NODES["site-a"]} == {rev_a}
    assert {by_node[n] for n in SITE_NODES["site-b"]} == {rev_b}
    assert rev_a != rev_b and "" not in (rev_a, rev_b)
    sets = {b["metadata"]["labels"][L.ADAPTERS]: b for b in daemonsets(server).values()}
    a, b = serve_args(sets[rev_a]), serve_args(sets[rev_b])
    assert [(x.name, x.uri, x.sha256) for x in a.adapter] == [
        ("clinic", CLINIC["uri"], CLINIC_SHA),
        ("shop", SHOP["uri"], SHOP_SHA),
    ]
    assert a.default_adapter == "shop"
    assert [(x.name, x.sha256) for x in b.adapter] == [("shop", SHOP_SHA)]
    assert b.default_adapter == "shop"
    assert a.name == "assistant"  # a request to `assistant` gets shop, `assistant:clinic` clinic on site-a
    # The first rollout of a ModelDeployment has nothing to protect: the adapters came with it.
    status = server.world.status
    assert site(status, "site-a")["revision"] == rev_a
    assert "previousRevision" not in site(status, "site-a")
    assert (site(status, "site-b")["adapters"], site(status, "site-b")["default"]) == (["shop"], "shop")
    assert cond(status, C.ADAPTERS_ROLLED_OUT)["status"] == "True"


def test_a_site_without_a_default_serves_the_base_model_to_a_bare_model_name() -> None:
    server = started([adapter("clinic", CLINIC_SHA, ["site-a"])])
    by_node = adapters_by_node(server)
    assert {by_node[n] for n in SITE_NODES["site-b"]} == {""}
    body = next(b for b in daemonsets(server).values() if b["metadata"]["labels"].get(L.ADAPTERS))
    args = serve_args(body)
    assert [x.name for x in args.adapter] == ["clinic"]
    assert args.default_adapter is None
    plain = next(b for b in daemonsets(server).values() if not b["metadata"]["labels"].get(L.ADAPTERS))
    assert serve_args(plain).adapter == []
    assert L.ADAPTERS not in plain["spec"]["selector"]["matchLabels"]


def test_a_model_deployment_without_adapters_builds_the_daemonsets_it_built_before() -> None:
    server = started([])
    names = sorted(daemonsets(server))
    assert len(names) == 1 and names[0].count("-") == 2  # md-<revision>-q4, no adapter part
    assert "adapters" not in server.world.status["edge"]
    assert C.ADAPTERS_ROLLED_OUT not in {c["type"] for c in server.world.status["conditions"]}


# --- rolling one site --------------------------------------------------------------------------------


def test_a_change_to_one_sites_adapters_rolls_out_on_that_site_alone_canary_first() -> None:
    server = started([SHOP, CLINIC])
    before = adapters_by_node(server)
    old_a, rev_b = before["a-1"], before["b-1"]
    b_daemonsets = {
        n: b for n, b in daemonsets(server).items() if b["metadata"]["labels"][L.ADAPTERS] == rev_b
    }
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    p = server.step(s2)
    after = adapters_by_node(server)
    new_a = after["a-1"]
    assert new_a not in (old_a, rev_b, "")
    assert (after["a-2"], after["a-3"]) == (old_a, old_a)  # one canary node of the site
    assert {after[n] for n in SITE_NODES["site-b"]} == {rev_b}
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert site(p.status, "site-a")["updateRevision"] == new_a
    assert any(e.reason == "RolloutStarted" and "adapters of site site-a" in e.message for e in p.events)
    assert cond(p.status, C.ADAPTERS_ROLLED_OUT)["reason"] == "RollingOut"
    for _ in range(12):
        p = server.step(s2)
    after = adapters_by_node(server)
    assert {after[n] for n in SITE_NODES["site-a"]} == {new_a}
    a = site(p.status, "site-a")
    assert (a["revision"], a["previousRevision"], a["verdict"]) == (new_a, old_a, "Completed")
    b = site(p.status, "site-b")
    assert (b["revision"], b.get("previousRevision")) == (rev_b, None)
    # Site b's DaemonSet was never rewritten: the same body it had before site a moved.
    assert {n: daemonsets(server)[n] for n in b_daemonsets} == b_daemonsets
    assert cond(p.status, C.ADAPTERS_ROLLED_OUT)["status"] == "True"
    assert p.status["phase"] == "Healthy"
    assert p.status["currentRevision"] == server.world.status["updateRevision"]  # the revision never moved


def test_the_site_canary_waits_its_bake_before_the_rest_of_the_site_moves() -> None:
    server = started([SHOP])
    s2 = lm_spec([adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)])
    p = server.step(s2)  # canary a-1 and b-1 moved
    new = adapters_by_node(server)["a-1"]
    p = server.step(s2)  # canaries Ready: the bake starts
    assert site(p.status, "site-a")["reason"] == "Baking"
    assert sum(1 for n in SITE_NODES["site-a"] if adapters_by_node(server)[n] == new) == 1
    for _ in range(10):
        p = server.step(s2)
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {new}


def test_a_never_ready_adapter_canary_rolls_its_site_back_to_the_previous_adapters() -> None:
    server = started([SHOP, CLINIC])
    before = adapters_by_node(server)
    old_a, rev_b = before["a-1"], before["b-1"]
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    p = server.step(s2)
    new_a = adapters_by_node(server)["a-1"]
    server.never_ready = {new_a}
    events = list(p.events)
    for _ in range(15):
        p = server.step(s2)
        events += p.events
        if site(p.status, "site-a")["verdict"] == "RolledBack":
            break
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("RolledBack", "ProgressDeadlineExceeded", old_a)
    assert a["rollout"]["rolledBackRevisions"] == [new_a]
    assert adapters_by_node(server) == before
    assert site(p.status, "site-b")["revision"] == rev_b
    rolled = [e for e in events if e.type == "Warning" and e.reason == "RolledBack"]
    assert len(rolled) == 1 and rolled[0].message.startswith(
        "adapters of site site-a: ProgressDeadlineExceeded"
    )
    adapters_cond = cond(p.status, C.ADAPTERS_ROLLED_OUT)
    assert (adapters_cond["status"], adapters_cond["reason"]) == ("False", "RolledBack")
    # The revision did not roll back: only site a's adapters did.
    assert p.status["currentRevision"] == p.status["updateRevision"]
    # GitOps re-applies the same spec: the site stays on its previous adapters, nothing is written.
    server.step(s2)
    writes = server.writes
    for _ in range(3):
        p = server.step(s2)
    assert server.writes == writes
    assert adapters_by_node(server) == before


def test_an_adapter_worse_than_the_base_on_held_out_text_never_rolls_out() -> None:
    server = started([SHOP])
    before = adapters_by_node(server)
    worse = adapter(
        "shop",
        SHOP2_SHA,
        ["site-a"],
        default=True,
        heldOut={"metric": "perplexity", "base": 10.0, "adapter": 10.5},
    )
    s2 = lm_spec([worse, adapter("shop-b", SHOP_SHA, ["site-b"], default=True)])
    p = server.step(s2)
    a = site(p.status, "site-a")
    assert adapters_by_node(server)["a-1"] == before["a-1"]
    assert (a["verdict"], a["reason"]) == ("Holding", "AdapterWorseThanBase")
    assert a["message"] == (
        "site site-a: adapter shop (perplexity 10.5 vs base 10) is worse than the base model on held-out text; "
        "not rolled out"
    )
    adapters_cond = cond(p.status, C.ADAPTERS_ROLLED_OUT)
    assert (adapters_cond["status"], adapters_cond["reason"]) == ("False", "AdapterWorseThanBase")
    warned = [e for e in p.events if e.reason == "AdapterWorseThanBase" and e.type == "Warning"]
    assert [e.message for e in warned] == [a["message"]]
    # Site b's change is not held by site a's refusal.
    assert adapters_by_node(server)["b-1"] != before["b-1"]
    p = server.step(s2)
    assert not [e for e in p.events if e.reason == "AdapterWorseThanBase"]  # said once


def test_an_adapter_equal_to_the_base_or_better_rolls_out() -> None:
    server = started([SHOP])
    before = adapters_by_node(server)
    equal = adapter(
        "shop",
        SHOP2_SHA,
        ["site-a"],
        default=True,
        heldOut={"metric": "accuracy", "base": 0.5, "adapter": 0.5},
    )
    p = server.step(lm_spec([equal, adapter("shop-b", SHOP_SHA, ["site-b"], default=True)]))
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]


# --- update policy and revisions ----------------------------------------------------------------------


def test_the_update_policy_counts_adapter_bytes_per_site_per_day() -> None:
    # A new 1000-byte adapter costs site a (3 nodes) 3000 bytes and site b (2 nodes) 2000.
    policy = {"updatePolicy": {"maxBytesPerDay": 2500}}
    server = started([SHOP], **policy)
    # A day later the first rollout's downloads (the variant, 2000 bytes a node) have left the window.
    server.world = replace(server.world, now=server.world.now + timedelta(days=1))
    before = adapters_by_node(server)
    s2 = lm_spec([adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)], **policy)
    p = server.step(s2)
    a, b = site(p.status, "site-a"), site(p.status, "site-b")
    assert (a["verdict"], a["reason"]) == ("Waiting", "UpdateDeferred")
    assert a["message"] == (
        "site site-a: adapters deferred by updatePolicy: maxBytesPerDay: site site-a needs 3000 bytes, "
        "more than its 2500 a day"
    )
    assert adapters_by_node(server)["a-1"] == before["a-1"]
    assert b["verdict"] == "Progressing"
    day = NOW + timedelta(days=1)
    recent = [
        (d["site"], d["bytes"]) for d in p.status["rollout"]["downloads"] if d["time"] >= format_time(day)
    ]
    assert recent == [("site-b", 2000)]
    for _ in range(12):
        p = server.step(s2)
    assert site(p.status, "site-b")["verdict"] == "Completed"
    # Another new adapter for site b the same day would take it to 4000 bytes: deferred until the first
    # adapter download leaves the 24-hour window.
    s3 = lm_spec(
        [
            adapter("shop", SHOP_SHA, ["site-a"], default=True),
            adapter("shop-b", "4" * 64, ["site-b"], default=True),
        ],
        **policy,
    )
    p = server.step(s3)
    b = site(p.status, "site-b")
    assert (b["verdict"], b["reason"]) == ("Waiting", "UpdateDeferred")
    assert b["message"] == (
        "site site-b: adapters deferred by updatePolicy: maxBytesPerDay: site site-b downloaded 2000 bytes "
        "in 24h, 2000 more exceeds 2500"
    )
    assert p.requeue_after is not None and p.requeue_after > 80000


def test_a_new_revision_waits_for_an_adapter_wave_in_flight_and_then_rolls_out() -> None:
    server = started([SHOP])
    s2 = lm_spec([adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)])
    server.step(s2)
    rev = server.world.status["currentRevision"]
    s3 = s2.model_copy(update={"runtime": s2.runtime.model_copy(update={"image": "example/kiri:2"})})
    p = server.step(s3)
    edge = cond(p.status, C.EDGE_PROGRESSING)
    assert (edge["reason"], edge["message"]) == (
        "UpdateDeferred",
        "waiting for the adapter rollout of site site-a, site-b to end",
    )
    for _ in range(30):
        p = server.step(s3)
    assert p.status["currentRevision"] != rev
    assert p.status["phase"] == "Healthy"
    # The new revision's DaemonSets carry each site's new adapters.
    by_node = adapters_by_node(server)
    assert by_node["a-1"] == site(p.status, "site-a")["revision"] != ""


def test_adapter_args_are_json_the_runtime_verifies_by_digest() -> None:
    server = started([SHOP])
    body = next(iter(daemonsets(server).values()))
    args = body["spec"]["template"]["spec"]["containers"][0]["args"]
    i = args.index("--adapter")
    assert json.loads(args[i + 1]) == {"name": "shop", "uri": SHOP["uri"], "sha256": SHOP_SHA}


def test_a_new_revision_after_an_adapter_rollback_runs_each_site_with_the_adapters_it_serves() -> None:
    server = started([SHOP, CLINIC])
    before = adapters_by_node(server)
    old_a = before["a-1"]
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    server.step(s2)
    server.never_ready = {adapters_by_node(server)["a-1"]}
    for _ in range(15):
        p = server.step(s2)
    assert site(p.status, "site-a")["verdict"] == "RolledBack"
    rev1 = p.status["currentRevision"]
    # The spec no longer names site a's served set (clinic at CLINIC_SHA): the new revision is built with it,
    # read back from the DaemonSet that runs it.
    s3 = s2.model_copy(update={"runtime": s2.runtime.model_copy(update={"image": "example/kiri:2"})})
    for _ in range(30):
        p = server.step(s3)
    rev2 = p.status["currentRevision"]
    assert rev2 != rev1 and p.status["phase"] == "Healthy"
    assert adapters_by_node(server) == before
    on_rev2 = {
        b["metadata"]["labels"][L.ADAPTERS]: b
        for b in daemonsets(server).values()
        if b["metadata"]["labels"][L.REVISION] == rev2 and affinity_nodes(b)
    }
    assert sorted(on_rev2) == sorted({old_a, before["b-1"]})
    args = serve_args(on_rev2[old_a])
    assert [(x.name, x.sha256) for x in args.adapter] == [("clinic", CLINIC_SHA), ("shop", SHOP_SHA)]
    assert args.default_adapter == "shop"


def test_a_site_dropped_from_the_spec_goes_back_to_the_base_model_through_its_own_wave() -> None:
    server = started([SHOP, CLINIC])
    rev_b = adapters_by_node(server)["b-1"]
    s2 = lm_spec([adapter("clinic", CLINIC_SHA, ["site-a"])])  # site a keeps clinic only; site b drops shop
    p = server.step(s2)
    after = adapters_by_node(server)
    assert (after["b-1"], after["b-2"]) == ("", rev_b)  # the canary first
    for _ in range(12):
        p = server.step(s2)
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-b"]} == {""}
    b = site(p.status, "site-b")
    assert (b["revision"], b["previousRevision"], b["adapters"]) == ("base", rev_b, [])
    # Its previous set's DaemonSet stays, empty: the way back needs no rebuild.
    kept = [
        n for n, body in daemonsets(server).items() if body["metadata"]["labels"].get(L.ADAPTERS) == rev_b
    ]
    assert len(kept) == 1 and affinity_nodes(daemonsets(server)[kept[0]]) == []


def test_a_status_without_adapter_memory_is_rebuilt_from_what_the_sites_run() -> None:
    server = started([SHOP, CLINIC])
    before = adapters_by_node(server)
    status = dict(server.world.status)
    status["edge"] = {k: v for k, v in status["edge"].items() if k != "adapters"}
    server.world = replace(server.world, status=status)
    s2 = lm_spec([SHOP, adapter("clinic", SHOP2_SHA, ["site-a"])])
    p = server.step(s2)
    after = adapters_by_node(server)
    # Not taken for a first rollout: site a's change still starts with one canary node.
    assert sum(1 for n in SITE_NODES["site-a"] if after[n] != before[n]) == 1
    assert site(p.status, "site-a")["revision"] == before["a-1"]
    assert site(p.status, "site-b")["revision"] == before["b-1"]


def test_ready_waits_for_a_site_adapter_wave_and_a_refused_set_leaves_the_model_deployment_healthy() -> None:
    server = started([SHOP])
    s2 = lm_spec([adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)])
    p = server.step(s2)
    ready = cond(p.status, C.READY)
    assert (ready["status"], ready["reason"]) == ("False", "RollingOut")
    assert ready["message"].startswith("AdaptersRolledOut: site site-a: step 1/2")
    assert p.status["phase"] == "Progressing"
    assert cond(p.status, C.RECONCILING)["status"] == "True"
    for _ in range(14):
        p = server.step(s2)
    assert (cond(p.status, C.READY)["status"], p.status["phase"]) == ("True", "Healthy")
    worse = {"metric": "loss", "base": 1.0, "adapter": 1.25}
    p = server.step(lm_spec([adapter("shop", "5" * 64, ["site-a", "site-b"], default=True, heldOut=worse)]))
    assert (cond(p.status, C.READY)["status"], p.status["phase"]) == ("True", "Healthy")
    assert cond(p.status, C.ADAPTERS_ROLLED_OUT)["reason"] == "AdapterWorseThanBase"


def test_a_crash_looping_adapter_canary_rolls_its_site_back_at_once() -> None:
    server = started([SHOP])
    before = adapters_by_node(server)
    s2 = lm_spec([adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)])
    server.step(s2)
    new = adapters_by_node(server)["a-1"]
    crashing = tuple(
        replace(pod, ready=False, restarts=3) if pod.labels.get(L.ADAPTERS) == new else pod
        for pod in server.world.pods
    )
    server.world = replace(server.world, pods=crashing)
    p = server.step(s2)  # the next reconcile sees the crash loop, well within progressDeadlineSeconds
    for name in ("site-a", "site-b"):
        entry = site(p.status, name)
        assert (entry["verdict"], entry["reason"]) == ("RolledBack", "PodsFailed")
    assert adapters_by_node(server) == before
