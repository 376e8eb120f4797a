"""Submitting a round to a SuperLink: Kiri's Flower App, the TLS connection, and `flwr run`.

Kiri ships one Flower App: its `pyproject.toml` names the ServerApp (`federating:server_app`) and the ClientApp
(`site_app:client_app`), both in the installed `kiri_runtime`, so the FAB (Flower App Bundle) that `flwr run`
builds holds no code of its own and needs nothing installed at run time (SuperLink and SuperNodes run with
`--disable-runtime-dependency-installation`, or without the flag on SuperNodes, where it is off by default).
`write_app` writes it; `submit` writes a Flower config home with one TLS connection (`root-certificates`) and
runs `flwr run --stream`, which returns when the run has ended.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiri_runtime.learning.errors import LearningError

APP_NAME = "kiri-rounds"
CONNECTION = "kiri"

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "Kiri's federated rounds: the ServerApp and ClientApp are in the installed kiri_runtime"
license = "Apache-2.0"
dependencies = ["flwr>=1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "kiri"

[tool.flwr.app.components]
serverapp = "kiri_runtime.learning.federating:server_app"
clientapp = "kiri_runtime.learning.site_app:client_app"

[tool.flwr.app.config]
{config}
"""

# Every key the apps read (settings.py), with its default: `flwr run --run-config` may only override keys
# the app declares.
DEFAULTS: dict[str, Any] = {
    "factory": "",
    "factory-kwargs": "{}",
    "weights": "",
    "eval": "",
    "out": "",
    "round": 0,
    "sites": "",
    "min-clients": 2,
    "deadline-seconds": 600.0,
    "part": "lora",
    "layers": "",
    "lora-rank": 4,
    "epochs": 1,
    "learning-rate": 0.05,
    "batch-size": 32,
    "clip-norm": 1.0,
    "noise-multiplier": 1.0,
    "dp-delta": 1e-5,
    "target-epsilon": 0.0,
    "secure-aggregation": True,
    "policy": "federated",
    "aggregation": "fedavg",
    "trim-fraction": 0.1,
    "server-learning-rate": 1.0,
    "clipping-range": 8.0,
    "ledger": "",
    "ledger-factory": "",
    "ledger-owner": "",
    "transcript": "",
    # part = "adapter": a language model's LoRA adapter (adapter_rounds.py)
    "base-model": "",
    "adapter-targets": "q_proj,v_proj",
    "adapter-steps": 50,
    "adapter-seq-len": 64,
    "ffa": True,
    "a-seed": 0,
    "serve-layout": "",  # the served model's lora.json as JSON: accepted rounds also write the .onnx_adapter
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise LearningError(f"run config value {value!r}: use str, int, float or bool")


def toml_table(values: Mapping[str, Any]) -> str:
    return "".join(f'"{k}" = {toml_value(v)}\n' for k, v in sorted(values.items()))


def write_app(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(PYPROJECT.format(name=APP_NAME, config=toml_table(DEFAULTS)))
    return directory


def write_home(home: Path, superlink: str, root_certificates: Path | None) -> Path:
    """A Flower config home (`FLWR_HOME`) whose one connection, `kiri`, is the SuperLink over TLS."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {toml_value(superlink)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(root_certificates.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def flwr_command() -> str:
    found = shutil.which(
        "flwr", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        raise LearningError("the `flwr` command is not installed: pip install 'kiri[learning]'")
    return found


def submit(
    work: Path,
    superlink: str,
    run_config: Mapping[str, Any],
    *,
    root_certificates: Path | None,
    timeout: float,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one round: `flwr run --stream` against the SuperLink's Control API; returns when the run ended."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise LearningError(f"run config keys {unknown} are not Kiri's")
    app = write_app(work / "app")
    home = write_home(work / "flwr-home", superlink, root_certificates)
    overrides = work / "run-config.toml"
    overrides.write_text(toml_table(run_config))
    env = {**os.environ, "FLWR_HOME": str(home)}
    cmd = [flwr_command(), "run", str(app), CONNECTION, "--run-config", str(overrides), "--stream"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise LearningError(f"the round did not end within {timeout:g}s") from e
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise LearningError(f"flwr run exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return done
