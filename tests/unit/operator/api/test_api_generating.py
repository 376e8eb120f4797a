"""The CRD generator: a structural schema, defaults equal to the models', bounded CEL, and a drift check
that catches a stale file."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiri_operator import cli
from kiri_operator.api import ModelDeployment, ModelDeploymentSpec, generating

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[4]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRD = generating.crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's structural defaulting: fill missing properties that have a default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, child in schema["properties"].items():
            if key not in out and "default" in child:
                out[key] = copy.deepcopy(child["default"])
            if key in out:
                out[key] = apply_defaults(out[key], child)
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: apply_defaults(v, schema["additionalProperties"]) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


def test_crd_identity() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "modeldeployments.kiri.dev"
    assert spec["group"] == "kiri.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ModelDeployment"
    assert spec["names"]["plural"] == "modeldeployments"
    assert spec["names"]["shortNames"] == ["mdep"]
    assert VERSION["name"] == "v1alpha1"
    assert VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}


@pytest.mark.parametrize("keyword", ["$ref", "$defs", "anyOf", "allOf", "oneOf", "title", "const"])
def test_schema_has_no_non_structural_keyword(keyword: str) -> None:
    offenders = [path for path, node in _nodes(SCHEMA) if keyword in node]
    assert offenders == []


def test_every_schema_node_has_a_type() -> None:
    untyped = [
        path
        for path, node in _nodes(SCHEMA)
        if "type" not in node
        and not node.get("x-kubernetes-int-or-string")
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert untyped == []
    assert not [path for path, node in _nodes(SCHEMA) if node.get("default", 0) is None]


def test_preserve_unknown_fields_only_where_free_form() -> None:
    preserved = sorted(
        path for path, node in _nodes(SCHEMA) if node.get("x-kubernetes-preserve-unknown-fields")
    )
    assert (
        preserved
        == [
            ".spec.edge.variants[].options",
            ".status.edge.adapters[].rollout",  # a site's adapter waves' memory, as .status.rollout is the revision's
            ".status.rollout",
            ".status.variants[].fidelity",
            ".status.variants[].latency",
        ]
    )


def test_spec_lists_and_maps_are_bounded_for_cel_cost() -> None:
    spec = SCHEMA["properties"]["spec"]
    unbounded = [
        path
        for path, node in _nodes(spec)
        if (node.get("type") == "array" and "maxItems" not in node)
        or (isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node)
        or (node.get("type") == "string" and "enum" not in node and "maxLength" not in node)
    ]
    assert unbounded == []


def test_cel_rules_have_messages_naming_a_field() -> None:
    rules = [
        (path, rule) for path, node in _nodes(SCHEMA) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 20
    for path, rule in rules:
        assert rule["rule"].strip()
        message = rule["message"]
        field = path.rsplit(".", 1)[-1].rstrip("[]")
        # A message names the field it sits on, or (for object rules) one of the fields the rule reads.
        assert field in message or "fieldPath" in rule or "must be" in message, (path, message)


def test_status_carries_no_defaults() -> None:
    assert not [path for path, node in _nodes(SCHEMA["properties"]["status"]) if "default" in node]


def test_printer_columns_point_at_schema_fields() -> None:
    names = [c["name"] for c in VERSION["additionalPrinterColumns"]]
    assert names[:6] == ["Phase", "Cloud", "Updated", "Target", "Stage", "Revision"]
    assert names[-1] == "Age"
    known = {path for path, _ in _nodes(SCHEMA)}
    for column in VERSION["additionalPrinterColumns"]:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert column["jsonPath"] in known, column


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_crd_defaults_equal_model_defaults(example: Path) -> None:
    manifest = yaml.safe_load(example.read_text())
    defaulted = apply_defaults(manifest["spec"], SCHEMA["properties"]["spec"])
    # Quantities may be written as YAML numbers; the models keep them as strings, as Kubernetes does.
    resources = defaulted["cloud"]["resources"]
    defaulted["cloud"]["resources"] = {
        k: str(v) if k in ("cpu", "memory") else v for k, v in resources.items()
    }
    assert defaulted == ModelDeploymentSpec.model_validate(manifest["spec"]).dump()


def test_minimal_spec_defaults_match_the_agreed_sketch() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"name": "m", "version": "1", "source": {"uri": "file:///m.onnx", "sha256": "0" * 64}}}
    )
    wire = apply_defaults(
        {"model": {"name": "m", "version": "1", "source": {"uri": "file:///m.onnx", "sha256": "0" * 64}}},
        SCHEMA["properties"]["spec"],
    )
    assert wire == spec.dump()
    assert wire["cloud"]["nodeSelector"] == {"kiri.dev/tier": "cloud"}
    assert wire["cloud"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert wire["edge"]["nodeSelector"] == {"kiri.dev/tier": "edge"}
    assert wire["rollout"]["stages"] == [{"percent": 100, "bakeSeconds": 0, "pause": False}]
    assert wire["rollout"]["maxUnavailable"] == 1
    assert wire["rollout"]["offlineNodes"] == "Skip"
    assert wire["runtime"]["image"] == "ghcr.io/kiri-dev/kiri-runtime:0.1.0"


def test_committed_files_are_up_to_date() -> None:
    assert generating.drift(REPO) == {}


def test_drift_check_catches_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generating.main(["--root", str(tmp_path)]) == 0
    assert generating.main(["--root", str(tmp_path), "--check"]) == 0
    crd_file = tmp_path / "crds" / "modeldeployment.yaml"
    crd_file.write_text(crd_file.read_text().replace("minimum: 0", "minimum: 1", 1))
    assert generating.main(["--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "crds/modeldeployment.yaml" in err
    assert "-" in err and "minimum: 1" in err
    (tmp_path / "docs" / "api.md").unlink()
    assert set(generating.drift(tmp_path)) == {Path("crds/modeldeployment.yaml"), Path("docs/api.md")}


def test_the_charts_crd_template_is_the_crd_behind_its_switches() -> None:
    files = generating.rendered()
    assert yaml.safe_load(files[Path("crds/modeldeployment.yaml")]) == CRD
    template = files[Path("helm/kiri/templates/crds/modeldeployment.yaml")]
    lines = template.splitlines()
    assert lines[1] == "{{- if .Values.crds.install }}" and lines[-1] == "{{- end }}"
    # Without the template lines it is the CRD, plus the keep annotation.
    plain = "\n".join(line for line in lines if "{{" not in line)
    assert yaml.safe_load(plain) == {
        **CRD,
        "metadata": {**CRD["metadata"], "annotations": {"helm.sh/resource-policy": "keep"}},
    }
    assert not (REPO / "helm" / "kiri" / "crds").exists()  # Helm would install it twice, and never upgrade it


def test_kiri_crd_prints_the_committed_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == (REPO / "crds" / "modeldeployment.yaml").read_text()
    assert cli.main(["crd", "-o", "json"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == CRD


def test_reference_documents_every_spec_and_status_field() -> None:
    doc = generating.rendered()[Path("docs/api.md")]
    for path, node in _nodes(SCHEMA):
        if path.startswith((".spec", ".status")) and "properties" in node:
            assert f"### `{path[1:]}`" in doc, path
            for key in node["properties"]:
                assert f"| {key} |" in doc or f"[{key}](" in doc, f"{path}.{key}"


def test_generator_refuses_keywords_it_does_not_understand() -> None:
    # A keyword the conversion does not know could make the schema non-structural; fail loudly instead.
    with pytest.raises(ValueError, match="does not handle"):
        generating._ordered({"type": "string", "oneOf": []})
    assert generating.crd() == CRD  # and generation is deterministic


def test_examples_parse_as_models() -> None:
    assert len(EXAMPLES) >= 3
    for example in EXAMPLES:
        ModelDeployment.model_validate(yaml.safe_load(example.read_text()))


def test_every_field_is_described_for_kubectl_explain() -> None:
    undescribed = [
        path
        for path, node in _nodes(SCHEMA)
        if path.startswith((".spec", ".status"))
        and not path.endswith(("[]", ".*"))
        and not node.get("description")
    ]
    assert undescribed == []


# Short names kubectl already resolves elsewhere: built-in kinds, Cluster API (MachineDeployment is `md`),
# Argo CD / Argo Rollouts, Flux, cert-manager, KServe, Knative, Crossplane. A clash makes `kubectl get NAME`
# pick one kind of the two.
COMMON_SHORT_NAMES = {
    *("po", "svc", "cm", "ns", "no", "pv", "pvc", "sa", "ep", "ev", "rc", "limits", "quota", "netpol"),
    *("deploy", "ds", "sts", "rs", "cj", "hpa", "pdb", "ing", "sc", "crd", "crds", "csr", "pc", "psp"),
    *("md", "ms", "mp", "mhc", "kcp", "cc", "cl"),
    *("app", "apps", "appproj", "appprojs", "appset", "appsets", "ro", "rollout", "at", "cat"),
    *("ks", "hr", "gitrepo", "helmrepo", "hc", "ocirepo", "bucket"),
    *("cert", "certs", "cr", "crs", "isvc", "ksvc", "kservice", "rev", "route", "cfg", "xrd", "comp"),
}


def test_short_names_collide_with_no_common_kind() -> None:
    assert CRD["spec"]["names"]["shortNames"] == ["mdep"]
    assert not set(CRD["spec"]["names"]["shortNames"]) & COMMON_SHORT_NAMES
    assert CRD["spec"]["names"]["categories"] == ["kiri"]


def test_status_fields_keep_their_names_when_defaults_are_stripped() -> None:
    # The API server prunes (and server-side apply refuses) any status field the schema does not declare;
    # stripping the `default` keyword from status once took the field `edge.adapters[].default` with it.
    status = SCHEMA["properties"]["status"]
    site = status["properties"]["edge"]["properties"]["adapters"]["items"]
    assert site["properties"]["default"] == {
        "description": "The default adapter of `updateRevision` (what a bare model name gets).",
        "type": "string",
    }
    assert [path for path, node in _nodes(status) if "default" in node and path != ""] == []
