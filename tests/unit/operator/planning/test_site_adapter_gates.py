"""A site's adapter wave under the revision rollout's gates (issue 23, "Rollout"): `spec.rollout.analysis`
judges the pods of the wave's adapter revision (the canary node's, then the site's) and a failing verdict
rolls that site back to its previous adapters; `kiri promote|abort|rollback --site` act on the site's wave
through `<verb>.adapters.kiri.dev/<site>` annotations. Runs `plan()` on the simulated API server of
tests/planning_worlds.py; measurements are handed over as reconcile does, when `analyzing.site_dues` says
one is due."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from adapter_worlds import (
    CLINIC,
    SHOP,
    SHOP2_SHA,
    SITE_NODES,
    Server,
    adapter,
    adapters_by_node,
    cond,
    lm_spec,
    site,
    started,
)
from kiri_operator import conditions as C
from kiri_operator.plans import Event, Plan

pytestmark = pytest.mark.timeout(30)

PROM = "http://prometheus-operated.monitoring.svc:9090"  # the default allowed address
ANALYSIS = {
    "analysis": {
        "prometheus": {"address": PROM},
        "queries": [
            {"name": "errors", "preset": "error-ratio", "successCondition": "result < 0.05", "interval": 2}
        ],
    }
}
# Site a's clinic adapter is retrained: site a alone has a new adapter set.
NEW_CLINIC = adapter("clinic", SHOP2_SHA, ["site-a"])


def _roll(server: Server, spec: Any, steps: int, until: str | None = None) -> tuple[Plan, list[Event]]:
    """Step the world; stop early once site a's verdict is `until`. The plan and every Event on the way."""
    events: list[Event] = []
    p = server.step(spec)
    events += p.events
    for _ in range(steps):
        if until is not None and site(p.status, "site-a")["verdict"] == until:
            break
        p = server.step(spec)
        events += p.events
    return p, events


def _changed(**rollout: Any) -> tuple[Server, Any, str, str, str]:
    """A fleet serving SHOP and CLINIC, then site a's new clinic: (server, new spec, site a's old and new
    adapter revision, site b's)."""
    server = started([SHOP, CLINIC], **rollout)
    before = adapters_by_node(server)
    s2 = lm_spec([SHOP, NEW_CLINIC], **rollout)
    server.step(s2)
    return server, s2, before["a-1"], adapters_by_node(server)["a-1"], before["b-1"]


# --- analysis ------------------------------------------------------------------------------------------


def test_a_failing_analysis_of_a_sites_adapter_canary_rolls_that_site_back_to_its_previous_adapters() -> None:
    server, s2, old_a, new_a, rev_b = _changed(**ANALYSIS)
    server.analysis = {"site-a": ("Failed", "errors: 3 samples, 3 failing result < 0.05, last 0.5")}
    assert new_a not in (old_a, rev_b)
    p, events = _roll(server, s2, 15, until="RolledBack")
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("RolledBack", "AnalysisFailed", old_a)
    assert a["message"] == ("step 1/2: analysis failed: errors: 3 samples, 3 failing result < 0.05, last 0.5")
    assert a["rollout"]["rolledBackRevisions"] == [new_a]
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {old_a}
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-b"]} == {rev_b}
    rolled = [e for e in events if e.reason == "RolledBack" and e.type == "Warning"]
    assert [(e.type, e.message) for e in rolled] == [
        (
            "Warning",
            "adapters of site site-a: AnalysisFailed: step 1/2: analysis failed: errors: 3 samples, 3 failing "
            f"result < 0.05, last 0.5; every node back to revision {old_a}",
        )
    ]
    adapters_cond = cond(p.status, C.ADAPTERS_ROLLED_OUT)
    assert (adapters_cond["status"], adapters_cond["reason"], adapters_cond["message"]) == (
        "False",
        "RolledBack",
        "site site-a: step 1/2: analysis failed: errors: 3 samples, 3 failing result < 0.05, last 0.5",
    )
    # The model revision never moved: only site a's adapters rolled back.
    assert p.status["currentRevision"] == p.status["updateRevision"]


