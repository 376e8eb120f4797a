"""Edge DaemonSets are OnDelete: a wave changes their node list, and that must not restart pods already moved."""

from __future__ import annotations

from kiri_operator.planning import building as B
from kiri_operator.planning.building import affinity_nodes
from planning_worlds import spec


def test_edge_daemonsets_leave_pod_replacement_to_the_node_list() -> None:
    owner = B.Owner("md", "ns", "uid-1")
    art = B.EdgeArtifact("file:///a/int8.onnx", "d" * 64)
    ds = B.edge_daemonset(spec(), owner, "r1", "c1", "int8", art, ["n1", "n2"], {})
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    # A node moved back onto an older revision keeps that DaemonSet's strategy too.
    repinned = B.repin_daemonset(ds, ["n1", "n2", "n3"])
    assert repinned["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert affinity_nodes(repinned) == ["n1", "n2", "n3"]
