"""The apply step against a recording stand-in for `kube`: order, status only on change, refused writes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from operator_worlds import SHA, fleet

from kiri_operator.caches import Cache
from kiri_operator.kube import KubeError
from kiri_operator.reconciling import Reconciler

pytestmark = pytest.mark.timeout(20)

SPEC = {
    "model": {"name": "m", "version": "1", "source": {"uri": "https://x/m.onnx", "sha256": SHA}},
    "edge": {"variants": [{"name": "int8", "method": "int8-dynamic"}]},
}


class RecordingKube:
    def __init__(self, refuse: str | None = None, spec: dict[str, Any] | None = None) -> None:
        self.spec = spec or SPEC
        self.calls: list[tuple[str, str, str]] = []
        self.refuse = refuse
        self.resource_version = 100

    def _rv(self, body: dict[str, Any]) -> dict[str, Any]:
        self.resource_version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.resource_version)
        return body

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))
        if obj["kind"] == self.refuse:
            raise KubeError(422, "apply", obj["kind"], "refused for the test")
        return self._rv(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", kind, name))

    def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", "ModelDeployment", name))
        # The API server answers with the whole object; the spec is the one stored.
        body = {
            "metadata": {"name": name, "namespace": namespace, "uid": "u", "generation": 1},
            "spec": self.spec,
            "status": status,
        }
        return self._rv(body)

    def event(self, md: Any, event: Any) -> None:
        self.calls.append(("event", event.reason, event.message))

    def get(self, kind: str, namespace: str, name: str) -> None:
        return None


def _cache() -> Cache:
    cache = Cache()
    cache.put_md(
        {
            "metadata": {
                "name": "md",
                "namespace": "ns",
                "uid": "u",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": SPEC,
        }
    )
    for node in fleet():
        cache.put_node(
            {
                "metadata": {"name": node.name, "labels": dict(node.labels)},
                "status": {
                    "allocatable": dict(node.allocatable),
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    return cache


def test_apply_order_then_quiet_second_reconcile():
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache)  # type: ignore[arg-type]
    out = r.reconcile(("ns", "md"))
    applied = [kind for verb, kind, _ in kube.calls if verb == "apply"]
    assert applied.index("ServiceAccount") < applied.index("Job")
    assert applied.index("Service") < applied.index("Deployment")
    assert ("status", "ModelDeployment", "md") in kube.calls
    assert out.writes == len(applied) + 1 and out.error is None
    # The second pass sees its own children (CloudReady's message moves from "creating" to "0/1 ready"):
    # a status write, no child write. The third finds nothing to do.
    kube.calls.clear()
    r.reconcile(("ns", "md"))
    assert [c for c in kube.calls if c[0] in ("apply", "delete")] == []
    kube.calls.clear()
    out = r.reconcile(("ns", "md"))
    assert kube.calls == [] and out.writes == 0


def test_a_refused_write_does_not_stop_the_others_and_is_reported_once():
    kube, cache = RecordingKube(refuse="Deployment"), _cache()
    r = Reconciler(kube, cache)  # type: ignore[arg-type]
    out = r.reconcile(("ns", "md"))
    assert out.error is not None and out.requeue_after == 5.0
    assert (
        "apply",
        "Job",
        "md-compress-" + next(n for v, k, n in kube.calls if k == "Job")[len("md-compress-") :],
    ) in kube.calls
    failures = [c for c in kube.calls if c[0] == "event" and c[1] == "ApplyFailed"]
    assert len(failures) == 1 and "refused for the test" in failures[0][2]
    kube.calls.clear()
    r.reconcile(("ns", "md"))
    assert ("apply", "Deployment", "md-cloud") in kube.calls  # retried
    assert not [c for c in kube.calls if c[0] == "event" and c[1] == "ApplyFailed"]  # not repeated


def test_an_invalid_stored_spec_gets_a_condition_and_touches_no_child():
    kube, cache = RecordingKube(spec={"model": {"name": "m"}}), _cache()
    cache.put_md(
        {
            "metadata": {
                "name": "md",
                "namespace": "ns",
                "uid": "u",
                "generation": 2,
                "resourceVersion": "5",
            },
            "spec": {"model": {"name": "m"}},
        }
    )
    Reconciler(kube, cache).reconcile(("ns", "md"))  # type: ignore[arg-type]
    assert [c[0] for c in kube.calls if c[0] in ("apply", "delete")] == []
    status = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (
        ready["reason"] == "InvalidSpec" and "spec.model" in ready["message"] and status["phase"] == "Failed"
    )
