"""`spec.edge.cache.path` leaves the API (issue 17) without stranding stored objects: measured on the real
API server, with the CRD of chart 0.1.0 (which had the field) replaced by today's."""

from __future__ import annotations

import pytest

from .conftest import REPO_ROOT, Cluster, KubectlError

OLD_CRD = REPO_ROOT / "tests" / "e2e" / "fixtures" / "kiri-chart-0.1.0" / "crds" / "modeldeployment.yaml"
NEW_CRD = REPO_ROOT / "crds" / "modeldeployment.yaml"
MD = "modeldeployment.kiri.dev"


def _crd(cluster: Cluster, path: str) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", path)
    cluster.wait_crd_established("modeldeployments.kiri.dev")


def _patch(cluster: Cluster, namespace: str, kind: str, patch: str) -> str:
    return cluster.kubectl("patch", MD, "old", "-n", namespace, "--type", kind, "-p", patch)


def test_an_object_stored_with_a_custom_cache_path_takes_other_edits_and_sheds_the_path(
    cluster: Cluster, namespace: str
) -> None:
    body = {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "old"},
        "spec": {
            "model": {
                "name": "m",
                "version": "1",
                "source": {"uri": "https://models.example/m.onnx", "sha256": "ab" * 32},
            },
            "edge": {"cache": {"path": "/srv/custom", "revisionsKept": 2}},
        },
    }
    try:
        _crd(cluster, str(OLD_CRD))
        cluster.apply(body, namespace=namespace)
        _crd(cluster, str(NEW_CRD))
        # Validation ratcheting: an edit elsewhere is accepted; the unchanged path is not re-judged.
        _patch(cluster, namespace, "merge", '{"spec":{"model":{"version":"2"}}}')
        # An edit of the cache object re-judges it, and so does a new path.
        for patch in (
            '{"spec":{"edge":{"cache":{"revisionsKept":3}}}}',
            '{"spec":{"edge":{"cache":{"path":"/etc"}}}}',
        ):
            with pytest.raises(KubectlError, match=r"edge\.cache\.path is no longer a spec field"):
                _patch(cluster, namespace, "merge", patch)
        _patch(cluster, namespace, "json", '[{"op":"remove","path":"/spec/edge/cache/path"}]')
        stored = cluster.get_json(MD, "old", "-n", namespace)
        assert stored["spec"]["edge"]["cache"] == {"revisionsKept": 2}
        assert stored["spec"]["model"]["version"] == "2"
        # A new object may carry the old default (what 0.1 defaulted); nothing else.
        body["metadata"]["name"] = "fresh"
        body["spec"]["edge"]["cache"]["path"] = "/var/lib/kiri/cache"
        cluster.apply(body, namespace=namespace)
    finally:
        _crd(cluster, str(NEW_CRD))
