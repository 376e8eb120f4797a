"""helm/kiri/README.md's values reference is generated from values.yaml, and the check mode catches drift."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def doc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("helm_values_doc", ROOT / "hack" / "helm_values_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["helm_values_doc"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_readme_is_up_to_date(doc: ModuleType) -> None:
    assert doc.main(["--check"]) == 0


def test_a_changed_default_makes_the_check_fail_with_a_diff(
    doc: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(doc.VALUES.read_text().replace("logLevel: INFO", "logLevel: DEBUG"))
    readme = tmp_path / "README.md"
    readme.write_text(doc.README.read_text())
    assert doc.main(["--check", "--values", str(values), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err
    assert '+| `operator.logLevel` | string | `"DEBUG"` |' in err
    assert doc.main(["--values", str(values), "--readme", str(readme)]) == 0
    assert doc.main(["--check", "--values", str(values), "--readme", str(readme)]) == 0


def test_rows_are_helm_docs_comments_with_dotted_keys_types_and_defaults(doc: ModuleType) -> None:
    text = """# -- top
# continued
a: 1
b:
  # -- nested
  c: [x]
  d: plain, undocumented
# -- a map as one row
e:
  f: true
"""
    assert doc.documented(text) == [("a", "top continued"), ("b.c", "nested"), ("e", "a map as one row")]
    assert doc.table(text).splitlines()[2:] == [
        "| `a` | int | `1` | top continued |",
        '| `b.c` | list | `["x"]` | nested |',
        '| `e` | object | `{"f":true}` | a map as one row |',
    ]


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_documented_by_itself_or_a_documented_parent(doc: ModuleType) -> None:
    text = doc.VALUES.read_text()
    keys = [k for k, _ in doc.documented(text)]
    undocumented = [
        leaf
        for leaf in _leaves(yaml.safe_load(text))
        if not any(leaf == k or leaf.startswith(k + ".") for k in keys)
    ]
    assert undocumented == []
