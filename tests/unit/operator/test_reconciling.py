"""The apply step against a recording stand-in for `kube`: order, status only on change, refused writes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kiri_operator import diagnosing, reconciling
from kiri_operator.caches import Cache
from kiri_operator.kube import KubeError
from kiri_operator.planning import Settings
from kiri_operator.reconciling import Reconciler, progress_only
from planning_worlds import SHA, fleet

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
        self.namespace_events: list[dict[str, Any]] = []

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

    def events_with_reason(self, namespace: str, kind: str | None, reason: str) -> list[dict[str, Any]]:
        self.calls.append(("events", f"{namespace}/{kind or '*'}", reason))
        return [
            e
            for e in self.namespace_events
            if e["reason"] == reason and kind in (None, e["involvedObject"]["kind"])
        ]

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
    r = Reconciler(kube, cache, Settings(create_compressor_rbac=True))  # type: ignore[arg-type]
    out = r.reconcile(("ns", "md"))
    applied = [kind for verb, kind, _ in kube.calls if verb == "apply"]
    assert applied.index("ServiceAccount") < applied.index("Job")
    assert applied.index("Service") < applied.index("Deployment")
    assert ("status", "ModelDeployment", "md") in kube.calls
    assert out.writes == len(applied) + 1 and out.error is None
    # The second pass sees its own children (CloudReady's message moves from "creating" to "0/1 ready"):
    # a progress-only status change, which waits (test below), and no child write. The third finds nothing.
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
    assert out.error is not None  # the queue brings it back after the key's backoff
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


def _status(**edge: Any) -> dict[str, Any]:
    return {
        "phase": "Progressing",
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "NodesNotReady", "message": "1/5 Ready"},
            {"type": "EdgeProgressing", "status": "True", "reason": "WaitingForReady", "message": "1/5"},
        ],
        "edge": {"targetNodes": 5, "updatedNodes": 5, "readyNodes": 1, "stageIndex": 0, **edge},
        "rollout": {"stage": 0, "readyNodes": 1, "progressAt": "2026-01-01T00:00:00Z", "message": "1/5"},
    }


def test_progress_only_tells_counts_and_messages_from_changes_that_matter():
    old = _status(perVariant=[{"name": "int8", "revision": "r2", "nodes": 5, "ready": 1}])
    new = copy.deepcopy(old)
    new["edge"]["readyNodes"] = 3
    new["edge"]["perVariant"][0]["ready"] = 3
    new["rollout"].update(readyNodes=3, progressAt="2026-01-01T00:00:04Z", message="3/5")
    for c in new["conditions"]:
        c["message"] = "3/5 Ready"
    assert progress_only(old, new)
    baking = copy.deepcopy(new)
    baking["conditions"][1]["reason"] = "Baking"
    assert not progress_only(old, baking)
    next_step = copy.deepcopy(new)
    next_step["rollout"]["stage"] = 1
    assert not progress_only(old, next_step)
    other_revision = copy.deepcopy(new)
    other_revision["edge"]["perVariant"][0]["revision"] = "r3"
    assert not progress_only(old, other_revision)
    assert not progress_only(old, {**new, "phase": "Healthy"})


def test_a_site_adapter_waves_counts_and_messages_are_progress_and_its_step_and_verdict_are_not():
    wave = {"stage": 0, "readyNodes": 0, "progressAt": "2026-01-01T00:00:00Z", "message": "0/3"}
    site = {
        "site": "a",
        "revision": "r1",
        "updatedNodes": 1,
        "verdict": "Progressing",
        "reason": "WaitingForReady",
    }
    old = _status(adapters=[{**site, "message": "0/3 Ready", "rollout": wave}])
    new = copy.deepcopy(old)
    new["edge"]["adapters"][0].update(updatedNodes=2, message="1/3 Ready")
    new["edge"]["adapters"][0]["rollout"].update(
        readyNodes=1, progressAt="2026-01-01T00:00:04Z", message="1/3"
    )
    assert progress_only(old, new)
    next_step = copy.deepcopy(new)
    next_step["edge"]["adapters"][0]["rollout"]["stage"] = 1
    assert not progress_only(old, next_step)
    rolled_back = copy.deepcopy(new)
    rolled_back["edge"]["adapters"][0]["verdict"] = "RolledBack"
    assert not progress_only(old, rolled_back)


def test_a_site_entry_as_the_planner_writes_it_with_its_adapter_names_compares_as_progress() -> None:
    # The names of a site's adapters are a list too: comparing two statuses must not take them for sites
    # (it raised AttributeError on every throttled status write of a site's wave).
    site = {
        "site": "a",
        "adapters": ["clinic", "shop"],
        "default": "shop",
        "updatedNodes": 1,
        "message": "0/3",
    }
    old = _status(adapters=[{**site, "rollout": {"stage": 0, "readyNodes": 0}}])
    new = copy.deepcopy(old)
    new["edge"]["adapters"][0].update(updatedNodes=2, message="1/3")
    new["edge"]["adapters"][0]["rollout"]["readyNodes"] = 1
    assert progress_only(old, new)
    other_set = copy.deepcopy(new)
    other_set["edge"]["adapters"][0]["adapters"] = ["shop"]
    assert not progress_only(old, other_set)


def test_a_progress_only_status_change_waits_for_the_interval_then_is_written(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(reconciling.time, "monotonic", lambda: clock[0])
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache, progress_interval=10.0)  # type: ignore[arg-type]
    r.reconcile(("ns", "md"))
    assert ("status", "ModelDeployment", "md") in kube.calls
    written = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    # The children now exist: CloudReady's message changes, nothing else in the status does.
    kube.calls.clear()
    clock[0] += 3
    out = r.reconcile(("ns", "md"))
    assert not [c for c in kube.calls if c[0] == "status"]
    assert out.status_deferred and not out.status_written
    assert out.requeue_after is not None and out.requeue_after <= 7.0
    assert cache.md(("ns", "md"))["status"] == written  # type: ignore[index]
    clock[0] += 7
    out = r.reconcile(("ns", "md"))
    assert [c for c in kube.calls if c[0] == "status"] == [("status", "ModelDeployment", "md")]
    assert out.status_written
    cloud = next(c for c in cache.md(("ns", "md"))["status"]["conditions"] if c["type"] == "CloudReady")  # type: ignore[index]
    assert cloud["message"] != next(c for c in written["conditions"] if c["type"] == "CloudReady")["message"]


def test_with_no_interval_every_status_change_is_written_at_once():
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache, progress_interval=0.0)  # type: ignore[arg-type]
    r.reconcile(("ns", "md"))
    kube.calls.clear()
    out = r.reconcile(("ns", "md"))
    assert [c for c in kube.calls if c[0] == "status"] == [("status", "ModelDeployment", "md")]
    assert out.status_written and not out.status_deferred


class UnreachableKube(RecordingKube):
    """The API server goes away between the watch event and the reconcile's PVC lookup."""

    def get(self, kind: str, namespace: str, name: str) -> None:
        raise ConnectionRefusedError("connection refused")


