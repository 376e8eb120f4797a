"""Generates the CRD and the API reference from the pydantic models, and checks them for drift.

    python -m kiri_operator.api.generating            # write crds/, the chart's CRD template, docs/api.md
    python -m kiri_operator.api.generating --check    # exit 1 if any committed file differs

Pydantic's JSON Schema is close to what the API server wants but not structural: it uses `$ref`, wraps
optional fields in `anyOf: [X, null]`, carries titles, and leaves out defaults made by `default_factory`.
`structural()` fixes each of those. Optional fields become "not required" rather than `nullable: true`, so
the API server prunes an explicit `null` (as Helm templates often write) instead of storing it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kiri_operator.api import names
from kiri_operator.api.specs import ModelDeploymentSpec
from kiri_operator.api.statuses import ModelDeploymentStatus

JsonDict = dict[str, Any]

GENERATED_HEADER = (
    "# Generated from operator/kiri_operator/api by `python -m kiri_operator.api.generating`. Do not edit.\n"
)
CRD_PATHS = (Path("crds/modeldeployment.yaml"),)
# The chart installs and upgrades the CRD as a template (Helm never upgrades what sits in crds/), behind
# `crds.install`, kept on uninstall with `crds.keep` (deleting a CRD deletes every ModelDeployment).
HELM_CRD_PATH = Path("helm/kiri/templates/crds/modeldeployment.yaml")
DOCS_PATH = Path("docs/api.md")

PRINTER_COLUMNS: list[JsonDict] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {
        "name": "Cloud",
        "type": "integer",
        "jsonPath": ".status.cloud.ready",
        "description": "Ready cloud replicas.",
    },
    {
        "name": "Updated",
        "type": "integer",
        "jsonPath": ".status.edge.updatedNodes",
        "description": "Edge nodes on the update revision.",
    },
    {
        "name": "Target",
        "type": "integer",
        "jsonPath": ".status.edge.targetNodes",
        "description": "Edge nodes the rollout targets.",
    },
    {"name": "Stage", "type": "string", "jsonPath": ".status.edge.stage", "description": "Current wave."},
    {
        "name": "Revision",
        "type": "string",
        "jsonPath": ".status.currentRevision",
        "description": "Last promoted revision.",
    },
    {
        "name": "Update",
        "type": "string",
        "jsonPath": ".status.updateRevision",
        "description": "Revision being rolled out.",
        "priority": 1,
    },
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".spec.model.version",
        "description": "Model version.",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


# --- schema -------------------------------------------------------------------------------------------


def _model_classes(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """Every model class reachable from `root` through field annotations."""
    seen: set[type[BaseModel]] = set()
    stack: list[Any] = [root]
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                continue
            seen.add(annotation)
            yield annotation
            stack.extend(f.annotation for f in annotation.model_fields.values())
        else:
            stack.extend(getattr(annotation, "__args__", ()))


def _factory_default(info: FieldInfo) -> Any:
    """The wire form of a `default_factory` default, which pydantic's JSON Schema leaves out."""
    factory = info.default_factory
    if factory is None or info.default is not PydanticUndefined:
        return PydanticUndefined
    value = factory()  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [
            v.model_dump(mode="json", by_alias=True, exclude_none=True) if isinstance(v, BaseModel) else v
            for v in value
        ]
    return value


def _add_factory_defaults(schema: JsonDict, root: type[BaseModel]) -> None:
    defs = schema.get("$defs", {})
    for cls in _model_classes(root):
        target = schema if cls is root else defs.get(cls.__name__)
        if target is None:
            continue
        for name, info in cls.model_fields.items():
            default = _factory_default(info)
            if default is PydanticUndefined:
                continue
            alias = info.alias or name
            target["properties"][alias]["default"] = default


def _merge(base: JsonDict, overlay: JsonDict) -> JsonDict:
    merged = dict(base)
    for key, value in overlay.items():
        if key == "x-kubernetes-validations":
            merged[key] = list(base.get(key, [])) + list(value)
        else:
            merged[key] = value
    return merged


