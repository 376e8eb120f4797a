"""A language model learns a LoRA adapter at its sites, end to end on the real control plane (issue 23).

The source is the tests' tiny LLaMA checkpoint (`hf`); each kwok site writes text from a vocabulary of its own
(tests/lm_sites.py). The operator's compression Job runs here (the real LM compressor: an int4 variant built
LoRA-ready, whose `lora.json` the manifest carries); then the operator makes the federation (SuperLink, a SuperNode
per site) and round 1's Job, whose command lines run here as local processes (flower_kubelet.py: Flower over the
operator's TLS, SuperNode keys, SecAgg+, DP). The round's ServerApp writes the adapter the edge loads; the operator
puts it in `status.learning.adapter` and rolls it onto every site as the sites' default adapter, site by site.
Finally one site's edge `kiri serve` runs here with its DaemonSet's own args: the bare model name now answers with
the learned adapter, which scores the sites' text better than the base does.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiri_runtime.compressing.lm.sources import directory_sha256
from kiri_runtime.manifests import LORA_LAYOUT_KEY

from .conftest import Cluster
from .flower_kubelet import Kubelet, deployments, jobs, wait
from .operator_harness import (
    KIRI,
    Operator,
    children,
    crd,
    free_port,
    get_md,
    manifest_of,
    operator_fixture,
    run_compression_job,
)

pytestmark = [pytest.mark.timeout(1200), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

NAME, MODEL = "chat", "assistant"
# kwok's sites, each with a vocabulary of lm_sites.py.
SITES = {"site-a": "harbour", "site-b": "orchard", "site-c": "observatory"}


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def _texts(tmp: Path) -> dict[str, Any]:
    from lm_fixture import tiny_llama
    from lm_sites import write_site

    checkpoint = shutil.copytree(tiny_llama(), tmp / "checkpoint")
    train = {site: write_site(tmp / "train", vocabulary, 120, seed=1) for site, vocabulary in SITES.items()}
    held_out = tmp / "held-out.jsonl"
    held_out.write_text("".join(write_site(tmp / "held", v, 20, seed=2).read_text() for v in SITES.values()))
    return {"checkpoint": checkpoint, "train": train, "held_out": held_out}


def _deployment(
    namespace: str, tmp: Path, texts: dict[str, Any], policy: str = "federated"
) -> dict[str, Any]:
    checkpoint = texts["checkpoint"]
    return {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {
                "name": MODEL,
                "version": "1",
                "source": {
                    "uri": checkpoint.as_uri(),
                    "format": "hf",
                    "sha256": directory_sha256(checkpoint),
                },
                "evalDataUri": texts["held_out"].as_uri(),
            },
            "cloud": {"replicas": 0},
            "edge": {
                "variants": [{"name": "q4", "method": "int4", "options": {"loraTargets": "q_proj,v_proj"}}],
                "artifacts": {"uri": (tmp / "store").as_uri()},
            },
            "rollout": {
                "stages": [{"nodes": 1, "bakeSeconds": 1}, {"percent": 100}],
                "maxUnavailable": "100%",
            },
            "learning": {
                "evalDataUri": texts["held_out"].as_uri(),
                "policy": policy,
                "siteDataPath": "/var/lib/kiri/site-data/train.jsonl",
                "rounds": 1,
                "minClients": 2,
                "learningRate": 0.01,
                "batchSize": 8,
                "trained": {"rank": 4, "steps": 40, "sequenceLength": 32},
                # Three sites are far too few for strong DP: a small noise, a budget that allows it.
                "dp": {"clipNorm": 1.0, "noiseMultiplier": 0.05, "targetEpsilon": 1000},
                "schedule": {"intervalSeconds": 3600, "deadlineSeconds": 300, "graceSeconds": 30},
            },
        },
    }


def _site_status(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    status = get_md(cluster, namespace, NAME).get("status") or {}
    return {s["site"]: s for s in (status.get("edge") or {}).get("adapters") or []}


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _mean_nll(port: int, model: str, texts: list[str]) -> float:
    """Mean per-token negative log-likelihood the server gives `texts` (`echo` + `logprobs` on the prompt)."""
    total, count = 0.0, 0
    with httpx.Client(timeout=60) as client:
        for text in texts:
            body = {
                "model": model,
                "prompt": text,
                "max_tokens": 1,
                "echo": True,
                "logprobs": 1,
                "temperature": 0,
            }
            reply = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            logprobs = [
                lp for lp in reply.json()["choices"][0]["logprobs"]["token_logprobs"] if lp is not None
            ]
            total -= sum(logprobs[:-1])  # the last is the generated token's
            count += len(logprobs) - 1
    return total / count


def _rolled_out(cluster: Cluster, namespace: str, what: str) -> dict[str, dict[str, Any]]:
    """Every site's adapter wave done, with `learned` its default: site -> status.edge.adapters[] entry."""

    def rolled() -> dict[str, dict[str, Any]] | None:
        sites = _site_status(cluster, namespace)
        done = [
            s
            for s in sites.values()
            if s.get("default") == "learned"
            and s.get("revision") == s.get("updateRevision")
            and s.get("nodes")
        ]
        return sites if len(done) == len(SITES) else None

    found: dict[str, dict[str, Any]] = wait(rolled, 240, what)
    return found


