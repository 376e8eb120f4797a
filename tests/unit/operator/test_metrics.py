"""The node gauges of a ModelDeployment are replaced as a whole: stale label sets go, others stay."""

from kiri_operator import metrics


def _samples(namespace: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for metric in metrics.NODES.collect():
        for s in metric.samples:
            if s.labels["namespace"] == namespace:
                out[(s.labels["modeldeployment"], s.labels["variant"], s.labels["phase"])] = s.value
    return out


def test_set_nodes_replaces_one_modeldeployments_label_sets() -> None:
    ns = "metrics-test"
    metrics.set_nodes(ns, "a", {("int8", "ready"): 3, ("fp16", "updating"): 1})
    metrics.set_nodes(ns, "b", {("int8", "ready"): 5})
    metrics.set_nodes(ns, "a", {("int8", "ready"): 4})
    assert _samples(ns) == {("a", "int8", "ready"): 4, ("b", "int8", "ready"): 5}
    metrics.set_nodes(ns, "a", {})
    assert _samples(ns) == {("b", "int8", "ready"): 5}
    metrics.set_nodes(ns, "b", {})
    assert _samples(ns) == {}
