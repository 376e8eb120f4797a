"""The metric gate on a site's adapter wave, end to end: the operator on the real control plane asks a real
Prometheus about the pods of the site's new adapter set, and rolls that site alone back when they fail;
`kiri rollback NAME --site SITE` takes a site back to its previous set.

kwok pods run no containers, so the runtimes run here (test_rollout_analysis.py's lab: real `kiri serve`
processes, one failing half its requests), and Prometheus labels them as the PodMonitor labels the pods
of the site's canary: `revision` (the settled revision), `adapters` (the wave's adapter revision),
`namespace`, `component`. The analysis is the `error-ratio` preset, as written in a spec.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Cluster
from .operator_harness import KIRI, Operator, condition, crd, get_md, operator_fixture
from .test_rollout import store
from .test_rollout_analysis import PROM_PORT, Lab
from .test_site_adapters import NAME, adapter, adapters_by_node, body, publish, site_status

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("crd")]
__all__ = ["crd", "store"]

INTERVAL = 2


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace, f"--allowed-prometheus=http://127.0.0.1:{PROM_PORT}")


class SiteLab(Lab):
    """The lab's runtimes, each scraped with the target labels of a pod of one adapter set."""

    labels: dict[str, dict[str, str]]

    def _write(self) -> None:
        labels = getattr(self, "labels", {})
        targets = [
            {"targets": [f"127.0.0.1:{port}"], "labels": labels.get(name, {"revision": "none"})}
            for name, port in self.ports.items()
        ]
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "edge", "static_configs": targets}],
        }
        self.config.write_text(yaml.safe_dump(config))

    def serve_set(self, name: str, namespace: str, revision: str, adapters: str) -> None:
        """Runtime `name` serves adapter set `adapters` of `revision`, with traffic."""
        target = {"namespace": namespace, "component": "edge", "revision": revision, "adapters": adapters}
        self.labels = {**getattr(self, "labels", {}), name: target}
        self.loaded.add(name)
        self._write()
        self.procs[-1].send_signal(signal.SIGHUP)  # Prometheus reloads its targets


@pytest.fixture
def lab(store: dict[str, Any], tmp_path: Path) -> Iterator[SiteLab]:
    lab = SiteLab(tmp_path, store["model"])
    try:
        yield lab
    finally:
        lab.close()


def _with_analysis(manifest: dict[str, Any], address: str) -> dict[str, Any]:
    manifest["spec"]["rollout"]["analysis"] = {
        "prometheus": {"address": address},
        "queries": [
            {"name": "errors", "preset": "error-ratio", "successCondition": "result < 0.1",
             "interval": INTERVAL, "minSamples": 2}
        ],
    }  # fmt: skip
    return manifest


def _events(cluster: Cluster, namespace: str, reason: str) -> list[dict[str, Any]]:
    selector = f"involvedObject.kind=ModelDeployment,reason={reason}"
    items: list[dict[str, Any]] = cluster.get_json("events", "-n", namespace, "--field-selector", selector)[
        "items"
    ]
    return items