def _edge_args(cluster: Cluster, namespace: str, adapter_revision: str) -> list[str]:
    """The `kiri serve` args of the (first) edge DaemonSet of one site's adapter revision."""
    daemonsets = [
        d for d in children(cluster, namespace, NAME, "daemonsets")
        if d["metadata"]["labels"].get("kiri.dev/adapters") == adapter_revision
    ]  # fmt: skip
    assert daemonsets, f"no DaemonSet of adapter revision {adapter_revision}"
    (container,) = daemonsets[0]["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def _serve_edge(rendered: list[str], tmp_path: Path, **local: str) -> tuple[subprocess.Popen[bytes], int]:
    """An edge `kiri serve` here with a DaemonSet's args (host, port and cache local; `local` overrides other
    flags' values); returns the process, once Ready, and its port."""
    port = free_port()
    local = {"--host": "127.0.0.1", "--port": str(port), "--cache-dir": str(tmp_path / "edge-cache"), **local}
    args = [local.get(rendered[i - 1], a) if i else a for i, a in enumerate(rendered)]
    log = (tmp_path / "edge.log").open("wb")
    proc = subprocess.Popen([*KIRI, *args, "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        Cluster.wait_for(ready, 120, 0.3, f"edge kiri serve\n{(tmp_path / 'edge.log').read_text()[-2000:]}")
    except TimeoutError:
        proc.terminate()
        raise
    return proc, port


def _learn(cluster: Cluster, namespace: str, tmp_path: Path, policy: str) -> dict[str, Any]:
    """Apply the ModelDeployment, run its compression Job and its one learning round here; returns the texts,
    the manifest's variant and the SuperNode Deployments."""
    texts = _texts(tmp_path)
    cluster.apply(_deployment(namespace, tmp_path, texts, policy))

    # The real LM compressor: the int4 variant built LoRA-ready, its layout in the manifest.
    (job,) = cluster.wait_for(
        lambda: children(cluster, namespace, NAME, "jobs"), 60, message="compression Job"
    )
    done = run_compression_job(cluster, namespace, job["metadata"]["name"])
    assert done.returncode == 0, done.stderr[-3000:]
    manifest_cm = job["metadata"]["labels"]["kiri.dev/compression"]
    manifest = manifest_of(cluster, namespace, f"{NAME}-manifest-{manifest_cm}")
    (q4,) = manifest["variants"]
    assert q4["accepted"], q4["reason"]
    assert q4["extra"][LORA_LAYOUT_KEY]["targets"] == ["q_proj", "v_proj"]

    # The federation and round 1's Job, once the manifest says what to export the adapter for.
    links = wait(lambda: deployments(cluster, namespace, "superlink"), 120, "the SuperLink")
    nodes = wait(
        lambda: (d := deployments(cluster, namespace, "supernode")) and len(d) == 3 and d, 90, "SuperNodes"
    )
    round_job = wait(lambda: jobs(cluster, namespace, "kiri.dev/learning-role=round"), 90, "the round Job")[0]
    args = round_job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    config = json.loads(_flag(args, "--run-config-json"))
    assert (config["part"], config["base-model"], config["adapter-targets"]) == (
        "adapter",
        str(texts["checkpoint"]),
        "q_proj,v_proj",
    )
    assert json.loads(config["serve-layout"]) == q4["extra"][LORA_LAYOUT_KEY]

    kubelet = Kubelet(cluster, namespace, tmp_path)
    try:
        kubelet.secret_files(f"{NAME}-flower-tls")
        address = kubelet.superlink(links[0])
        for d in nodes:
            site = d["spec"]["template"]["spec"]["nodeSelector"]["kiri.dev/site"]
            kubelet.supernode(d, address, texts["train"][site])
        kubelet.run_job(round_job, kubelet.control)
    finally:
        kubelet.stop()

    return {**texts, "variant": q4, "supernodes": nodes}


def test_a_language_model_learns_an_adapter_through_flower_and_every_site_serves_it_as_its_default(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    texts = _learn(cluster, namespace, tmp_path, "federated")

    def learned() -> dict[str, Any] | None:
        status = get_md(cluster, namespace, NAME).get("status") or {}
        return (status.get("learning") or {}).get("adapter")

    adapter = wait(learned, 90, "status.learning.adapter")
    (r1,) = get_md(cluster, namespace, NAME)["status"]["learning"]["rounds"]
    assert r1["outcome"] == "Accepted" and sorted(r1["participants"]) == sorted(SITES), r1
    served = tmp_path / "store" / namespace / NAME / "learning" / "rounds" / "0001" / "adapter.onnx_adapter"
    assert adapter["uri"] == served.as_uri()
    assert (adapter["sha256"], adapter["sizeBytes"]) == (
        hashlib.sha256(served.read_bytes()).hexdigest(),
        served.stat().st_size,
    )
    held = adapter["heldOut"]
    assert held["metric"] == "perplexity" and held["adapter"] < held["base"], held  # it helps the sites' text

    # Every site's adapter wave: the learned adapter as the site's default, on all of the site's nodes.
    sites = _rolled_out(cluster, namespace, "every site serving the learned adapter")
    assert {site: s["adapters"] for site, s in sites.items()} == {site: ["learned"] for site in SITES}
    rendered = _edge_args(cluster, namespace, sites["site-a"]["revision"])
    assert _flag(rendered, "--default-adapter") == "learned"
    assert json.loads(_flag(rendered, "--adapter")) == {
        "name": "learned",
        "uri": served.as_uri(),
        "sha256": adapter["sha256"],
    }

    # Site a's edge, served here with the DaemonSet's own args: the bare name gets the learned adapter.
    proc, port = _serve_edge(rendered, tmp_path)
    try:
        lines = [json.loads(line)["text"] for line in texts["held_out"].read_text().splitlines()[:30]]
        bare, base = _mean_nll(port, MODEL, lines), _mean_nll(port, f"{MODEL}:base", lines)
        named = _mean_nll(port, f"{MODEL}:learned", lines)
        assert math.isclose(bare, named, rel_tol=1e-6)  # the site's default is the learned adapter
        assert bare < base, (bare, base)
        print(f"federated: held-out ppl base {held['base']} adapter {held['adapter']}; served edge nll "
              f"base {base:.4f} learned {bare:.4f}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(15)


def test_per_site_each_site_keeps_its_own_adapter_its_supernode_serves_it_and_its_edge_answers_with_it(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    texts = _learn(cluster, namespace, tmp_path, "perSite")

    def kept() -> list[dict[str, Any]] | None:
        learning = (get_md(cluster, namespace, NAME).get("status") or {}).get("learning") or {}
        found = learning.get("siteAdapters") or []
        return found if len(found) == len(SITES) else None

    by_site = {k["site"]: k for k in wait(kept, 90, "status.learning.siteAdapters")}
    learning = get_md(cluster, namespace, NAME)["status"]["learning"]
    assert "adapter" not in learning  # nothing was averaged: there is no global adapter
    supernodes = {
        d["spec"]["template"]["spec"]["nodeSelector"]["kiri.dev/site"]: d for d in texts["supernodes"]
    }
    for site, entry in by_site.items():
        name = supernodes[site]["metadata"]["name"]
        assert entry["uri"] == f"http://{name}.{namespace}.svc:8080/round-0001.onnx_adapter"
        local = tmp_path / f"kept-{site}" / "round-0001.onnx_adapter"  # where the site kept it, here
        assert entry["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
        held = entry["heldOut"]
        assert held["adapter"] < held["base"], (site, held)  # on the site's own held-out text
    # Nothing of the adapters went to the store the cloud writes.
    assert not list((tmp_path / "store").rglob("*.onnx_adapter"))
    assert len({k["sha256"] for k in by_site.values()}) == len(SITES)

    # After its only round, each site's SuperNode (and its store and Service) stays; the SuperLink goes.
    wait(lambda: not deployments(cluster, namespace, "superlink"), 90, "the SuperLink removed")
    assert len(deployments(cluster, namespace, "supernode")) == len(SITES)
    for d in supernodes.values():
        assert (
            cluster.get_json("service", d["metadata"]["name"], "-n", namespace)["spec"]["ports"][0]["port"]
            == 8080
        )

    sites = _rolled_out(cluster, namespace, "every site serving its own adapter")
    assert len({s["revision"] for s in sites.values()}) == len(SITES)  # one name, three different adapters
    rendered = _edge_args(cluster, namespace, sites["site-a"]["revision"])
    assert json.loads(_flag(rendered, "--adapter")) == {
        "name": "learned",
        "uri": by_site["site-a"]["uri"],
        "sha256": by_site["site-a"]["sha256"],
    }

    # Site a's store and edge, here: the edge fetches site a's adapter from site a's SuperNode (the Service's
    # name resolves only in the cluster, so the URI points at the store's local port), checks its sha256, and the
    # bare model name answers with it: site a's text scores better than under the base model.
    kubelet = Kubelet(cluster, namespace, tmp_path)
    proc = None
    try:
        store_port = kubelet.site_store(supernodes["site-a"])
        fetched = httpx.get(f"http://127.0.0.1:{store_port}/round-0001.onnx_adapter", timeout=10)
        assert hashlib.sha256(fetched.content).hexdigest() == by_site["site-a"]["sha256"]
        assert (
            httpx.put(f"http://127.0.0.1:{store_port}/x.onnx_adapter", content=b"x", timeout=10).status_code
            == 405
        )
        local_uri = by_site["site-a"]["uri"].replace(
            f"{supernodes['site-a']['metadata']['name']}.{namespace}.svc:8080", f"127.0.0.1:{store_port}"
        )
        adapter_arg = json.dumps({"name": "learned", "uri": local_uri, "sha256": by_site["site-a"]["sha256"]})
        proc, port = _serve_edge(rendered, tmp_path, **{"--adapter": adapter_arg})
        from lm_sites import write_site

        own = [
            json.loads(line)["text"]
            for line in write_site(tmp_path / "eval-a", SITES["site-a"], 20, seed=5).read_text().splitlines()
        ]
        mine, base = _mean_nll(port, MODEL, own), _mean_nll(port, f"{MODEL}:base", own)
        assert mine < base, (mine, base)
        held = {site: (k["heldOut"]["base"], k["heldOut"]["adapter"]) for site, k in by_site.items()}
        print(
            f"perSite: held-out ppl (base, adapter) {held}; site a's edge nll base {base:.4f} own {mine:.4f}"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        kubelet.stop()
