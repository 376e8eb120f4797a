"""A generative ModelDeployment on real pods (issue 22, operator): the tests' tiny trained LLaMA
(tests/lm_fixture.py) with an int4 edge variant in `cascade` collaboration with the cloud Service, and a cloud
tier that decodes the full model's fp32 pack on CPU (`cloud.resources.gpu: 0`, as
examples/generative-collaboration.yaml does). The operator's own pods run on real kubelets: the edge
DaemonSet's pod on `kiri-real-0`, the cloud Deployment's pod on `kiri-real-1` (relabelled cloud by
test_real_edge_path.py's `real_pair`), both from the runtime image.

As in `make demo`'s generative act (hack/demo.sh, hack/demo_lm.py, hack/demo_real.py): the operator runs here
as a process watching the namespace, the artifact store is a `file://` directory on this host, which the real
nodes share (the operator mounts its `<namespace>/<name>` read-only into both pods as a hostPath), and the
edge pod's cache is the chart's node-cache CSI driver on the edge node. The compression Job's containers run
here with the arguments the operator wrote into the Job (operator_harness.run_compression_job): the language
model compressor needs torch, which no image here can hold (hack/images.py builds only the torch-free
`compressor-quantize`), and the namespace has no compressor ServiceAccount, so the Job gets no pod of its own.

Requests go to the edge pod by pod IP from this host, as the other real-node tests reach pods; its cloud
tier is `http://<name>-cloud.<namespace>.svc:8080`, which the edge pod resolves through the cluster DNS and
reaches through kube-proxy. Marked `real_nodes` (root; see tests/e2e/conftest.py), so it runs after the kwok
tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from kiri_runtime.compressing.lm.sources import directory_sha256

from .conftest import REPO_ROOT, Cluster
from .operator_harness import Operator, crd, run_compression_job
from .test_real_edge_path import CLOUD_NODE, EDGE_NODE, REAL, RUNTIME_IMAGE, TOLERATE_REAL, real_pair
from .test_real_node_cache import cache_driver_on

pytestmark = [pytest.mark.real_nodes, pytest.mark.timeout(900), pytest.mark.usefixtures("crd")]
__all__ = ["crd", "real_pair"]

NAME = MODEL = "chat"
MAX_TOKENS = 24
THRESHOLD = 0.95  # the demo's: margin uncertainty above it hands off (hack/demo.sh LM_THRESHOLD)
PORT = 8080


def _demo_lm() -> ModuleType:
    """hack/demo_lm.py: the demo's prompts (in-domain ones the edge is sure of, the hard one), its eval chats and
    its readers of `usage.kiri` and the edge's `kiri:collab_tokens_total`."""
    spec = importlib.util.spec_from_file_location("kiri_hack_demo_lm", REPO_ROOT / "hack" / "demo_lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO = _demo_lm()
# Openings of functions of the training text, the demo's first, asked as chats. How many tokens of each the int4
# edge is sure of depends on the weights, and those on the machine that trained them (another CPU's kernels
# round differently): one machine's model answered DEMO.EASY[1] alone (11 of 11), another's hands every one of
# these off after 4 or 5.
IN_DOMAIN = (*DEMO.EASY, "def dedent(text):", "def heappop(heap):", "def capwords(s, sep=None):")


def chat_deployment(namespace: str, source: Path, sha: str, eval_data: Path, store: Path) -> dict[str, Any]:
    on_real = {**REAL, "kiri.dev/tier": "edge"}
    return {
        "apiVersion": "kiri.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {
                "name": MODEL,
                "version": "1.0.0",
                "source": {"uri": source.as_uri(), "format": "hf", "sha256": sha},
                "evalDataUri": eval_data.as_uri(),
            },
            "runtime": {"image": RUNTIME_IMAGE, "imagePullPolicy": "Never"},
            "cloud": {
                "replicas": 1,
                "resources": {"cpu": "500m", "memory": "2Gi", "gpu": 0},
                "runtime": {"threads": 1},
                "nodeSelector": {**REAL, "kiri.dev/tier": "cloud"},
                "tolerations": TOLERATE_REAL,
            },
            "edge": {
                "nodeSelector": on_real,
                "tolerations": TOLERATE_REAL,
                "artifacts": {"uri": store.as_uri()},
                "variants": [{"name": "int4", "method": "int4"}],
                "collaboration": {"mode": "cascade", "cascade": {"threshold": THRESHOLD}},
            },
            "rollout": {"stages": [{"percent": 100}], "progressDeadlineSeconds": 300},
        },
    }


