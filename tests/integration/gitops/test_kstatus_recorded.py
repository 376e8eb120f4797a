"""kstatus itself (sigs.k8s.io/cli-utils' `status.Compute`, what Flux's health checks and kpt read, built by
hack/build-binaries.sh as hack/tools/kstatus) against the ModelDeployments recorded from the API server
at each phase of a rollout (deploy/argocd/kiri.dev/ModelDeployment/testdata). The e2e rollout tests run
the same binary against the live objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gitops_health import TESTDATA, kstatus, kstatus_binary

pytestmark = pytest.mark.timeout(60)

EXPECTED = {
    "healthy": "Current",
    "healthy-after-rolling-forward": "Current",
    "older-operator-healthy": "Current",
    "progressing-waiting-for-ready": "InProgress",
    "progressing-baking": "InProgress",
    "paused": "InProgress",
    "generation-not-observed": "InProgress",
    "rolled-back": "Failed",
    "rolled-back-same-spec-reapplied": "Failed",
    "rolled-back-aborted": "Failed",
    # An operator older than Stalled: Ready=False reads as still in progress, never as failed (the bug).
    "older-operator-rolled-back": "InProgress",
    # kstatus's known blind spot: no status and no conditions read as Current until the operator's first
    # status write (the API server drops status on create, so no default can cover it).
    "just-applied": "Current",
}


@pytest.fixture(scope="module")
def binary() -> Path:
    return kstatus_binary()


def test_every_recorded_object_has_an_expected_kstatus() -> None:
    assert set(EXPECTED) == {p.stem for p in TESTDATA.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kstatus_reads_each_phase_as_flux_should(name: str, binary: Path) -> None:
    obj = yaml.safe_load((TESTDATA / f"{name}.yaml").read_text())
    assert kstatus(obj, binary)["status"] == EXPECTED[name]


def test_a_rollback_fails_with_the_rollbacks_reason_in_kstatus_conditions(binary: Path) -> None:
    result = kstatus(yaml.safe_load((TESTDATA / "rolled-back.yaml").read_text()), binary)
    assert result["status"] == "Failed"
    assert [(c["type"], c["reason"]) for c in result["conditions"]] == [
        ("Stalled", "ProgressDeadlineExceeded")
    ]
