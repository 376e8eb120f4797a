"""`kiri validate`: offline checks with field paths written the way the API server writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiri_operator import cli

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[4]


def test_examples_validate(capsys: pytest.CaptureFixture[str]) -> None:
    examples = sorted(str(p) for p in (REPO / "examples").glob("*.yaml"))
    assert cli.main(["validate", *examples]) == 0
    out = capsys.readouterr().out
    assert out.count(": valid") == len(examples)


def test_invalid_manifest_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "full.yaml").read_text())
    manifest["spec"]["edge"]["variants"][1]["gate"][0]["threshold"] = 2.0
    manifest["spec"]["cloud"]["replicas"] = -1
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "skipped"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([other, manifest]))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "ModelDeployment detector: spec.cloud.replicas:" in err
    assert "spec.edge.variants[1].gate[0]:" in err and "threshold must be between -1 and 1" in err
    assert "skipped" not in err


def test_unreadable_or_empty_input_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\n")
    assert cli.main(["validate", str(empty)]) == 1
    assert "no kiri.dev/v1alpha1 ModelDeployment found" in capsys.readouterr().err
