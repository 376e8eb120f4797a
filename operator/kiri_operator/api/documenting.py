"""Renders docs/api.md, the field reference, from the generated CRD schema.

The reference is built from the same structural schema the API server enforces, so a field, default,
range or CEL rule cannot be documented differently from how it behaves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kiri_operator.api import names

JsonDict = dict[str, Any]

INTRO = f"""\
<!-- Generated from operator/kiri_operator/api by `python -m kiri_operator.api.generating` (`make crds`).
     Do not edit: change the models or operator/kiri_operator/api/documenting.py, then regenerate. -->

# ModelDeployment API reference (`{names.API_VERSION}`)

A `ModelDeployment` (short name `{names.SHORT_NAMES[0]}`, namespaced, with a status subresource) asks Kiri to
serve one model in full on cloud GPU nodes, build compressed variants of it, verify each variant's fidelity
against the full model, and roll the variants that pass onto edge nodes in staged waves, rolling back on its own
when a gate fails.

- CRD: [`crds/modeldeployment.yaml`](../crds/modeldeployment.yaml) (the Helm chart installs and upgrades the
  same CRD from `helm/kiri/templates/crds/`, switch `crds.install`). Print it with `kiri crd`.
- Source of truth: the pydantic models in `operator/kiri_operator/api/` (`specs.py`, `statuses.py`). The CRD and
  this page are generated from them; `make crds-check` (part of `make lint`) fails when either is stale.
- Examples: [`examples/`](../examples/).
- Offline check: `kiri validate FILE...` applies the same rules without a cluster (for GitOps CI), and prints
  each error with the field path the API server would print.

## Conventions

- YAML keys are camelCase; Python attributes are snake_case (`spec.edge.fallback.queueLimit` is
  `spec.edge.fallback.queue_limit`). Read with `ModelDeploymentSpec.model_validate(body["spec"])`, write with
  `.dump()` (camelCase, no nulls, RFC 3339 times).
- Every object has defaults, so the API server stores a fully defaulted spec: what `kubectl get -o yaml` shows is
  what Kiri acts on.
- Optional fields are omitted rather than `null`. An explicit `null` (as templating tools often write) is pruned by
  the API server, and then the default applies, instead of being stored.
- Validation happens in the API server, before anything is stored: OpenAPI ranges, enums and patterns, plus CEL
  rules (`x-kubernetes-validations`) for cross-field rules. Each CEL message names the field it is about. The
  same rules are mirrored in pydantic validators, so the operator and unit tests reach the same verdict offline.
- Lists that CEL rules iterate are bounded (`maxItems`) so the API server can bound the rules' cost.

## Design notes (refinements of the first sketch, with reasons)

- **`model.source.sha256` is required.** Edge links drop and truncate downloads; every fetcher verifies the
  digest, and a revision is the hash of it, so an unpinned model could change under a running rollout.
- **`model.source.uri` schemes are limited** to `file`, `http`, `https`, `s3` and `pvc` (`pvc://claim/path`):
  the ones the artifact fetcher implements. Anything else would be accepted and fail later, on a node, mid-wave.
- **Stages are cumulative** (`nodes: 1` then `percent: 50` means one canary node, then half the fleet in total).
  `nodes` stages come first, each kind strictly increases, and the last stage is `percent: 100` so every
  rollout ends with the whole fleet. The default is a single `percent: 100` stage.
- **`rollout.analysis.queries[].successCondition` is `result <op> <number>`**, not an expression language: the
  operator compares a number, it never evaluates user code.
- **`variants[].options` keeps unknown keys** (`x-kubernetes-preserve-unknown-fields`) so the compressor can grow
  options without a CRD change; the known ones are typed and CEL checks each applies to its method.
- **`variants[].gate` defaults to `cosine mean >= 0.99`**, so a variant is never shipped unverified.
- **A variant using `int8-static` needs `model.evalDataUri`**: calibrating on random inputs gives scales that
  do not match real activations.
- **Variant choice is first match**: a node gets the first variant in list order whose `requires` it satisfies
  (labels, expressions including `Gt`/`Lt` on numeric labels, and `minMemoryMb` against allocatable memory). List
  the most demanding variant first (e.g. fp16 for GPU nodes, then int8 for the rest).
- **`edge.artifacts`** (added during implementation): the compression Job needs a store to write verified
  variants to, and edge nodes need a URI to fetch them from (`fetchUri`, e.g. an HTTP server in front of the
  same store). Both default to a host path so a single-node setup works unchanged.
- **Status has no defaults** and ignores unknown keys when read. Only three places preserve unknown fields:
  the free-form measurement maps (`variants[].fidelity`, `variants[].latency`) whose keys are metric names, and
  `status.rollout`, the wave controller's internal bookkeeping, which must survive an operator restart but is
  not a user contract.
