"""The pure pieces of per-site adapters (planning/adapting.py): what an adapter revision covers, the held-out
gate's direction, a site's wave policy, reading a DaemonSet's adapters back, and one site's plan."""

from __future__ import annotations

from typing import Any

import pytest

from kiri_operator.api.specs import HeldOutMetric, ModelDeploymentSpec, RolloutSpec
from kiri_operator.api.statuses import RolloutStatus, SiteAdapters
from kiri_operator.observations import NodeView
from kiri_operator.planning import building as B
from kiri_operator.planning.adapting import (
    BASE,
    AdapterInput,
    desired_sets,
    plan_adapters,
    site_policy,
)
from kiri_operator.planning.stepping import AnalysisPolicy, Stage, policy_of
from kiri_operator.planning.waves import NodePod
from planning_worlds import NOW, SHA

pytestmark = pytest.mark.timeout(30)


def lm(adapters: list[dict[str, Any]]) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "assistant",
                "version": "1",
                "source": {"uri": "s3://m/lm.tar", "format": "hf", "sha256": SHA},
                "evalDataUri": "s3://e/chat.jsonl",
            },
            "edge": {"variants": [{"name": "q4", "method": "int4"}], "adapters": adapters},
        }
    )


def ad(name: str, sites: list[str], sha: str = "1" * 64, **more: Any) -> dict[str, Any]:
    return {"name": name, "uri": f"s3://a/{name}", "sha256": sha, "sizeBytes": 100, "sites": sites, **more}


def test_an_adapter_revision_does_not_depend_on_the_order_of_adapters_or_sites() -> None:
    one = desired_sets(lm([ad("shop", ["a", "b"], default=True), ad("faq", ["a"])]))
    two = desired_sets(lm([ad("faq", ["a"]), ad("shop", ["b", "a"], default=True)]))
    assert {s: v.revision for s, v in one.items()} == {s: v.revision for s, v in two.items()}
    assert [a.name for a in one["a"].adapters] == ["faq", "shop"]
    assert (one["a"].default, one["b"].default) == ("shop", "shop")


def test_a_changed_digest_uri_or_default_is_a_new_adapter_revision_and_size_or_held_out_is_not() -> None:
    def rev(**more: Any) -> str:
        return desired_sets(lm([ad("shop", ["a"], **more)]))["a"].revision

    plain = rev()
    assert rev(sha="2" * 64) != plain
    assert rev(default=True) != plain
    assert desired_sets(lm([{**ad("shop", ["a"]), "uri": "s3://b/shop"}]))["a"].revision != plain
    assert rev(sizeBytes=999) == plain
    assert rev(heldOut={"metric": "loss", "base": 2.0, "adapter": 1.0}) == plain
    assert rev(sha="A" * 64) == rev(sha="a" * 64)  # a digest is a digest, whatever its case


@pytest.mark.parametrize(
    ("metric", "base", "adapter", "worse"),
    [
        ("perplexity", 10.0, 10.5, True),
        ("perplexity", 10.0, 10.0, False),
        ("perplexity", 10.0, 9.0, False),
        ("loss", 2.0, 2.01, True),
        ("accuracy", 0.8, 0.79, True),
        ("accuracy", 0.8, 0.8, False),
        ("accuracy", 0.8, 0.9, False),
    ],
)
def test_held_out_perplexity_and_loss_are_worse_higher_and_accuracy_lower(
    metric: str, base: float, adapter: float, worse: bool
) -> None:
    assert HeldOutMetric.model_validate({"metric": metric, "base": base, "adapter": adapter}).worse() is worse


def test_a_site_wave_is_one_canary_node_with_the_first_stages_bake_then_the_whole_site_judged_by_the_analysis() -> (
    None
):
    rollout = RolloutSpec.model_validate(
        {
            "stages": [{"nodes": 2, "bakeSeconds": 30}, {"percent": 50, "pause": True}, {"percent": 100}],
            "groupBy": "kiri.dev/site",
            "progressDeadlineSeconds": 120,
            "maxUnavailable": 1,
            "analysis": {
                "prometheus": {"address": "http://prometheus.monitoring.svc:9090"},
                "queries": [{"name": "q", "query": "up", "successCondition": "result > 0"}],
            },
        }
    )
    assert policy_of(rollout).analysis is not None and policy_of(rollout).group_by == "kiri.dev/site"
    policy = site_policy(rollout)
    assert policy.stages == (Stage(nodes=1, bake_seconds=30.0), Stage(percent=100))
    assert policy.group_by is None
    assert policy.analysis == AnalysisPolicy(interval_seconds=30.0, warmup_seconds=30.0)
    assert (policy.progress_deadline_seconds, policy.max_unavailable) == (120.0, 1)


