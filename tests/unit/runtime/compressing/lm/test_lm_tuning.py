"""The auto-tune ladder of language-model variants, with fake candidates: order, stopping, the pick."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiri_runtime.compressing.errors import CompressionError
from kiri_runtime.compressing.lm import tuning
from kiri_runtime.compressing.lm.scoring import LmFidelity
from kiri_runtime.manifests import Gate, VariantSpec

KL_GATE = [Gate(metric="kl", stat="mean", op="<=", threshold=0.05)]


def _spec(method: str = "int4", gate: list[Gate] | None = None, **options: Any) -> VariantSpec:
    return VariantSpec(name="q4", method=method, options=options, gate=KL_GATE if gate is None else gate)  # type: ignore[arg-type]


def _fid(kl: float) -> LmFidelity:
    return LmFidelity(kl_mean=kl, top1_agreement=0.9, perplexity_ratio=1.01, greedy_match=None, positions=10)


class Fake:
    """Candidates whose kl and size are looked up by their options; records what was built."""

    def __init__(self, facts: dict[str, tuple[float, int]], fail: tuple[str, ...] = ()) -> None:
        self.facts = facts
        self.fail = fail
        self.built: list[dict[str, Any]] = []

    def __call__(self, options: dict[str, Any]) -> tuning.Outcome:
        self.built.append(options)
        key = repr(sorted(options.items()))
        if key in self.fail:
            raise CompressionError("builder: boom")
        kl, size = self.facts.get(key, (0.5, 1000))
        return tuning.Outcome(path=Path(f"/tmp/{len(self.built)}"), fidelity=_fid(kl), size_bytes=size)


def k(**options: Any) -> str:
    return repr(sorted(options.items()))


def test_the_int4_ladder_goes_in_order_of_size_cost() -> None:
    assert tuning.rungs(_spec()) == [
        {},
        {"algorithm": "k_quant"},
        {"int8LmHead": True},
        {"int8LmHead": True, "int8Embeddings": True},
        {"int8Layers": "first-last"},
        {"blockSize": 16},
        {"algorithm": "hqq"},
        {"algorithm": "k_quant", "int8LmHead": True, "int8Layers": "first-last"},
        {
            "algorithm": "hqq",
            "blockSize": 16,
            "int8LmHead": True,
            "int8Embeddings": True,
            "int8Layers": "first-last",
        },
    ]


def test_untied_embeddings_skip_the_embeddings_rung() -> None:
    got = tuning.rungs(_spec(), tied_embeddings=False)
    assert len(got) == 8
    assert not any("int8Embeddings" in r for r in got)
    assert got[-1] == {"algorithm": "hqq", "blockSize": 16, "int8LmHead": True, "int8Layers": "first-last"}
    transcode = {"transcode": True, "int8Embeddings": True}
    assert tuning.rungs(_spec(), first=[transcode], tied_embeddings=False)[0] == transcode  # kept as planned


def test_the_variant_options_are_the_base_of_every_rung_and_duplicates_are_dropped() -> None:
    got = tuning.rungs(_spec("int8", blockSize=16, greedyTokens=8))
    assert got == [{"blockSize": 16}, {"blockSize": 16, "algorithm": "k_quant"}]  # block 16 is already given
    assert tuning.rungs(_spec("int4", tune=False, symmetric=True, greedyTokens=4)) == [{"symmetric": True}]
    assert tuning.rungs(_spec("int8"), first=[{"transcode": True}]) == [
        {"transcode": True},
        {},
        {"algorithm": "k_quant"},
        {"blockSize": 16},
    ]


def test_the_search_stops_at_the_first_passing_candidate() -> None:
    fake = Fake({k(): (0.2, 100), k(algorithm="k_quant"): (0.3, 110), k(int8LmHead=True): (0.01, 120)})
    result = tuning.search(_spec(), tuning.rungs(_spec()), fake)
    assert result.accepted and result.path == Path("/tmp/3")
    assert [c.passed for c in result.search()] == [False, False, True]
    assert [c.size_bytes for c in result.search()] == [100, 110, 120]
    assert result.chosen.candidate.options == {"int8LmHead": True}
    assert tuning.reason(result) == (
        "passed kl.mean<=0.05 (0.01) after auto-tune (3 candidates, smallest passing chosen)"
    )


def test_with_tune_all_every_rung_is_built_and_the_smallest_passing_wins() -> None:
    spec = _spec(tuneAll=True)
    fake = Fake(
        {k(int8LmHead=True): (0.01, 300), k(blockSize=16): (0.02, 200), k(algorithm="hqq"): (0.04, 200)}
    )
    result = tuning.search(spec, tuning.rungs(spec), fake)
    assert len(fake.built) == 9
    assert result.chosen.candidate.options == {"blockSize": 16}  # 200 bytes, and first of the equals
    assert [c.passed for c in result.search()].count(True) == 3


def test_when_nothing_passes_the_best_scoring_candidate_is_reported_and_nothing_ships() -> None:
    fake = Fake({k(blockSize=16): (0.07, 500), k(): (0.5, 100)}, fail=(k(algorithm="k_quant"),))
    result = tuning.search(_spec(), tuning.rungs(_spec()), fake)
    assert not result.accepted and result.path is None
    assert result.chosen.candidate.options == {"blockSize": 16}
    failed = [c for c in result.search() if c.error]
    assert [(c.options, c.error, c.generative) for c in failed] == [
        ({"algorithm": "k_quant"}, "builder: boom", None)
    ]
    assert tuning.reason(result) == (
        "rejected: no candidate passed (9 tried); best seen kl.mean<=0.05 (0.07) with options "
        "{'blockSize': 16}; missed kl.mean<=0.05"
    )


def test_when_no_candidate_builds_the_reason_is_the_build_error() -> None:
    spec = _spec("fp16")
    result = tuning.search(spec, tuning.rungs(spec), Fake({}, fail=(k(),)))
    assert tuning.reason(result) == "rejected: no candidate could be built (builder: boom)"


def test_every_gate_must_pass_and_gate_values_come_from_the_lm_fidelity() -> None:
    gates = [
        Gate(metric="kl", op="<=", threshold=0.1),
        Gate(metric="top1-agreement", op=">=", threshold=0.95),
        Gate(metric="perplexity", op="<=", threshold=1.02),
        Gate(metric="greedy-match", op=">=", threshold=0.5),
    ]
    fid = tuning.manifest_fidelity(
        LmFidelity(kl_mean=0.05, top1_agreement=0.9, perplexity_ratio=1.01, greedy_match=None, positions=3)
    )
    results = tuning.check_gates(gates, fid)
    assert [(r.value, r.passed) for r in results] == [(0.05, True), (0.9, False), (1.01, True), (None, False)]
    assert tuning.margin(results[:3]) == pytest.approx(-0.05)  # top-1 is 0.05 short


def test_a_candidate_over_max_bytes_does_not_pass_whatever_its_fidelity() -> None:
    spec = _spec(maxBytes=150)
    fake = Fake({k(): (0.01, 151), k(algorithm="k_quant"): (0.04, 150)})
    result = tuning.search(spec, tuning.rungs(spec), fake)
    assert [(c.passed, c.size_bytes, c.error) for c in result.search()] == [
        (False, 151, "151 bytes, over maxBytes 150"),
        (True, 150, None),
    ]
    assert result.chosen.candidate.options == {"algorithm": "k_quant"}
    assert fake.built[0] == {}  # maxBytes steers the search, the builder never sees it


def test_when_only_over_budget_candidates_meet_the_gates_the_reason_says_so() -> None:
    spec = _spec(maxBytes=10, tune=False)
    result = tuning.search(spec, tuning.rungs(spec), Fake({k(): (0.01, 11)}))
    assert not result.accepted
    assert tuning.reason(result) == (
        "rejected: no candidate passed (1 tried); best seen kl.mean<=0.05 (0.01) with options {}; "
        "missed 11 bytes, over maxBytes 10"
    )


def test_the_budgets_candidate_comes_right_after_the_variants_own_options_and_is_worked_out_only_then() -> (
    None
):
    mix = {"int8Tensors": ["lm_head"], "embeddingBits": 4}
    asked: list[int] = []

    def budgeted() -> dict[str, Any] | None:
        asked.append(1)
        return mix

    spec = _spec(maxBytes=100)
    got = tuning.rungs(spec, first=[{"transcode": True}], budgeted=budgeted)
    assert got[:4] == [{"transcode": True}, {}, budgeted, {"algorithm": "k_quant"}]
    passes_as_given = Fake({k(transcode=True): (0.5, 90), k(): (0.01, 90)})
    assert tuning.search(spec, got, passes_as_given).chosen.candidate.options == {}
    assert asked == []  # the own options passed: no sensitivity pass, no fitting builds
    result = tuning.search(spec, got, Fake({k(int8Tensors=["lm_head"], embeddingBits=4): (0.01, 100)}))
    assert asked == [1]
    assert [c.options for c in result.search()] == [{"transcode": True}, {}, mix]


def test_a_budget_that_nothing_fits_skips_its_rung() -> None:
    spec = _spec(maxBytes=100)
    result = tuning.search(
        spec, tuning.rungs(spec, budgeted=lambda: None), Fake({k(algorithm="k_quant"): (0.01, 50)})
    )
    assert [c.options for c in result.search()] == [{}, {"algorithm": "k_quant"}]
