"""Federated learning on the real control plane, on Flower: the operator makes the TLS Secret and a SuperNode key
Secret per site, the SuperLink (Deployment + Service) on a cloud node and a SuperNode per site pinned to that
site's nodes, and the round Job; their own command lines run here as local processes (the simulated nodes run
no containers) with the files their pods' Secret volumes would hold (the items they name, nothing else), the round record comes back through `kiri publish-round`, and the operator records it, asks
the update policy, and turns the allowed round into a new revision.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiri_operator.planning import federation as F
from kiri_operator.planning.federation import SITE_DATA_MOUNT, TLS_MOUNT
from learning_tiny_model import make_model, write_sites

from .conftest import REPO_ROOT, Cluster
from .operator_harness import (
    KIRI,
    Operator,
    crd,
    free_port,
    get_md,
    model_deployment,
    operator_fixture,
)

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("crd")]
__all__ = ["crd"]

FACTORY = f"{REPO_ROOT / 'tests' / 'learning_tiny_model.py'}:make_model"
SITES = ("site-a", "site-b", "site-c")
# The simulated nodes have no cluster DNS: the Flower processes started here resolve Services to 127.0.0.1.
SVC_RESOLVER = """
import socket
_real = socket.getaddrinfo
def _local(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".svc"):
        host = "127.0.0.1"
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _local
"""


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    yield from operator_fixture(cluster, namespace)


def _jobs(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return list(cluster.get_json("jobs", "-n", namespace, "-l", selector).get("items") or [])


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _deployments(cluster: Cluster, namespace: str, role: str) -> list[dict[str, Any]]:
    selector = f"kiri.dev/learning-role={role}"
    return list(cluster.get_json("deployments", "-n", namespace, "-l", selector).get("items") or [])


class Kubelet:
    """Plays the kubelet for the learning children: their command lines, here, with the Secret's own files."""

    def __init__(self, cluster: Cluster, namespace: str, tmp: Path) -> None:
        self.cluster, self.namespace, self.tmp = cluster, namespace, tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port, self.control_port = free_port(), free_port()
        self.control = ""
        """The SuperLink's Control API address (its `--control-port`), which the round Job submits to."""
        (tmp / "resolver").mkdir(exist_ok=True)
        (tmp / "resolver" / "sitecustomize.py").write_text(SVC_RESOLVER)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **cluster.env,
            "PYTHONPATH": os.pathsep.join(
                [
                    str(tmp / "resolver"),
                    str(REPO_ROOT / "operator"),
                    str(REPO_ROOT / "runtime"),
                    str(REPO_ROOT / "tests"),
                ]
            ),
            "PATH": f"{bin_dir}{os.pathsep}{cluster.env.get('PATH', '')}",
            "FLWR_HOME": str(tmp / "flwr-home"),
            "OMP_NUM_THREADS": "1",
        }
        self.tls = tmp / "tls"

    def secret_files(self, name: str) -> None:
        secret = self.cluster.get_json("secret", name, "-n", self.namespace)
        self.tls.mkdir(exist_ok=True)
        for key, value in secret["data"].items():
            (self.tls / key).write_bytes(base64.b64decode(value))
        (self.tls / "tls.key").chmod(0o600)

    def _secret_data(self, name: str) -> dict[str, bytes]:
        secret = self.cluster.get_json("secret", name, "-n", self.namespace)
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def mount_secrets(self, owner: str, pod: dict[str, Any]) -> dict[str, str]:
        """The pod's Secret volumes (plain or projected) as local directories holding only the items they
        name, as the kubelet would mount them: mount path -> local directory. The TLS Secret's key is kept
        apart (`secret_files`)."""
        out: dict[str, str] = {}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in pod["containers"][0]["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "secret" in volume:
                sources = [{"secret": {**volume["secret"], "name": volume["secret"]["secretName"]}}]
            else:
                sources = [x for x in volume.get("projected", {}).get("sources", []) if "secret" in x]
            if mount["mountPath"] == TLS_MOUNT or not sources:
                continue
            directory = self.tmp / "mounts" / owner / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            for source in sources:
                data = self._secret_data(source["secret"]["name"])
                for item in source["secret"]["items"]:
                    (directory / item["path"]).write_bytes(data[item["key"]])
                    (directory / item["path"]).chmod(0o400)
            out[mount["mountPath"]] = str(directory)
        return out

    def _local(self, args: list[str], mounts: dict[str, str] | None = None) -> list[str]:
        local = [a.replace(TLS_MOUNT, str(self.tls)) for a in args]
        for path, directory in (mounts or {}).items():
            local = [a.replace(path, directory) for a in local]
        return [*KIRI, *local[1:]] if local and local[0] == "kiri" else local

    def start(self, name: str, command: list[str]) -> None:
        log = (self.tmp / f"{name}.log").open("wb")
        self.procs.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp)
        )

    def superlink(self, deployment: dict[str, Any]) -> str:
        pod = deployment["spec"]["template"]["spec"]
        cmd = self._local(pod["containers"][0]["command"], self.mount_secrets("superlink", pod))
        cmd = _swap(_swap(cmd, "--port", str(self.port)), "--host", "127.0.0.1")
        cmd = _swap(cmd, "--control-port", str(self.control_port))
        self.start("superlink", cmd)
        self.control = f"{deployment['metadata']['name']}.{self.namespace}.svc:{self.control_port}"
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return f"{deployment['metadata']['name']}.{self.namespace}.svc:{self.port}"
            time.sleep(0.2)
        raise AssertionError((self.tmp / "superlink.log").read_text()[-3000:])

    def supernode(self, deployment: dict[str, Any], address: str, data: Path) -> None:
        pod = deployment["spec"]["template"]["spec"]
        cmd = self._local(
            pod["containers"][0]["command"], self.mount_secrets(deployment["metadata"]["name"], pod)
        )
        cmd = _swap(cmd, "--superlink", address)
        config = cmd[cmd.index("--node-config") + 1]
        site = config.split('"')[1]
        config = config.replace(SITE_DATA_MOUNT, str(data)).replace(
            "/tmp/kiri-learning", str(self.tmp / f"work-{site}")
        )
        cmd = [*_swap(cmd, "--node-config", config), "--host", "127.0.0.1", "--port", str(free_port())]
        self.start(f"supernode-{site}", cmd)

    def run_job(self, job: dict[str, Any], address: str) -> None:
        pod = job["spec"]["template"]["spec"]
        args = self._local(_swap(pod["initContainers"][0]["args"], "--superlink", address))
        args = _swap(args, "--work-dir", str(self.tmp / f"round-{job['metadata']['name']}"))
        done = subprocess.run(
            [*KIRI, *args], capture_output=True, text=True, env=self.env, timeout=400, check=False
        )
        logs = "\n".join(
            (self.tmp / f).read_text()[-2500:] for f in os.listdir(self.tmp) if f.endswith(".log")
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
        publish = subprocess.run(
            [*KIRI, *pod["containers"][0]["args"]],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        assert publish.returncode == 0, publish.stderr

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def test_the_federation_runs_as_children_on_the_right_nodes_over_the_operators_tls_and_rounds_become_revisions(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    import safetensors.torch
    import torch

    paths, held_out = write_sites(tmp_path, len(SITES), seed=3)
    site_files = dict(zip(SITES, paths, strict=True))
    torch.manual_seed(0)
    start: Any = make_model()
    weights = tmp_path / "v1.safetensors"
    safetensors.torch.save_file(start.state_dict(), weights)
    # The cloud serves the same model as ONNX; its inputs (no labels) are the compressor's eval data.
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(
        start.eval(), (torch.randn(1, 8),), str(onnx_path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.load(held_out)["x"][:64])
    body = model_deployment(
        "lm",
        namespace,
        onnx_path,
        onnx_sha,
        tmp_path / "store",
        [{"name": "int8", "method": "int8-dynamic"}],
        rollout={"updatePolicy": {"minImprovement": 0.0}},
        learning={
            "trainable": {
                "factory": FACTORY,
                "weightsUri": f"file://{weights}",
                "weightsSha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            },
            "evalDataUri": f"file://{held_out}",
            "trained": {"kind": "layers", "layers": ["2"]},
            "rounds": 1,
            "minClients": 2,
            "localEpochs": 2,
            "learningRate": 0.1,
            "batchSize": 16,
            "dp": {"clipNorm": 1.0, "noiseMultiplier": 0.3, "targetEpsilon": 100},
            "schedule": {"intervalSeconds": 60, "deadlineSeconds": 240, "graceSeconds": 30},
        },
    )
    body["spec"]["model"]["evalDataUri"] = f"file://{inputs}"
    cluster.apply(body, namespace)

    # The children: the TLS Secret, the SuperLink on a cloud node, one SuperNode per site on that site's nodes.
    secret = _wait(
        lambda: cluster.kubectl("get", "secret", "lm-flower-tls", "-n", namespace, "-o", "json", check=False),
        90,
        "the TLS Secret",
    )
    secret = json.loads(secret)
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert secret["metadata"]["ownerReferences"][0]["name"] == "lm"
    key_secrets = {site: F.node_key_secret_name("lm", site) for site in SITES}
    for site, name in key_secrets.items():
        made = _wait(
            lambda name=name: cluster.kubectl(
                "get", "secret", name, "-n", namespace, "-o", "json", check=False
            ),
            90,
            f"{site}'s SuperNode key Secret",
        )
        made = json.loads(made)
        assert sorted(made["data"]) == ["supernode.key", "supernode.pub"]
        assert made["metadata"]["ownerReferences"][0]["name"] == "lm"
    links = _wait(lambda: _deployments(cluster, namespace, "superlink"), 90, "the SuperLink")
    nodes_ = _wait(
        lambda: (d := _deployments(cluster, namespace, "supernode")) and len(d) == 3 and d, 90, "SuperNodes"
    )
    service = cluster.get_json("service", "lm-superlink", "-n", namespace)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("fleet", 9092), ("control", 9093)]
    # The API server took the NetworkPolicies (it validates them): the SuperLink's and the SuperNodes'.
    policies = cluster.get_json("networkpolicies", "-n", namespace, "-l", "kiri.dev/modeldeployment=lm")[
        "items"
    ]
    assert sorted(p["metadata"]["name"] for p in policies) == ["lm-superlink", "lm-supernodes"]
    assert {p["metadata"]["ownerReferences"][0]["name"] for p in policies} == {"lm"}
    (link_policy,) = [p for p in policies if p["metadata"]["name"] == "lm-superlink"]
    assert [[q["port"] for q in r["ports"]] for r in link_policy["spec"]["ingress"]] == [[9092], [9093]]
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in cluster.get_json("nodes")["items"]}

    def scheduled() -> list[dict[str, Any]] | None:
        pods = cluster.get_json(
            "pods", "-n", namespace, "-l", "kiri.dev/learning-role in (superlink,supernode)"
        )
        bound = [p for p in pods["items"] if p["spec"].get("nodeName")]
        return bound if len(bound) == 4 else None

    for p in _wait(scheduled, 120, "the federation's pods bound to nodes"):
        labels = nodes[p["spec"]["nodeName"]]
        spec = p["spec"]
        assert spec["automountServiceAccountToken"] is False
        c = spec["containers"][0]
        assert (
            c["securityContext"]["readOnlyRootFilesystem"] is True and spec["securityContext"]["runAsNonRoot"]
        )
        if p["metadata"]["labels"]["kiri.dev/learning-role"] == "superlink":
            assert labels["kiri.dev/tier"] == "cloud"
            assert "--enable-supernode-auth" in c["command"]
            # The sites' public keys, never a private one.
            keys = next(v for v in spec["volumes"] if v["name"] == "supernode-keys")["projected"]["sources"]
            assert [(x["secret"]["name"], x["secret"]["items"]) for x in keys] == [
                (key_secrets[site], [{"key": "supernode.pub", "path": f"{site}.pub"}]) for site in SITES
            ]
        else:
            site = spec["nodeSelector"]["kiri.dev/site"]
            assert labels["kiri.dev/tier"] == "edge" and labels["kiri.dev/site"] == site
            assert [v["secret"]["items"] for v in spec["volumes"] if v["name"] == "tls"] == [
                [{"key": "ca.crt", "path": "ca.crt"}]
            ]
            # Its own site's private key, and no other Secret.
            assert sorted(
                (v["secret"]["secretName"], i["key"])
                for v in spec["volumes"]
                if "secret" in v
                for i in v["secret"]["items"]
            ) == [("lm-flower-tls", "ca.crt"), (key_secrets[site], "supernode.key")]
            assert "--auth-supernode-private-key" in c["command"]
    job = _wait(lambda: _jobs(cluster, namespace, "kiri.dev/learning-role=round"), 90, "the round Job")[0]
    revision_before = get_md(cluster, namespace, "lm")["status"]["updateRevision"]

    # Play the kubelet: the children's own command lines, with the operator's certificates.
    kubelet = Kubelet(cluster, namespace, tmp_path)
    try:
        kubelet.secret_files("lm-flower-tls")
        address = kubelet.superlink(links[0])
        for d in nodes_:
            site = d["spec"]["template"]["spec"]["nodeSelector"]["kiri.dev/site"]
            kubelet.supernode(d, address, site_files[site])
        kubelet.run_job(job, kubelet.control)
    finally:
        kubelet.stop()

    def recorded() -> dict[str, Any] | None:
        learning = get_md(cluster, namespace, "lm").get("status", {}).get("learning") or {}
        return learning if learning.get("roundsCompleted", 0) >= 1 and learning.get("update") else None

    learning = _wait(recorded, 60, "round 1 in status")
    (r1,) = learning["rounds"]
    assert r1["outcome"] == "Accepted" and sorted(r1["participants"]) == list(SITES), r1
    assert r1["epsilon"] > 0 and r1["modelSha256"]
    ledger = cluster.get_json("configmap", "lm-learning-ledger", "-n", namespace)
    spends = json.loads(ledger["data"]["ledger.json"])["spends"]
    assert [(s["round"], s["sites"]) for s in spends] == [(1, list(SITES))]
    assert learning["update"]["allowed"] is True and learning["model"]["round"] == 1
    _wait(
        lambda: get_md(cluster, namespace, "lm")["status"].get("updateRevision") != revision_before,
        60,
        "the learned model's revision",
    )
    # The last round is done: the federation is no longer wanted.
    _wait(lambda: not _deployments(cluster, namespace, "superlink"), 60, "the SuperLink removed")
