"""Who Kiri's pods run as and how they reach a store: service accounts, image pull secrets and store
credentials go exactly where the spec says, only into the containers that fetch, and change nothing for a
spec that does not set them."""

from __future__ import annotations

from typing import Any

from kiri_operator.planning import building as B
from kiri_operator.planning import learning
from kiri_operator.planning.revisions import compression_key, revision_key
from planning_worlds import SHA, spec

OWNER = B.Owner("resnet", "team-a", "uid-1")
KEYS = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "KIRI_HTTP_BEARER_TOKEN",
    "KIRI_HTTP_USERNAME",
    "KIRI_HTTP_PASSWORD",
]
ACCESS = {
    "runtime.imagePullSecrets": [{"name": "registry"}, {"name": "mirror"}],
    "runtime.compressorServiceAccountName": "compressor-irsa",
    "cloud.serviceAccountName": "model-reader",
    "edge.serviceAccountName": "edge-reader",
    "model.source.credentials": {
        "secretRef": {"name": "model-store"},
        "caBundle": {"configMapKeyRef": {"name": "corp-ca"}},
    },
    "edge.artifacts": {
        "uri": "pvc://artifacts",
        "fetchUri": "https://store.example/edge",
        "credentials": {
            "secretRef": {"name": "edge-store"},
            "caBundle": {"secretKeyRef": {"name": "tls", "key": "ca.pem"}},
        },
    },
}


def _secret_env(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": True}}} for k in KEYS
    ]


CA_ENV = {"name": "KIRI_CA_FILE", "value": "/etc/kiri/store-ca/ca.crt"}
CA_MOUNT = {"name": "store-ca", "mountPath": "/etc/kiri/store-ca", "readOnly": True}


def _edge(s: Any) -> dict[str, Any]:
    return B.edge_daemonset(
        s,
        OWNER,
        "rev1",
        "comp1",
        "int8",
        B.EdgeArtifact("https://store.example/edge/int8.onnx", SHA),
        ["n1"],
        {},
    )


def test_cloud_pods_run_as_the_named_account_with_pull_secrets_and_the_source_credentials() -> None:
    pod = B.cloud_deployment(spec(**ACCESS), OWNER, {})["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "model-reader"
    assert pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    (serve,) = pod["containers"]
    assert serve["env"][3:] == [*_secret_env("model-store"), CA_ENV]
    assert CA_MOUNT in serve["volumeMounts"]
    assert {
        "name": "store-ca",
        "configMap": {"name": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
    } in pod["volumes"]


def test_edge_pods_get_the_artifact_store_credentials_not_the_model_stores() -> None:
    pod = _edge(spec(**ACCESS))["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "edge-reader"
    assert pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    (serve,) = pod["containers"]
    assert serve["env"][3:] == [*_secret_env("edge-store"), CA_ENV]
    assert CA_MOUNT in serve["volumeMounts"]
    assert {
        "name": "store-ca",
        "secret": {"secretName": "tls", "items": [{"key": "ca.pem", "path": "ca.crt"}]},
    } in pod["volumes"]
    assert "initContainers" not in pod  # the node cache comes from the CSI driver, with no init container


def test_only_the_compress_step_of_the_job_holds_the_source_credentials() -> None:
    job = B.compression_job(spec(**ACCESS), OWNER, "comp1", {}, 3600, "kiri-compressor")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "compressor-irsa"
    assert pod["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]
    (compress,) = pod["initContainers"]
    (publish,) = pod["containers"]
    assert compress["env"][2:] == [*_secret_env("model-store"), CA_ENV]
    assert CA_MOUNT in compress["volumeMounts"]
    assert [e["name"] for e in publish["env"]] == ["HOME", "PYTHONDONTWRITEBYTECODE"]
    assert CA_MOUNT not in publish["volumeMounts"]
    # Unset, the Job runs as the namespace's account that the chart (or the operator) made for Jobs.
    default = B.compression_job(spec(), OWNER, "comp1", {}, 3600, "kiri-compressor")["spec"]["template"][
        "spec"
    ]
    assert default["serviceAccountName"] == "kiri-compressor"


def test_learning_pods_pull_with_the_secrets_and_supernodes_run_as_the_trainer_account() -> None:
    s = spec(
        **ACCESS,
        **{
            "model.evalDataUri": "file:///data/eval.npz",
            "learning": {
                "trainable": {"factory": "m:make", "weightsUri": "file:///w/w.pt", "weightsSha256": SHA},
                "evalDataUri": "file:///data/eval.npz",
                "trainerServiceAccountName": "trainer",
            },
        },
    )
    objects = learning.round_objects(s, OWNER, 1, ["site-a"], "file:///w/w.pt")
    pods = {
        o["metadata"]["labels"]["kiri.dev/learning-role"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Job", "Deployment")
    }
    assert set(pods) == {"round", "superlink", "supernode"}
    assert pods["supernode"]["serviceAccountName"] == "trainer"
    assert pods["supernode"]["automountServiceAccountToken"] is False
    assert pods["round"]["serviceAccountName"] == "kiri-compressor"
    assert pods["superlink"]["serviceAccountName"] == "kiri-compressor"
    assert all(p["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}] for p in pods.values())


def test_a_spec_without_access_fields_builds_the_same_children_and_keys_as_before() -> None:
    s = spec()
    pods = [
        B.cloud_deployment(s, OWNER, {})["spec"]["template"]["spec"],
        _edge(s)["spec"]["template"]["spec"],
        B.compression_job(s, OWNER, "comp1", {}, 3600, "kiri-compressor")["spec"]["template"]["spec"],
    ]
    assert all("imagePullSecrets" not in p for p in pods)
    assert "serviceAccountName" not in pods[0] and "serviceAccountName" not in pods[1]
    assert all(
        not any(
            "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
            for c in p["containers"]
            for e in c.get("env", [])
        )
        for p in pods
    )
    # Pinned: the keys of a spec with none of the new fields are the keys older operators computed.
    assert compression_key(B.with_default_store(s, None), B.store_uri(s)) == "3f7ea5ca63"
    assert revision_key(B.with_default_store(s, None), B.store_uri(s)) == "7da1048975"


def test_who_edge_pods_run_as_and_their_store_credentials_make_a_new_revision() -> None:
    base = spec()
    keys = {revision_key(B.with_default_store(base, None), B.store_uri(base))}
    for path, value in [
        ("edge.serviceAccountName", "edge-reader"),
        ("runtime.imagePullSecrets", [{"name": "registry"}]),
        ("edge.artifacts.credentials", {"secretRef": {"name": "edge-store"}}),
    ]:
        s = spec(**{path: value})
        keys.add(revision_key(B.with_default_store(s, None), B.store_uri(s)))
    assert len(keys) == 4
    # The cloud's account is not the edge's business: same revision.
    s = spec(**{"cloud.serviceAccountName": "model-reader"})
    assert revision_key(B.with_default_store(s, None), B.store_uri(s)) == revision_key(
        B.with_default_store(base, None), B.store_uri(base)
    )
    # The Job's account is part of its key: a Job that failed for want of access is retried under a new one.
    s = spec(**{"runtime.compressorServiceAccountName": "compressor-irsa"})
    assert compression_key(B.with_default_store(s, None), B.store_uri(s)) != compression_key(
        B.with_default_store(base, None), B.store_uri(base)
    )