- **Printer columns** show `updatedNodes` and `targetNodes` as two columns (`Updated`, `Target`) because a
  column is one JSONPath; `Stage` is a string the operator writes (e.g. `2/4 (25%)`).
- **`spec.learning` lives in the ModelDeployment, not in a separate CRD** (added for federated learning, see
  [learning.md](learning.md)). An accepted round must become a new revision of *this* deployment and go through
  its compression, gates, waves and `rollout.updatePolicy`; a second CRD would need a cross-object reference,
  ownership rules and a second status to keep consistent, for no field that is not about this one model. The
  price is a larger spec, and it is optional: without `learning` nothing changes. `learning.dp.delta` has no
  schema default because `1e-05` in JSON reads back as a string in YAML 1.1 tools; the operator uses 1e-5.
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type_of(node: JsonDict) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = node.get("type", "any")
    if kind == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return f"map[string]{_type_of(extra)}"
        return "object"
    if "format" in node:
        return f"{kind} ({node['format']})"
    return str(kind)


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return f"`{_escape(text)}`"


def _constraints(node: JsonDict) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(_code(v) for v in node["enum"]))
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {node['maximum']}")
    if "minLength" in node:
        parts.append(f"length >= {node['minLength']}")
    if "maxLength" in node:
        parts.append(f"length <= {node['maxLength']}")
    if "pattern" in node:
        parts.append(f"matches {_code(node['pattern'])}")
    if "minItems" in node:
        parts.append(f"items >= {node['minItems']}")
    if "maxItems" in node:
        parts.append(f"items <= {node['maxItems']}")
    if "maxProperties" in node:
        parts.append(f"entries <= {node['maxProperties']}")
    if node.get("x-kubernetes-preserve-unknown-fields"):
        parts.append("unknown keys kept")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(f"CEL: {_escape(rule['message'])}")
    items = node.get("items", {})
    if node.get("type") == "array" and items.get("type") != "object":
        inner = _constraints(items)
        if inner:
            parts.append(f"each item: {inner}")
    return "; ".join(parts)


def _objects(path: str, node: JsonDict) -> Iterator[tuple[str, JsonDict]]:
    """(path, object schema) for every object with properties, depth first, in field order."""
    if node.get("type") == "array":
        yield from _objects(f"{path}[]", node.get("items", {}))
        return
    if "properties" not in node:
        return
    yield path, node
    for key, child in node["properties"].items():
        yield from _objects(f"{path}.{key}", child)


def _section(path: str, node: JsonDict) -> list[str]:
    lines = [f"### `{path}`", ""]
    if node.get("description"):
        lines += [node["description"].replace("\n", " "), ""]
    object_rules = [r for r in node.get("x-kubernetes-validations", [])]
    if object_rules:
        lines.append("Rules:")
        lines += [f"- {r['message']} (`{r['rule']}`)".replace("\n", " ") for r in object_rules]
        lines.append("")
    required = set(node.get("required", []))
    lines += ["| Field | Type | Required | Default | Validation | Description |", "|---|---|---|---|---|---|"]
    for key, child in node["properties"].items():
        link = key
        if "properties" in child or "properties" in child.get("items", {}):
            suffix = "[]" if child.get("type") == "array" else ""
            link = f"[{key}](#{_anchor(f'{path}.{key}{suffix}')})"
        constraints = _constraints({k: v for k, v in child.items() if k != "x-kubernetes-validations"})
        field_rules = [] if "properties" in child else child.get("x-kubernetes-validations", [])
        if field_rules:
            rules = "; ".join(f"CEL: {_escape(r['message'])}" for r in field_rules)
            constraints = f"{constraints}; {rules}" if constraints else rules
        default = _code(child["default"]) if "default" in child and "properties" not in child else ""
        if "default" in child and "properties" in child:
            default = "defaulted"
        description = _escape(child.get("description", ""))
        lines.append(
            f"| {link} | {_escape(_type_of(child))} | {'yes' if key in required else ''} | {default} "
            f"| {constraints} | {description} |"
        )
    lines.append("")
    return lines


def _anchor(path: str) -> str:
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def api_reference(crd: JsonDict) -> str:
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    lines = [INTRO, "## Printer columns", "", "`kubectl get mdep` shows:", ""]
    lines += ["| Column | JSONPath | Shown | Description |", "|---|---|---|---|"]
    for column in version["additionalPrinterColumns"]:
        shown = "with `-o wide`" if column.get("priority", 0) > 0 else "always"
        lines.append(
            f"| {column['name']} | `{column['jsonPath']}` | {shown} | {column.get('description', '')} |"
        )
    lines.append("")
    for top in ("spec", "status"):
        lines += [f"## {top}", ""]
        for path, node in _objects(top, schema["properties"][top]):
            lines += _section(path, node)
    return "\n".join(lines).rstrip("\n") + "\n"
