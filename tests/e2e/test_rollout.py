"""Progressive delivery on the real control plane: staged waves, automatic rollback, offline nodes, manual
control through annotations and the `kiri` CLI, and an operator killed mid-wave.

Every test deploys revision 1 (the first rollout goes everywhere at once: nothing to protect yet), then
changes `spec.edge.podLabels` to make revision 2. The label `kiri.dev/sim=never-ready` makes kwok keep the
new revision's pods un-Ready, as a broken build would. The operator runs as a process per test.

The variants come from the real compressor, run once per module; other namespaces get a copy of that
output and publish it with the Job's own `kiri publish-manifest` step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gitops_health import argocd_health, kstatus, kstatus_binary, record

from .conftest import Cluster
from .operator_harness import (
    KIRI,
    Operator,
    build_model,
    children,
    condition,
    crd,
    get_md,
    model_deployment,
    operator_fixture,
    run_compression_job,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

NAME = "waves"
VARIANTS = [
    {
        "name": "int8",
        "method": "int8-dynamic",
        "gate": [{"metric": "cosine", "stat": "mean", "op": ">=", "threshold": 0.99}],
    }
]
NEVER_READY = {"kiri.dev/sim": "never-ready"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model, the artifact store, and (once built) the compressor's output directory to copy."""
    root = tmp_path_factory.mktemp("rollout")
    model, sha = build_model(root)
    return {
        "model": model,
        "sha": sha,
        "store": root / "store",
        "built": None,
        "kstatus": kstatus_binary(),
    }


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


