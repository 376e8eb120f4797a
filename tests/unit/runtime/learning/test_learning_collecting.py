"""The aggregator's rounds without HTTP or torch: admitting and taking uploads, closing, accepting, skipping."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from kiri_runtime.learning import aggregating, deltas, rounds
from kiri_runtime.learning.collecting import Aggregator, Settings, load_tokens
from kiri_runtime.learning.errors import (
    BadDelta,
    Conflict,
    Forbidden,
    LearningError,
    RoundClosed,
    TooLarge,
    Unauthorized,
    WrongShape,
)
from kiri_runtime.learning.parts import TrainedPart

TOKENS = {"a": "a" * 20, "b": "b" * 20, "c": "c" * 20}


class ArrayModel:
    """A numpy model: its loss is the sum of its weights, so an update shows in the evaluation."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(w.shape) for n, w in self.weights.items()}

    def evaluate(self) -> rounds.Evaluation:
        return rounds.Evaluation(loss=float(sum(w.sum() for w in self.weights.values())), samples=4)

    def updated(self, update: Mapping[str, np.ndarray], server_lr: float) -> ArrayModel | None:
        with np.errstate(over="ignore"):
            new = aggregating.apply(self.weights, update, server_lr)
        return ArrayModel(new) if all(np.isfinite(w).all() for w in new.values()) else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(safetensors.numpy.save(self.weights))


def _aggregator(tmp_path: Path, tokens: Mapping[str, str] = TOKENS, **settings: Any) -> Aggregator:
    model = ArrayModel({"w": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)})
    model.save(tmp_path / "w.safetensors")
    s = Settings(part=TrainedPart(), clip_norm=1.0, noise_multiplier=1.0, dp_delta=1e-5, **settings)
    return Aggregator(s, model, tmp_path / "w.safetensors", tmp_path / "out", tokens)


def _delta(agg: Aggregator, site: str, value: float, samples: int = 10, **changes: Any) -> deltas.Delta:
    st = agg.state
    assert st is not None
    d = deltas.Delta(
        round=st.number,
        site=site,
        samples=samples,
        base_sha256=st.base_sha256,
        part=agg.settings.part.describe(),
        clip_norm=1.0,
        noise_multiplier=1.0,
        tensors={n: np.full(s, value, np.float32) for n, s in agg.expected.items()},
    )
    for k, v in changes.items():
        setattr(d, k, v)
    return d


def _upload(agg: Aggregator, site: str, body: bytes) -> dict[str, Any]:
    assert agg.state is not None
    st = agg.admit(str(agg.state.number), site, len(body))
    return agg.take(st, site, body)


async def _opened(agg: Aggregator) -> None:
    while agg.state is None:
        await asyncio.sleep(0.01)


