"""Scale: one operator, 50 ModelDeployments sharing 1,000 simulated edge nodes, 4 baked waves each.

Run: `.venv/bin/python bench/scale/bench_scale.py [--quick]` (about 14 minutes; `--quick`: 200 nodes,
5 ModelDeployments, short bakes, about 4 minutes). It starts (or resizes) its OWN control plane with
`hack/cluster up --edge-nodes N --sites S` in `$KIRI_STATE_DIR` (default /tmp/kiri-scale, never the
shared `.kiri/`), and leaves it running; `KIRI_STATE_DIR=/tmp/kiri-scale hack/cluster down` stops it.

Setup. The fleet is cut into one shard per ModelDeployment (node label `kiri.dev/scale-shard-0`, one node
of each site per shard in turn, so every shard spans every site and has GPU and CPU-only nodes). Each
ModelDeployment has two variants chosen by node capability (fp16 on `kiri.dev/accelerator=gpu`, int8
elsewhere) and 4 stages of 25% each, baking BAKE seconds. `--models-per-node K` cuts the fleet K times
(labels `kiri.dev/scale-shard-<k>`, a different cut each time), so the ModelDeployments share nodes and
each node serves K of them; the baseline then rolls K DaemonSets. Why not 50 ModelDeployments on every
node: that is 50,000 simulated pods, which this 2-core machine cannot churn in minutes.

The variants come from ONE real `kiri compress` run (the first ModelDeployment's Job, run locally as the
e2e tests do); the others get a copy of that output, published by their Job's own `kiri publish-manifest`
step (in-process: the same function).

Measured, all in this run:
1. baseline: a plain DaemonSet on the same nodes, RollingUpdate with maxUnavailable = one wave (25%) and
   minReadySeconds = BAKE, rolled by Kubernetes itself;
2. Kiri: time per wave and in total for all ModelDeployments (apply -> every one Healthy on the new
   revision) against the sum of bakes and against the baseline;
3. from the operator's /metrics: API requests by verb, per reconcile and per node moved, writes in a
   steady-state window (target 0), the watch-event -> status-patch latency histogram (p50/p99);
4. from /proc: the operator's RSS (VmRSS, VmHWM) and CPU seconds per phase.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KIRI_STATE_DIR", "/tmp/kiri-scale")
# As the Helm chart runs the operator (helm/kiri/templates/deployment.yaml).
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

from tests.e2e.conftest import Cluster, start_cluster  # noqa: E402
from tests.e2e.operator_harness import (  # noqa: E402
    WRITE_VERBS,
    Operator,
    build_model,
    model_deployment,
    run_compression_job,
)

SHARD = "kiri.dev/scale-shard"
GROUP, VERSION, PLURAL = "kiri.dev", "v1alpha1", "modeldeployments"
WAVES = 4
VARIANTS = [
    {"name": "fp16", "method": "fp16", "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}}},
    {"name": "int8", "method": "int8-dynamic"},
]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the operator process ------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


class Snapshot:
    """The operator's counters at one moment, so phases can be told apart by difference."""

    def __init__(self, op: Operator) -> None:
        assert op.proc is not None
        self.t = time.monotonic()
        self.cpu = proc_cpu(op.proc.pid)
        self.requests: dict[tuple[str, str], float] = {}
        self.reconciles = 0.0
        self.latency: dict[float, float] = {}
        self.writes_by_kind: dict[tuple[str, str], float] = {}
        for family in op.scrape():
            for s in family.samples:
                if s.name == "kiri_api_requests_total":
                    key = (s.labels["verb"], s.labels["resource"])
                    self.requests[key] = self.requests.get(key, 0.0) + s.value
                elif s.name == "kiri_reconcile_duration_seconds_count":
                    self.reconciles += s.value
                elif s.name == "kiri_event_to_status_seconds_bucket":
                    self.latency[float(s.labels["le"])] = s.value
                elif s.name == "kiri_reconcile_writes_total":
                    key = (s.labels["kind"], s.labels["check"])
                    self.writes_by_kind[key] = self.writes_by_kind.get(key, 0.0) + s.value

    def minus(self, before: Snapshot) -> dict[str, Any]:
        requests = {k: v - before.requests.get(k, 0.0) for k, v in self.requests.items()}
        by_verb: dict[str, float] = {}
        for (verb, _), v in requests.items():
            by_verb[verb] = by_verb.get(verb, 0.0) + v
        writes = sum(v for (verb, _), v in requests.items() if verb in WRITE_VERBS)
        latency = {le: v - before.latency.get(le, 0.0) for le, v in self.latency.items()}
        kinds = {
            f"{k}/{c}": int(v - before.writes_by_kind.get((k, c), 0.0))
            for (k, c), v in self.writes_by_kind.items()
            if v - before.writes_by_kind.get((k, c), 0.0)
        }
        return {
            "seconds": self.t - before.t,
            "cpu_s": self.cpu - before.cpu,
            "reconciles": self.reconciles - before.reconciles,
            "requests": sum(requests.values()),
            "by_verb": {k: int(v) for k, v in sorted(by_verb.items()) if v},
            "writes": writes,
            "writes_by_kind": kinds,
            "latency_p50": quantile(latency, 0.5),
            "latency_p99": quantile(latency, 0.99),
            "latency_n": int(latency.get(math.inf, 0.0)),
        }


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """histogram_quantile: linear within the bucket that holds the q-th observation."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0.0)
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-9)
        lower, below = le, buckets[le]
    return None


# -- watching ModelDeployment status -------------------------------------------------------------------
class StatusLog(threading.Thread):
    """Every ModelDeployment status the API server reports, with the time it arrived."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.namespace = namespace
        self.records: list[tuple[float, str, dict[str, Any]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(self.cluster.api_client())
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    timeout_seconds=30,
                ):
                    obj = event["object"]
                    self.records.append((time.monotonic(), obj["metadata"]["name"], obj.get("status") or {}))
                    if self.stop.is_set():
                        break
            except Exception as exc:  # a dropped watch is re-listed; the records keep their times
                log(f"status watch: {exc}")
                time.sleep(0.5)


# -- the fleet -----------------------------------------------------------------------------------------
def cluster_up(nodes: int, sites: int) -> Cluster:
    proc = subprocess.run(
        [str(ROOT / "hack" / "cluster"), "up", "--edge-nodes", str(nodes), "--sites", str(sites)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"hack/cluster up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return start_cluster()


def shard_fleet(cluster: Cluster, mds: int, per_node: int) -> dict[int, list[str]]:
    """ModelDeployment i -> its nodes. `per_node` slots each cut the fleet into shards (label
    `kiri.dev/scale-shard-<slot>`), with a different cut per slot, so every node serves `per_node`
    ModelDeployments and two ModelDeployments share some nodes but not all."""
    nodes = cluster.get_json("nodes", "-l", "kiri.dev/tier=edge")["items"]
    by_site: dict[str, list[str]] = {}
    for n in nodes:
        by_site.setdefault(n["metadata"]["labels"]["kiri.dev/site"], []).append(n["metadata"]["name"])
    out: dict[int, list[str]] = {}
    for slot in range(per_node):
        members = [i for i in range(mds) if i % per_node == slot]
        shards = len(members)
        cut: dict[int, list[str]] = {k: [] for k in range(shards)}
        for j, site in enumerate(sorted(by_site)):
            names = sorted(by_site[site], key=lambda s: int(s.rsplit("-", 1)[1]))
            if slot:
                random.Random(1000 * slot + j).shuffle(names)
            for r, name in enumerate(names):
                cut[(r + j) % shards].append(name)
        for k, names in cut.items():
            cluster.kubectl("label", "--overwrite", "nodes", *names, f"{SHARD}-{slot}={k}")
            out[members[k]] = names
    return out


def shard_selector(i: int, per_node: int) -> dict[str, str]:
    return {f"{SHARD}-{i % per_node}": str(i // per_node)}


def wait_pods(cluster: Cluster, namespace: str, selector: str, count: int, timeout: float) -> None:
    def ready() -> bool:
        out = cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", selector, "--no-headers",
            "-o", "custom-columns=R:.status.conditions[?(@.type=='Ready')].status",
        )  # fmt: skip
        lines = out.split()
        return len(lines) == count and all(x == "True" for x in lines)

    cluster.wait_for(ready, timeout, 2, f"{count} pods {selector} Ready")


def pod_count(cluster: Cluster, namespace: str, selector: str) -> int:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "--no-headers", "-o", "name")
    return len(out.split())


# -- 1. the baseline -----------------------------------------------------------------------------------
def baseline(cluster: Cluster, namespace: str, nodes: int, bake: int, per_node: int) -> dict[str, Any]:
    """`per_node` DaemonSets on every edge node (as many pods as Kiri moves), rolled at the same time."""
    wave = math.ceil(nodes / WAVES)
    names = [f"baseline-{k}" for k in range(per_node)]

    def daemonset(name: str, build: str) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": {"app": "baseline", "slot": name}},
                "minReadySeconds": bake,
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": wave}},
                "template": {
                    "metadata": {"labels": {"app": "baseline", "slot": name, "build": build}},
                    "spec": {
                        "nodeSelector": {"kiri.dev/tier": "edge"},
                        "containers": [{"name": "serve", "image": "ghcr.io/kiri-dev/kiri-runtime:bench"}],
                    },
                },
            },
        }

    def statuses() -> list[dict[str, Any]]:
        items = cluster.get_json("daemonsets", "-n", namespace)["items"]
        return [d.get("status") or {} for d in items if d["metadata"]["name"] in names]

    cluster.apply([daemonset(n, "v1") for n in names])
    wait_pods(cluster, namespace, "app=baseline", nodes * per_node, 300)
    # Available (minReadySeconds) too, or the update would start from a partly unavailable set.
    cluster.wait_for(
        lambda: sum(int(st.get("numberAvailable") or 0) for st in statuses()) == nodes * per_node,
        bake + 120,
        1,
        "baseline available",
    )
    log(
        f"baseline: {per_node} DaemonSet(s) on {nodes} nodes ready; rolling "
        f"(maxUnavailable {wave}, minReadySeconds {bake})"
    )
    started = time.monotonic()
    cluster.apply([daemonset(n, "v2") for n in names])
    marks: list[float] = []
    while True:
        sts = statuses()
        # Before observedGeneration 2, "updated" means the old template.
        current = len(sts) == per_node and all(st.get("observedGeneration") == 2 for st in sts)
        updated = min(int(st.get("updatedNumberScheduled") or 0) for st in sts) if current else 0
        # Batch k is over when the controller starts batch k+1 (more than k waves' nodes updated), in
        # the slowest DaemonSet.
        while current and len(marks) < WAVES - 1 and updated > wave * (len(marks) + 1):
            marks.append(time.monotonic() - started)
        if current and all(
            st.get("numberAvailable") == nodes and st.get("updatedNumberScheduled") == nodes for st in sts
        ):
            break
        if time.monotonic() - started > 60 * WAVES * per_node + 4 * bake:
            raise TimeoutError(f"baseline rollout stuck: {sts}")
        time.sleep(1)
    total = time.monotonic() - started
    marks.append(total)
    cluster.kubectl("delete", "daemonsets", *names, "-n", namespace, "--wait=false")
    cluster.wait_for(lambda: pod_count(cluster, namespace, "app=baseline") == 0, 300, 2, "baseline pods gone")
    return {"total_s": total, "wave_marks_s": marks, "daemonsets": per_node}


# -- 2. Kiri ---------------------------------------------------------------------------------------------
class Fleet:
    def __init__(
        self, cluster: Cluster, namespace: str, mds: int, per_node: int, bake: int, workdir: Path
    ) -> None:
        self.cluster = cluster
        self.per_node = per_node
        self.namespace = namespace
        self.mds = mds
        self.bake = bake
        self.workdir = workdir
        self.model, self.sha = build_model(workdir)
        self.store = workdir / "store"

    def name(self, i: int) -> str:
        return f"scale-{i:03d}"

    def body(self, i: int, build: str) -> dict[str, Any]:
        stages = [{"percent": 100 * (k + 1) // WAVES, "bakeSeconds": self.bake} for k in range(WAVES)]
        body = model_deployment(
            self.name(i),
            self.namespace,
            self.model,
            self.sha,
            self.store,
            VARIANTS,
            rollout={"stages": stages, "maxUnavailable": "100%"},
        )
        body["spec"]["cloud"] = {"replicas": 0}
        body["spec"]["edge"]["nodeSelector"] = {"kiri.dev/tier": "edge", **shard_selector(i, self.per_node)}
        body["spec"]["edge"]["podLabels"] = {"build": build}
        return body

    def apply_all(self, build: str) -> None:
        self.cluster.apply([self.body(i, build) for i in range(self.mds)])

    def statuses(self) -> dict[str, dict[str, Any]]:
        items = self.cluster.get_json(PLURAL, "-n", self.namespace)["items"]
        return {md["metadata"]["name"]: md.get("status") or {} for md in items}

    def jobs(self) -> dict[str, dict[str, Any]]:
        items = self.cluster.get_json("jobs", "-n", self.namespace)["items"]
        return {j["metadata"]["labels"]["kiri.dev/modeldeployment"]: j for j in items}

    def compress_and_publish(self) -> None:
        """One real compressor run (the first ModelDeployment's Job); the others publish a copy of it."""
        from kiri_operator import cli

        self.cluster.apply(self.body(0, "v1"))
        job = self.cluster.wait_for(lambda: self.jobs().get(self.name(0)), 120, 0.5, "first Job")
        t = time.monotonic()
        run_compression_job(self.cluster, self.namespace, job["metadata"]["name"])
        log(f"real compressor run: {time.monotonic() - t:.1f}s")
        source_out = arg(job, "compress", "--out")
        self.apply_all("v1")

        def all_jobs() -> dict[str, dict[str, Any]] | None:
            jobs = self.jobs()
            return jobs if len(jobs) == self.mds else None

        jobs = self.cluster.wait_for(all_jobs, 180, 1, "all compression Jobs")
        for name, job in jobs.items():
            if name == self.name(0):
                continue
            shutil.copytree(source_out, arg(job, "compress", "--out"), dirs_exist_ok=True)
            publish = container_args(job, "publish")
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli.main([*publish, "--kubeconfig", self.cluster.kubeconfig])
            if code != 0:
                raise RuntimeError(f"publish-manifest failed for {name}")

    def wait_healthy(self, revision_not: dict[str, str] | None, timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            st = self.statuses()
            ok = len(st) == self.mds and all(
                s.get("phase") == "Healthy"
                and s.get("currentRevision") == s.get("updateRevision")
                and (revision_not is None or s.get("currentRevision") != revision_not.get(n))
                for n, s in st.items()
            )
            return st if ok else None

        return dict(self.cluster.wait_for(done, timeout, 2, "every ModelDeployment Healthy"))


def check_pods(cluster: Cluster, namespace: str, final: dict[str, dict[str, Any]]) -> int:
    """Every node of every ModelDeployment runs exactly one pod, of the promoted revision: moves really moved."""

    def settled() -> int | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=edge")["items"]
        seen: dict[tuple[str, str], list[str]] = {}
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            labels = pod["metadata"]["labels"]
            key = (labels["kiri.dev/modeldeployment"], pod["spec"].get("nodeName") or "")
            seen.setdefault(key, []).append(labels["kiri.dev/revision"])
        expected = sum(int((s.get("edge") or {}).get("targetNodes") or 0) for s in final.values())
        ok = len(seen) == expected and all(
            revs == [final[md]["currentRevision"]] for (md, _), revs in seen.items()
        )
        return len(seen) if ok else None

    return int(cluster.wait_for(settled, 120, 2, "one pod of the promoted revision per node"))


def container_args(job: dict[str, Any], name: str) -> list[str]:
    pod = job["spec"]["template"]["spec"]
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        if c["name"] == name:
            return list(c["args"])
    raise KeyError(name)


def arg(job: dict[str, Any], container: str, flag: str) -> str:
    args = container_args(job, container)
    return args[args.index(flag) + 1]


def wave_times(
    records: list[tuple[float, str, dict[str, Any]]], started: float, old: dict[str, str]
) -> dict[str, Any]:
    """Per ModelDeployment: when each stage started and when it finished, from the status it reported."""
    starts: dict[str, dict[int, float]] = {}
    done: dict[str, float] = {}
    for t, name, st in records:
        if t < started or st.get("updateRevision") in (None, old.get(name)):
            continue
        edge = st.get("edge") or {}
        stage = int(edge.get("stageIndex") or 0)
        starts.setdefault(name, {}).setdefault(stage, t)
        if st.get("phase") == "Healthy" and st.get("currentRevision") == st.get("updateRevision"):
            done.setdefault(name, t)
    per_md: list[list[float]] = []
    for name, end in done.items():
        marks = [started] + [starts[name].get(k, math.nan) for k in range(1, WAVES)] + [end]
        per_md.append([b - a for a, b in itertools.pairwise(marks)])
    # Fleet-wide wave k ends when the last ModelDeployment has left it.
    fleet_ends = [max(starts[n].get(k, math.nan) for n in done) - started for k in range(1, WAVES)]
    fleet_ends.append(max(done.values()) - started)
    return {
        "per_md_wave_median_s": [statistics.median(w[k] for w in per_md) for k in range(WAVES)],
        "per_md_wave_max_s": [max(w[k] for w in per_md) for k in range(WAVES)],
        "fleet_wave_end_s": fleet_ends,
        "first_done_s": min(done.values()) - started,
        "mds_done": len(done),
    }


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 nodes, 20 sites, 5 ModelDeployments, bake 10s"
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--mds", type=int, default=50)
    parser.add_argument(
        "--models-per-node",
        type=int,
        default=1,
        help="ModelDeployments served by each node (the fleet is cut once per model slot); the "
        "baseline rolls as many DaemonSets",
    )
    parser.add_argument("--bake", type=int, default=45, help="bakeSeconds of each of the 4 stages")
    parser.add_argument("--steady", type=float, default=40, help="steady-state window (s); >= one resync")
    parser.add_argument("--resync", type=float, default=30, help="the operator's --resync-seconds")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--crd",
        type=Path,
        default=ROOT / "crds" / "modeldeployment.yaml",
        help="the CRD to apply: the one of the code under test (an older operator refuses the fields that a "
        "newer CRD defaults into every object)",
    )
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.sites, args.mds, args.bake, args.steady, args.resync = 200, 20, 5, 10, 25, 20

    began = time.monotonic()
    log(f"cluster: {args.nodes} edge nodes in {args.sites} sites ({os.environ['KIRI_STATE_DIR']})")
    cluster = cluster_up(args.nodes, args.sites)
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(args.crd)
    )
    shards = shard_fleet(cluster, args.mds, args.models_per_node)
    namespace = f"kiri-scale-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    cluster.wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False),
        60,
        0.5,
        "default ServiceAccount",
    )
    workdir = Path(tempfile.mkdtemp(prefix="kiri-bench-scale-"))
    op: Operator | None = None
    watcher: StatusLog | None = None
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "sites": args.sites,
        "modeldeployments": args.mds,
        "models_per_node": args.models_per_node,
        "nodes_per_md": statistics.median(len(v) for v in shards.values()),
        "waves": WAVES,
        "bake_s": args.bake,
        "sum_of_bakes_s": WAVES * args.bake,
    }
    try:
        if not args.skip_baseline:
            base = baseline(cluster, namespace, args.nodes, args.bake, args.models_per_node)
            result["baseline"] = base
            log(f"baseline: {base['total_s']:.1f}s")
        fleet = Fleet(cluster, namespace, args.mds, args.models_per_node, args.bake, workdir)
        op = Operator(
            cluster, namespace, "--resync-seconds", str(args.resync), "--log-level", "WARNING"
        ).start()
        assert op.proc is not None
        s0 = Snapshot(op)
        watcher = StatusLog(cluster, namespace)
        watcher.start()
        fleet.compress_and_publish()
        first = fleet.wait_healthy(None, 600)
        s1 = Snapshot(op)
        first_mem = proc_mem(op.proc.pid)
        log(f"first rollout (everywhere at once): {s1.t - s0.t:.1f}s from operator start")
        time.sleep(3)  # the last status echoes and pod events settle
        s2 = Snapshot(op)
        time.sleep(args.steady)
        s3 = Snapshot(op)
        steady = s3.minus(s2)
        log(
            f"steady state {steady['seconds']:.0f}s: {steady['writes']:.0f} writes, {steady['reconciles']:.0f} reconciles"
        )
        old = {n: str(s.get("currentRevision")) for n, s in first.items()}
        started = time.monotonic()
        started_epoch = time.time()
        s4 = Snapshot(op)
        fleet.apply_all("v2")
        final = fleet.wait_healthy(old, 60 * WAVES + 4 * args.bake + 600)
        total = time.monotonic() - started
        result["rollout_window_epoch"] = [started_epoch, time.time()]
        s5 = Snapshot(op)
        rollout = s5.minus(s4)
        result["pods_checked"] = check_pods(cluster, namespace, final)
        moved = sum(int((s.get("edge") or {}).get("updatedNodes") or 0) for s in final.values())
        waves = wave_times(watcher.records, started, old)
        mem = proc_mem(op.proc.pid)
        variants: dict[str, int] = {}
        for s in final.values():
            for v in (s.get("edge") or {}).get("perVariant") or []:
                variants[v["name"]] = variants.get(v["name"], 0) + int(v.get("nodes") or 0)
        result.update(
            {
                "nodes_moved": moved,
                "nodes_per_variant": variants,
                "fidelity": (first[fleet.name(0)].get("variants") or []),
                "kiri_total_s": total,
                "kiri_waves": waves,
                "overhead_vs_bakes": total / (WAVES * args.bake) - 1,
                "rollout": rollout,
                "requests_per_reconcile": rollout["requests"] / max(rollout["reconciles"], 1),
                "requests_per_node_moved": rollout["requests"] / max(moved, 1),
                "writes_per_node_moved": rollout["writes"] / max(moved, 1),
                "steady": steady,
                "setup": s1.minus(s0),
                "operator_rss_mib": mem.get("VmRSS"),
                "operator_peak_rss_mib": mem.get("VmHWM"),
                # Anon is the heap Kiri can shrink; File is the interpreter's and libraries' mapped code.
                "operator_rss_anon_mib": mem.get("RssAnon"),
                "operator_rss_file_mib": mem.get("RssFile"),
                "operator_rss_after_first_rollout_mib": first_mem.get("VmRSS"),
                "operator_cpu_s_total": proc_cpu(op.proc.pid),
                "bench_wall_s": time.monotonic() - began,
            }
        )
        if "baseline" in result:
            b = result["baseline"]["total_s"]
            result["kiri_vs_baseline"] = total / b
            result["operator_added_vs_bakes"] = (total - b) / (WAVES * args.bake)
        report(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        return 0
    finally:
        if watcher is not None:
            watcher.stop.set()
        if op is not None:
            op.stop()
            print(f"operator log: {op.log}")
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    ro, st = r["rollout"], r["steady"]
    w = r["kiri_waves"]
    print(json.dumps({k: v for k, v in r.items() if k != "fidelity"}, indent=2, default=str))
    print()
    print(
        f"{r['nodes']} edge nodes, {r['sites']} sites, {r['modeldeployments']} ModelDeployments "
        f"(~{r['nodes_per_md']:.0f} nodes each, {r['models_per_node']} per node), "
        f"{r['waves']} waves x {r['bake_s']}s bake"
    )
    print(f"{'':34} {'Kiri':>8} {'DaemonSet':>10}")
    base = r.get("baseline") or {}
    marks = base.get("wave_marks_s") or []
    prev = 0.0
    for k in range(r["waves"]):
        end = w["fleet_wave_end_s"][k]
        b = f"{marks[k]:.1f}" if k < len(marks) else "-"
        print(f"wave {k + 1} ends at (s, fleet)          {end:>8.1f} {b:>10}")
        prev = end
    del prev
    print(f"total (s)                          {r['kiri_total_s']:>8.1f} {fmt(base.get('total_s')):>10}")
    print(f"sum of bakes (s)                   {r['sum_of_bakes_s']:>8}")
    print(f"overhead vs bakes                  {r['overhead_vs_bakes'] * 100:>7.1f}%")
    if "operator_added_vs_bakes" in r:
        print(f"Kiri - DaemonSet, / bakes          {r['operator_added_vs_bakes'] * 100:>7.1f}%")
    print(f"per-MD wave median (s)             {' '.join(f'{x:.1f}' for x in w['per_md_wave_median_s'])}")
    print(f"reconciles in rollout              {ro['reconciles']:>8.0f}")
    print(f"API requests / reconcile           {r['requests_per_reconcile']:>8.2f}")
    print(f"API requests / node moved          {r['requests_per_node_moved']:>8.2f}")
    print(
        f"writes / node moved                {r['writes_per_node_moved']:>8.2f}   ({ro['writes']:.0f} writes, {r['nodes_moved']} nodes)"
    )
    print(
        f"writes at steady state ({st['seconds']:.0f}s)       {st['writes']:>8.0f}   ({st['reconciles']:.0f} reconciles)"
    )
    print(
        f"event -> status p50 / p99 (s)      {fmt(ro['latency_p50'], 3):>8} / {fmt(ro['latency_p99'], 3)}  (n={ro['latency_n']})"
    )
    print(
        f"operator RSS / peak (MiB)          {fmt(r['operator_rss_mib'])} / {fmt(r['operator_peak_rss_mib'])}"
        f" (anon {fmt(r['operator_rss_anon_mib'])}, file {fmt(r['operator_rss_file_mib'])};"
        f" {fmt(r['operator_rss_after_first_rollout_mib'])} after the first rollout)"
    )
    print(
        f"operator CPU s: setup {r['setup']['cpu_s']:.1f}, steady {st['cpu_s']:.1f}, rollout {ro['cpu_s']:.1f}, total {r['operator_cpu_s_total']:.1f}"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
