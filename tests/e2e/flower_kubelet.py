"""Playing the kubelet for the learning children on kwok's nodes (which run no containers): the SuperLink's,
SuperNodes' and round Job's own command lines run here as local processes, with the files their pods' Secret
volumes would hold (the items they name, nothing else), and Services resolved to 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiri_operator.planning.federation import KEPT_DIR, SITE_DATA_MOUNT, TLS_MOUNT

from .conftest import REPO_ROOT, Cluster
from .operator_harness import KIRI, free_port

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


def jobs(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return list(cluster.get_json("jobs", "-n", namespace, "-l", selector).get("items") or [])


def wait(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def swap(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def deployments(cluster: Cluster, namespace: str, role: str) -> list[dict[str, Any]]:
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
        cmd = swap(swap(cmd, "--port", str(self.port)), "--host", "127.0.0.1")
        cmd = swap(cmd, "--control-port", str(self.control_port))
        self.start("superlink", cmd)
        self.control = f"{deployment['metadata']['name']}.{self.namespace}.svc:{self.control_port}"
        self.listening(self.port, "superlink", 60)
        return f"{deployment['metadata']['name']}.{self.namespace}.svc:{self.port}"

    def supernode(self, deployment: dict[str, Any], address: str, data: Path) -> None:
        pod = deployment["spec"]["template"]["spec"]
        cmd = self._local(
            pod["containers"][0]["command"], self.mount_secrets(deployment["metadata"]["name"], pod)
        )
        cmd = swap(cmd, "--superlink", address)
        config = cmd[cmd.index("--node-config") + 1]
        site = config.split('"')[1]
        config = config.replace(SITE_DATA_MOUNT, str(data)).replace(
            "/tmp/kiri-learning", str(self.tmp / f"work-{site}")
        )
        # A keeping SuperNode's node cache: a directory of the site's own here.
        config = config.replace(KEPT_DIR, str(self.kept_dir(site)))
        cmd = [*swap(cmd, "--node-config", config), "--host", "127.0.0.1", "--port", str(free_port())]
        self.start(f"supernode-{site}", cmd)

    def kept_dir(self, site: str) -> Path:
        return self.tmp / f"kept-{site}"

    def site_store(self, deployment: dict[str, Any]) -> int:
        """A keeping SuperNode's second container (`kiri store --read-only` of what the site kept), here, on a
        free port; returns the port."""
        pod = deployment["spec"]["template"]["spec"]
        (store,) = [c for c in pod["containers"] if c["name"] == "adapters"]
        site = pod["nodeSelector"]["kiri.dev/site"]
        port = free_port()
        cmd = swap(swap(self._local(store["command"]), "--port", str(port)), "--host", "127.0.0.1")
        self.start(f"store-{site}", swap(cmd, "--root", str(self.kept_dir(site))))
        self.listening(port, f"store-{site}", 30)
        return port

    def listening(self, port: int, name: str, timeout: float) -> None:
        """Wait for the process `name` (started by `start`) to accept connections on `port`; fail with its log."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError((self.tmp / f"{name}.log").read_text()[-3000:])

    def run_job(self, job: dict[str, Any], address: str) -> None:
        pod = job["spec"]["template"]["spec"]
        args = self._local(swap(pod["initContainers"][0]["args"], "--superlink", address))
        args = swap(args, "--work-dir", str(self.tmp / f"round-{job['metadata']['name']}"))
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


@dataclass(frozen=True)
class TinyLearning:
    """The learning e2e tests' files: the sites' `.npz` data, the held-out set, the first round's weights, the
    same model as ONNX (what the cloud serves) and its inputs without labels (the compressor's eval data)."""

    site_files: dict[str, Path]
    held_out: Path
    weights: Path
    onnx: Path
    onnx_sha256: str
    inputs: Path

    def trainable(self, factory: str) -> dict[str, str]:
        """`spec.learning.trainable`: the model factory and the first round's weights, with their sha256."""
        digest = hashlib.sha256(self.weights.read_bytes()).hexdigest()
        return {"factory": factory, "weightsUri": f"file://{self.weights}", "weightsSha256": digest}


def tiny_learning(tmp: Path, sites: Sequence[str]) -> TinyLearning:
    import numpy as np
    import safetensors.torch
    import torch

    from learning_tiny_model import make_model, write_sites

    paths, held_out = write_sites(tmp, len(sites), seed=3)
    torch.manual_seed(0)
    start: Any = make_model()
    weights = tmp / "v1.safetensors"
    safetensors.torch.save_file(start.state_dict(), weights)
    onnx_path = tmp / "model.onnx"
    torch.onnx.export(
        start.eval(), (torch.randn(1, 8),), str(onnx_path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    inputs = tmp / "inputs.npz"
    np.savez(inputs, x=np.load(held_out)["x"][:64])
    return TinyLearning(
        dict(zip(sites, paths, strict=True)),
        held_out,
        weights,
        onnx_path,
        hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        inputs,
    )