def test_a_daemonsets_adapters_read_back_exactly_as_it_was_built() -> None:
    s = lm([ad("shop", ["a"], default=True), ad("faq", ["a"], sha="2" * 64)])
    built = desired_sets(s)["a"]
    body = B.edge_daemonset(
        s,
        B.Owner("md", "ns", "u"),
        "rev",
        "comp",
        "q4",
        B.EdgeArtifact("s3://x/q4.tar", SHA),
        ["n"],
        {},
        built,
    )
    got = B.recorded_adapters(body)
    assert got is not None
    assert got.revision == built.revision == body["metadata"]["labels"]["kiri.dev/adapters"]
    assert [(a.name, a.uri, a.sha256) for a in got.adapters] == [
        ("faq", "s3://a/faq", "2" * 64),
        ("shop", "s3://a/shop", "1" * 64),
    ]
    assert got.default == "shop"
    assert body["metadata"]["name"] == f"md-rev-q4-{built.revision}"
    assert body["spec"]["selector"]["matchLabels"]["kiri.dev/adapters"] == built.revision


def _node(name: str, site: str) -> NodeView:
    return NodeView(name=name, labels={"kiri.dev/site": site})


def test_a_site_wave_does_not_start_while_a_revision_rollout_is_in_flight() -> None:
    sets = desired_sets(lm([ad("shop", ["a"])]))
    stored = SiteAdapters(site="a", rollout=RolloutStatus(stable_revision=BASE, update_revision=BASE))
    inp = AdapterInput(
        rollout=RolloutSpec(),
        sites=sets,
        nodes=[_node("a-1", "a"), _node("a-2", "a")],
        site_label="kiri.dev/site",
        current={"a-1": BASE, "a-2": BASE},
        pods={n: NodePod(BASE, True) for n in ("a-1", "a-2")},
        stored={"a": stored},
        now=NOW,
        revision_settled=False,
    )
    plan = plan_adapters(inp)
    assert plan.nodes == {"a-1": BASE, "a-2": BASE}
    (a,) = plan.sites
    assert (a.verdict, a.reason, a.message) == (
        "Waiting",
        "WaitingForRevisionRollout",
        "site a: adapters wait for the revision rollout in flight to end",
    )
    assert plan.in_progress == ()
    moved = plan_adapters(AdapterInput(**{**inp.__dict__, "revision_settled": True}))
    assert moved.nodes == {"a-1": sets["a"].revision, "a-2": BASE}
    assert moved.in_progress == ("a",)


def test_nodes_of_no_site_never_get_adapters() -> None:
    inp = AdapterInput(
        rollout=RolloutSpec(),
        sites=desired_sets(lm([ad("shop", ["a"])])),
        nodes=[_node("a-1", "a"), NodeView(name="lone", labels={})],
        site_label="kiri.dev/site",
        current={},
        pods={},
        stored={},
        now=NOW,
        first_rollout=True,
    )
    plan = plan_adapters(inp)
    assert plan.nodes == {"a-1": desired_sets(lm([ad("shop", ["a"])]))["a"].revision, "lone": BASE}
    assert [s.site for s in plan.sites] == ["a"]


@pytest.mark.parametrize(
    ("held_out", "gain"),
    [
        ({"metric": "accuracy", "base": 0.5, "adapter": 0.56}, 0.06),
        ({"metric": "accuracy", "base": 0.5, "current": 0.55, "adapter": 0.56}, 0.01),
        ({"metric": "loss", "base": 2.0, "adapter": 1.9}, 0.1),
        ({"metric": "loss", "base": 2.0, "current": 1.8, "adapter": 1.9}, -0.1),
        ({"metric": "perplexity", "base": 10.0, "adapter": 9.0}, 0.1),
        ({"metric": "perplexity", "base": 10.0, "current": 8.0, "adapter": 7.6}, 0.05),
        ({"metric": "perplexity", "base": 0.0, "adapter": 0.0}, 0.0),
    ],
)
def test_the_held_out_gain_is_accuracys_rise_losss_drop_and_perplexitys_relative_drop_over_current_else_base(
    held_out: dict[str, float], gain: float
) -> None:
    assert HeldOutMetric.model_validate(held_out).gain() == pytest.approx(gain, abs=1e-12)


@pytest.mark.parametrize(
    ("held_out", "regression"),
    [
        (
            {
                "metric": "accuracy",
                "base": 0.5,
                "adapter": 0.6,
                "worstOtherSite": {"base": 0.7, "adapter": 0.65},
            },
            0.05,
        ),
        (
            {"metric": "loss", "base": 2.0, "adapter": 1.8, "worstOtherSite": {"base": 2.0, "adapter": 2.3}},
            0.3,
        ),
        (
            {
                "metric": "perplexity",
                "base": 10.0,
                "adapter": 8.0,
                "worstOtherSite": {"base": 10.0, "adapter": 9.0},
            },
            -0.1,
        ),
        ({"metric": "perplexity", "base": 10.0, "adapter": 8.0}, None),
    ],
)
def test_the_regression_on_another_site_is_accuracys_drop_losss_rise_and_perplexitys_relative_rise(
    held_out: dict[str, Any], regression: float | None
) -> None:
    got = HeldOutMetric.model_validate(held_out).other_site_regression()
    assert got == (None if regression is None else pytest.approx(regression, abs=1e-12))
