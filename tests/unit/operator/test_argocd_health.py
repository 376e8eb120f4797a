"""deploy/argocd's health check for ModelDeployment, run by Lua 5.1 (what Argo CD's gopher-lua speaks)
against objects recorded from the API server at each phase of a rollout, in Argo CD's own test layout:
health_test.yaml lists each testdata file with the health status and message Argo CD must show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gitops_health import ARGOCD_CHECK, DERIVED, TESTDATA, argocd_health

pytestmark = pytest.mark.timeout(30)

CASES: list[dict[str, Any]] = yaml.safe_load((ARGOCD_CHECK / "health_test.yaml").read_text())["tests"]


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_argocd_shows_the_expected_health_for_each_recorded_phase(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((ARGOCD_CHECK / case["inputPath"]).read_text())
    assert argocd_health(obj) == case["healthStatus"]


def test_every_testdata_object_has_an_expected_health_and_every_phase_is_covered() -> None:
    listed = {Path(c["inputPath"]).name for c in CASES}
    assert listed == {p.name for p in TESTDATA.glob("*.yaml")}
    assert {c["healthStatus"]["status"] for c in CASES} == {"Healthy", "Progressing", "Suspended", "Degraded"}
    assert {f"{name}.yaml" for name in DERIVED} <= listed


def test_a_rollback_is_degraded_naming_the_revision_it_went_back_to_and_why() -> None:
    obj = yaml.safe_load((TESTDATA / "rolled-back.yaml").read_text())
    health = argocd_health(obj)
    assert health["status"] == "Degraded"
    assert health["message"].startswith(
        f"Rolled back to {obj['status']['currentRevision']}: ProgressDeadlineExceeded: "
    )


def test_an_object_the_operator_has_not_seen_yet_is_progressing_whatever_its_old_status_says() -> None:
    obj = yaml.safe_load((TESTDATA / "rolled-back.yaml").read_text())
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    assert argocd_health(obj) == {
        "status": "Progressing",
        "message": f"Waiting for the Kiri operator to observe generation {obj['metadata']['generation']}",
    }
