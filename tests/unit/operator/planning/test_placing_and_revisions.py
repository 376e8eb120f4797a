"""Placement rules and revision hashing."""

from __future__ import annotations

import pytest

from kiri_operator.api.specs import NodeRequirements, Variant
from kiri_operator.planning.building import store_uri
from kiri_operator.planning.placing import parse_quantity, place, requirements_met
from kiri_operator.planning.revisions import compression_key, revision_key
from planning_worlds import edge_node, spec

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("text", "value"), [("4Gi", 4 * 1024**3), ("512Mi", 512 * 1024**2), ("2", 2), ("500m", 0.5), ("1k", 1000)]
)
def test_parse_quantity(text, value):
    assert parse_quantity(text) == pytest.approx(value)


def test_requirements_labels_expressions_and_memory():
    node = edge_node("n", accelerator="gpu", memory_mb=2048)
    assert requirements_met(NodeRequirements(), node)
    assert requirements_met(
        NodeRequirements.model_validate({"matchLabels": {"kiri.dev/accelerator": "gpu"}}), node
    )
    assert not requirements_met(NodeRequirements.model_validate({"minMemoryMb": 4096}), node)
    expr = {"matchExpressions": [{"key": "kiri.dev/memory-mb", "operator": "Gt", "values": ["1000"]}]}
    assert requirements_met(NodeRequirements.model_validate(expr), node)
    expr = {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "NotIn", "values": ["amd64"]}]}
    assert not requirements_met(NodeRequirements.model_validate(expr), node)
    expr = {"matchExpressions": [{"key": "kiri.dev/missing", "operator": "DoesNotExist"}]}
    assert requirements_met(NodeRequirements.model_validate(expr), node)


def test_first_matching_variant_wins_and_rejected_ones_fall_through():
    variants = [
        Variant.model_validate(
            {"name": "gpu", "method": "fp16", "requires": {"matchLabels": {"kiri.dev/accelerator": "gpu"}}}
        ),
        Variant.model_validate({"name": "cpu", "method": "int8-dynamic"}),
    ]
    nodes = [edge_node("a", accelerator="gpu"), edge_node("b")]
    assert place(variants, nodes).variants == {"a": "gpu", "b": "cpu"}
    assert place(variants, nodes, accepted={"cpu"}).variants == {"a": "cpu", "b": "cpu"}
    only_gpu = place(variants[:1], nodes, accepted=set())
    assert only_gpu.rejected_only == ("a",) and only_gpu.unmatched == ("b",)


def test_revision_covers_what_runs_and_not_where():
    base = spec()
    uri = store_uri(base)
    same = spec()
    assert revision_key(base, uri) == revision_key(same, uri)
    moved = spec(
        **{"edge.variants": [{"name": "fp16", "method": "fp16"}, {"name": "int8", "method": "int8-dynamic"}]}
    )
    assert compression_key(moved, uri) == compression_key(base, uri)
    assert revision_key(moved, uri) == revision_key(base, uri)
    image = spec(**{"runtime.image": "example/kiri:2"})
    assert compression_key(image, uri) == compression_key(base, uri)
    assert revision_key(image, uri) != revision_key(base, uri)
    version = spec(**{"model.version": "2"})
    assert compression_key(version, uri) != compression_key(base, uri)
    assert revision_key(version, uri) != revision_key(base, uri)
    scaled = spec(**{"cloud.replicas": 3})
    assert revision_key(scaled, uri) == revision_key(base, uri)