PVC_SPEC = {**SPEC, "model": {**SPEC["model"], "source": {"uri": "pvc://models/m.onnx", "sha256": SHA}}}


def test_a_reconcile_that_raises_says_so_in_a_condition_and_one_warning_event():
    kube, cache = UnreachableKube(spec=PVC_SPEC), _cache()
    cache.put_md({**cache.md(("ns", "md")), "spec": PVC_SPEC})  # type: ignore[dict-item]
    r = Reconciler(kube, cache)  # type: ignore[arg-type]
    out = r.reconcile(("ns", "md"))
    assert out.error == "connection refused"
    status = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Degraded"]["status"], by_type["Degraded"]["reason"]) == ("True", "ReconcileFailed")
    assert (by_type["Stalled"]["status"], by_type["Stalled"]["reason"]) == ("True", "ReconcileFailed")
    assert by_type["Stalled"]["message"] == "ConnectionRefusedError: connection refused"
    assert by_type["Reconciling"]["status"] == "False"
    events = [c for c in kube.calls if c[0] == "event"]
    assert events == [("event", "ReconcileFailed", "ConnectionRefusedError: connection refused")]
    # The same failure again writes nothing new and repeats no event.
    kube.calls.clear()
    r.reconcile(("ns", "md"))
    assert kube.calls == []


def test_garbage_patched_into_status_rollout_is_reported_and_rebuilt_not_retried_forever():
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache)  # type: ignore[arg-type]
    r.reconcile(("ns", "md"))
    md = cache.md(("ns", "md"))
    assert md is not None
    cache.put_md(md)  # the watch shows our status write
    md["status"]["rollout"] = {"stage": "banana", "readyNodes": "many"}
    md["metadata"]["resourceVersion"] = "patched-by-hand"
    cache.put_md(md)
    kube.calls.clear()
    out = r.reconcile(("ns", "md"))
    assert out.error is None
    assert ("status", "ModelDeployment", "md") in kube.calls
    stored = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    assert "rollout" not in stored  # nothing rolled out yet: nothing to rebuild
    invalid = [c for c in kube.calls if c[0] == "event" and c[1] == "RolloutStatusInvalid"]
    # The Warning with the cause, and the condition's move (told as every move is).
    assert sorted(m.split(" (")[0] for _, _, m in invalid) == [
        "EdgeProgressing is True: status.rollout is unreadable",
        "status.rollout is unreadable",
    ]
    kube.calls.clear()
    assert r.reconcile(("ns", "md")).error is None
    assert not [c for c in kube.calls if c[0] == "event" and c[1] == "RolloutStatusInvalid"]