def test_the_round_logic_imports_neither_torch_nor_aiohttp() -> None:
    code = (
        "import sys, kiri_runtime.learning.collecting; "
        "print(sorted(m for m in ('torch', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_round_closes_after_quorum_and_grace_averages_by_samples_and_publishes(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b", "c"), min_clients=2, grace_seconds=0.2, deadline_seconds=30)
    base = agg.base_sha256
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    body = deltas.encode(_delta(agg, "a", 0.1, samples=30))
    assert _upload(agg, "a", body) == {"accepted": True, "round": 1}
    with pytest.raises(Conflict, match=r"^site 'a' already uploaded to round 1$"):
        _upload(agg, "a", body)
    assert _upload(agg, "b", deltas.encode(_delta(agg, "b", 0.5, samples=10))) == {
        "accepted": True,
        "round": 1,
    }
    (record,) = await asyncio.wait_for(task, 10)
    assert record.status == "accepted" and record.reason == ""
    assert [(p.site, p.samples, p.upload_bytes) for p in record.participants] == [
        ("a", 30, len(body)),
        ("b", 10, len(body)),
    ]
    assert record.skipped == [
        rounds.SkippedSite(site="c", reason="no update by the close of the round (offline or straggler)")
    ]
    # FedAvg: (30 * 0.1 + 10 * 0.5) / 40 = 0.2 on every coordinate.
    assert isinstance(agg.model, ArrayModel)
    np.testing.assert_allclose(agg.model.weights["w"], np.full((2, 3), 0.2), rtol=1e-6)
    np.testing.assert_allclose(agg.model.weights["b"], np.full(2, 1.2), rtol=1e-6)
    assert record.eval_before == rounds.Evaluation(loss=2.0, samples=4)
    assert record.eval_after is not None and record.eval_after.loss == pytest.approx(2.0 + 8 * 0.2)
    # The published weights are the next round's base.
    assert record.model is not None and record.base_sha256 == base
    published = Path(record.model.path)
    assert published == tmp_path / "out" / "rounds" / "0001" / rounds.WEIGHTS_FILE
    assert hashlib.sha256(published.read_bytes()).hexdigest() == record.model.sha256 == agg.base_sha256
    assert agg.weights == published and agg.global_weights() == (published.read_bytes(), agg.base_sha256)
    assert set(record.privacy.per_site) == {"a", "b"}
    assert rounds.history(tmp_path / "out") == [record]
    assert agg.finished and agg.next_round() == 2


async def test_every_expected_site_in_closes_the_round_at_once(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=1, grace_seconds=60, deadline_seconds=60)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 0.1)))
    _upload(agg, "b", deltas.encode(_delta(agg, "b", 0.1)))
    (record,) = await asyncio.wait_for(task, 5)
    assert record.status == "accepted" and record.skipped == []


async def test_too_few_updates_by_the_deadline_skip_the_round_but_still_spend_privacy(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=2, deadline_seconds=0.3)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 0.1)))
    late = deltas.encode(_delta(agg, "b", 0.1))
    (record,) = await asyncio.wait_for(task, 10)
    with pytest.raises(RoundClosed, match=r"^round 1 is closed$") as caught:
        _upload(agg, "b", late)
    assert caught.value.status == 410
    assert record.status == "skipped"
    assert record.reason == "1 of minClients 2 updates arrived by the deadline"
    assert record.model is None and record.eval_after is None
    assert set(record.privacy.per_site) == {"a"} and record.privacy.epsilon > 0
    assert isinstance(agg.model, ArrayModel)
    np.testing.assert_array_equal(agg.model.weights["w"], np.zeros((2, 3)))


async def test_admit_refuses_before_the_body_is_read(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), deadline_seconds=5)
    with pytest.raises(Conflict, match=r"^round 1 is not the open round None$"):
        agg.admit("1", "a", None)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    cases: list[tuple[tuple[str, str, int | None], type[LearningError], int, str]] = [
        (("one", "a", None), BadDelta, 400, "round 'one' is not a number"),
        (("2", "a", None), Conflict, 409, "round 2 is not the open round 1"),
        (("1", "c", None), Forbidden, 403, "site 'c' is not expected in this round"),
        (
            ("1", "a", agg.max_body_bytes + 1),
            TooLarge,
            413,
            f"body of {agg.max_body_bytes + 1} bytes; this round takes at most {agg.max_body_bytes}",
        ),
    ]
    for args, kind, status, message in cases:
        with pytest.raises(kind) as caught:
            agg.admit(*args)
        assert (type(caught.value), caught.value.status, str(caught.value)) == (kind, status, message)
    assert agg.admit("1", "a", agg.max_body_bytes) is agg.state
    agg.settings.deadline_seconds = 0.01
    agg.changed.set()
    await asyncio.wait_for(task, 5)


