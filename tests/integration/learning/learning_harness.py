"""Helpers for the learning integration tests: real `kiri` processes and the tokens they use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import learning_tiny_model

FACTORY = f"{Path(learning_tiny_model.__file__).resolve()}:make_model"
TOKENS = {f"site-{i}": f"token-for-site-{i}-{'x' * 16}" for i in range(5)}


def kiri(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "kiri_operator.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )


@dataclass
class Recorded:
    method: str
    path: str
    body: bytes


@dataclass
class Proxy:
    """Forwards to the aggregator and keeps every request body a trainer sent."""

    upstream: str
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""


def wait_port(port_file: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_file.exists():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"aggregator exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"aggregator did not listen within {timeout}s:\n{log.read_text()}")


def write_tokens(root: Path, sites: list[str]) -> Path:
    path = root / "tokens"
    path.write_text("".join(f"{s}={TOKENS[s]}\n" for s in sites))
    token_dir = root / "site-tokens"
    token_dir.mkdir(exist_ok=True)
    for s in sites:
        (token_dir / s).write_text(TOKENS[s])
    return path
