"""The one kind registry: what the builders make, the client, handlers and reconciler know."""

from __future__ import annotations

from kiri_operator import kinds
from kiri_operator.planning import plan
from kiri_operator.planning.building import Owner, compressor_account
from planning_worlds import observed, spec


def test_children_apply_dependencies_first() -> None:
    ordered = sorted(kinds.CHILDREN, key=lambda k: k.apply_order)
    assert [k.kind for k in ordered] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "NetworkPolicy",
        "Deployment",
        "Job",
        "DaemonSet",
        "ConfigMap",
    ]
    assert kinds.apply_rank("Pod") == kinds.apply_rank("Unknown") == kinds.LAST
    assert [k.kind for k in kinds.CHILDREN if k.immutable] == ["Job"]


def test_every_child_a_plan_builds_is_a_registered_child_kind() -> None:
    s = spec()
    first = plan(s, observed())
    built = {a.body["kind"]: a.body["apiVersion"] for a in first.actions if a.body is not None}
    built.update(
        {o["kind"]: o["apiVersion"] for o in compressor_account(Owner("md", "ns", "u"), ["md-manifest-c1"])}
    )
    assert {"Deployment", "Service", "Job", "ServiceAccount", "Role", "RoleBinding"} <= built.keys()
    for kind, api_version in built.items():
        assert kinds.KINDS[kind].child and kinds.KINDS[kind].api_version == api_version


def test_paths() -> None:
    assert kinds.KINDS["Node"].path("ns", "n") == "/api/v1/nodes/n"
    assert (
        kinds.KINDS["RoleBinding"].path("ns")
        == "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/rolebindings"
    )
    assert kinds.MODEL_DEPLOYMENT.path("ns", "md", "status") == (
        "/apis/kiri.dev/v1alpha1/namespaces/ns/modeldeployments/md/status"
    )
    assert kinds.PVC.path(None) == "/api/v1/persistentvolumeclaims"


def test_one_owner_reference_builder_and_its_three_uses() -> None:
    from kiri_operator.commands import manifest_configmap
    from kiri_operator.learning_commands import configmap

    base = {"apiVersion": "kiri.dev/v1alpha1", "kind": "ModelDeployment", "name": "md", "uid": "u"}
    (account, _, _) = compressor_account(Owner("md", "ns", "u"), ["md-manifest-c1"])
    assert account["metadata"]["ownerReferences"] == [
        {**base, "controller": True, "blockOwnerDeletion": True}
    ]
    published = manifest_configmap("ns", "cm", "{}", "c1", "md", "u")
    assert published["metadata"]["ownerReferences"] == [
        {**base, "controller": True, "blockOwnerDeletion": False}
    ]
    assert "ownerReferences" not in manifest_configmap("ns", "cm", "{}", "c1", "md", None)["metadata"]
    assert configmap("ns", "rec", "{}", 1, "md", "u")["metadata"]["ownerReferences"] == [base]