def test_a_sites_adapter_wave_is_measured_on_its_own_adapter_revision_against_the_sites_stable_one() -> None:
    server, s2, old_a, new_a, _ = _changed(**ANALYSIS)
    server.analysis = {"site-a": ("Successful", "errors: 3 samples, 0 failing")}
    revision = server.world.status["currentRevision"]
    _roll(server, s2, 3)
    assert server.asked, "no measurement of site a's wave was due"
    name, subs = server.asked[0]
    assert name == "site-a"
    assert (subs.revision, subs.stable_revision, subs.adapters, subs.stable_adapters) == (
        revision,
        revision,
        new_a,
        old_a,
    )
    assert subs.apply('x{revision="$revision",adapters=~"$adapters"}') == (
        f'x{{revision="{revision}",adapters=~"{new_a}"}}'
    )


def test_a_passing_analysis_lets_the_sites_canary_bake_and_then_the_whole_site_move() -> None:
    server, s2, old_a, new_a, _ = _changed(**ANALYSIS)
    server.analysis = {"site-a": ("Successful", "errors: 1 samples, 0 failing")}
    p, events = _roll(server, s2, 25, until="Completed")
    a = site(p.status, "site-a")
    assert (a["verdict"], a["revision"], a["previousRevision"]) == ("Completed", new_a, old_a)
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {new_a}
    passed = [e.message for e in events if e.reason == "AnalysisPassed"]
    assert passed == [
        "adapters of site site-a: step 1/2: analysis passed: errors: 1 samples, 0 failing",
        "adapters of site site-a: step 2/2: analysis passed: errors: 1 samples, 0 failing",
    ]
    assert not [e for e in events if e.reason == "RolledBack"]


def test_an_inconclusive_analysis_holds_the_sites_canary_without_rolling_back() -> None:
    server, s2, old_a, new_a, _ = _changed(**ANALYSIS)
    server.analysis = {"site-a": ("Inconclusive", "errors: too few samples: 0 samples (minSamples 1)")}
    p, events = _roll(server, s2, 12)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"]) == ("Inconclusive", "AnalysisInconclusive")
    assert a["message"] == "step 1/2: errors: too few samples: 0 samples (minSamples 1)"
    by_node = adapters_by_node(server)
    assert [by_node[n] for n in SITE_NODES["site-a"]] == [new_a, old_a, old_a]
    assert not [e for e in events if e.reason == "RolledBack"]
    assert cond(p.status, C.ADAPTERS_ROLLED_OUT)["reason"] == "RollingOut"


def test_without_analysis_no_site_measurement_is_ever_due() -> None:
    server, s2, *_ = _changed()
    server.analysis = {"site-a": ("Failed", "never asked")}
    p, _ = _roll(server, s2, 15, until="Completed")
    assert server.asked == []
    assert site(p.status, "site-a")["verdict"] == "Completed"


# --- commands ------------------------------------------------------------------------------------------


def _annotate(server: Server, **verbs: str) -> None:
    """`kiri <verb> NAME --site site-a` for each verb, with its nonce."""
    notes = {f"{verb}.adapters.kiri.dev/site-a": nonce for verb, nonce in verbs.items()}
    server.world = replace(server.world, annotations={**server.world.annotations, **notes})


def test_promote_of_a_site_skips_its_canarys_bake() -> None:
    server, s2, _old_a, new_a, _ = _changed(stages=[{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}])
    p, _ = _roll(server, s2, 3)
    assert site(p.status, "site-a")["reason"] == "Baking"
    server_history = p.status["rollout"]["history"]
    _annotate(server, promote="2026-01-01T12:00:00.000001Z")
    p, events = _roll(server, s2, 8, until="Completed")
    a = site(p.status, "site-a")
    assert (a["verdict"], a["revision"]) == ("Completed", new_a)
    assert [e.message for e in events if e.reason == "Promoted"] == [
        "adapters of site site-a: step 1/2 promoted by user: bake and analysis skipped"
    ]
    # The revision is untouched by site a's command.
    assert p.status["currentRevision"] == p.status["updateRevision"]
    assert p.status["rollout"]["history"] == server_history


