"""The privacy ledger and the round accounting live in the API, so an operator killed mid-round loses none of it.

The operator is SIGKILLed the moment it has created round 1's Job; the round is then played while no operator
runs (the ServerApp writes every site's spend to the ledger ConfigMap before it aggregates, and `kiri
publish-round` writes the record). A new operator process picks up from the API alone: it reports exactly the
epsilon the ledger and the record hold, never writes the ledger, never runs round 1 again, and plans round 2,
whose spend adds to round 1's. Round 3 would take every site past `targetEpsilon`: the ServerApp, counting the
spends the API ledger holds (the store's own round history is gone), refuses it and spends nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiri_operator.planning import learning as PL
from kiri_runtime.learning.accounting import epsilon

from .conftest import REPO_ROOT, Cluster
from .flower_kubelet import Kubelet, deployments, jobs, tiny_learning, wait
from .operator_harness import Operator, crd, get_md, model_deployment

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

FACTORY = f"{REPO_ROOT / 'tests' / 'learning_tiny_model.py'}:make_model"
SITES = ("site-a", "site-b", "site-c")
MD = "led"
# DP settings: 1 round costs 4.73, 2 rounds 7.08, 3 rounds 9.01 (RDP accountant, delta 1e-5). A target of 8
# lets two rounds in and refuses the third.
NOISE, DELTA, TARGET = 1.0, 1e-5, 8.0
ROUNDS = 3


def _eps(rounds: int) -> float:
    return round(epsilon(NOISE, rounds, DELTA), 6)


class RoundJobs:
    """Every round Job seen over the test, by name and uid: a recreated Job shows as a second uid or name."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.seen: dict[str, set[str]] = {}

    def look(self) -> list[dict[str, Any]]:
        found = jobs(self.cluster, self.namespace, "kiri.dev/learning-role=round")
        for j in found:
            self.seen.setdefault(j["metadata"]["name"], set()).add(j["metadata"]["uid"])
        return found

    def of_round(self, n: int) -> list[dict[str, Any]]:
        return [j for j in self.look() if j["metadata"]["labels"]["kiri.dev/learning-round"] == str(n)]


