"""The node cache CSI driver (csi/kiri-cache-csi) is Go: its own tests, vet and gofmt run from here, so
`make test` covers it. Its behaviour on real kubelets is tests/e2e/test_real_node_cache.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[3] / "csi" / "kiri-cache-csi"
GO = shutil.which("go")

pytestmark = pytest.mark.skipif(GO is None, reason="the Go toolchain builds the driver (make binaries)")


def _go(*args: str) -> subprocess.CompletedProcess[str]:
    assert GO is not None
    env = {**os.environ, "GOFLAGS": "-mod=readonly"}
    return subprocess.run(
        [GO, *args], cwd=DRIVER, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_the_drivers_go_tests_pass_and_vet_finds_nothing() -> None:
    tested = _go("test", "-count=1", "./...")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    if os.geteuid() == 0:  # the tests that chown skip themselves otherwise
        assert "ok  \tkiri.dev/csi/kiri-cache-csi" in tested.stdout
    vetted = _go("vet", "./...")
    assert vetted.returncode == 0, vetted.stderr


def test_the_drivers_sources_are_gofmt_clean() -> None:
    assert GO is not None
    gofmt = Path(GO).with_name("gofmt")
    out = subprocess.run([str(gofmt), "-l", "."], cwd=DRIVER, capture_output=True, text=True, check=True)
    assert out.stdout == ""
