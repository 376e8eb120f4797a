"""planning/federation.py's NetworkPolicies: who reaches the SuperLink's pod (this ModelDeployment's SuperNodes and
round Jobs, on the one port Flower 1.42 serves the Fleet and Control APIs on) and that no one reaches a SuperNode.
Peers are checked against the labels of the pods the same plan makes, not against constants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kiri_operator import kinds
from kiri_operator import labels as L
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.learning_commands import configmap
from kiri_operator.observations import NodeView, ObjectView, Observed
from kiri_operator.planning import federation as F
from kiri_operator.planning import learning
from kiri_operator.planning.building import Owner
from kiri_runtime.learning import rounds

SHA = "ab" * 32
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
OWNER = Owner("md", "ns", "uid-1")
OTHER = Owner("md-2", "ns", "uid-2")
"""Another ModelDeployment in the same namespace, learning on the same sites."""
NODES = (
    NodeView("cloud-0", {"kiri.dev/tier": "cloud"}),
    NodeView("a-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-a"}),
    NodeView("b-0", {"kiri.dev/tier": "edge", "kiri.dev/site": "site-b"}),
)
SPEC = ModelDeploymentSpec.model_validate(
    {
        "model": {
            "name": "m",
            "version": "1",
            "source": {"uri": "file:///models/m.onnx", "sha256": SHA},
            "evalDataUri": "file:///data/inputs.npz",
        },
        "edge": {
            "variants": [{"name": "int8", "method": "int8-dynamic"}],
            "artifacts": {"uri": "file:///store"},
        },
        "learning": {
            "trainable": {
                "factory": "models.net:make",
                "weightsUri": "file:///models/v1.pt",
                "weightsSha256": SHA,
            },
            "evalDataUri": "file:///data/held-out.npz",
            "rounds": 3,
            "minClients": 2,
            "schedule": {"intervalSeconds": 3600},
        },
    }
)


def _record(n: int, minutes_ago: int) -> rounds.RoundRecord:
    closed = (NOW - timedelta(minutes=minutes_ago)).isoformat()
    return rounds.RoundRecord(
        round=n,
        status="accepted",
        base_sha256=SHA,
        privacy=rounds.Privacy(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, epsilon=1.0, per_site={}),
        model=rounds.Artifact(
            path=f"/store/ns/md/learning/rounds/{n:04d}/{rounds.WEIGHTS_FILE}", sha256=SHA, bytes=1
        ),
        opened_at=closed,
        closed_at=closed,
    )


def _plan(owner: Owner = OWNER, *records: rounds.RoundRecord) -> list[dict[str, Any]]:
    children = {}
    for r in records:
        cm = configmap(
            owner.namespace, learning.record_name(owner.name, r.round), learning.record_json(r), r.round,
            owner.name, owner.uid,
        )  # fmt: skip
        children[("ConfigMap", cm["metadata"]["name"])] = ObjectView("ConfigMap", cm["metadata"]["name"], cm)
    observed = Observed(
        owner.name, owner.namespace, owner.uid, 1, NOW, status={}, nodes=NODES, children=children
    )
    return learning.plan_learning(SPEC, observed, owner, variant_sizes={}).children


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"]["metadata"]["labels"]
    return labels


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector of matchLabels only (the policies use no matchExpressions: asserted below)."""
    assert set(selector) == {"matchLabels"}
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _admitted(policy: dict[str, Any], labels: dict[str, str]) -> set[int]:
    """The TCP ports `policy` lets a pod of this namespace with `labels` reach."""
    ports: set[int] = set()
    for rule in policy["spec"]["ingress"]:
        if any(_matches(peer["podSelector"], labels) for peer in rule["from"]):
            ports |= {p["port"] for p in rule["ports"] if p["protocol"] == "TCP"}
    return ports


def test_the_superlink_policy_admits_supernodes_on_the_fleet_port_and_round_jobs_on_the_control_port() -> (
    None
):
    policy = _one(_plan(), "NetworkPolicy", F.superlink_name("md"))
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["ownerReferences"] == [L.owner_reference("md", "uid-1")]
    assert policy["spec"] == {
        "podSelector": {
            "matchLabels": {
                "kiri.dev/modeldeployment": "md",
                "app.kubernetes.io/component": "learning",
                "kiri.dev/learning-role": "superlink",
            }
        },
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        "podSelector": {
                            "matchLabels": {
                                "kiri.dev/modeldeployment": "md",
                                "app.kubernetes.io/component": "learning",
                                "kiri.dev/learning-role": "supernode",
                            }
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 9092}],
            },
            {
                "from": [
                    {
                        "podSelector": {
                            "matchLabels": {
                                "kiri.dev/modeldeployment": "md",
                                "app.kubernetes.io/component": "learning",
                                "kiri.dev/learning-role": "round",
                            }
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 9093}],
            },
        ],
    }


def test_the_superlink_policy_selects_the_superlinks_pod_and_the_ports_it_and_its_service_serve() -> None:
    objs = _plan()
    policy = _one(objs, "NetworkPolicy", F.superlink_name("md"))
    link = _one(objs, "Deployment", F.superlink_name("md"))
    assert _matches(policy["spec"]["podSelector"], _pod_labels(link))
    for node in [o for o in objs if o["kind"] == "Deployment" and o is not link]:
        assert not _matches(policy["spec"]["podSelector"], _pod_labels(node))
    container = link["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    fleet, control = int(cmd[cmd.index("--port") + 1]), int(cmd[cmd.index("--control-port") + 1])
    assert (fleet, control) == (F.FLEET_PORT, F.CONTROL_PORT) and fleet != control
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("fleet", fleet),
        ("control", control),
    ]
    service = _one(objs, "Service", F.superlink_name("md"))
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("fleet", fleet),
        ("control", control),
    ]
    assert [[p["port"] for p in rule["ports"]] for rule in policy["spec"]["ingress"]] == [[fleet], [control]]