class RecordingAnalyst:
    """Stands in for analyzing.Analyst: records who asked for a measurement."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def take(self, key: tuple[str, str], spec: Any, status: Any, now: Any) -> tuple[None, bool]:
        self.asked.append(key)
        return None, False

    def take_sites(
        self, key: tuple[str, str], spec: Any, status: Any, now: Any
    ) -> tuple[dict[str, Any], frozenset[str]]:
        self.asked.append(key)
        return {}, frozenset()


@pytest.mark.parametrize(
    ("address", "asked"),
    [("http://prometheus-operated.monitoring.svc:9090", True), ("http://169.254.169.254/latest", False)],
)
def test_a_prometheus_outside_the_allow_list_is_never_asked_and_the_spec_is_refused(
    address: str, asked: bool
) -> None:
    spec = {
        **SPEC,
        "rollout": {
            "analysis": {
                "prometheus": {"address": address},
                "queries": [{"name": "errors", "query": "up", "successCondition": "result < 1"}],
            }
        },
    }
    kube, cache, analyst = RecordingKube(spec=spec), _cache(), RecordingAnalyst()
    md = cache.md(("ns", "md"))
    assert md is not None
    cache.put_md({**md, "spec": spec, "metadata": {**md["metadata"], "resourceVersion": "2"}})
    Reconciler(kube, cache, analyst=analyst).reconcile(("ns", "md"))  # type: ignore[arg-type]
    assert analyst.asked == ([("ns", "md")] * 2 if asked else [])  # the revision's wave, then the sites'
    status = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["reason"] == "PrometheusNotAllowed") is not asked
    applied = [c for c in kube.calls if c[0] == "apply"]
    assert bool(applied) is asked


def _failed_create(kind: str, name: str) -> dict[str, Any]:
    return {"involvedObject": {"kind": kind, "name": name}, "reason": "FailedCreate", "message": "m"}


def test_a_namespaces_failed_creates_are_listed_once_per_ttl_however_many_children_ask():
    kube = RecordingKube()
    kube.namespace_events = [_failed_create("DaemonSet", "a"), _failed_create("Job", "a")]
    now = [0.0]
    seen = diagnosing.NamespaceEvents(kube, ttl=15.0, monotonic=lambda: now[0])  # type: ignore[arg-type]
    assert seen.about("ns", "FailedCreate", "DaemonSet", {"a"}) == [_failed_create("DaemonSet", "a")]
    assert seen.about("ns", "FailedCreate", "DaemonSet", {"b"}) == []
    now[0] = 14.9
    assert seen.about("ns", "FailedCreate", "Job", {"a", "b"}) == [_failed_create("Job", "a")]
    assert kube.calls == [("events", "ns/*", "FailedCreate")]
    seen.about("other", "FailedCreate", "Job", {"a"})  # each namespace its own LIST
    seen.about("ns", "Unhealthy", "Pod", {"a"})  # and each reason
    now[0] = 15.0
    kube.namespace_events = []
    assert seen.about("ns", "FailedCreate", "DaemonSet", {"a"}) == []
    assert kube.calls == [
        ("events", "ns/*", "FailedCreate"),
        ("events", "other/*", "FailedCreate"),
        ("events", "ns/*", "Unhealthy"),
        ("events", "ns/*", "FailedCreate"),
    ]


def test_only_what_lingers_past_the_grace_is_reported_and_what_recovers_starts_its_grace_again():
    now = [100.0]
    lingering = diagnosing.Lingering(grace=10.0, monotonic=lambda: now[0])
    a, b = ("DaemonSet", "a"), ("DaemonSet", "b")
    assert lingering.lingering(("ns", "md"), [a]) == set()
    now[0] = 105.0
    assert lingering.lingering(("ns", "md"), [a, b]) == set()
    now[0] = 110.0
    assert lingering.lingering(("ns", "md"), [a, b]) == {a}
    assert lingering.lingering(("ns", "other"), [a]) == set()  # each ModelDeployment its own
    now[0] = 111.0
    assert lingering.lingering(("ns", "md"), [b]) == set()  # a recovered: forgotten
    now[0] = 115.0
    assert lingering.lingering(("ns", "md"), [a, b]) == {b}  # b since 105; a again since 115
    now[0] = 125.0
    assert lingering.lingering(("ns", "md"), [a, b]) == {a, b}
    lingering.forget(("ns", "md"))
    assert lingering.lingering(("ns", "md"), [a, b]) == set()


def _serving_pod(name: str, component: str, not_ready_since: str, ready: bool = False) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kiri.dev/modeldeployment": "md", "app.kubernetes.io/component": component},
        },
        "spec": {"nodeName": "cloud-0"},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": str(ready), "lastTransitionTime": not_ready_since},
            ],
            "containerStatuses": [{"name": "kiri-serve", "ready": ready, "state": {"running": {}}}],
        },
    }


def _probe_event(pod: str, message: str, last: str) -> dict[str, Any]:
    return {
        "involvedObject": {"kind": "Pod", "name": pod, "fieldPath": "spec.containers{kiri-serve}"},
        "reason": "Unhealthy",
        "type": "Warning",
        "message": message,
        "lastTimestamp": last,
    }


def _cloud_ready(cache: Cache) -> dict[str, Any]:
    status = cache.md(("ns", "md"))["status"]  # type: ignore[index]
    return next(c for c in status["conditions"] if c["type"] == "CloudReady")


def test_cloud_ready_quotes_the_readiness_probe_output_from_the_kubelets_event(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(reconciling.time, "monotonic", lambda: clock[0])
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache, progress_interval=0.0)  # type: ignore[arg-type]
    r.reconcile(("ns", "md"))
    cache.put_pod(_serving_pod("md-cloud-1", "cloud", "2026-12-06T10:00:00Z"))
    said = "model m not loaded (attempt 3): HTTP 401: no credentials were sent"
    kube.namespace_events = [
        # From before this not-ready spell (older than its transition less the probe's window): not quoted.
        _probe_event("md-cloud-1", "Readiness probe failed: cache full", "2026-12-06T09:58:00Z"),
        _probe_event("md-cloud-1", f"Readiness probe failed: {said}\n", "2026-12-06T10:00:20Z"),
        _probe_event("md-cloud-1", "Liveness probe failed: HTTP probe failed", "2026-12-06T10:00:30Z"),
        _probe_event("other-pod", "Readiness probe failed: not this pod's", "2026-12-06T10:00:40Z"),
    ]
    kube.calls.clear()
    r.reconcile(("ns", "md"))
    # Not ready for less than EVENT_GRACE_SECONDS as far as this operator has seen: no Events read yet.
    assert ("events", "ns/*", "Unhealthy") not in kube.calls
    assert _cloud_ready(cache)["message"] == "0/1 replicas ready"
    clock[0] += diagnosing.EVENT_GRACE_SECONDS
    r.reconcile(("ns", "md"))
    assert kube.calls.count(("events", "ns/*", "Unhealthy")) == 1
    cond = _cloud_ready(cache)
    assert (cond["status"], cond["reason"]) == ("False", "DeploymentProgressing")
    assert cond["message"] == f"0/1 replicas ready; 1 pods not ready: readiness probe: {said}"

    # Within EVENT_LIST_SECONDS the last answer stands (no second LIST); after it, the Events are read again.
    kube.namespace_events.append(
        _probe_event("md-cloud-1", "Readiness probe failed: disk full", "2026-12-06T10:01:00Z")
    )
    kube.calls.clear()
    clock[0] += 5
    r.reconcile(("ns", "md"))
    assert ("events", "ns/*", "Unhealthy") not in kube.calls
    assert _cloud_ready(cache)["message"].endswith(f"readiness probe: {said}")
    clock[0] += diagnosing.EVENT_LIST_SECONDS
    r.reconcile(("ns", "md"))
    assert kube.calls.count(("events", "ns/*", "Unhealthy")) == 1
    assert (
        _cloud_ready(cache)["message"] == "0/1 replicas ready; 1 pods not ready: readiness probe: disk full"
    )


def test_probe_events_are_not_read_while_every_serving_pod_is_ready_or_says_why_itself(monkeypatch):
    kube, cache = RecordingKube(), _cache()
    r = Reconciler(kube, cache, progress_interval=0.0)  # type: ignore[arg-type]
    r.reconcile(("ns", "md"))
    cache.put_pod(_serving_pod("md-cloud-1", "cloud", "2026-12-06T10:00:00Z", ready=True))
    crashing = _serving_pod("md-cloud-2", "cloud", "2026-12-06T10:00:00Z")
    crashing["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
    cache.put_pod(crashing)
    kube.namespace_events = [_probe_event("md-cloud-2", "Readiness probe failed: x", "2026-12-06T10:00:20Z")]
    kube.calls.clear()
    r.reconcile(("ns", "md"))
    assert ("events", "ns/*", "Unhealthy") not in kube.calls
    # The crash loop is on the pod object itself: no Event is needed, and none is quoted.
    assert (
        _cloud_ready(cache)["message"] == "0/1 replicas ready; 1 pods not ready: kiri-serve: CrashLoopBackOff"
    )


class SecretKube(RecordingKube):
    def __init__(self, exists: bool = False) -> None:
        super().__init__()
        self.exists = exists
        self.created: list[dict[str, Any]] = []

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))
        if self.exists:
            raise KubeError(409, "create", obj["kind"], "already exists")
        self.created.append(obj)
        return obj


def test_the_tls_secret_is_created_once_with_a_ca_and_a_certificate_for_the_superlink(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("cryptography")
    import base64

    from cryptography import x509

    from kiri_operator.planning import building as B
    from kiri_operator.planning import federation as F
    from kiri_operator.plans import Plan

    kube = SecretKube()
    r = Reconciler(kube, _cache(), Settings())  # type: ignore[arg-type]
    plan = Plan(secrets=[F.tls_request(B.Owner("md", "ns", "uid-1"))])
    with caplog.at_level("DEBUG"):
        first = r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
        r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "Secret", "md-flower-tls")]
    assert first.writes - first.status_written == 1 and first.error is None
    body = kube.created[0]
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    data = {k: base64.b64decode(v) for k, v in body["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(data["ca.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "md-superlink.ns.svc" in sans.get_values_for_type(x509.DNSName)
    key = data["tls.key"].decode()
    assert key.split("\n")[1] not in caplog.text and body["data"]["tls.key"] not in caplog.text
    assert ("event", "Created", "created Secret md-flower-tls") in kube.calls


def test_a_sites_supernode_key_secret_is_created_once_with_a_p384_pair_flower_accepts_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("cryptography")
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from kiri_operator.planning import building as B
    from kiri_operator.planning import federation as F
    from kiri_operator.plans import Plan
    from kiri_runtime.learning import node_keys

    kube = SecretKube()
    r = Reconciler(kube, _cache(), Settings())  # type: ignore[arg-type]
    owner = B.Owner("md", "ns", "uid-1")
    plan = Plan(secrets=[F.node_key_request(owner, "site-a"), F.node_key_request(owner, "site-b")])
    with caplog.at_level("DEBUG"):
        first = r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
        r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
    names = [F.node_key_secret_name("md", "site-a"), F.node_key_secret_name("md", "site-b")]
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "Secret", n) for n in names]
    assert first.error is None
    publics = []
    for body in kube.created:
        assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert body["metadata"]["labels"]["kiri.dev/learning-role"] == "supernode"
        data = {k: base64.b64decode(v) for k, v in body["data"].items()}
        assert set(data) == {"supernode.key", "supernode.pub"}
        # What flower-supernode --auth-supernode-private-key loads, and the public key of that same key.
        private = serialization.load_ssh_private_key(data["supernode.key"], None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert node_keys.registration_bytes(data["supernode.pub"]) == public
        publics.append(public)
        key_line = data["supernode.key"].decode().split("\n")[1]
        assert key_line not in caplog.text and body["data"]["supernode.key"] not in caplog.text
    assert publics[0] != publics[1]  # one pair per site


def test_a_tls_secret_that_exists_already_is_left_alone_and_not_recreated() -> None:
    pytest.importorskip("cryptography")
    from kiri_operator.planning import building as B
    from kiri_operator.planning import federation as F
    from kiri_operator.plans import Plan

    kube = SecretKube(exists=True)
    r = Reconciler(kube, _cache(), Settings())  # type: ignore[arg-type]
    plan = Plan(secrets=[F.tls_request(B.Owner("md", "ns", "uid-1"))])
    out = r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
    r._apply(("ns", "md"), {"metadata": {"name": "md"}}, {}, plan)
    assert out.error is None and out.writes - out.status_written == 0
    assert [c[0] for c in kube.calls].count("create") == 1  # the 409 is remembered: no create per reconcile