def test_a_failing_analysis_rolls_one_sites_adapters_back_a_passing_one_completes_them_and_kiri_rollback_site_undoes_it(
    cluster: Cluster, namespace: str, operator: Operator, lab: SiteLab, tmp_path: Path
) -> None:
    a_nodes, b_nodes = cluster.edge_nodes("site-a"), cluster.edge_nodes("site-b")
    shop = adapter("shop", "1" * 64, ["site-a", "site-b"], default=True)
    cluster.apply(
        _with_analysis(
            body(namespace, tmp_path, [shop, adapter("clinic", "3" * 64, ["site-a"])]), lab.address
        )
    )
    publish(cluster, namespace)
    try:
        status = cluster.wait_for(
            lambda: (
                (s := get_md(cluster, namespace, NAME).get("status") or {}).get("phase") == "Healthy" and s
            ),
            timeout=120,
            message="revision 1 with adapters everywhere",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{operator.tail(40)}") from None
    revision = status["currentRevision"]
    first = adapters_by_node(cluster, namespace)
    rev_a, rev_b = first[a_nodes[0]], first[b_nodes[0]]

    def site_a_until(key: str, value: str, timeout: float, what: str) -> dict[str, Any]:
        """Site a's status once its `key` is `value`; on a timeout, the status and the operator's log say why."""
        try:
            got: dict[str, Any] = cluster.wait_for(
                lambda: (s := site_status(cluster, namespace, "site-a")).get(key) == value and s,
                timeout=timeout,
                message=what,
            )
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}: {site_status(cluster, namespace, 'site-a')}\n{operator.tail(40)}"
            ) from None
        return got

    waved = {rev_a}

    def wave_of(sha: str) -> str:
        """Site a's clinic adapter becomes `sha`: the new adapter revision. Until the operator has read the new
        spec, the site's status still names the last wave's update revision (a rolled-back one stays there):
        only a revision no wave had before is the new one."""
        cluster.apply(
            _with_analysis(body(namespace, tmp_path, [shop, adapter("clinic", sha, ["site-a"])]), lab.address)
        )
        new: str = cluster.wait_for(
            lambda: (
                (u := site_status(cluster, namespace, "site-a").get("updateRevision")) not in (None, *waved)
                and u
            ),
            timeout=60,
            message="site a's wave",
        )
        waved.add(new)
        return new

    # Site a's new clinic adapter: its canary's runtime answers half its requests with 500.
    new_a = wave_of("4" * 64)
    lab.serve_set("faulty", namespace, revision, new_a)
    a = site_a_until("verdict", "RolledBack", 120, "site a rolled back")
    assert (a["reason"], a["revision"]) == ("AnalysisFailed", rev_a)
    assert a["message"].startswith("step 1/2: analysis failed: errors: ")
    placed = adapters_by_node(cluster, namespace)
    assert {placed[n] for n in a_nodes} == {rev_a} and {placed[n] for n in b_nodes} == {rev_b}
    rolled = [e["message"] for e in _events(cluster, namespace, "RolledBack") if e["type"] == "Warning"]
    assert [m for m in rolled if m.startswith("adapters of site site-a: AnalysisFailed: step 1/2: ")], rolled
    md = get_md(cluster, namespace, NAME)
    assert condition(md, "AdaptersRolledOut")["status"] == "False"
    assert condition(md, "AdaptersRolledOut")["message"].startswith("site site-a: step 1/2: analysis failed")
    assert md["status"]["currentRevision"] == revision  # the revision never moved

    # Another clinic adapter, whose canary's runtime is healthy: the gate passes, the site completes.
    new_a2 = wave_of("6" * 64)
    lab.serve_set("healthy", namespace, revision, new_a2)
    a = site_a_until("verdict", "Completed", 120, "site a completed")
    assert (a["revision"], a["previousRevision"]) == (new_a2, rev_a)
    assert {adapters_by_node(cluster, namespace)[n] for n in a_nodes} == {new_a2}
    passed = [e["message"] for e in _events(cluster, namespace, "AnalysisPassed")]
    assert any(
        m.startswith("adapters of site site-a: step 1/2: analysis passed: errors: ") for m in passed
    ), passed

    # `kiri rollback NAME --site site-a`: back to the set site a served before, the other sites untouched.
    done = subprocess.run(
        [*KIRI, "rollback", NAME, "-n", namespace, "--site", "site-a"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"rollback: {namespace}/{NAME} site site-a (rollback.adapters.kiri.dev/site-a="
    )
    a = site_a_until("reason", "ManualRollback", 60, "site a rolled back by hand")
    assert (a["verdict"], a["revision"], a["message"]) == (
        "RolledBack",
        rev_a,
        f"manual rollback from {new_a2} to {rev_a}",
    )
    cluster.wait_for(
        lambda: {adapters_by_node(cluster, namespace)[n] for n in a_nodes} == {rev_a},
        timeout=30,
        message="site a's nodes back on its previous set",
    )
    assert {adapters_by_node(cluster, namespace)[n] for n in b_nodes} == {rev_b}