async def test_a_rejected_upload_is_named_in_the_record_and_the_site_may_retry(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=1, deadline_seconds=0.5)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    shapes = dict(agg.expected)
    wrong: list[tuple[bytes, type[LearningError], str]] = [
        (b"garbage that is not a delta", BadDelta, "header length"),
        (deltas.encode(_delta(agg, "a", 0.1))[:-5], BadDelta, "not valid safetensors"),
        (deltas.encode(_delta(agg, "a", np.nan)), BadDelta, "NaN or infinite"),
        (
            deltas.encode(
                _delta(agg, "a", 0.1, tensors={**_delta(agg, "a", 0).tensors, "w": np.zeros((3, 2))})
            ),
            WrongShape,
            "tensor 'w' has shape [3, 2], the round expects [2, 3]",
        ),
        (
            deltas.encode(_delta(agg, "a", 0.1, tensors={"w": np.zeros(shapes["w"])})),
            WrongShape,
            "missing ['b'], unexpected []",
        ),
        (deltas.encode(_delta(agg, "b", 0.1)), Conflict, "delta is for round 1 site 'b', posted as 1 'a'"),
        (deltas.encode(_delta(agg, "a", 0.1, round=2)), Conflict, "delta is for round 2 site 'a'"),
        (
            deltas.encode(_delta(agg, "a", 0.1, base_sha256="0" * 64)),
            Conflict,
            "trained from base 000000000000",
        ),
        (deltas.encode(_delta(agg, "a", 0.1, part={"kind": "lora"})), Conflict, "the round trains"),
        (deltas.encode(_delta(agg, "a", 0.1, noise_multiplier=0.5)), Conflict, "accountant is only right"),
    ]
    for body, kind, message in wrong:
        with pytest.raises(kind) as caught:
            _upload(agg, "a", body)
        assert type(caught.value) is kind and message in str(caught.value)
    assert agg.state is not None and agg.state.deltas == {}
    # Only decoding and shape errors are kept as the reason a site was left out; the last was a 409.
    assert agg.state.rejected == {"a": "delta tensors do not match the round: missing ['b'], unexpected []"}
    (record,) = await asyncio.wait_for(task, 10)
    assert record.status == "skipped"
    assert [(s.site, s.reason) for s in record.skipped] == [
        ("a", "update rejected: delta tensors do not match the round: missing ['b'], unexpected []"),
        ("b", "no update by the close of the round (offline or straggler)"),
    ]


async def test_an_upload_that_arrives_as_the_round_closes_is_refused(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), deadline_seconds=5)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    body = deltas.encode(_delta(agg, "a", 0.1))
    st = agg.admit("1", "a", len(body))
    st.open = False  # what run_round does at the deadline, while this body was still arriving
    with pytest.raises(RoundClosed, match=r"^round 1 closed while the upload arrived$"):
        agg.take(st, "a", body)
    assert st.deltas == {}
    agg.settings.deadline_seconds = 0.01
    agg.changed.set()
    (record,) = await asyncio.wait_for(task, 5)
    assert record.status == "skipped"


async def test_round_info_tells_a_site_its_round_and_whether_it_may_take_part(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), deadline_seconds=0.3)
    assert agg.round_info("a") == {"finished": False, "open": False}
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    st = agg.state
    assert st is not None
    common = {
        "finished": False,
        "open": True,
        "round": 1,
        "baseSha256": agg.base_sha256,
        "part": {"kind": "whole", "names": [], "rank": 4},
        "loraSeed": st.lora_seed,
        "clipNorm": 1.0,
        "noiseMultiplier": 1.0,
        "closesAt": st.opened + 0.3,
        "submitted": False,
    }
    assert agg.round_info("a") == common | {"eligible": True, "reason": ""}
    assert agg.round_info("b") == common | {
        "eligible": False,
        "reason": "site 'b' is not expected in this round",
    }
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 0.1)))
    assert agg.round_info("a")["submitted"] is True
    await asyncio.wait_for(task, 10)
    assert agg.round_info("a")["finished"] is True and agg.round_info("a")["open"] is False


