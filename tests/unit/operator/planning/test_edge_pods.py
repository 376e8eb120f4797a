"""What an edge pod needs from its node: a cache directory it can write, and the store it fetches from."""

from __future__ import annotations

from typing import Any

from kiri_operator.planning import building as B
from planning_worlds import SHA, spec

OWNER = B.Owner("resnet", "team-a", "uid-1")


def _daemonset(uri: str = "https://store.example/a/int8.onnx", **overrides: Any) -> dict[str, Any]:
    return B.edge_daemonset(
        spec(**overrides), OWNER, "rev1", "comp1", "int8", B.EdgeArtifact(uri, SHA), ["n1"], {}
    )


def _pod(ds: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    return pod


def _arg(container: dict[str, Any], flag: str) -> str:
    args: list[str] = container["args"]
    return args[args.index(flag) + 1]


def test_an_init_container_alone_runs_as_root_to_hand_the_pod_its_own_node_cache_directory():
    pod = _pod(_daemonset(**{"edge.cache.path": "/srv/kiri-cache"}))
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "sh", "-c", 'mkdir -p -m 0750 "$1" && chown 65532:65532 "$1"', "sh", "/node-cache/team-a/resnet",
    ]  # fmt: skip
    assert init["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
    }
    assert init["volumeMounts"] == [{"name": "cache", "mountPath": "/node-cache"}]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["hostPath"] == {"path": "/srv/kiri-cache", "type": "DirectoryOrCreate"}
    (serve,) = pod["containers"]
    assert serve["securityContext"]["runAsNonRoot"] is True
    assert "runAsUser" not in serve["securityContext"]  # the pod's 65532
    assert pod["securityContext"]["runAsUser"] == 65532
    assert {"name": "cache", "mountPath": "/var/cache/kiri", "subPath": "team-a/resnet"} in serve[
        "volumeMounts"
    ]
    assert _arg(serve, "--cache-dir") == "/var/cache/kiri"


def test_every_pod_that_runs_kiri_serve_knows_its_namespace_from_the_downward_api():
    downward = {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    edge = _pod(_daemonset())["containers"][0]
    cloud = B.cloud_deployment(spec(), OWNER, {})["spec"]["template"]["spec"]["containers"][0]
    assert edge["args"][0] == cloud["args"][0] == "serve"
    assert downward in edge["env"]
    assert downward in cloud["env"]


def test_a_file_store_is_mounted_read_only_at_its_own_path_in_the_pods_that_fetch_from_it():
    uri = "file:///var/lib/kiri/artifacts/team-a/resnet/comp1/int8.onnx"
    pod = _pod(_daemonset(uri))
    serve = pod["containers"][0]
    assert _arg(serve, "--model-uri") == uri
    assert {"name": "artifacts", "mountPath": "/var/lib/kiri/artifacts", "readOnly": True} in serve[
        "volumeMounts"
    ]
    store = next(v for v in pod["volumes"] if v["name"] == "artifacts")
    assert store == {
        "name": "artifacts",
        "hostPath": {"path": "/var/lib/kiri/artifacts", "type": "Directory"},
    }


def test_a_pvc_store_is_fetched_through_the_claim_mounted_read_only():
    pod = _pod(
        _daemonset(
            "pvc://store/kiri/team-a/resnet/comp1/int8.onnx", **{"edge.artifacts.uri": "pvc://store/kiri"}
        )
    )
    serve = pod["containers"][0]
    assert _arg(serve, "--model-uri") == "file:///artifacts/kiri/team-a/resnet/comp1/int8.onnx"
    assert {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True} in serve["volumeMounts"]
    store = next(v for v in pod["volumes"] if v["name"] == "artifacts")
    assert store == {"name": "artifacts", "persistentVolumeClaim": {"claimName": "store", "readOnly": True}}


def test_an_http_store_needs_no_volume():
    pod = _pod(_daemonset("https://store.example/a/int8.onnx"))
    assert [v["name"] for v in pod["volumes"]] == ["cache", "tmp"]
    assert _arg(pod["containers"][0], "--model-uri") == "https://store.example/a/int8.onnx"