@dataclass
class Deployed:
    cluster: Cluster
    ns: str
    operator: Operator
    edge: dict[str, Any]
    cloud: dict[str, Any]
    seconds: dict[str, float]

    @property
    def edge_url(self) -> str:
        return f"http://{self.edge['status']['podIP']}:{PORT}"

    @property
    def cloud_url(self) -> str:
        return f"http://{self.cloud['status']['podIP']}:{PORT}"

    def md(self) -> dict[str, Any]:
        return dict(self.cluster.get_json("modeldeployment", NAME, "-n", self.ns))

    def pod(self, name: str) -> dict[str, Any]:
        return dict(self.cluster.get_json("pod", name, "-n", self.ns))

    def explain(self) -> str:
        pods = self.cluster.kubectl("get", "pods", "-n", self.ns, "-o", "wide", check=False)
        return f"{pods}\nstatus: {self.md().get('status')}\n--- operator ---\n{self.operator.tail(40)}"


def ready_pod(cluster: Cluster, namespace: str, component: str) -> dict[str, Any] | None:
    sel = f"kiri.dev/modeldeployment={NAME},app.kubernetes.io/component={component}"
    for pod in cluster.get_json("pods", "-n", namespace, "-l", sel)["items"]:
        conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        if conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
            return dict(pod)
    return None


