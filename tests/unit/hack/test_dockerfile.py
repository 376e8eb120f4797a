"""hack/docker/Dockerfile cannot be built here (no Docker engine), so check what can be checked without one:
its targets, that every image runs as non-root, that the extras it installs exist, and that the commands
the images start are ones the real `kiri` parser accepts (tests/e2e/test_helm.py does the same for the
chart's container args)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from kiri_operator.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "hack" / "docker" / "Dockerfile").read_text()


def _stages() -> dict[str, list[str]]:
    """Instructions per stage name (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = stages.setdefault(match.group(1), [line])
        else:
            current.append(line)
    return stages


def test_five_final_targets_on_a_non_root_base() -> None:
    stages = _stages()
    for target in ("operator", "runtime", "runtime-cuda", "compressor", "compressor-quantize"):
        assert stages[target][0].split()[1] == "base", f"{target} must build on the non-root base stage"
        assert any(line.startswith("COPY --from=build-") for line in stages[target])
    assert "USER 65532:65532" in stages["base"]
    assert not any(line.startswith("USER") and "root" in line for lines in stages.values() for line in lines)


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        ("build-operator", None),
        ("build-runtime", "runtime"),
        ("build-compressor", "learning"),
        ("build-compressor-quantize", "quantize"),
    ],
)
def test_each_image_installs_an_existing_extra(stage: str, extra: str | None) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (run,) = [line for line in _stages()[stage] if "pip install" in line]
    spec = run.rsplit("pip install", 1)[1].split()[-1].strip("'\"")
    if extra is None:
        assert spec == ".", "the operator image installs no extra: no torch, no onnxruntime"
    else:
        assert spec == f".[{extra}]"
        assert extra in extras


def test_the_cuda_runtime_swaps_in_the_cuda_builds_of_the_pinned_onnxruntime_genai() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pinned,) = [d for d in extras["runtime"] if d.startswith("onnxruntime-genai==")]
    (run,) = [line for line in _stages()["build-runtime-cuda"] if "pip install" in line]
    steps = [step.strip() for step in run.split("&&")]
    assert steps[1].endswith("pip install '.[runtime]'")
    # The CPU builds go before the CUDA ones: both install the modules onnxruntime_genai and onnxruntime.
    assert steps[2].endswith("pip uninstall -y onnxruntime-genai onnxruntime")
    cuda = shlex.split(steps[3].split("pip install", 1)[1])
    assert pinned.replace("onnxruntime-genai", "onnxruntime-genai-cuda") in cuda
    assert any(c.startswith("onnxruntime-gpu[cuda,cudnn]") for c in cuda)


def test_operator_image_command_parses_with_the_real_cli() -> None:
    parser = build_parser()
    (cmd_line,) = [line for line in _stages()["operator"] if line.startswith("CMD")]
    cmd = json.loads(cmd_line.removeprefix("CMD").strip())
    args = parser.parse_args(cmd)
    assert args.command == "operator" and args.liveness and args.metrics_port


@pytest.mark.parametrize("cmd", ['["serve", "--help"]', '["compress", "--help"]'])
def test_runtime_and_compressor_commands_exist(cmd: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(shlex.split(" ".join(json.loads(cmd))))
    assert exit_info.value.code == 0  # --help of a registered subcommand
