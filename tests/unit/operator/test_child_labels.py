"""Children's labels against Argo CD's tracking rule: an Application named like the ModelDeployment must
not take Kiri's children for its own (and prune them), and children an older operator labelled so are
re-applied without the label."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kiri_operator import labels as L
from kiri_operator.observations import ObjectView
from kiri_operator.planning import Settings
from kiri_operator.planning.building import canonical_hash
from kiri_operator.plans import Check
from planning_worlds import FakeServer, manifest, observed, spec

pytestmark = pytest.mark.timeout(30)

# Argo CD's defaults: `application.instanceLabelKey` (label tracking) and the annotation tracking method's key.
ARGOCD_INSTANCE_LABEL = "app.kubernetes.io/instance"
ARGOCD_TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"
RECOMMENDED = {L.NAME: "kiri", L.PART_OF: "kiri", L.MANAGED_BY: "kiri"}


def argocd_tracks(obj: dict[str, Any], app: str) -> bool:
    """Argo CD's rule (gitops-engine's argo.GetAppInstanceLabel / tracking-id): the object belongs to
    Application `app` if its instance label is `app`, or its tracking-id annotation starts with `app:`."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(ARGOCD_INSTANCE_LABEL) == app:
        return True
    return str((meta.get("annotations") or {}).get(ARGOCD_TRACKING_ANNOTATION, "")).startswith(f"{app}:")


def _with_templates(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The object and the pod templates inside it (Deployment, DaemonSet, Job)."""
    out = [body]
    template = (body.get("spec") or {}).get("template")
    if template:
        out.append(template)
    return out


# With the operator making the Jobs' account, so its ServiceAccount, Role and RoleBinding are checked too.
ACCOUNTS = Settings(create_compressor_rbac=True)


def healthy_world() -> FakeServer:
    s = spec(**{"cloud.replicas": 1})
    server = FakeServer(observed())
    server.step(s, ACCOUNTS)
    server.publish(s, manifest({"fp16": True, "int8": True}))
    for _ in range(3):
        server.step(s, ACCOUNTS)
    assert server.world.status["phase"] == "Healthy"
    return server


def test_no_child_or_pod_template_is_tracked_by_an_argocd_application_of_the_same_name() -> None:
    server = healthy_world()
    kinds = {kind for kind, _ in server.world.children}
    assert {"Deployment", "Service", "Job", "DaemonSet", "ConfigMap", "ServiceAccount"} <= kinds
    for (kind, name), child in server.world.children.items():
        for obj in _with_templates(dict(child.body)):
            labels = (obj.get("metadata") or {}).get("labels") or {}
            assert not argocd_tracks(obj, server.world.name), (kind, name, labels)
            assert ARGOCD_INSTANCE_LABEL not in labels, (kind, name)
            assert labels[L.MODEL_DEPLOYMENT] == server.world.name, (kind, name)
            assert {k: labels.get(k) for k in RECOMMENDED} == RECOMMENDED, (kind, name)
            assert labels[L.COMPONENT] in ("cloud", "edge", "compress", "manifest"), (kind, name)


def test_the_tracking_rule_itself_is_what_argocd_applies() -> None:
    assert argocd_tracks({"metadata": {"labels": {ARGOCD_INSTANCE_LABEL: "md"}}}, "md")
    assert not argocd_tracks({"metadata": {"labels": {ARGOCD_INSTANCE_LABEL: "other"}}}, "md")
    tracked = {"metadata": {"annotations": {ARGOCD_TRACKING_ANNOTATION: "md:apps/Deployment:ns/md-cloud"}}}
    assert argocd_tracks(tracked, "md")


@pytest.mark.parametrize("component", ["cloud", "edge", "compress", "manifest", "learning", "learning-round"])
def test_every_components_labels_are_the_recommended_set_without_instance(component: str) -> None:
    assert L.common_labels("md", component) == {
        **RECOMMENDED,
        L.COMPONENT: component,
        L.MODEL_DEPLOYMENT: "md",
    }


def test_children_labelled_by_an_older_operator_are_reapplied_without_the_instance_label() -> None:
    server = healthy_world()
    s = spec(**{"cloud.replicas": 1})
    old: dict[tuple[str, str], ObjectView] = {}
    for key, child in server.world.children.items():
        body = copy.deepcopy(dict(child.body))
        if key[0] == "ConfigMap":  # the manifest: written by the Job, not by the operator
            old[key] = child
            continue
        # As the previous operator built it: the instance label, and the hash over that body.
        body["metadata"]["labels"][ARGOCD_INSTANCE_LABEL] = server.world.name
        body["metadata"]["annotations"].pop(L.SPEC_HASH)
        body["metadata"]["annotations"][L.SPEC_HASH] = canonical_hash(body)
        old[key] = ObjectView(child.kind, child.name, body)
    server.world = replace(server.world, children=old)
    p = server.step(s, ACCOUNTS)
    updated = {(a.kind, a.name): a for a in p.actions if a.check is Check.UPDATE}
    # A Job's pod template is immutable (the check step never updates one): an older Job keeps the label
    # until its compression key changes; docs/gitops.md gives the one-off `kubectl label` for upgrades.
    assert set(updated) == {k for k in old if k[0] not in ("ConfigMap", "Job")}
    assert {k[0] for k in updated} == {
        "Deployment",
        "Service",
        "DaemonSet",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    for action in updated.values():
        assert action.body is not None
        assert ARGOCD_INSTANCE_LABEL not in action.body["metadata"]["labels"]
    # and then nothing more: the level is reached.
    assert not server.step(s, ACCOUNTS).writes


def test_no_operator_module_names_the_instance_label_outside_the_labels_docstring() -> None:
    root = Path(L.__file__).parent
    assert ARGOCD_INSTANCE_LABEL not in vars(L).values()
    for path in root.rglob("*.py"):
        if path.name != "labels.py":
            assert ARGOCD_INSTANCE_LABEL not in path.read_text(), path


def test_no_pod_kiri_makes_mounts_a_service_account_token_pod_wide() -> None:
    """Cloud, edge, compression: the pod spec turns the automatic token off, and only a container that
    publishes through the API mounts the projected one (the learning Jobs: test_learning_planning.py)."""
    server = healthy_world()
    pods = 0
    for (kind, name), child in server.world.children.items():
        for template in _with_templates(dict(child.body))[1:]:
            pod = template["spec"]
            pods += 1
            assert pod["automountServiceAccountToken"] is False, (kind, name)
            for container in pod.get("initContainers", []) + pod["containers"]:
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                holds = "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
                assert holds == (kind == "Job" and container["name"] == "publish"), (
                    kind,
                    name,
                    container["name"],
                )
        if kind == "ServiceAccount":
            assert child.body["automountServiceAccountToken"] is False
    assert pods >= 3  # the cloud Deployment, the compression Job, at least one edge DaemonSet
