"""A real Flower federation on 127.0.0.1: one SuperLink and a SuperNode per site, TLS from Kiri's own CA, and
SuperNode authentication on as the operator deploys it: a key pair per site (`node_keys`), the SuperLink
registering the sites' public keys (`--supernode-public-keys`), each SuperNode signing with its own key.

Every process is the real Flower executable from the environment running the tests (`flower-superlink`,
`flower-supernode`, and the `flwr-serverapp` / `flwr-clientapp` subprocesses they start), running Kiri's
ServerApp and ClientApp from the checkout under test (PYTHONPATH).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import learning_tiny_model
from kiri_runtime.learning import certificates, launching, node_keys, rounds

ROOT = Path(__file__).resolve().parents[3]
FACTORY = f"{Path(learning_tiny_model.__file__).resolve()}:make_model"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "runtime"), str(ROOT / "tests")])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@dataclass
class Federation:
    root: Path
    sites: dict[str, Path]  # site -> its data
    allow_plain: bool = False
    plain_sites: frozenset[str] | None = None  # the sites that accept plain rounds (None: all or none)
    # site -> variables its SuperNode's process gets on top of env() (the ClientApp subprocesses inherit them)
    site_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    superlink: str = ""
    ca: Path = field(default_factory=Path)
    keys: dict[str, Path] = field(default_factory=dict)  # site -> its SuperNode's private key
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def _start(
        self, name: str, args: list[str], extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        variables = {**env(), **(extra_env or {})}
        with log.open("wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=variables, cwd=self.root)
        self.procs.append(proc)
        return proc

    def start(self) -> Federation:
        tls = certificates.make(["127.0.0.1", "localhost"])
        for name, data in tls.as_secret_data().items():
            (self.root / name).write_bytes(data)
        (self.root / certificates.KEY_FILE).chmod(0o600)
        self.ca = self.root / certificates.CA_FILE
        public_keys = self.root / "supernode-keys"
        public_keys.mkdir()
        for site in self.sites:
            pair = node_keys.make()
            (public_keys / f"{site}.pub").write_bytes(pair.public_key)
            self.keys[site] = self.root / f"{site}.key"
            self.keys[site].write_bytes(pair.private_key)
            self.keys[site].chmod(0o600)
        port, control = free_port(), free_port()
        self.superlink = f"127.0.0.1:{port}"
        self.control = f"127.0.0.1:{control}"
        """The Control API, on a port of its own as the operator starts it (`--control-port`)."""
        self._start(
            "superlink",
            [
                sys.executable, "-m", "kiri_operator.cli", "flower-superlink",
                "--ssl-ca-certfile", str(self.ca),
                "--ssl-certfile", str(self.root / certificates.CERT_FILE),
                "--ssl-keyfile", str(self.root / certificates.KEY_FILE),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--control-port", str(control),
                "--disable-runtime-dependency-installation",
                "--enable-supernode-auth",
                "--supernode-public-keys", str(public_keys),
            ],
        )  # fmt: skip
        self.wait_listening(port)
        self.wait_listening(control)
        for site in self.sites:
            self.start_supernode(f"supernode-{site}", site, self.keys[site])
        return self

    def start_supernode(self, name: str, site: str, key: Path | None) -> subprocess.Popen[bytes]:
        """A SuperNode calling itself `site`, signing with `key` (None: no key of its own); its work directory is
        `work_dir(name)`."""
        data = self.sites.get(site, self.root / "no-data.npz")
        config = f'site="{site}" data="{data}" work-dir="{self.work_dir(name)}"'
        if self.allow_plain and (self.plain_sites is None or site in self.plain_sites):
            config += " allow-plain-rounds=true"
        auth = [] if key is None else ["--auth-supernode-private-key", str(key)]
        return self._start(
            name,
            [
                sys.executable, "-m", "kiri_operator.cli", "flower-supernode",
                "--superlink", self.superlink,
                "--root-certificates", str(self.ca),
                *auth,
                "--node-config", config,
                "--host", "127.0.0.1",
                "--port", str(free_port()),
            ],
            self.site_env.get(site),
        )  # fmt: skip

    def work_dir(self, name: str) -> Path:
        """The work directory of the SuperNode `name` (a site's own: `supernode-<site>`), where it keeps what
        never leaves the site."""
        return self.root / f"work-{name}"

    def log_text(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a Flower process exited:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"the SuperLink did not listen within {timeout}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs if p.exists()
        )

    def run_round(self, config: Mapping[str, Any], timeout: float = 900) -> rounds.RoundRecord:
        number = int(config["round"])
        work = self.root / f"submit-{number}"
        try:
            launching.submit(
                work,
                self.control,
                config,
                root_certificates=self.ca,
                timeout=timeout,
                log=work / "flwr.log",
            )
        except Exception as e:
            raise AssertionError(f"{e}\n{self.tail()}") from None
        path = rounds.round_dir(Path(str(config["out"])), number) / rounds.RECORD_FILE
        assert path.exists(), (
            f"no record for round {number}:\n{(work / 'flwr.log').read_text()}\n{self.tail()}"
        )
        return rounds.load(path)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def round_config(
    tmp: Path, held_out: Path, weights: Path, sites: list[str], number: int, **extra: Any
) -> dict[str, Any]:
    return {
        "factory": FACTORY,
        "weights": str(weights),
        "eval": str(held_out),
        "out": str(tmp / "out"),
        "round": number,
        "sites": ",".join(sites),
        "min-clients": 2,
        "deadline-seconds": 300.0,
        "part": "whole",
        "learning-rate": 0.1,
        "batch-size": 16,
        "clip-norm": 1.0,
        "noise-multiplier": 0.3,
        "dp-delta": 1e-5,
        **extra,
    }