def test_a_round_jobs_pods_reach_the_control_port_and_its_supernodes_pods_the_fleet_port() -> None:
    objs = _plan()
    policy = _one(objs, "NetworkPolicy", F.superlink_name("md"))
    job = _one(objs, "Job", learning.round_job_name("md", 1))
    # The address the round Job submits to and the one each SuperNode dials: both on an admitted port.
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert args[args.index("--superlink") + 1].endswith(f":{F.CONTROL_PORT}")
    assert _admitted(policy, _pod_labels(job)) == {F.CONTROL_PORT}
    assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": F.CONTROL_PORT}]
    assert _matches(policy["spec"]["ingress"][1]["from"][0]["podSelector"], _pod_labels(job))
    for site in ("site-a", "site-b"):
        node = _one(objs, "Deployment", F.supernode_name("md", site))
        cmd = node["spec"]["template"]["spec"]["containers"][0]["command"]
        assert cmd[cmd.index("--superlink") + 1].endswith(f":{F.FLEET_PORT}")
        assert _admitted(policy, _pod_labels(node)) == {F.FLEET_PORT}
        assert _matches(policy["spec"]["ingress"][0]["from"][0]["podSelector"], _pod_labels(node))
        assert not _matches(policy["spec"]["ingress"][1]["from"][0]["podSelector"], _pod_labels(node))
    assert not _matches(policy["spec"]["ingress"][0]["from"][0]["podSelector"], _pod_labels(job))


def test_another_model_deployments_supernodes_and_round_jobs_are_not_admitted() -> None:
    policy = _one(_plan(), "NetworkPolicy", F.superlink_name("md"))
    others = _plan(OTHER)
    assert [o["metadata"]["name"] for o in others if o["kind"] == "NetworkPolicy"] == [
        "md-2-superlink",
        "md-2-supernodes",
    ]
    for site in ("site-a", "site-b"):
        node = _one(others, "Deployment", F.supernode_name("md-2", site))
        assert _pod_labels(node)[L.LEARNING_ROLE] == F.ROLE_SUPERNODE  # a SuperNode, of md-2
        assert _admitted(policy, _pod_labels(node)) == set()
    job = _one(others, "Job", learning.round_job_name("md-2", 1))
    assert _admitted(policy, _pod_labels(job)) == set()
    # Nor this ModelDeployment's other pods, were any to carry its name: its SuperLink's own pod, for one.
    link = _one(_plan(), "Deployment", F.superlink_name("md"))
    assert _admitted(policy, _pod_labels(link)) == set()


def test_no_pod_may_reach_a_supernode() -> None:
    objs = _plan()
    policy = _one(objs, "NetworkPolicy", F.supernodes_policy_name("md"))
    assert policy["metadata"]["name"] == "md-supernodes"
    assert policy["metadata"]["ownerReferences"] == [L.owner_reference("md", "uid-1")]
    assert policy["spec"] == {
        "podSelector": {
            "matchLabels": {
                "kiri.dev/modeldeployment": "md",
                "app.kubernetes.io/component": "learning",
                "kiri.dev/learning-role": "supernode",
            }
        },
        "policyTypes": ["Ingress"],
        "ingress": [],
    }
    selected = [
        o["metadata"]["name"]
        for o in objs
        if o["kind"] in ("Deployment", "Job") and _matches(policy["spec"]["podSelector"], _pod_labels(o))
    ]
    assert selected == [F.supernode_name("md", "site-a"), F.supernode_name("md", "site-b")]
    for node in _plan(OTHER):
        if node["kind"] == "Deployment":
            assert not _matches(policy["spec"]["podSelector"], _pod_labels(node))


def test_the_policies_are_wanted_exactly_while_the_federation_is() -> None:
    names = [(F.superlink_name("md"), "NetworkPolicy"), (F.supernodes_policy_name("md"), "NetworkPolicy")]

    def policies(objs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(o["metadata"]["name"], o["kind"]) for o in objs if o["kind"] == "NetworkPolicy"]

    # A round running, and between rounds (the SuperNodes stay connected): the federation and its policies.
    assert policies(_plan()) == names
    between = _plan(OWNER, _record(1, 1))
    assert policies(between) == names and not [o for o in between if o["kind"] == "Job"]
    # The last round recorded: no federation, no policies (the reconciler deletes the owned leftovers).
    done = _plan(OWNER, _record(1, 300), _record(2, 200), _record(3, 90))
    assert done == []


def test_network_policy_is_a_watched_child_kind_applied_before_the_pods_it_guards() -> None:
    kind = kinds.KINDS["NetworkPolicy"]
    assert kind.child and kind.api_version == "networking.k8s.io/v1" and kind.plural == "networkpolicies"
    assert kind in kinds.children(accounts=False)
    assert kinds.apply_rank("NetworkPolicy") < kinds.apply_rank("Deployment") < kinds.apply_rank("Job")
