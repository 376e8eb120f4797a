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


def test_the_node_cache_is_the_chart_drivers_csi_volume_named_by_model_so_no_pod_names_a_host_path():
    pod = _pod(_daemonset(**{"edge.cache.path": "/var/lib/kiri/cache"}))  # the old default: ignored
    assert "initContainers" not in pod
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache == {
        "name": "cache",
        "csi": {"driver": "cache.kiri.dev", "volumeAttributes": {"model": "resnet"}},
    }
    assert not any("hostPath" in v for v in pod["volumes"])
    (serve,) = pod["containers"]
    assert {"name": "cache", "mountPath": "/var/cache/kiri"} in serve["volumeMounts"]
    assert _arg(serve, "--cache-dir") == "/var/cache/kiri"


def test_an_edge_pod_meets_pod_security_restricted():
    pod = _pod(_daemonset())
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    assert {next(k for k in v if k != "name") for v in pod["volumes"]} == {"csi", "emptyDir"}


def test_every_pod_that_runs_kiri_serve_knows_its_namespace_from_the_downward_api():
    downward = {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    edge = _pod(_daemonset())["containers"][0]
    cloud = B.cloud_deployment(spec(), OWNER, {})["spec"]["template"]["spec"]["containers"][0]
    assert edge["args"][0] == cloud["args"][0] == "serve"
    assert downward in edge["env"]
    assert downward in cloud["env"]


def test_a_file_store_mounts_only_this_model_deployments_directory_read_only():
    uri = "file:///var/lib/kiri/artifacts/team-a/resnet/comp1/int8.onnx"
    pod = _pod(_daemonset(uri))
    serve = pod["containers"][0]
    assert _arg(serve, "--model-uri") == uri
    own = "/var/lib/kiri/artifacts/team-a/resnet"
    assert {"name": "artifacts", "mountPath": own, "readOnly": True} in serve["volumeMounts"]
    store = next(v for v in pod["volumes"] if v["name"] == "artifacts")
    assert store == {"name": "artifacts", "hostPath": {"path": own, "type": "Directory"}}


def test_a_compression_job_on_a_file_store_mounts_only_its_own_output_directory():
    job = B.compression_job(spec(), OWNER, "comp1", {}, 600, "kiri-compressor")
    pod = job["spec"]["template"]["spec"]
    store = next(v for v in pod["volumes"] if v["name"] == "artifacts")
    out = "/var/lib/kiri/artifacts/team-a/resnet/comp1"
    assert store == {"name": "artifacts", "hostPath": {"path": out, "type": "DirectoryOrCreate"}}
    compress = pod["initContainers"][0]
    assert {"name": "artifacts", "mountPath": out} in compress["volumeMounts"]
    assert _arg(compress, "--out") == out


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