@pytest.fixture(scope="module")
def plugin_env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """cluster.env with `kubectl-kiri` on the PATH (what the `kubectl-kiri` entry point installs), so the
    tests run `kubectl kiri ...` through kubectl's own plugin lookup."""
    bin_dir = tmp_path_factory.mktemp("plugin")
    shim = bin_dir / "kubectl-kiri"
    shim.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        "'import sys; from kiri_operator.cli import kubectl_main; sys.exit(kubectl_main())' \"$@\"\n"
    )
    shim.chmod(0o755)
    env = dict(cluster.env)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def kubectl_kiri(env: dict[str, str], *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", "kiri", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def three_steps() -> dict[str, Any]:
    """The rollout the mid-wave fault tests interrupt: one node, half, all; short bakes."""
    return {
        "stages": [
            {"nodes": 1, "bakeSeconds": 3},
            {"percent": 50, "bakeSeconds": 3},
            {"percent": 100, "bakeSeconds": 2},
        ],
        "maxUnavailable": "100%",
    }


class Rollout:
    """One ModelDeployment under test, with helpers to change it and to read where its nodes are."""

    def __init__(
        self, cluster: Cluster, namespace: str, store: dict[str, Any], rollout: dict[str, Any]
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.store = store
        self.body = model_deployment(
            NAME, namespace, store["model"], store["sha"], store["store"], VARIANTS, rollout=rollout
        )
        self.body["spec"]["cloud"] = {"replicas": 0}
        # This namespace's compressor output directory, once `deploy_first` has filled it. Not the module
        # store's "built", which is the first namespace's (another test's, or this test's failed first run).
        self.built: Path | None = None

    # -- changes ----------------------------------------------------------------------------------------
    def apply(self) -> None:
        self.cluster.apply(self.body)

    def set(self, pod_labels: dict[str, str] | None = None, **rollout: Any) -> None:
        if pod_labels is not None:
            self.body["spec"]["edge"]["podLabels"] = pod_labels
        self.body["spec"]["rollout"].update(rollout)
        self.apply()

    def kiri(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KIRI, *args, NAME, "-n", self.namespace],
            env=self.cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # -- reads ------------------------------------------------------------------------------------------
    def md(self) -> dict[str, Any]:
        return get_md(self.cluster, self.namespace, NAME)

    def status(self) -> dict[str, Any]:
        return dict(self.md().get("status") or {})

    def health(self, name: str, flux: str, argocd: str) -> dict[str, Any]:
        """What Flux (kstatus) and Argo CD (deploy/argocd's Lua) read from the object as it is now; the
        object is recorded as testdata NAME when KIRI_RECORD_HEALTH_TESTDATA is set."""
        md = self.md()
        record(md, name)
        seen = {"kstatus": kstatus(md, self.store["kstatus"]), "argocd": argocd_health(md)}
        got = (seen["kstatus"]["status"], seen["argocd"]["status"])
        assert got == (flux, argocd), (name, seen, md.get("status", {}).get("conditions"))
        return seen

    def placement(self) -> dict[str, str]:
        """node -> revision, from the DaemonSets' node affinity (what the operator decided)."""
        out: dict[str, str] = {}
        for ds in children(self.cluster, self.namespace, NAME, "daemonsets"):
            revision = ds["metadata"]["labels"]["kiri.dev/revision"]
            terms = ds["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            for term in terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]:
                for field in term.get("matchFields") or []:
                    for node in field.get("values") or []:
                        if node.startswith("kiri-"):
                            out[node] = revision
        return out

    def events(self, reason: str) -> list[dict[str, Any]]:
        items = self.cluster.get_json(
            "events",
            "-n",
            self.namespace,
            "--field-selector",
            f"involvedObject.kind=ModelDeployment,reason={reason}",
        )["items"]
        return list(items)

    def wait(
        self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 60, what: str = ""
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> Any:
            nonlocal last
            last = self.status()
            return last if predicate(last) else None

        try:
            return dict(self.cluster.wait_for(check, timeout=timeout, interval=0.3, message=what))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last status: {last}") from None

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    def deploy_first(self) -> str:
        """Revision 1 everywhere; returns it."""
        self.apply()
        jobs = self.cluster.wait_for(
            lambda: children(self.cluster, self.namespace, NAME, "jobs"),
            timeout=30,
            message="compression Job",
        )
        job = jobs[0]
        pod = job["spec"]["template"]["spec"]
        out_dir = Path(_arg(pod["initContainers"][0]["args"], "--out"))
        if self.store["built"] is None:
            run_compression_job(self.cluster, self.namespace, job["metadata"]["name"])
            self.store["built"] = out_dir
        else:
            # The compressor's real output from the first namespace, published by the Job's own last step.
            shutil.copytree(self.store["built"], out_dir, dirs_exist_ok=True)
            publish = pod["containers"][0]["args"]
            result = subprocess.run(
                [*KIRI, *publish],
                env=self.cluster.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stderr
        self.built = out_dir
        status = self.wait(lambda s: s.get("phase") == "Healthy", timeout=120, what="revision 1 everywhere")
        revision = str(status["currentRevision"])
        assert set(self.placement().values()) == {revision}
        return revision


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def edge_nodes(cluster: Cluster) -> list[str]:
    return cluster.edge_nodes()


# --- waves --------------------------------------------------------------------------------------------


def test_waves_walk_site_by_site_with_status_and_cli(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {
            "stages": [{"nodes": 1, "bakeSeconds": 1}, {"percent": 100, "bakeSeconds": 1}],
            "groupBy": "kiri.dev/site",
            "maxUnavailable": "100%",
        },
    )
    rev1 = r.deploy_first()
    nodes = edge_nodes(cluster)
    site = {n: n.rsplit("-", 1)[0].removeprefix("kiri-edge-") for n in nodes}
    r.set(pod_labels={"build": "2"})
    r.wait(lambda s: s.get("updateRevision") not in (None, rev1), what="revision 2")
    seen_stages: list[str] = []
    order: list[str] = []  # sites in the order their first node reached revision 2
    rev2 = ""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        status = r.status()
        rev2 = status.get("updateRevision", "")
        stage = (status.get("edge") or {}).get("stage")
        if stage and (not seen_stages or seen_stages[-1] != stage):
            seen_stages.append(stage)
        placement = r.placement()
        touched = sorted({site[n] for n, v in placement.items() if v == rev2 and rev2 != rev1})
        full = {s for s in touched if all(placement.get(n) == rev2 for n in nodes if site[n] == s)}
        # Site by site: at any moment every touched site but the last is complete.
        assert set(touched[:-1]) <= full, (touched, full)
        order += [s for s in touched if s not in order]
        if status.get("phase") == "Healthy" and status.get("currentRevision") == rev2:
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"rollout did not complete: {r.status()}")
    final = r.placement()
    assert set(final.values()) == {rev2}, (rev1, rev2, final, [e["message"] for e in r.events("ApplyFailed")])
    assert order == ["site-a", "site-b", "site-c"], order
    # Status named the steps as it went, in order. Polling on a loaded machine can miss a 1 s bake, so the
    # sampled stages need only be an ordered subsequence; the events carry every step.
    expected = [f"site-{x} {i}/6" for i, x in zip(range(1, 7), "aabbcc", strict=True)]
    sampled = [s.split(" (")[0] for s in seen_stages if s.startswith("site-")]
    assert sampled and all(x in expected for x in sampled), seen_stages
    assert [expected.index(x) for x in sampled] == sorted({expected.index(x) for x in sampled}), seen_stages
    steps = sorted(e["message"] for e in r.events("StepStarted") if "of group" in e["message"])
    assert [m.split(" (")[0] for m in steps] == [
        f"step {i}/6 of group site-{x}" for i, x in zip(range(1, 7), "aabbcc", strict=True)
    ], steps
    history = r.status()["history"]
    assert [h["outcome"] for h in history[-2:]] == ["Promoted", "Promoted"]

    get = subprocess.run(
        [*KIRI, "get", "-n", namespace], env=cluster.env, capture_output=True, text=True, check=True
    )
    assert NAME in get.stdout and "Healthy" in get.stdout
    out = r.kiri("status")
    assert out.returncode == 0, out.stderr
    assert "✔ Healthy" in out.stdout and f"⟳ {rev2} (update, stable)" in out.stdout


# --- automatic rollback -------------------------------------------------------------------------------


def test_a_never_ready_canary_rolls_back_and_the_same_spec_is_not_rolled_out_again(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any], plugin_env: dict[str, str]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {"stages": [{"nodes": 1, "bakeSeconds": 1}, {"percent": 100}], "progressDeadlineSeconds": 6},
    )
    rev1 = r.deploy_first()
    r.health("healthy", "Current", "Healthy")
    r.set(pod_labels=NEVER_READY)
    # What a pipeline runs after `kubectl apply`: it blocks through the waves and fails on the rollback.
    waiting = subprocess.Popen(
        ["kubectl", "kiri", "wait", NAME, "-n", namespace, "--for=healthy", "--timeout=2m"],
        env=plugin_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status = r.wait(lambda s: s.get("updateRevision") not in (None, rev1), what="revision 2")
    rev2 = status["updateRevision"]
    canary = cluster.wait_for(
        lambda: [n for n, v in r.placement().items() if v == rev2], timeout=30, message="canary moved"
    )
    assert len(canary) == 1
    started = time.monotonic()
    if r.status().get("phase") == "Progressing":  # the 6 s deadline may already have passed on a slow run
        seen = r.health("progressing-waiting-for-ready", "InProgress", "Progressing")
        assert seen["kstatus"]["message"].startswith("step 1/2: "), seen
    status = r.wait_phase("RolledBack", timeout=60)
    latency = time.monotonic() - started
    rolled = condition({"status": status}, "RolledBack")
    assert (rolled["status"], rolled["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert latency < 6 + 10
    assert status["currentRevision"] == rev1
    assert status["history"][-1]["outcome"] == "RolledBack" and status["history"][-1]["revision"] == rev2
    assert r.events("RolledBack")
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1, err
    assert f"will not be healthy: rolled back to {rev1}" in err
    out = kubectl_kiri(plugin_env, "wait", NAME, "-n", namespace, "--for=rolledback", "--timeout=30s")
    assert out.returncode == 0, out.stderr
    seen = r.health("rolled-back", "Failed", "Degraded")
    assert seen["argocd"]["message"].startswith(f"Rolled back to {rev1}: ProgressDeadlineExceeded"), seen
    assert set(r.placement().values()) == {rev1}
    cluster.wait_for(
        lambda: (
            not [
                p
                for p in children(cluster, namespace, NAME, "pods")
                if p["metadata"]["labels"].get("kiri.dev/revision") == rev2
            ]
        ),
        timeout=60,
        message="revision 2 pods gone",
    )

    # GitOps re-applies the same spec (and touches the object): no node moves to revision 2 again.
    r.apply()
    cluster.kubectl("annotate", "mdep", NAME, "-n", namespace, "sync=again", "--overwrite")
    for _ in range(12):
        assert rev2 not in r.placement().values()
        assert r.status()["phase"] == "RolledBack"
        time.sleep(0.5)
    r.health("rolled-back-same-spec-reapplied", "Failed", "Degraded")

    # A changed spec rolls out again, and completes.
    r.set(pod_labels={"build": "3"})
    out = kubectl_kiri(plugin_env, "wait", NAME, "-n", namespace, "--for=healthy", "--timeout=90s")
    assert out.returncode == 0, out.stderr
    status = r.wait(
        lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") not in (rev1, rev2),
        timeout=90,
        what="revision 3",
    )
    assert condition({"status": status}, "RolledBack")["status"] == "False"
    assert set(r.placement().values()) == {status["currentRevision"]}
    r.health("healthy-after-rolling-forward", "Current", "Healthy")


# --- offline nodes ------------------------------------------------------------------------------------


def test_offline_nodes_skip_wait_and_fail(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {"stages": [{"nodes": 2}, {"percent": 100}], "maxUnavailable": "100%", "offlineNodes": "Skip"},
    )
    rev1 = r.deploy_first()
    nodes = edge_nodes(cluster)
    offline = nodes[0]  # first in walk order: in the canary wave
    try:
        # Skip: the wave goes on without it; it catches up with the promoted revision when back.
        cluster.set_node_ready(offline, False)
        r.set(pod_labels={"build": "2"})
        status = r.wait(
            lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") != rev1,
            timeout=90,
            what="skip",
        )
        rev2 = status["currentRevision"]
        assert status["edge"]["deferredNodes"] == 1
        # Its slot already says revision 2; its pod waits for the node and is Ready once it is back.
        assert r.placement()[offline] == rev2
        assert not ready_pod(cluster, namespace, offline, rev2)
        cluster.set_node_ready(offline, True)
        cluster.wait_back(offline, lambda: ready_pod(cluster, namespace, offline, rev2), message="caught up")

        # Wait: the wave holds while a node of it is offline, and goes on when it is back.
        cluster.set_node_ready(offline, False)
        r.set(pod_labels={"build": "3"}, offlineNodes="Wait")
        status = r.wait(
            lambda s: condition({"status": s}, "EdgeProgressing").get("reason") == "WaitingForOfflineNodes",
            what="holding for the offline node",
        )
        rev3 = status["updateRevision"]
        time.sleep(2)
        assert rev3 not in {r.placement().get(offline)}
        assert r.status()["phase"] == "Progressing"
        cluster.set_node_ready(offline, True)
        status = r.wait(
            lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == rev3,
            timeout=90,
            what="wait resumes",
        )
        assert set(r.placement().values()) == {rev3}

        # Fail: an offline node in the wave rolls the rollout back.
        cluster.set_node_ready(offline, False)
        r.set(pod_labels={"build": "4"}, offlineNodes="Fail")
        status = r.wait_phase("RolledBack", timeout=60)
        assert condition({"status": status}, "RolledBack")["reason"] == "NodeOffline"
        assert set(r.placement().values()) == {rev3}
        # Back online, the node converges to the promoted revision, never to the rolled-back one.
        cluster.set_node_ready(offline, True)
        time.sleep(2)
        assert r.placement()[offline] == rev3
    finally:
        cluster.set_node_ready(offline, True)


# --- manual control -----------------------------------------------------------------------------------


def test_pause_promote_and_abort_through_the_cli(
    cluster: Cluster, namespace: str, operator: Operator, store: dict[str, Any], plugin_env: dict[str, str]
) -> None:
    r = Rollout(
        cluster,
        namespace,
        store,
        {"stages": [{"nodes": 1, "bakeSeconds": 3600}, {"percent": 100}], "maxUnavailable": "100%"},
    )
    rev1 = r.deploy_first()
    assert r.kiri("promote").returncode == 1  # nothing in progress: says so, changes nothing

    # paused in the spec: nothing moves.
    r.set(pod_labels={"build": "2"}, paused=True)
    status = r.wait_phase("Paused")
    r.health("paused", "InProgress", "Suspended")
    out = kubectl_kiri(plugin_env, "wait", NAME, "-n", namespace, "--timeout=2s")
    assert out.returncode == 2 and "timed out after 2s" in out.stderr, out
    shown = kubectl_kiri(plugin_env, "status", NAME, "-n", namespace, "-o", "json")
    assert json.loads(shown.stdout)["status"]["phase"] == "Paused", shown.stderr
    time.sleep(1.5)
    assert set(r.placement().values()) == {rev1}
    r.set(paused=False)
    status = r.wait(lambda s: (s.get("edge") or {}).get("updatedNodes") == 1, what="canary moved")
    r.wait(lambda s: condition({"status": s}, "EdgeProgressing").get("reason") == "Baking", what="baking")
    rev2 = status["updateRevision"]
    r.health("progressing-baking", "InProgress", "Progressing")

    # promote skips the hour-long bake.
    out = r.kiri("promote")
    assert out.returncode == 0, out.stderr
    status = r.wait(
        lambda s: s.get("phase") == "Healthy" and s.get("currentRevision") == rev2,
        timeout=60,
        what="promoted",
    )
    assert r.events("Promoted")
    assert md_annotation(r, "kiri.dev/promote")

    # abort rolls back now.
    r.set(pod_labels={"build": "3"})
    r.wait(lambda s: condition({"status": s}, "EdgeProgressing").get("reason") == "Baking", what="baking")
    shown = r.kiri("status")
    assert "Baking" in shown.stdout and "1/2" in shown.stdout
    out = r.kiri("abort")
    assert out.returncode == 0, out.stderr
    status = r.wait_phase("RolledBack", timeout=30)
    assert condition({"status": status}, "RolledBack")["reason"] == "Aborted"
    r.health("rolled-back-aborted", "Failed", "Degraded")
    assert set(r.placement().values()) == {rev2}
    # The spec was never touched: GitOps still owns it.
    assert r.md()["spec"]["edge"]["podLabels"] == {"build": "3"}

    # rollback, with nothing in progress: back to the stable revision before this one, at once.
    out = r.kiri("rollback")
    assert out.returncode == 0, out.stderr
    status = r.wait(
        lambda s: condition({"status": s}, "RolledBack").get("reason") == "ManualRollback", what="rollback"
    )
    assert status["currentRevision"] == rev1
    cluster.wait_for(
        lambda: set(r.placement().values()) == {rev1}, timeout=30, message="every node on revision 1"
    )


def ready_pod(cluster: Cluster, namespace: str, node: str, revision: str) -> bool:
    for pod in children(cluster, namespace, NAME, "pods"):
        if (
            pod["spec"].get("nodeName") == node
            and pod["metadata"]["labels"].get("kiri.dev/revision") == revision
        ):
            conds = pod.get("status", {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                return True
    return False


def md_annotation(r: Rollout, key: str) -> str | None:
    return (r.md()["metadata"].get("annotations") or {}).get(key)


# --- operator restart ---------------------------------------------------------------------------------


def test_operator_killed_mid_wave_resumes_without_repeating_or_skipping(
    cluster: Cluster, namespace: str, store: dict[str, Any]
) -> None:
    op = Operator(cluster, namespace).start()
    try:
        r = Rollout(
            cluster,
            namespace,
            store,
            three_steps(),
        )
        r.deploy_first()
        r.set(pod_labels={"build": "2"})
        stages: list[str] = []

        def record(s: dict[str, Any]) -> bool:
            stage = str((s.get("edge") or {}).get("stage") or "")
            if "/" in stage and stage not in stages:
                stages.append(stage)
            return stage.startswith("2/3")

        r.wait(record, what="second wave")
        op.kill()
        frozen = r.status()
        assert frozen["edge"]["stage"].startswith("2/3")
        moved = {n for n, v in r.placement().items() if v == frozen["updateRevision"]}
        time.sleep(3)
        # A short resync bounds how long a pod watch that starts quiet after the restart can hold the wave.
        op = Operator(cluster, namespace, "--resync-seconds", "15").start()
        status = r.wait(
            lambda s: (
                (record(s) or True)
                and s.get("phase") == "Healthy"
                and s.get("currentRevision") == frozen["updateRevision"]
            ),
            timeout=90,
            what="resumed rollout completes",
        )
        # The steps went 1, 2, 3 across both processes: none repeated, none skipped.
        assert [s.split(" ")[0] for s in stages] == ["1/3", "2/3", "3/3"], stages
        # No step started twice. (An event due just before the kill may be missing: events are best effort.)
        steps = [e["message"] for e in r.events("StepStarted")]
        assert len(steps) == len(set(steps)), steps
        assert moved <= {n for n, v in r.placement().items() if v == status["currentRevision"]}
    finally:
        op.stop()


# --- control-plane restarts ---------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["apiserver", "etcd"])
def test_a_control_plane_restart_mid_wave_loses_and_doubles_no_step(
    cluster: Cluster, namespace: str, store: dict[str, Any], component: str
) -> None:
    op = Operator(cluster, namespace, "--resync-seconds", "15").start()
    try:
        r = Rollout(
            cluster,
            namespace,
            store,
            three_steps(),
        )
        first = r.deploy_first()
        r.set(pod_labels={"build": "2"})
        stages: list[str] = []

        def record(s: dict[str, Any]) -> bool:
            stage = str((s.get("edge") or {}).get("stage") or "")
            if "/" in stage and stage not in stages:
                stages.append(stage)
            return stage.startswith("2/3")

        r.wait(record, what="second wave")
        subprocess.run([sys.executable, "hack/cluster.py", "restart", component], check=True, timeout=120)
        status = r.wait(
            lambda s: (
                (record(s) or True) and s.get("phase") == "Healthy" and s.get("currentRevision") != first
            ),
            timeout=120,
            what=f"rollout completes after the {component} restart",
        )
        steps = [e["message"] for e in r.events("StepStarted")]
        assert len(steps) == len(set(steps)), steps
        # Every step happened, in order: seen in the status by polling, or told by its StepStarted Event. A
        # poll (a kubectl call, seconds on a loaded machine) can miss the last step's few seconds of status.
        polled = [s.split(" ")[0] for s in stages]
        assert polled == sorted(polled), stages
        told = {m.split(" ")[1] for m in steps if f"on revision {status['currentRevision']}," in m}
        assert sorted(set(polled) | told) == ["1/3", "2/3", "3/3"], (stages, steps)
        promoted = [h for h in status.get("history") or [] if h.get("revision") == status["currentRevision"]]
        assert [h["outcome"] for h in promoted] == ["Promoted"]
        assert op.proc is not None and op.proc.poll() is None  # the operator rode it out
    finally:
        op.stop()