@pytest.fixture(scope="module")
def deployed(
    cluster: Cluster, real_pair: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    """The chat ModelDeployment applied, its compression Job's containers run here, and both tiers' pods Ready."""
    from lm_fixture import tiny_llama

    root = tmp_path_factory.mktemp("realgen")
    # Under the temporary directory, which the operator's host-store roots allow (operator_harness).
    source = shutil.copytree(tiny_llama(), root / "checkpoint")
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in DEMO.eval_rows()), encoding="utf-8")
    store = root / "store"
    ns = f"e2e-realgen-{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        stack.enter_context(cache_driver_on(cluster, [EDGE_NODE], root / "csi"))
        cluster.kubectl("create", "namespace", ns)
        stack.callback(
            cluster.kubectl,
            "delete",
            "namespace",
            ns,
            "--wait=true",
            "--timeout=120s",
            check=False,
            timeout=150,
        )
        cluster.wait_for(
            lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", ns, check=False),
            timeout=30,
            message=f"default ServiceAccount in {ns}",
        )
        operator = Operator(cluster, ns).start()
        stack.callback(operator.stop)
        # Last in, first out: the ModelDeployment goes while its operator still runs (its children are
        # owned by it), then the operator, then the namespace, then the cache driver its edge pod mounted.
        stack.callback(
            cluster.kubectl, "delete", "modeldeployment", NAME, "-n", ns, "--ignore-not-found", "--wait=true",
            "--timeout=120s", check=False, timeout=150,
        )  # fmt: skip
        seconds: dict[str, float] = {}
        t0 = time.monotonic()
        cluster.apply(chat_deployment(ns, source, directory_sha256(source), eval_data, store))
        job = cluster.wait_for(
            lambda: cluster.get_json("jobs", "-n", ns, "-l", f"kiri.dev/modeldeployment={NAME}")["items"],
            timeout=60,
            message="the compression Job",
        )[0]
        t_job = time.monotonic()
        run_compression_job(cluster, ns, job["metadata"]["name"])
        seconds["compression Job's containers (here)"] = time.monotonic() - t_job
        d = Deployed(cluster, ns, operator, {}, {}, seconds)

        def healthy() -> dict[str, Any] | None:
            status = d.md().get("status") or {}
            return status if status.get("phase") == "Healthy" else None

        try:
            cluster.wait_for(healthy, timeout=300, interval=1, message=f"{NAME} Healthy")
            edge = cluster.wait_for(
                lambda: ready_pod(cluster, ns, "edge"), timeout=60, message="edge pod Ready"
            )
            cloud = cluster.wait_for(
                lambda: ready_pod(cluster, ns, "cloud"), timeout=120, message="cloud pod Ready"
            )
            assert edge is not None and cloud is not None  # wait_for returns a truthy value
            d.edge, d.cloud = edge, cloud
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{d.explain()}") from None
        seconds["applied -> Healthy, both pods Ready"] = time.monotonic() - t0
        print(f"\n[figure] {seconds}")
        yield d


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def chat(url: str, prompt: str, mode: str | None = None, model: str = MODEL, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }
    if mode is not None:
        body["kiri"] = {"collaboration": mode}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def samples(url: str, name: str) -> dict[str, float]:
    """The samples of metric family `name` (its `_total` lines; `_created` left out), by their label text."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_total{{") or line.startswith(f"{name}_total "):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name) + len("_total") :]] = float(value)
    return out


def test_the_chat_model_becomes_healthy_with_its_edge_pod_on_the_real_edge_node_and_its_cloud_pod_on_the_real_cloud_node(
    deployed: Deployed,
) -> None:
    d = deployed
    status = d.md()["status"]
    assert status["phase"] == "Healthy"
    assert (
        status["currentRevision"]
        == status["updateRevision"]
        == d.edge["metadata"]["labels"]["kiri.dev/revision"]
    )
    assert d.edge["spec"]["nodeName"] == EDGE_NODE
    assert d.cloud["spec"]["nodeName"] == CLOUD_NODE
    assert [o["kind"] for o in d.edge["metadata"]["ownerReferences"]] == ["DaemonSet"]
    assert [o["kind"] for o in d.cloud["metadata"]["ownerReferences"]] == ["ReplicaSet"]
    for pod in (d.edge, d.cloud):
        (container,) = pod["status"]["containerStatuses"]
        assert container["ready"] is True and container["restartCount"] == 0, container
        assert container["containerID"].startswith("containerd://"), container
        assert container["image"] == RUNTIME_IMAGE
    # The edge serves the int4 variant in cascade with the cloud Service, whose one endpoint is the cloud pod;
    # the cloud serves the Job's fp32 pack (the manifest's model), on CPU.
    (edge_c,) = d.edge["spec"]["containers"]
    (cloud_c,) = d.cloud["spec"]["containers"]
    assert flag(edge_c["args"], "--variant") == "int4"
    assert flag(edge_c["args"], "--collaboration") == "cascade"
    assert flag(edge_c["args"], "--cascade-threshold") == str(THRESHOLD)
    assert flag(edge_c["args"], "--fallback-url") == f"http://{NAME}-cloud.{d.ns}.svc:{PORT}"
    assert flag(cloud_c["args"], "--variant") == "full"
    assert "nvidia.com/gpu" not in cloud_c["resources"]["limits"]
    endpoints = d.cluster.get_json("endpoints", f"{NAME}-cloud", "-n", d.ns)
    ips = [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses") or []]
    assert ips == [d.cloud["status"]["podIP"]]
    (variant,) = status["variants"]
    assert variant["name"] == "int4" and variant["state"] == "Verified", variant


def test_the_edge_pod_answers_sure_chats_itself_and_hands_the_hard_one_to_the_cloud_pod_through_its_service(
    deployed: Deployed,
) -> None:
    d = deployed
    cloud_before = samples(d.cloud_url, "kiri_requests")
    edge_before = DEMO.collab_tokens(httpx.get(f"{d.edge_url}/metrics", timeout=10).text, MODEL)
    reports = {}
    for prompt in (*IN_DOMAIN, DEMO.HARD):
        reply = chat(d.edge_url, prompt)  # the deployment's mode: cascade
        assert reply.status_code == 200, reply.text
        body = reply.json()
        kiri = body["usage"]["kiri"]
        reports[prompt] = kiri
        assert kiri["collaboration"] == "cascade", kiri
        print(f"\n[cascade] {prompt!r}: {kiri} -> {body['choices'][0]['message']['content']!r}")
        assert kiri["edge_tokens"] + kiri["cloud_tokens"] == body["usage"]["completion_tokens"], body["usage"]
    assert all(r["edge_tokens"] > 0 for r in reports.values()), reports  # the edge starts every answer
    # What the edge is sure of stays on the edge: the in-domain answer it kept longest, asked again to end
    # before its first uncertain token (all of it, if it never was), is the edge's alone: no hand-off, and the
    # cloud's final check (check: full) keeps every token. How long that stretch is depends on the weights,
    # trained on the machine that runs the tests.
    longest = max(IN_DOMAIN, key=lambda p: reports[p]["edge_tokens"])
    kept = reports[longest]["edge_tokens"]
    reply = chat(d.edge_url, longest, max_tokens=kept)
    assert reply.status_code == 200, reply.text
    sure = reports[f"{longest} (first {kept} tokens)"] = reply.json()["usage"]["kiri"]
    print(f"\n[cascade] {longest!r}, first {kept} tokens: {sure}")
    assert sure["edge_tokens"] == kept, sure
    assert sure["cloud_tokens"] == 0 and sure["handoffs"] == 0 and sure["corrected_tokens"] == 0, sure
    hard = reports[DEMO.HARD]
    assert hard["edge_tokens"] > 0 and hard["cloud_tokens"] > 0, hard
    assert hard["handoffs"] >= 1 and hard["handoff_reason"] == "uncertainty", hard
    assert hard["cloud_requests"] >= 1, hard

    # The edge's own counters agree with the answers, token for token.
    edge_after = DEMO.collab_tokens(httpx.get(f"{d.edge_url}/metrics", timeout=10).text, MODEL)
    answered = DEMO.tier_totals(list(reports.values()))
    assert {t: edge_after.get(t, 0.0) - edge_before.get(t, 0.0) for t in ("edge", "cloud")} == answered
    # The cloud pod on the other node served exactly the calls the edge reports having made, all 200s.
    cloud_after = samples(d.cloud_url, "kiri_requests")
    served = {
        k: v - cloud_before.get(k, 0.0) for k, v in cloud_after.items() if v != cloud_before.get(k, 0.0)
    }
    assert served == {
        f'{{code="200",model="{MODEL}"}}': float(sum(r["cloud_requests"] for r in reports.values()))
    }


def test_a_speculative_answer_from_the_edge_pod_is_the_cloud_only_answer_token_for_token(
    deployed: Deployed,
) -> None:
    d = deployed
    for prompt in (DEMO.HARD, DEMO.EASY[0]):
        reference = chat(d.edge_url, prompt, "cloud-only")
        speculative = chat(d.edge_url, prompt, "speculative")
        assert reference.status_code == 200 and speculative.status_code == 200, (
            reference.text,
            speculative.text,
        )
        ref, spec = reference.json(), speculative.json()
        assert ref["usage"]["kiri"]["edge_tokens"] == 0
        assert ref["usage"]["kiri"]["cloud_tokens"] == ref["usage"]["completion_tokens"] > 0, ref["usage"]
        assert spec["usage"]["kiri"]["collaboration"] == "speculative"
        # The edge really drafted, and what the answer took from it is what the cloud accepted.
        spec_kiri = spec["usage"]["kiri"]
        assert spec_kiri["draft_tokens"] > 0 and spec_kiri["cloud_passes"] >= 1, spec_kiri
        assert spec_kiri["edge_tokens"] == spec_kiri["accepted_tokens"] <= spec_kiri["draft_tokens"], (
            spec_kiri
        )
        assert spec_kiri["edge_tokens"] + spec_kiri["cloud_tokens"] == spec["usage"]["completion_tokens"]
        print(f"\n[speculative] {prompt!r}: {spec_kiri}")
        assert spec["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"], prompt
        assert spec["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]


def test_bad_chat_requests_to_the_edge_pod_are_client_errors_and_the_pod_stays_ready(
    deployed: Deployed,
) -> None:
    d = deployed
    before = samples(d.edge_url, "kiri_requests")
    cases = [
        (chat(d.edge_url, DEMO.HARD, model="no-such-model"), 404, "no-such-model"),
        (chat(d.edge_url, DEMO.HARD, "telepathic"), 400, "kiri.collaboration"),
        (chat(d.edge_url, DEMO.HARD, kiri={"draft_everything": True}), 400, "kiri.draft_everything"),
        (chat(d.edge_url, DEMO.HARD, max_tokens=-3), 400, "max_tokens"),
        (httpx.post(f"{d.edge_url}/v1/chat/completions", content=b"{not json", timeout=30), 400, "JSON"),
    ]
    for reply, code, named in cases:
        assert reply.status_code == code, (code, reply.status_code, reply.text)
        assert named in reply.json()["error"]["message"], reply.text
    after = samples(d.edge_url, "kiri_requests")
    assert not [k for k, v in after.items() if k.startswith('{code="5') and v != before.get(k, 0.0)], after

    pod = d.pod(d.edge["metadata"]["name"])
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    (container,) = pod["status"]["containerStatuses"]
    assert container["restartCount"] == 0 and container["ready"] is True
    assert httpx.get(f"{d.edge_url}/v2/health/ready", timeout=10).status_code == 200
    reply = chat(d.edge_url, DEMO.EASY[1])
    assert reply.status_code == 200, reply.text


def test_deleting_the_chat_model_removes_its_pods_from_both_real_nodes(deployed: Deployed) -> None:
    """Last in this module: the edge pod's node-cache volume is unmounted (a bind mount on the disk the kubelet's
    root is on) and both pods finish terminating."""
    d = deployed
    d.cluster.kubectl(
        "delete", "modeldeployment", NAME, "-n", d.ns, "--wait=true", "--timeout=60s", timeout=90
    )
    names = [d.edge["metadata"]["name"], d.cloud["metadata"]["name"]]

    def gone() -> bool:
        left = d.cluster.get_json("pods", "-n", d.ns)["items"]
        return not [p for p in left if p["metadata"]["name"] in names]

    try:
        d.cluster.wait_for(gone, timeout=90, interval=1, message=f"pods {names} gone")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{d.explain()}") from None
