"""One hostile or broken site, or a crashed aggregation: a bounded pull on the model, a clear rejection, and
a privacy spend that is written down before anything can fail."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_learning_collecting import TOKENS, ArrayModel, _aggregator, _delta, _opened, _upload

from kiri_runtime.learning import aggregating, deltas, ledgers
from kiri_runtime.learning.errors import BadDelta

pytestmark = pytest.mark.timeout(30)

SITES = ("a", "b", "c", "d", "e")
FIVE = {s: s * 20 for s in SITES}


def _weights(agg: Any) -> np.ndarray:
    assert isinstance(agg.model, ArrayModel)
    return np.concatenate([agg.model.weights[k].ravel() for k in sorted(agg.model.weights)])


async def _round(tmp_path: Path, uploads: Mapping[str, tuple[float, int]], **settings: Any) -> Any:
    agg = _aggregator(tmp_path, FIVE, sites=tuple(uploads), min_clients=len(uploads), **settings)
    before = _weights(agg)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    for site, (value, samples) in uploads.items():
        _upload(agg, site, deltas.encode(_delta(agg, site, value, samples=samples)))
    (record,) = await asyncio.wait_for(task, 10)
    assert record.status == "accepted", record.reason
    return _weights(agg) - before


@pytest.mark.parametrize("aggregation", ["fedavg", "trimmed-mean"])
async def test_one_poisoned_site_of_five_moves_the_round_no_further_than_its_bounded_share(
    tmp_path: Path, aggregation: str
) -> None:
    honest = {s: (0.1, 100) for s in SITES[:4]}
    clean = await _round(tmp_path / "clean", honest, aggregation=aggregation)
    # The fifth site claims a billion samples and sends an update a million times too large.
    moved = await _round(
        tmp_path / "poisoned", {**honest, "e": (1e6, 1_000_000_000)}, aggregation=aggregation
    )
    dimension = moved.size  # 8 trained coordinates, clipNorm 1, noiseMultiplier 1
    bound = aggregating.norm_bound(1.0, 1.0, dimension)
    assert bound == pytest.approx(1 + math.sqrt(8) + 6)
    # Its weight is capped at 4 x the median count (400 of 800): a share of 1/2, times twice the norm bound.
    stated = 2 * bound * 0.5
    assert np.linalg.norm(moved - clean) <= stated
    if aggregation == "trimmed-mean":  # trimmed, the outlier is dropped from every coordinate
        np.testing.assert_allclose(moved, clean, atol=1e-6)


def test_the_trimmed_mean_trims_one_from_each_end_at_three_sites() -> None:
    updates = [{"w": np.array([v], np.float32)} for v in (0.1, 0.2, 1e6)]
    assert aggregating.trimmed_mean(updates, 0.1)["w"][0] == pytest.approx(0.2)


def test_honest_clipped_and_noised_updates_pass_the_server_side_bound_untouched() -> None:
    rng = np.random.default_rng(0)
    d, clip, sigma = 10_000, 1.0, 1.0
    bound = aggregating.norm_bound(clip, sigma, d)
    for _ in range(20):
        update = rng.normal(0, 1, d)
        update *= clip / np.linalg.norm(update)
        noised = {"w": (update + rng.normal(0, sigma * clip, d)).astype(np.float32)}
        _, _, touched = aggregating.bound_influence([noised], [10], bound)
        assert touched == []


async def test_a_huge_samples_value_is_refused_clearly_and_the_round_still_closes_with_its_record(
    tmp_path: Path,
) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=1, grace_seconds=0.1)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 0.1, samples=10)))
    with pytest.raises(
        BadDelta, match=r"^delta reports 10000000000000000000\.\.\. samples; at most 1000000000 are taken$"
    ):
        _upload(agg, "b", deltas.encode(_delta(agg, "b", 0.1, samples=10**400)))
    (record,) = await asyncio.wait_for(task, 10)
    assert record.status == "accepted"
    assert [p.site for p in record.participants] == ["a"]
    assert [(s.site, s.reason[:40]) for s in record.skipped] == [
        ("b", "update rejected: delta reports 100000000")
    ]


class CrashingModel(ArrayModel):
    def updated(self, update: Mapping[str, np.ndarray], server_lr: float) -> ArrayModel | None:
        raise MemoryError("out of memory while aggregating")


async def test_a_crashed_aggregation_is_a_skipped_round_whose_spend_the_ledger_already_holds(
    tmp_path: Path,
) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=2)
    assert isinstance(agg.model, ArrayModel)
    agg.model = CrashingModel(agg.model.weights)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    for site in ("a", "b"):
        _upload(agg, site, deltas.encode(_delta(agg, site, 0.1)))
    (record,) = await asyncio.wait_for(task, 10)
    assert (record.status, record.reason) == (
        "skipped",
        "aggregation failed: MemoryError: out of memory while aggregating",
    )
    assert agg.ledger.spent() == {"a": 1, "b": 1}


async def test_spends_the_ledger_holds_count_against_the_budget_even_without_round_records(
    tmp_path: Path,
) -> None:
    # Round 1's aggregator died after the uploads and before its record: only the ledger knows.
    ledger = ledgers.FileLedger(tmp_path / "api" / "ledger.json")
    ledger.spend(1, ["a", "b"], {"a": 0.5, "b": 0.5})
    model = ArrayModel({"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)})
    model.save(tmp_path / "w.safetensors")
    from kiri_runtime.learning.collecting import Aggregator, Settings
    from kiri_runtime.learning.parts import TrainedPart

    settings = Settings(
        part=TrainedPart(), clip_norm=1.0, noise_multiplier=5.0, dp_delta=1e-5, sites=("a", "b", "c")
    )
    from kiri_runtime.learning import accounting

    one, two = (accounting.epsilon(5.0, n, 1e-5) for n in (1, 2))
    settings.target_epsilon = (one + two) / 2  # one round fits, two do not
    agg = Aggregator(settings, model, tmp_path / "w.safetensors", tmp_path / "out", TOKENS, ledger=ledger)
    refused = agg._refusals(ledger.spent())
    assert sorted(refused) == ["a", "b"]


class RefusingLedger:
    def spent(self) -> dict[str, int]:
        return {}

    def spend(self, number: int, sites: Sequence[str], epsilon: Mapping[str, float]) -> None:
        raise ConnectionError("the API server refused the ledger write")


async def test_a_round_whose_spend_cannot_be_written_down_is_not_accepted(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), min_clients=1)
    agg.ledger = RefusingLedger()
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 0.1)))
    (record,) = await asyncio.wait_for(task, 10)
    assert (record.status, record.reason) == (
        "skipped",
        "the privacy ledger could not be written: the API server refused the ledger write",
    )
    assert record.model is None
