"""The operator's own refusals (issue 17): a spec the API server accepts but whose analysis names a
Prometheus outside the allow-list is refused whole, with a condition, and no Prometheus is asked."""

from __future__ import annotations

from typing import Any

import pytest

from kiri_operator.api import ModelDeployment
from kiri_operator.commands import allowed_prometheus
from kiri_operator.planning import Settings, plan
from kiri_operator.planning.admitting import normalize_address, prometheus_allowed
from kiri_operator.planning.settings import DEFAULT_PROMETHEUS
from manifest_catalogue import CATALOGUE, apply_case
from planning_worlds import observed

pytestmark = pytest.mark.timeout(20)


def _spec(case: dict[str, Any]) -> Any:
    return ModelDeployment.model_validate(apply_case(CATALOGUE["base"], case)).spec


# The catalogue base's own Prometheus, allowed: each case differs from an accepted spec by its edit alone.
BASE_ALLOWED = Settings(allowed_prometheus=(DEFAULT_PROMETHEUS, "http://prometheus.monitoring:9090"))


@pytest.mark.parametrize("case", CATALOGUE["operator_cases"], ids=lambda c: c["id"])
def test_operator_case_is_refused_with_its_reason_and_nothing_applied(case: dict[str, Any]) -> None:
    assert plan(_spec({}), observed(), BASE_ALLOWED).actions != []
    p = plan(_spec(case), observed(), BASE_ALLOWED)
    assert p.actions == []
    ready = next(c for c in p.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", case["reason"])
    assert p.status["phase"] == "Failed"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", case["reason"])]
    # The message names the field and the allow-list, never the refused address's userinfo.
    assert ready["message"].startswith("spec.rollout.analysis.prometheus.address: ")
    assert DEFAULT_PROMETHEUS in ready["message"] and "pass" not in ready["message"]


def test_the_catalogue_base_names_a_prometheus_the_default_allow_list_lacks_and_an_allowed_one_passes() -> (
    None
):
    base = _spec({})
    assert base.rollout.analysis is not None
    refused = plan(base, observed(), Settings())
    assert refused.actions == []
    allowed = Settings(allowed_prometheus=("http://prometheus.monitoring:9090/",))
    p = plan(base, observed(), allowed)
    assert p.actions != []
    assert all(c["reason"] != "PrometheusNotAllowed" for c in p.status["conditions"])


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("http://prometheus-operated.monitoring.svc:9090", True),
        ("http://prometheus-operated.monitoring.svc:9090/", True),
        ("HTTP://Prometheus-Operated.Monitoring.svc:9090", True),
        ("http://prometheus-operated.monitoring.svc", False),  # port 80: another server
        ("https://prometheus-operated.monitoring.svc:9090", False),
        ("http://prometheus-operated.monitoring.svc:9090/other", False),
        ("http://prometheus-operated.monitoring.svc:9090?x=1", False),
        ("http://a@prometheus-operated.monitoring.svc:9090", False),
        ("http://prometheus-operated.monitoring.svc.evil.example:9090", False),
        ("http://prometheus-operated.monitoring.svc:99999", False),
    ],
)
def test_addresses_compare_by_scheme_host_port_and_path(address: str, allowed: bool) -> None:
    assert prometheus_allowed(address, [DEFAULT_PROMETHEUS]) is allowed


def test_default_ports_are_made_explicit() -> None:
    assert normalize_address("https://p.example/api/") == "https://p.example:443/api"
    assert normalize_address("http://[::1]/") == "http://[::1]:80"
    assert normalize_address("ftp://p.example") is None


def test_an_empty_allow_list_allows_nothing() -> None:
    assert not prometheus_allowed(DEFAULT_PROMETHEUS, [])


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (None, None, (DEFAULT_PROMETHEUS,)),
        (None, "http://a:9090, http://b:9090", ("http://a:9090", "http://b:9090")),
        (
            ["http://a:9090,http://b:9090", "http://c:9090"],
            "http://env:9090",
            ("http://a:9090", "http://b:9090", "http://c:9090"),
        ),
        ([""], None, ()),
    ],
)
def test_the_allow_list_comes_from_the_flags_else_the_environment_else_the_default(
    flags: list[str] | None, env: str | None, expected: tuple[str, ...]
) -> None:
    assert allowed_prometheus(flags, env, DEFAULT_PROMETHEUS) == expected
