"""Multi-tenant safety on the real control plane (issue 17, the credentials and validation part):

- the pods Kiri makes run as the service accounts the spec names, pull with its image pull secrets, and read
  store credentials from the namespace's own Secret and CA ConfigMap, exactly as built (the API server's
  ServiceAccount admission checks every account exists); no secret value reaches status or events;
- the operator refuses every spec of the catalogue's `operator_cases` (a Prometheus outside its allow-list)
  with `Ready=False` and the case's reason, and creates nothing, while the catalogue base, which differs
  from each case by the case's edit alone, is planned.

What the API server itself refuses (tolerations without a key or of the control-plane taint, references to
another namespace) is in the catalogue's `cases`, run by tests/e2e/test_api_validation.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from manifest_catalogue import CATALOGUE, apply_case

from .conftest import Cluster
from .operator_harness import (
    Operator,
    build_model,
    children,
    condition,
    crd,
    get_md,
    model_deployment,
    operator_fixture,
    run_compression_job,
    wait_condition,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

BASE_PROMETHEUS = CATALOGUE["base"]["spec"]["rollout"]["analysis"]["prometheus"]["address"]
SECRET_VALUES = {
    "AWS_ACCESS_KEY_ID": "AKIAKIRIE2EEXAMPLE01",
    "AWS_SECRET_ACCESS_KEY": "kiri-e2e-secret-value-never-logged",
    "KIRI_HTTP_BEARER_TOKEN": "kiri-e2e-bearer-never-logged",
}
CREDENTIAL_KEYS = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "KIRI_HTTP_BEARER_TOKEN",
    "KIRI_HTTP_USERNAME",
    "KIRI_HTTP_PASSWORD",
]
VARIANTS = [
    {"name": "int8", "method": "int8-dynamic", "gate": [{"metric": "cosine", "op": ">=", "threshold": 0.99}]}
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return build_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace, f"--allowed-prometheus={BASE_PROMETHEUS}")


def _secret_env(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": True}}}
        for k in CREDENTIAL_KEYS
    ]


CA_ENV = {"name": "KIRI_CA_FILE", "value": "/etc/kiri/store-ca/ca.crt"}
CA_MOUNT = {"name": "store-ca", "mountPath": "/etc/kiri/store-ca", "readOnly": True}
PULL = [{"name": "registry"}]


def _namespace_objects(namespace: str) -> list[dict[str, Any]]:
    docker = base64.b64encode(json.dumps({"auths": {"registry.example": {"auth": "a2lyaTpraXJp"}}}).encode())
    accounts = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": n, "namespace": namespace}}
        for n in ("model-reader", "edge-reader", "compressor-irsa")
    ]
    return [
        *accounts,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "store", "namespace": namespace},
            "stringData": SECRET_VALUES,
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/dockerconfigjson",
            "metadata": {"name": "registry", "namespace": namespace},
            "data": {".dockerconfigjson": docker.decode()},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "corp-ca", "namespace": namespace},
            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\n(test)\n-----END CERTIFICATE-----\n"},
        },
    ]


def _pods(cluster: Cluster, namespace: str, component: str) -> list[dict[str, Any]]:
    out = cluster.get_json("pods", "-n", namespace, "-l", f"app.kubernetes.io/component={component}")
    return list(out.get("items") or [])


def test_pods_run_as_the_named_accounts_and_read_credentials_from_the_namespace_exactly(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    cluster.apply(_namespace_objects(namespace))
    model, sha = tiny_model
    credentials = {"secretRef": {"name": "store"}, "caBundle": {"configMapKeyRef": {"name": "corp-ca"}}}
    md = model_deployment("tiny", namespace, model, sha, tmp_path / "store", VARIANTS)
    md["spec"]["model"]["source"]["credentials"] = credentials
    md["spec"]["runtime"] = {"imagePullSecrets": PULL, "compressorServiceAccountName": "compressor-irsa"}
    md["spec"]["cloud"] = {"serviceAccountName": "model-reader"}
    md["spec"]["edge"]["serviceAccountName"] = "edge-reader"
    md["spec"]["edge"]["artifacts"]["credentials"] = credentials
    cluster.apply(md)

    # Cloud: the pods the Deployment controller made, as the API server admitted them.
    wait_condition(cluster, namespace, "tiny", "CloudReady", "True", "DeploymentAvailable")
    (cloud,) = _pods(cluster, namespace, "cloud")
    assert cloud["spec"]["serviceAccountName"] == "model-reader"
    assert cloud["spec"]["automountServiceAccountToken"] is False
    assert cloud["spec"]["imagePullSecrets"] == PULL
    env = cloud["spec"]["containers"][0]["env"]
    assert env[3:] == [*_secret_env("store"), CA_ENV]
    assert CA_MOUNT in cloud["spec"]["containers"][0]["volumeMounts"]
    ca = next(v for v in cloud["spec"]["volumes"] if v["name"] == "store-ca")
    assert ca["configMap"]["name"] == "corp-ca"
    assert ca["configMap"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]

    # Compression: the Job's pod runs as the named account; only its compress step holds the credentials.
    (job,) = children(cluster, namespace, "tiny", "jobs")
    job_pods = cluster.wait_for(
        lambda: _pods(cluster, namespace, "compress"), timeout=60, message="the compression Job's pod"
    )
    spec = job_pods[0]["spec"]
    assert spec["serviceAccountName"] == "compressor-irsa"
    assert spec["imagePullSecrets"] == PULL
    assert spec["initContainers"][0]["env"][2:] == [*_secret_env("store"), CA_ENV]
    assert [e["name"] for e in spec["containers"][0]["env"]] == ["HOME", "PYTHONDONTWRITEBYTECODE"]
    run_compression_job(cluster, namespace, job["metadata"]["name"])

    # Edge: every pod of every DaemonSet.
    wait_condition(cluster, namespace, "tiny", "Ready", "True", timeout=90)
    edge = _pods(cluster, namespace, "edge")
    assert edge
    for pod in edge:
        assert pod["spec"]["serviceAccountName"] == "edge-reader"
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["imagePullSecrets"] == PULL
        assert pod["spec"]["containers"][0]["env"][3:] == [*_secret_env("store"), CA_ENV]
        # The node cache is a CSI volume now: no init container, and so none holding credentials.
        assert "initContainers" not in pod["spec"]

    # No secret value in what the operator wrote: status, events.
    written = json.dumps(get_md(cluster, namespace, "tiny")) + json.dumps(
        cluster.get_json("events", "-n", namespace)
    )
    logged = operator.tail(100000)
    for value in SECRET_VALUES.values():
        assert value not in written and value not in logged


def test_a_service_account_missing_from_the_namespace_is_refused_by_admission_and_reported(
    cluster: Cluster, namespace: str, operator: Operator, tiny_model: tuple[Path, str], tmp_path: Path
) -> None:
    model, sha = tiny_model
    md = model_deployment("tiny", namespace, model, sha, tmp_path / "store", [])
    md["spec"]["cloud"] = {"serviceAccountName": "absent"}
    cluster.apply(md)

    # The Deployment is created; the API server refuses its ReplicaSet's pods.
    def refused() -> bool:
        events = cluster.get_json("events", "-n", namespace, "--field-selector", "reason=FailedCreate")
        return any('serviceaccount "absent" not found' in e["message"] for e in events["items"])

    cluster.wait_for(refused, timeout=60, message="FailedCreate: serviceaccount not found")
    assert _pods(cluster, namespace, "cloud") == []
    got = get_md(cluster, namespace, "tiny")
    assert condition(got, "CloudReady")["status"] == "False"


@pytest.mark.parametrize("case", CATALOGUE["operator_cases"], ids=lambda c: c["id"])
def test_the_operator_refuses_a_catalogue_case_with_its_reason_and_creates_nothing(
    case: dict[str, Any], cluster: Cluster, namespace: str, operator: Operator
) -> None:
    def put(name: str, manifest: dict[str, Any]) -> None:
        manifest["metadata"] = {"name": name, "namespace": namespace}
        cluster.apply(manifest)

    # The base, whose Prometheus this operator may query, is planned: children appear.
    put("base", apply_case(CATALOGUE["base"], {}))
    cluster.wait_for(
        lambda: children(cluster, namespace, "base", "deployments"), timeout=60, message="the base's children"
    )
    put("refused", apply_case(CATALOGUE["base"], case))
    got = wait_condition(cluster, namespace, "refused", "Ready", "False", case["reason"])
    assert got["status"]["phase"] == "Failed"
    assert condition(got, "Degraded")["reason"] == case["reason"]
    message = condition(got, "Ready")["message"]
    assert message.startswith("spec.rollout.analysis.prometheus.address: ") and BASE_PROMETHEUS in message
    for kind in ("deployments", "services", "jobs", "daemonsets", "serviceaccounts"):
        assert children(cluster, namespace, "refused", kind) == []
    events = cluster.get_json("events", "-n", namespace, "--field-selector", "involvedObject.name=refused")
    assert [e["reason"] for e in events["items"] if e["type"] == "Warning"] == [case["reason"]]