def test_only_the_sites_own_or_the_shared_bearer_token_is_authorized(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, tokens={**TOKENS, "*": "s" * 20})
    agg.authorize("a", f"Bearer {TOKENS['a']}")
    agg.authorize("a", f"bearer {TOKENS['a']}")
    agg.authorize("z", f"Bearer {'s' * 20}")  # a site without its own token may use the shared one
    for site, header, message in [
        ("a", "", "missing bearer token"),
        ("a", f"Basic {TOKENS['a']}", "missing bearer token"),
        ("a", "Bearer ", "missing bearer token"),
        ("a", f"Bearer {TOKENS['b']}", "bad token for site 'a'"),
        ("a", f"Bearer {'s' * 20}", "bad token for site 'a'"),  # the shared token does not stand in for a's
    ]:
        with pytest.raises(Unauthorized) as caught:
            agg.authorize(site, header)
        assert (str(caught.value), caught.value.status) == (message, 401)
    private = _aggregator(tmp_path)
    with pytest.raises(Unauthorized, match=r"^bad token for site 'z'$"):
        private.authorize("z", f"Bearer {TOKENS['a']}")


async def test_a_round_that_would_exceed_the_privacy_budget_is_refused_before_it_opens(
    tmp_path: Path,
) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), target_epsilon=0.01)
    (record,) = await asyncio.wait_for(agg.run(3), 5)
    assert record.status == "refused"
    assert record.reason == "only 0 sites within the privacy budget, minClients is 1"
    assert [s.site for s in record.skipped] == ["a", "b", "c"]  # c holds a token, so it is accounted too
    assert all(s.reason.startswith("privacy budget: epsilon would reach ") for s in record.skipped)
    assert agg.state is None and agg.finished


async def test_an_aggregate_with_non_finite_weights_skips_the_round(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), server_lr=1e38)
    task = asyncio.create_task(agg.run(1))
    await _opened(agg)
    _upload(agg, "a", deltas.encode(_delta(agg, "a", 1e10)))
    (record,) = await asyncio.wait_for(task, 5)
    assert record.status == "skipped"
    assert record.reason == (
        "the aggregated model has non-finite weights: lower learningRate or --server-learning-rate"
    )
    assert record.eval_before == rounds.Evaluation(loss=2.0, samples=4) and record.model is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_clients": 0}, "minClients must be >= 1"),
        ({"sites": ("a",), "min_clients": 2}, "exceeds the 1 expected sites"),
        ({"aggregation": "median"}, "aggregation 'median'"),
        ({"deadline_seconds": 0}, "deadline must be > 0"),
        ({"grace_seconds": -1}, "grace >= 0"),
        ({"target_epsilon": 0}, "targetEpsilon must be > 0"),
    ],
)
def test_settings_refuse_impossible_rounds(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(LearningError, match=message):
        Settings(part=TrainedPart(), clip_norm=1.0, noise_multiplier=1.0, dp_delta=1e-5, **settings)


def test_tokens_come_from_a_directory_or_a_file_of_site_token_lines(tmp_path: Path) -> None:
    d = tmp_path / "secret"
    d.mkdir()
    (d / "a").write_text("a" * 16 + "\n")
    (d / ".hidden").write_text("x")
    assert load_tokens(d) == {"a": "a" * 16}
    f = tmp_path / "tokens"
    f.write_text(f"# sites\n\na = {'a' * 16}\n*={'s' * 16}\n")
    assert load_tokens(f) == {"a": "a" * 16, "*": "s" * 16}
    f.write_text("a\n")
    with pytest.raises(LearningError, match=r"tokens:1: expected 'site=token'"):
        load_tokens(f)
    f.write_text("a=short\n")
    with pytest.raises(LearningError, match="each at least 16 characters"):
        load_tokens(f)
    with pytest.raises(LearningError, match="no such file or directory"):
        load_tokens(tmp_path / "missing")
