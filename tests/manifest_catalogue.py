"""The bad-manifest catalogue (bad_modeldeployments.yaml) and how a case is applied to its base manifest.

Shared by the unit tests (the models) and the e2e tests (the real API server), so both judge the same
manifests.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

CATALOGUE: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "bad_modeldeployments.yaml").read_text())
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def field_path(path: str) -> list[str | int]:
    """`spec.edge.variants[0].name` -> ["spec", "edge", "variants", 0, "name"]."""
    return [int(index) if index else name for name, index in _TOKEN.findall(path)]


def apply_case(base: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with the case's `set` values written and its `delete` paths removed."""
    manifest = copy.deepcopy(base)
    for path, value in case.get("set", {}).items():
        *parents, last = field_path(path)
        _walk(manifest, parents)[last] = value
    for path in case.get("delete", []):
        *parents, last = field_path(path)
        del _walk(manifest, parents)[last]
    return manifest


def _walk(node: Any, keys: list[str | int]) -> Any:
    for key in keys:
        node = node[key]
    return node
