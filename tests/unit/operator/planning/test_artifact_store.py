"""The artifact store a ModelDeployment uses: an http(s) store (the chart's `kiri store`) is uploaded to by
the compression Job, and the operator's default store fills an unset `edge.artifacts.uri`."""

from __future__ import annotations

from typing import Any

from kiri_operator.planning import building as B
from kiri_operator.planning.settings import Settings
from planning_worlds import FakeServer, manifest, observed, spec

OWNER = B.Owner("resnet", "team-a", "uid-1")
STORE = "http://kiri-store.kiri-system.svc:8080"


def _containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod["initContainers"], *pod["containers"]]}


def test_an_http_store_gets_a_scratch_volume_and_the_publish_step_uploads_there_before_the_configmap():
    s = spec(**{"edge.artifacts.uri": STORE + "/"})
    job = B.compression_job(s, OWNER, "k1", {}, 600, "kiri-compressor")
    pod = job["spec"]["template"]["spec"]
    (artifacts,) = [v for v in pod["volumes"] if v["name"] == "artifacts"]
    assert artifacts == {"name": "artifacts", "emptyDir": {}}  # no hostPath on the cloud node
    c = _containers(job)
    compress, publish = c["compress"]["args"], c["publish"]["args"]
    assert compress[compress.index("--out") + 1] == "/artifacts/team-a/resnet/k1"
    assert publish[publish.index("--upload-to") + 1] == f"{STORE}/team-a/resnet/k1/"
    assert publish[publish.index("--manifest") + 1] == "/artifacts/team-a/resnet/k1/manifest.json"
    assert B.artifact_dir(s, OWNER, "k1").fetch_base == f"{STORE}/team-a/resnet/k1/"


def test_a_file_store_is_written_in_place_and_uploads_nothing():
    job = B.compression_job(
        spec(**{"edge.artifacts.uri": "file:///srv/kiri"}), OWNER, "k1", {}, 600, "kiri-compressor"
    )
    assert "--upload-to" not in _containers(job)["publish"]["args"]


def test_an_unset_store_is_the_operators_default_and_else_the_built_in_host_path():
    s = spec()
    assert s.edge.artifacts.uri is None
    assert B.with_default_store(s, STORE).edge.artifacts.uri == STORE
    assert B.with_default_store(s, None).edge.artifacts.uri == "file:///var/lib/kiri/artifacts"
    named = spec(**{"edge.artifacts.uri": "pvc://claim/x"})
    assert B.with_default_store(named, STORE).edge.artifacts.uri == "pvc://claim/x"


def test_edge_pods_fetch_the_variant_from_the_default_store_when_the_spec_names_none():
    s = spec()
    settings = Settings(default_artifacts_uri=STORE)
    server = FakeServer(observed())
    server.step(s, settings)
    (job,) = [o for (kind, _), o in server.world.children.items() if kind == "Job"]
    publish = _containers(dict(job.body))["publish"]["args"]
    assert publish[publish.index("--upload-to") + 1].startswith(f"{STORE}/")
    server.publish(B.with_default_store(s, STORE), manifest({"fp16": True, "int8": True}))
    server.step(s, settings)
    dss = [o.body for (kind, _), o in server.world.children.items() if kind == "DaemonSet"]
    assert dss
    for ds in dss:
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--model-uri") + 1].startswith(f"{STORE}/ns/md/")


def test_a_learning_model_deployment_without_a_store_keeps_the_host_path_as_its_rounds_are_not_uploaded():
    from kiri_operator.api.specs import ModelDeploymentSpec

    s = ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "m",
                "version": "1",
                "source": {"uri": "file:///models/m.onnx", "sha256": "a" * 64},
                "evalDataUri": "file:///data/inputs.npz",
            },
            "edge": {"variants": [{"name": "int8", "method": "int8-dynamic"}]},
            "learning": {
                "trainable": {
                    "factory": "models.net:make",
                    "weightsUri": "file:///m.pt",
                    "weightsSha256": "a" * 64,
                },
                "evalDataUri": "file:///data/held-out.npz",
            },
        }
    )
    server = FakeServer(observed())
    server.step(s, Settings(default_artifacts_uri=STORE))
    jobs = [o.body for (kind, _), o in server.world.children.items() if kind == "Job"]
    assert jobs
    for job in jobs:
        assert "--upload-to" not in str(job)
        volumes = job["spec"]["template"]["spec"]["volumes"]
        (artifacts,) = [v for v in volumes if v["name"] == "artifacts"]
        # The built-in host store, of which the Job mounts only its own compression's directory.
        assert artifacts["hostPath"]["path"].startswith("/var/lib/kiri/artifacts/ns/md/")