def test_abort_of_a_site_returns_it_to_its_stable_adapters_and_holds_there() -> None:
    server, s2, old_a, _new_a, rev_b = _changed(stages=[{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}])
    _roll(server, s2, 2)
    _annotate(server, abort="2026-01-01T12:00:00.000001Z")
    p, _events = _roll(server, s2, 1)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["message"]) == ("RolledBack", "Aborted", "aborted by user")
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {old_a}
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-b"]} == {rev_b}
    # The same spec stays held on the stable adapters: the aborted set does not start again.
    p, _ = _roll(server, s2, 5)
    assert (site(p.status, "site-a")["verdict"], site(p.status, "site-a")["revision"]) == (
        "RolledBack",
        old_a,
    )
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {old_a}


def test_rollback_of_a_site_returns_it_to_its_previous_adapter_set() -> None:
    server, s2, old_a, new_a, rev_b = _changed()
    p, _ = _roll(server, s2, 20, until="Completed")
    assert site(p.status, "site-a")["revision"] == new_a
    _annotate(server, rollback="2026-01-01T12:00:00.000001Z")
    p, _events = _roll(server, s2, 1)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("RolledBack", "ManualRollback", old_a)
    assert a["message"] == f"manual rollback from {new_a} to {old_a}"
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-a"]} == {old_a}
    assert {adapters_by_node(server)[n] for n in SITE_NODES["site-b"]} == {rev_b}
    # Acted once: the same nonce seen again does nothing more.
    writes = server.writes
    server.step(s2)
    server.step(s2)
    p = server.step(s2)
    assert server.writes == writes
    assert site(p.status, "site-a")["revision"] == old_a


def test_a_site_command_given_before_the_site_had_a_wave_does_not_act_on_its_first_one() -> None:
    server = started([SHOP, CLINIC])
    _annotate(server, promote="old", abort="old")
    # Site a's memory is lost (a restored status): the nonces already there are not commands to its next wave.
    status = dict(server.world.status)
    status["edge"] = {**status["edge"], "adapters": []}
    server.world = replace(server.world, status=status)
    s2 = lm_spec([SHOP, NEW_CLINIC], stages=[{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}])
    p, events = _roll(server, s2, 4)
    assert site(p.status, "site-a")["reason"] == "Baking"
    assert not [e for e in events if e.reason in ("Promoted", "RolledBack")]


def test_a_command_to_one_site_leaves_the_other_sites_wave_alone() -> None:
    server = started([SHOP])
    s2 = lm_spec(
        [adapter("shop", SHOP2_SHA, ["site-a", "site-b"], default=True)],
        stages=[{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}],
    )
    _roll(server, s2, 2)
    _annotate(server, abort="2026-01-01T12:00:00.000001Z")
    p, _ = _roll(server, s2, 1)
    assert site(p.status, "site-a")["verdict"] == "RolledBack"
    b = site(p.status, "site-b")
    assert (b["verdict"], b["reason"]) == ("Progressing", "Baking")


# --- min gain ------------------------------------------------------------------------------------------

MIN_GAIN = {"updatePolicy": {"minImprovement": 0.05}}


def _clinic(**held_out: float) -> dict[str, Any]:
    return adapter("clinic", SHOP2_SHA, ["site-a"], heldOut={"metric": "perplexity", **held_out})


def test_an_adapter_that_improves_its_site_by_less_than_min_improvement_over_the_base_is_held_with_the_reason() -> (
    None
):
    server = started([SHOP, CLINIC], **MIN_GAIN)
    before = adapters_by_node(server)
    s2 = lm_spec([SHOP, _clinic(base=10.0, adapter=9.9)], **MIN_GAIN)
    p, _events = _roll(server, s2, 3)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("Waiting", "UpdateDeferred", before["a-1"])
    assert a["message"] == (
        "site site-a: adapters deferred by updatePolicy: minImprovement: held-out gain +0.0100 is below 0.05 "
        "(adapter clinic: perplexity 9.9 against the base's 10)"
    )
    assert adapters_by_node(server) == before
    assert cond(p.status, C.ADAPTERS_ROLLED_OUT)["reason"] == "UpdateDeferred"
    assert p.requeue_after is None or p.requeue_after > 3600  # a gain does not grow with time: no retry loop