def _structural(node: Any, defs: JsonDict) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = _merge(target, node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = _merge(node.pop("allOf")[0], node)
        return _structural(node, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) == 1:
            del node["anyOf"]
            node = _merge(_structural(options[0], defs), node)
    node.pop("title", None)
    if node.get("default", 0) is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node["exclusiveMinimum"]
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node["exclusiveMaximum"]
        node["exclusiveMaximum"] = True
    extra = node.pop("additionalProperties", None)
    if extra is True:
        node["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):
        node["additionalProperties"] = _structural(extra, defs)
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _structural(node["items"], defs)
    return _ordered(node)


_KEY_ORDER = (
    "description",
    "type",
    "format",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
)


def _ordered(node: JsonDict) -> JsonDict:
    unknown = set(node) - set(_KEY_ORDER)
    if unknown:
        raise ValueError(f"schema keyword(s) the generator does not handle: {sorted(unknown)}")
    return {k: node[k] for k in _KEY_ORDER if k in node}


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip_defaults(n) for n in node]
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "default":
                continue
            if key == "properties" and isinstance(value, dict):
                # Field names, not keywords: a field called `default` is a field.
                out[key] = {name: _strip_defaults(sub) for name, sub in value.items()}
            else:
                out[key] = _strip_defaults(value)
        return out
    return node


def structural(model: type[BaseModel]) -> JsonDict:
    """The structural OpenAPI v3 schema of `model`: no `$ref`, no `anyOf` null, defaults included."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    _add_factory_defaults(schema, model)
    defs = schema.pop("$defs", {})
    result: JsonDict = _structural(schema, defs)
    return result


def openapi_schema() -> JsonDict:
    spec = structural(ModelDeploymentSpec)
    # Status carries no defaults: it says what the operator wrote, nothing the API server made up.
    status = _strip_defaults(structural(ModelDeploymentStatus))
    return {
        "description": "ModelDeployment serves a model in full on cloud GPU nodes and rolls verified compressed "
        "variants of it onto edge nodes in staged waves with health gates and automatic rollback.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> JsonDict:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "kiri", "app.kubernetes.io/part-of": "kiri"},
        },
        "spec": {
            "group": names.GROUP,
            "names": {
                "kind": names.KIND,
                "listKind": names.LIST_KIND,
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": list(names.SHORT_NAMES),
                "categories": list(names.CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def crd_yaml() -> str:
    body = yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
    return GENERATED_HEADER + body


# --- files --------------------------------------------------------------------------------------------


def rendered() -> dict[Path, str]:
    """Every generated file, by path relative to the repository root."""
    from kiri_operator.api.documenting import api_reference

    text = crd_yaml()
    files = dict.fromkeys(CRD_PATHS, text)
    files[HELM_CRD_PATH] = helm_crd_template(text)
    files[DOCS_PATH] = api_reference(crd())
    return files


def helm_crd_template(text: str) -> str:
    """The CRD as a chart template: rendered only with `crds.install`, annotated `helm.sh/resource-policy:
    keep` with `crds.keep`. The CRD's own YAML is left as generated, so it holds no template syntax."""
    assert "{{" not in text, "the CRD text must not look like a Helm template"
    body = text.removeprefix(GENERATED_HEADER)
    anchor = "metadata:\n  name: " + names.CRD_NAME + "\n"
    assert anchor in body
    annotated = body.replace(
        anchor,
        anchor
        + "  annotations:\n"
        + "    {{- if .Values.crds.keep }}\n"
        + "    helm.sh/resource-policy: keep\n"
        + "    {{- end }}\n",
        1,
    )
    return GENERATED_HEADER + "{{- if .Values.crds.install }}\n" + annotated + "{{- end }}\n"


def default_root() -> Path:
    return Path(__file__).resolve().parents[3]


def write(root: Path) -> list[Path]:
    changed = []
    for rel, text in rendered().items():
        path = root / rel
        if path.exists() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        changed.append(rel)
    return changed


def drift(root: Path) -> dict[Path, str]:
    """A unified diff per generated file that differs from (or is missing in) the tree."""
    diffs = {}
    for rel, text in rendered().items():
        path = root / rel
        current = path.read_text() if path.exists() else ""
        if current != text:
            diffs[rel] = "".join(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile=f"{rel} (committed)",
                    tofile=f"{rel} (generated)",
                )
            )
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiri_operator.api.generating", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="fail if a generated file differs from the tree")
    parser.add_argument("--root", type=Path, default=default_root(), help="repository root")
    args = parser.parse_args(argv)
    if args.check:
        diffs = drift(args.root)
        for rel, diff in diffs.items():
            sys.stderr.write(diff or f"{rel}: differs\n")
        if diffs:
            sys.stderr.write(
                f"{len(diffs)} generated file(s) out of date: run `make crds` and commit the result.\n"
            )
            return 1
        print("crds and docs/api.md are up to date")
        return 0
    for rel in write(args.root):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
