"""Federated learning on the real control plane, on Flower: the operator makes the TLS Secret and a SuperNode key
Secret per site, the SuperLink (Deployment + Service) on a cloud node and a SuperNode per site pinned to that
site's nodes, and the round Job; their own command lines run here as local processes (the simulated nodes run
no containers) with the files their pods' Secret volumes would hold (the items they name, nothing else), the round record comes back through `kiri publish-round`, and the operator records it, asks
the update policy, and turns the allowed round into a new revision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiri_operator.planning import federation as F

from .conftest import REPO_ROOT, Cluster
from .flower_kubelet import Kubelet, deployments, jobs, tiny_learning, wait
from .operator_harness import (
    Operator,
    crd,
    get_md,
    model_deployment,
    operator_fixture,
)

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

FACTORY = f"{REPO_ROOT / 'tests' / 'learning_tiny_model.py'}:make_model"
SITES = ("site-a", "site-b", "site-c")


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def test_the_federation_runs_as_children_on_the_right_nodes_over_the_operators_tls_and_rounds_become_revisions(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    files = tiny_learning(tmp_path, SITES)
    onnx_sha = files.onnx_sha256
    body = model_deployment(
        "lm",
        namespace,
        files.onnx,
        onnx_sha,
        tmp_path / "store",
        [{"name": "int8", "method": "int8-dynamic"}],
        rollout={"updatePolicy": {"minImprovement": 0.0}},
        learning={
            "trainable": files.trainable(FACTORY),
            "evalDataUri": f"file://{files.held_out}",
            "trained": {"kind": "layers", "layers": ["2"]},
            "rounds": 1,
            "minClients": 2,
            "localEpochs": 2,
            "learningRate": 0.1,
            "batchSize": 16,
            "dp": {"clipNorm": 1.0, "noiseMultiplier": 0.3, "targetEpsilon": 100},
            "schedule": {"intervalSeconds": 60, "deadlineSeconds": 240, "graceSeconds": 30},
        },
    )
    body["spec"]["model"]["evalDataUri"] = f"file://{files.inputs}"
    cluster.apply(body, namespace)

    # The children: the TLS Secret, the SuperLink on a cloud node, one SuperNode per site on that site's nodes.
    secret = wait(
        lambda: cluster.kubectl("get", "secret", "lm-flower-tls", "-n", namespace, "-o", "json", check=False),
        90,
        "the TLS Secret",
    )
    secret = json.loads(secret)
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert secret["metadata"]["ownerReferences"][0]["name"] == "lm"
    key_secrets = {site: F.node_key_secret_name("lm", site) for site in SITES}
    for site, name in key_secrets.items():
        made = wait(
            lambda name=name: cluster.kubectl(
                "get", "secret", name, "-n", namespace, "-o", "json", check=False
            ),
            90,
            f"{site}'s SuperNode key Secret",
        )
        made = json.loads(made)
        assert sorted(made["data"]) == ["supernode.key", "supernode.pub"]
        assert made["metadata"]["ownerReferences"][0]["name"] == "lm"
    links = wait(lambda: deployments(cluster, namespace, "superlink"), 90, "the SuperLink")
    nodes_ = wait(
        lambda: (d := deployments(cluster, namespace, "supernode")) and len(d) == 3 and d, 90, "SuperNodes"
    )
    service = cluster.get_json("service", "lm-superlink", "-n", namespace)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("fleet", 9092), ("control", 9093)]
    # The API server took the NetworkPolicies (it validates them): the SuperLink's and the SuperNodes'.
    policies = cluster.get_json("networkpolicies", "-n", namespace, "-l", "kiri.dev/modeldeployment=lm")[
        "items"
    ]
    assert sorted(p["metadata"]["name"] for p in policies) == ["lm-superlink", "lm-supernodes"]
    assert {p["metadata"]["ownerReferences"][0]["name"] for p in policies} == {"lm"}
    (link_policy,) = [p for p in policies if p["metadata"]["name"] == "lm-superlink"]
    assert [[q["port"] for q in r["ports"]] for r in link_policy["spec"]["ingress"]] == [[9092], [9093]]
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in cluster.get_json("nodes")["items"]}

    def scheduled() -> list[dict[str, Any]] | None:
        pods = cluster.get_json(
            "pods", "-n", namespace, "-l", "kiri.dev/learning-role in (superlink,supernode)"
        )
        bound = [p for p in pods["items"] if p["spec"].get("nodeName")]
        return bound if len(bound) == 4 else None

    for p in wait(scheduled, 120, "the federation's pods bound to nodes"):
        labels = nodes[p["spec"]["nodeName"]]
        spec = p["spec"]
        assert spec["automountServiceAccountToken"] is False
        c = spec["containers"][0]
        assert (
            c["securityContext"]["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"]
        )
        if p["metadata"]["labels"]["kiri.dev/learning-role"] == "superlink":
            assert labels["kiri.dev/tier"] == "cloud"
            assert "--enable-supernode-auth" in c["command"]
            # The sites' public keys, never a private one.
            keys = next(v for v in spec["volumes"] if v["name"] == "supernode-keys")["projected"]["sources"]
            assert [(x["secret"]["name"], x["secret"]["items"]) for x in keys] == [
                (key_secrets[site], [{"key": "supernode.pub", "path": f"{site}.pub"}]) for site in SITES
            ]
        else:
            site = spec["nodeSelector"]["kiri.dev/site"]
            assert labels["kiri.dev/tier"] == "edge" and labels["kiri.dev/site"] == site
            assert [v["secret"]["items"] for v in spec["volumes"] if v["name"] == "tls"] == [
                [{"key": "ca.crt", "path": "ca.crt"}]
            ]
            # Its own site's private key, and no other Secret.
            assert sorted(
                (v["secret"]["secretName"], i["key"])
                for v in spec["volumes"]
                if "secret" in v
                for i in v["secret"]["items"]
            ) == [("lm-flower-tls", "ca.crt"), (key_secrets[site], "supernode.key")]
            assert "--auth-supernode-private-key" in c["command"]
    job = wait(lambda: jobs(cluster, namespace, "kiri.dev/learning-role=round"), 90, "the round Job")[0]
    revision_before = get_md(cluster, namespace, "lm")["status"]["updateRevision"]

    # Play the kubelet: the children's own command lines, with the operator's certificates.
    kubelet = Kubelet(cluster, namespace, tmp_path)
    try:
        kubelet.secret_files("lm-flower-tls")
        address = kubelet.superlink(links[0])
        for d in nodes_:
            site = d["spec"]["template"]["spec"]["nodeSelector"]["kiri.dev/site"]
            kubelet.supernode(d, address, files.site_files[site])
        kubelet.run_job(job, kubelet.control)
    finally:
        kubelet.stop()

    def recorded() -> dict[str, Any] | None:
        learning = get_md(cluster, namespace, "lm").get("status", {}).get("learning") or {}
        return learning if learning.get("roundsCompleted", 0) >= 1 and learning.get("update") else None

    learning = wait(recorded, 60, "round 1 in status")
    (r1,) = learning["rounds"]
    assert r1["outcome"] == "Accepted" and sorted(r1["participants"]) == list(SITES), r1
    assert r1["epsilon"] > 0 and r1["modelSha256"]
    ledger = cluster.get_json("configmap", "lm-learning-ledger", "-n", namespace)
    spends = json.loads(ledger["data"]["ledger.json"])["spends"]
    assert [(s["round"], s["sites"]) for s in spends] == [(1, list(SITES))]
    assert learning["update"]["allowed"] is True and learning["model"]["round"] == 1
    wait(
        lambda: get_md(cluster, namespace, "lm")["status"].get("updateRevision") != revision_before,
        60,
        "the learned model's revision",
    )
    # The last round is done: the federation is no longer wanted.
    wait(lambda: not deployments(cluster, namespace, "superlink"), 60, "the SuperLink removed")