def _ledger(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", "configmap", PL.ledger_name(MD), "-n", namespace, "-o", "json", check=False)
    return json.loads(out) if out else None


def _spends(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    return list(json.loads(ledger["data"]["ledger.json"])["spends"])


def _learning(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return dict((get_md(cluster, namespace, MD).get("status") or {}).get("learning") or {})


def _until_rounds(cluster: Cluster, namespace: str, n: int, watch: Callable[[], object]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        watch()
        learning = _learning(cluster, namespace)
        return learning if learning.get("roundsCompleted", 0) >= n else None

    return dict(wait(check, 60, f"roundsCompleted {n} in status"))


def test_a_killed_operators_successor_reads_the_privacy_ledger_and_round_records_from_the_api_and_never_spends_twice(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    files = tiny_learning(tmp_path, SITES)
    store = tmp_path / "store"
    body = model_deployment(
        MD,
        namespace,
        files.onnx,
        files.onnx_sha256,
        store,
        [{"name": "int8", "method": "int8-dynamic"}],
        learning={
            "trainable": files.trainable(FACTORY),
            "evalDataUri": f"file://{files.held_out}",
            "trained": {"kind": "layers", "layers": ["2"]},
            "rounds": ROUNDS,
            "minClients": 2,
            "localEpochs": 1,
            "learningRate": 0.1,
            "batchSize": 16,
            "dp": {"clipNorm": 1.0, "noiseMultiplier": NOISE, "targetEpsilon": TARGET},
            # The ledger is written before aggregation either way; without SecAgg+'s extra exchanges a round
            # takes about half as long (test_learning.py runs SecAgg+).
            "secureAggregation": False,
            # The API's shortest interval: round 2 is due 60 s after round 1 closed, round 3 60 s after round 2.
            "schedule": {"intervalSeconds": 60, "deadlineSeconds": 120, "graceSeconds": 10},
        },
    )
    body["spec"]["model"]["evalDataUri"] = f"file://{files.inputs}"
    round_jobs = RoundJobs(cluster, namespace)
    kubelet = Kubelet(cluster, namespace, tmp_path)
    first = Operator(cluster, namespace).start()
    second: Operator | None = None
    try:
        cluster.apply(body, namespace)
        # The crash: the moment round 1's Job exists, before the round has run or any record came back.
        (job1,) = cluster.wait_for(
            lambda: round_jobs.of_round(1), timeout=120, interval=0.05, message="round 1's Job"
        )
        first.kill()
        assert job1["metadata"]["name"] == PL.round_job_name(MD, 1)
        assert _ledger(cluster, namespace) is None  # nothing spent yet, and the operator makes no ledger

        # Round 1 runs while no operator does: the pods keep running without their controller.
        links = deployments(cluster, namespace, "superlink")
        nodes = deployments(cluster, namespace, "supernode")
        assert len(links) == 1 and len(nodes) == len(SITES)
        kubelet.secret_files(f"{MD}-flower-tls")
        address = kubelet.superlink(links[0])
        for d in nodes:
            site = d["spec"]["template"]["spec"]["nodeSelector"]["kiri.dev/site"]
            kubelet.supernode(d, address, files.site_files[site])
        kubelet.run_job(job1, kubelet.control)
        ledger1 = _ledger(cluster, namespace)
        assert ledger1 is not None
        spends1 = _spends(ledger1)
        assert [(s["round"], s["sites"]) for s in spends1] == [(1, list(SITES))]
        assert spends1[0]["epsilon"] == {site: _eps(1) for site in SITES}
        record1 = cluster.get_json("configmap", PL.record_name(MD, 1), "-n", namespace)
        assert json.loads(record1["data"]["round.json"])["status"] == "accepted"
        assert _learning(cluster, namespace).get("roundsCompleted", 0) == 0  # no operator read it

        # A new operator process: everything it knows comes from the API.
        second = Operator(cluster, namespace).start()
        learning = _until_rounds(cluster, namespace, 1, round_jobs.look)
        assert learning["roundsCompleted"] == 1
        assert learning["epsilonSpent"] == _eps(1) == max(spends1[0]["epsilon"].values())
        (r1,) = learning["rounds"]
        assert (r1["round"], r1["outcome"], sorted(r1["participants"]), r1["epsilon"]) == (
            1,
            "Accepted",
            list(SITES),
            _eps(1),
        )
        # Round 1 is over for the new operator: its Job goes, and none takes its place.
        wait(lambda: not round_jobs.of_round(1), 60, "round 1's Job removed")
        assert "nextRoundAt" in learning and learning.get("activeRound") is None, learning
        after_restart = _ledger(cluster, namespace)
        assert after_restart is not None
        assert after_restart["metadata"]["resourceVersion"] == ledger1["metadata"]["resourceVersion"]
        assert after_restart["data"] == ledger1["data"]

        # Round 2, planned by the new operator 60 s after round 1 closed: its spend adds to round 1's.
        (job2,) = wait(lambda: round_jobs.of_round(2), 120, "round 2's Job")
        assert job2["metadata"]["name"] == PL.round_job_name(MD, 2)
        kubelet.run_job(job2, kubelet.control)
        learning = _until_rounds(cluster, namespace, 2, round_jobs.look)
        ledger2 = _ledger(cluster, namespace)
        assert ledger2 is not None
        spends2 = _spends(ledger2)
        assert spends2[0] == spends1[0]  # round 1's spend, as the ServerApp wrote it
        assert [(s["round"], s["sites"], s["epsilon"]) for s in spends2] == [
            (1, list(SITES), {site: _eps(1) for site in SITES}),
            (2, list(SITES), {site: _eps(2) for site in SITES}),
        ]
        assert (learning["roundsCompleted"], learning["epsilonSpent"]) == (2, _eps(2))
        assert [(r["round"], r["outcome"], r["epsilon"]) for r in learning["rounds"]] == [
            (1, "Accepted", _eps(1)),
            (2, "Accepted", _eps(2)),
        ]

        # Round 3 would take every site to 9.01 > 8. The store's round history goes (a new SuperLink
        # volume would not have it): the API ledger alone must stop the round.
        history = sorted((store / namespace / MD / "learning" / "rounds").glob("*/round.json"))
        assert [f.parent.name for f in history] == ["0001", "0002"]
        for f in history:
            f.unlink()
        (job3,) = wait(lambda: round_jobs.of_round(3), 120, "round 3's Job")
        kubelet.run_job(job3, kubelet.control)
        learning = _until_rounds(cluster, namespace, 3, round_jobs.look)
        r3 = learning["rounds"][-1]
        budget = f"privacy budget: epsilon would reach {epsilon(NOISE, 3, DELTA):.3f} > targetEpsilon 8 after 3 rounds"
        assert (r3["round"], r3["outcome"], r3["participants"]) == (3, "Refused", [])
        assert r3["skipped"] == [{"site": site, "reason": budget} for site in SITES]
        assert r3["reason"] == "0 sites admitted (within budget and connected), min-clients is 2"
        assert (learning["roundsCompleted"], learning["epsilonSpent"]) == (3, _eps(2))
        ledger3 = _ledger(cluster, namespace)
        assert ledger3 is not None
        assert ledger3["metadata"]["resourceVersion"] == ledger2["metadata"]["resourceVersion"]
        assert _spends(ledger3) == spends2  # the refused round spent nothing
        # The rounds are over: the federation goes, and no round ever got a second Job.
        wait(lambda: not deployments(cluster, namespace, "superlink"), 60, "the SuperLink removed")
        round_jobs.look()
        assert round_jobs.seen.keys() == {PL.round_job_name(MD, n) for n in (1, 2, 3)}, round_jobs.seen
        assert all(len(uids) == 1 for uids in round_jobs.seen.values()), round_jobs.seen
    finally:
        kubelet.stop()
        first.stop()
        if second is not None:
            second.stop()
