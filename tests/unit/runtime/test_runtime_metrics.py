"""metrics.observe_many: a histogram fed in bulk reads exactly as one fed value by value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from kiri_runtime.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# Values on, below, between and above the bounds (a value equal to a bound belongs to that bound's bucket).
VALUES = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.99, 1.0, 1.5, 30.0, 0.001]


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_gives_the_buckets_count_and_sum_of_observing_each_value() -> None:
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    a = Histogram("lat", "x", ["model"], buckets=BUCKETS, registry=one_by_one).labels("m")
    b = Histogram("lat", "x", ["model"], buckets=BUCKETS, registry=bulk).labels("m")
    for v in VALUES:
        a.observe(v)
    observe_many(b, VALUES[:5])
    observe_many(b, VALUES[5:])
    got = _samples(bulk)
    assert got == _samples(one_by_one)
    assert got[("lat_count", (("model", "m"),))] == len(VALUES)
    assert got[("lat_bucket", (("le", "0.001"), ("model", "m")))] == 4


def test_observe_many_of_nothing_changes_nothing() -> None:
    registry = CollectorRegistry()
    h = Histogram("lat", "x", buckets=BUCKETS, registry=registry)
    before = _samples(registry)
    observe_many(h, [])
    assert _samples(registry) == before
