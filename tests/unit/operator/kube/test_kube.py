"""kiri_operator.kube.Kube over httpx: status handling, metrics, authorization, token rotation.

The API server is an httpx.MockTransport: these tests inject failures (404, 409, 401, a dropped
connection) that a healthy local server would not produce on demand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kiri_operator.kube import Credentials, Kube, KubeError, http_client
from kiri_operator.metrics import REGISTRY

Handler = Callable[[httpx.Request], httpx.Response]


def kube(handler: Handler, credentials: Credentials | None = None) -> Kube:
    creds = credentials or Credentials(server="https://api.test:6443/prefix", token="tok")
    return Kube(http_client(creds, transport=httpx.MockTransport(handler)))


def count(verb: str, resource: str, code: str) -> float:
    labels = {"verb": verb, "resource": resource, "code": code}
    return REGISTRY.get_sample_value("kiri_api_requests_total", labels) or 0.0


def test_get_sends_the_bearer_token_and_parses_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kind": "ConfigMap", "metadata": {"name": "a"}})

    before = count("get", "configmaps", "200")
    assert kube(handler).get("ConfigMap", "ns", "a") == {"kind": "ConfigMap", "metadata": {"name": "a"}}
    (request,) = seen
    assert request.headers["Authorization"] == "Bearer tok"
    assert request.headers["Accept"] == "application/json"
    # The server URL's path (a proxy's prefix) is kept.
    assert str(request.url) == "https://api.test:6443/prefix/api/v1/namespaces/ns/configmaps/a"
    assert count("get", "configmaps", "200") == before + 1


def test_missing_object_is_none_when_missing_is_ok() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"kind": "Status", "message": "not found", "code": 404})

    before = count("get", "deployments", "404")
    assert kube(handler).get("Deployment", "ns", "gone") is None
    assert count("get", "deployments", "404") == before + 1
    # Only a read may find nothing: a write to a missing object is an error.
    before = count("patch", "deployments", "404")
    with pytest.raises(KubeError) as err:
        kube(handler).annotate("Deployment", "ns", "gone", {"a": "b"})
    assert err.value.status == 404
    assert count("patch", "deployments", "404") == before + 1


def test_conflict_carries_the_api_message() -> None:
    bodies: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        assert request.headers["Content-Type"] == "application/apply-patch+yaml"
        assert request.url.params["fieldManager"] == "kiri" and request.url.params["force"] == "true"
        message = 'Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas'
        return httpx.Response(409, json={"kind": "Status", "message": message, "code": 409})

    before = count("apply", "configmaps", "409")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}}
    with pytest.raises(KubeError) as err:
        kube(handler).apply(cm)
    assert err.value.status == 409
    assert err.value.message == 'Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas'
    assert bodies == [cm]
    assert count("apply", "configmaps", "409") == before + 1


def test_non_json_error_body_is_the_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="upstream unavailable")

    with pytest.raises(KubeError, match="HTTP 503: upstream unavailable"):
        kube(handler).list("Pod", "ns")


def test_transport_error_is_status_0() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    before = count("apply", "configmaps", "error")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "ns"}}
    with pytest.raises(KubeError) as err:
        kube(handler).apply(cm)
    assert err.value.status == 0 and "connection refused" in err.value.message
    assert count("apply", "configmaps", "error") == before + 1


def test_annotate_is_one_merge_patch_of_the_annotations() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kind": "ModelDeployment"})

    before = count("patch", "modeldeployments", "200")
    assert kube(handler).annotate("ModelDeployment", "ns", "md", {"kiri.dev/promote": "t"}) == {
        "kind": "ModelDeployment"
    }
    (request,) = seen
    assert request.method == "PATCH"
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    assert request.url.path == "/prefix/apis/kiri.dev/v1alpha1/namespaces/ns/modeldeployments/md"
    assert not request.url.params
    assert json.loads(request.content) == {"metadata": {"annotations": {"kiri.dev/promote": "t"}}}
    assert count("patch", "modeldeployments", "200") == before + 1


def test_unconnected_kube_fails_like_a_transport_error() -> None:
    with pytest.raises(KubeError) as err:
        Kube().get("Pod", "ns", "p")
    assert err.value.status == 0


def test_rotated_token_file_is_read_again_after_a_401(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old")
    creds = Credentials(server="https://api.test", token="old", token_path=str(token), read_at=1e18)
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["Authorization"])
        if request.headers["Authorization"] != "Bearer new":
            return httpx.Response(401, json={"kind": "Status", "message": "Unauthorized"})
        return httpx.Response(200, json={"kind": "Pod"})

    k = kube(handler, creds)
    token.write_text("new")
    assert k.get("Pod", "ns", "p") == {"kind": "Pod"}
    assert sent == ["Bearer old", "Bearer new"]
    assert k.get("Pod", "ns", "p") == {"kind": "Pod"}
    assert sent[-1] == "Bearer new" and len(sent) == 3


def test_static_token_is_not_retried_after_a_401() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(401, json={"kind": "Status", "message": "Unauthorized"})

    with pytest.raises(KubeError) as err:
        kube(handler).get("Pod", "ns", "p")
    assert err.value.status == 401 and err.value.message == "Unauthorized" and len(sent) == 1


def test_operator_never_imports_the_official_client() -> None:
    # In a fresh interpreter: the guard in `kiri operator` must run before kopf is first imported.
    # The operator runs with its own registry, a plain kopf.OperatorRegistry: kopf adds its fallback logins
    # (through the official client, or a kubeconfig reader) only to its default registry, so the only
    # login handler there is Kiri's.
    code = (
        "import asyncio, sys\n"
        "runs = []\n"
        "asyncio.run = lambda main: runs.append(main.cr_frame.f_locals) or main.close()\n"  # stop short of running kopf
        "from kiri_operator import cli\n"
        "assert cli.main(['operator', '--metrics-port', '0']) == 0\n"
        "assert sys.modules.get('kubernetes') is None, sys.modules['kubernetes']\n"
        "import kopf\n"
        "from kiri_operator import handlers\n"
        "(arguments,) = runs\n"
        "assert arguments['registry'] is handlers.REGISTRY\n"
        "assert type(handlers.REGISTRY) is kopf.OperatorRegistry, type(handlers.REGISTRY)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_kopf_logs_in_with_the_same_credentials(tmp_path: Path) -> None:
    import kopf
    import yaml

    from kiri_operator import handlers
    from kiri_operator.memos import Config, memo

    cfg = {
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "shop"}}],
        "clusters": [
            {"name": "c", "cluster": {"server": "https://h:6443", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "tok"}}],
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(cfg))
    info = handlers.login(memo=kopf.Memo(memo(Config(kubeconfig=str(path)))))
    assert isinstance(info, kopf.ConnectionInfo)
    assert (info.server, info.token, info.insecure, info.default_namespace) == (
        "https://h:6443",
        "tok",
        True,
        "shop",
    )
    assert info.as_http_headers() == {"Authorization": "Bearer tok"}
    # A kubeconfig that cannot work stops the operator with the reason instead of retrying forever.
    with pytest.raises(kopf.PermanentError, match="does not exist"):
        handlers.login(memo=kopf.Memo(memo(Config(kubeconfig=str(tmp_path / "nope")))))


def test_publish_creates_and_only_applies_over_a_name_that_exists() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m", "namespace": "ns"}, "data": {}}
    seen: list[tuple[str, str]] = []

    def fresh(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(201, json=cm)

    kube(fresh).publish(cm)
    # A new name needs `create` alone: one POST, no PATCH (which a create-only Role would refuse).
    assert seen == [("POST", "/prefix/api/v1/namespaces/ns/configmaps")]

    seen.clear()

    def existing(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.method == "POST":
            return httpx.Response(409, json={"kind": "Status", "reason": "AlreadyExists", "code": 409})
        return httpx.Response(200, json=cm)

    kube(existing).publish(cm)
    assert seen == [
        ("POST", "/prefix/api/v1/namespaces/ns/configmaps"),
        ("PATCH", "/prefix/api/v1/namespaces/ns/configmaps/m"),
    ]

    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"kind": "Status", "message": "forbidden", "code": 403})

    with pytest.raises(KubeError) as err:
        kube(forbidden).publish(cm)
    assert err.value.status == 403