def test_min_improvement_is_measured_against_the_sites_current_adapter_when_its_value_is_given() -> None:
    server = started([SHOP, CLINIC], **MIN_GAIN)
    before = adapters_by_node(server)
    # 20% better than the base, but only 2.5% better than the clinic adapter the site serves now.
    s2 = lm_spec([SHOP, _clinic(base=10.0, current=8.0, adapter=7.8)], **MIN_GAIN)
    p, _ = _roll(server, s2, 2)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"]) == ("Waiting", "UpdateDeferred")
    assert a["message"].endswith(
        "minImprovement: held-out gain +0.0250 is below 0.05 (adapter clinic: perplexity 7.8 against the "
        "current adapter's 8)"
    )
    assert adapters_by_node(server) == before
    # 10% better than the current one: it rolls out.
    s3 = lm_spec([SHOP, _clinic(base=10.0, current=8.0, adapter=7.2)], **MIN_GAIN)
    p, _ = _roll(server, s3, 1)
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]


def test_an_adapter_without_a_held_out_measurement_is_not_held_by_min_improvement() -> None:
    server = started([SHOP, CLINIC], **MIN_GAIN)
    before = adapters_by_node(server)
    p, _ = _roll(server, lm_spec([SHOP, NEW_CLINIC], **MIN_GAIN), 1)
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]


def test_min_improvement_weighs_only_the_adapters_new_to_the_site() -> None:
    # The shop adapter the sites already serve gained little when it came; it is not judged again when
    # site a gets a new clinic adapter that gains enough.
    shop = {**SHOP, "heldOut": {"metric": "accuracy", "base": 0.5, "adapter": 0.51}}
    server = started([shop, CLINIC], **MIN_GAIN)
    before = adapters_by_node(server)
    p, _ = _roll(server, lm_spec([shop, _clinic(base=10.0, adapter=8.0)], **MIN_GAIN), 1)
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]
    assert site(p.status, "site-b")["verdict"] == "Completed"


# --- the other sites -----------------------------------------------------------------------------------

BOUND = {"updatePolicy": {"maxOtherSiteRegression": 0.05}}


def _clinic_on_b(adapter_on_b: float) -> dict[str, Any]:
    """Site a's new clinic adapter: 20% better on site a's text; on site b's text `adapter_on_b` against the
    base's 10."""
    worst = {"site": "site-b", "base": 10.0, "adapter": adapter_on_b}
    return _clinic(base=10.0, adapter=8.0, worstOtherSite=worst)  # type: ignore[arg-type]


def test_an_adapter_that_hurts_another_sites_held_out_text_beyond_the_bound_never_rolls_out() -> None:
    server = started([SHOP, CLINIC], **BOUND)
    before = adapters_by_node(server)
    s2 = lm_spec([SHOP, _clinic_on_b(11.0)], **BOUND)
    p, events = _roll(server, s2, 3)
    a = site(p.status, "site-a")
    assert (a["verdict"], a["reason"], a["revision"]) == ("Holding", "AdapterHurtsOtherSites", before["a-1"])
    assert a["message"] == (
        "site site-a: adapter clinic hurts site site-b by 0.1 (perplexity 11 vs base 10 on its held-out text), "
        "more than maxOtherSiteRegression 0.05; not rolled out"
    )
    assert adapters_by_node(server) == before
    warned = [e.message for e in events if e.reason == "AdapterHurtsOtherSites" and e.type == "Warning"]
    assert warned == [a["message"]]  # said once
    adapters_cond = cond(p.status, C.ADAPTERS_ROLLED_OUT)
    assert (adapters_cond["status"], adapters_cond["reason"]) == ("False", "AdapterHurtsOtherSites")


def test_an_adapter_within_the_bound_on_the_other_sites_rolls_out() -> None:
    server = started([SHOP, CLINIC], **BOUND)
    before = adapters_by_node(server)
    p, _ = _roll(server, lm_spec([SHOP, _clinic_on_b(10.5)], **BOUND), 1)  # 5% worse: at the bound
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]


def test_without_a_stated_bound_the_other_sites_measurement_is_not_a_gate() -> None:
    server = started([SHOP, CLINIC])
    before = adapters_by_node(server)
    p, _ = _roll(server, lm_spec([SHOP, _clinic_on_b(20.0)]), 1)
    assert site(p.status, "site-a")["verdict"] == "Progressing"
    assert adapters_by_node(server)["a-1"] != before["a-1"]
