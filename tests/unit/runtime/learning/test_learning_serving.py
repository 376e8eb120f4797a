"""The aggregator in-process over real HTTP (aiohttp test server) with a torch model: the routes end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp.test_utils import TestClient, TestServer

from kiri_runtime.learning import deltas, rounds, serving
from kiri_runtime.learning.collecting import Aggregator, Settings
from kiri_runtime.learning.loading import TorchGlobalModel, save_weights
from kiri_runtime.learning.parts import TrainedPart

TOKENS = {"a": "a" * 20, "b": "b" * 20, "c": "c" * 20}


def _aggregator(tmp_path: Path, **settings: Any) -> Aggregator:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    save_weights(model, tmp_path / "w.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    s = Settings(part=TrainedPart(), clip_norm=1.0, noise_multiplier=1.0, dp_delta=1e-5, **settings)
    return Aggregator(
        s,
        TorchGlobalModel(model, (x, (x[:, 0] > 0).astype(np.int64))),
        tmp_path / "w.pt",
        tmp_path / "out",
        TOKENS,
    )


def _body(agg: Aggregator, site: str, value: float, samples: int = 10) -> bytes:
    st = agg.state
    assert st is not None
    return deltas.encode(
        deltas.Delta(
            round=st.number,
            site=site,
            samples=samples,
            base_sha256=st.base_sha256,
            part=agg.settings.part.describe(),
            clip_norm=1.0,
            noise_multiplier=1.0,
            tensors={n: np.full(s, value, np.float32) for n, s in agg.expected.items()},
        )
    )


async def _post(client: TestClient[Any, Any], agg: Aggregator, site: str, body: bytes) -> int:
    assert agg.state is not None
    r = await client.post(
        f"/v1/rounds/{agg.state.number}/sites/{site}/delta",
        data=body,
        headers={"Authorization": f"Bearer {TOKENS[site]}"},
    )
    return r.status


def _module(agg: Aggregator) -> Any:
    assert isinstance(agg.model, TorchGlobalModel)
    return agg.model.module


async def _open(agg: Aggregator) -> None:
    while agg.state is None:
        await asyncio.sleep(0.01)


async def test_round_closes_after_quorum_and_grace_and_averages_by_samples(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b", "c"), min_clients=2, grace_seconds=0.3, deadline_seconds=30)
    before = _module(agg).weight.detach().clone()
    async with TestClient(TestServer(serving.app(agg))) as client:
        task = asyncio.create_task(agg.run(1))
        await _open(agg)
        assert await _post(client, agg, "a", _body(agg, "a", 0.1, samples=30)) == 202
        assert await _post(client, agg, "a", _body(agg, "a", 0.1)) == 409  # one upload per site and round
        assert await _post(client, agg, "b", _body(agg, "b", 0.5, samples=10)) == 202
        (record,) = await asyncio.wait_for(task, 10)
    assert record.status == "accepted"
    assert [p.site for p in record.participants] == ["a", "b"]
    assert record.skipped == [
        rounds.SkippedSite(site="c", reason="no update by the close of the round (offline or straggler)")
    ]
    # FedAvg: (30 * 0.1 + 10 * 0.5) / 40 = 0.2 on every coordinate.
    torch.testing.assert_close(_module(agg).weight.detach(), before + 0.2)
    assert record.model is not None and Path(record.model.path).is_file()
    assert rounds.history(tmp_path / "out") == [record]


async def test_too_few_updates_by_the_deadline_skip_the_round_but_still_spend_privacy(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a", "b"), min_clients=2, deadline_seconds=0.5)
    async with TestClient(TestServer(serving.app(agg))) as client:
        task = asyncio.create_task(agg.run(1))
        await _open(agg)
        assert await _post(client, agg, "a", _body(agg, "a", 0.1)) == 202
        (record,) = await asyncio.wait_for(task, 10)
        assert await _post(client, agg, "b", _body(agg, "b", 0.1)) == 410
    assert record.status == "skipped"
    assert record.reason == "1 of minClients 2 updates arrived by the deadline"
    assert record.model is None
    assert set(record.privacy.per_site) == {"a"} and record.privacy.epsilon > 0


async def test_round_info_tells_a_site_when_it_may_not_take_part(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), deadline_seconds=0.3)
    async with TestClient(TestServer(serving.app(agg))) as client:
        task = asyncio.create_task(agg.run(1))
        await _open(agg)
        r = await client.get(
            "/v1/round", params={"site": "b"}, headers={"Authorization": f"Bearer {TOKENS['b']}"}
        )
        info = await r.json()
        assert info["open"] and not info["eligible"] and "not expected" in info["reason"]
        r = await client.get(
            "/v1/model", params={"site": "a"}, headers={"Authorization": f"Bearer {TOKENS['a']}"}
        )
        assert r.headers["X-Kiri-Sha256"] == agg.base_sha256
        await asyncio.wait_for(task, 10)


async def test_errors_are_json_bodies_with_the_status_their_error_names(tmp_path: Path) -> None:
    agg = _aggregator(tmp_path, sites=("a",), deadline_seconds=5)
    auth = {"Authorization": f"Bearer {TOKENS['a']}"}
    async with TestClient(TestServer(serving.app(agg))) as client:
        task = asyncio.create_task(agg.run(1))
        await _open(agg)

        async def answer(r: Any) -> tuple[int, str, Any]:
            return r.status, r.content_type, await r.json()

        assert await answer(await client.get("/v1/round")) == (
            400,
            "application/json",
            {"error": "query parameter site= is required"},
        )
        assert await answer(await client.get("/v1/round", params={"site": "a"})) == (
            401,
            "application/json",
            {"error": "missing bearer token"},
        )
        r = await client.post("/v1/rounds/one/sites/a/delta", data=b"", headers=auth)
        assert await answer(r) == (400, "application/json", {"error": "round 'one' is not a number"})
        r = await client.post("/v1/rounds/1/sites/a/delta", data=b"garbage that is not a delta", headers=auth)
        assert r.status == 400 and (await r.json())["error"].startswith("delta header length ")
        big = agg.max_body_bytes + 1
        r = await client.post("/v1/rounds/1/sites/a/delta", data=b"\0" * big, headers=auth)
        assert await answer(r) == (
            413,
            "application/json",
            {"error": f"body of {big} bytes; this round takes at most {agg.max_body_bytes}"},
        )

        async def chunks() -> Any:  # no Content-Length: the body limit is found while reading
            for _ in range(big // (1 << 16) + 1):
                yield b"\0" * (1 << 16)

        r = await client.post("/v1/rounds/1/sites/a/delta", data=chunks(), headers=auth)
        assert await answer(r) == (
            413,
            "application/json",
            {"error": f"body over {agg.max_body_bytes} bytes"},
        )
        r = await client.post("/v1/rounds/1/sites/a/delta", data=_body(agg, "a", 0.1), headers=auth)
        assert await answer(r) == (202, "application/json", {"accepted": True, "round": 1})
        r = await client.get("/healthz")
        assert (r.status, await r.text()) == (200, "ok")
        await asyncio.wait_for(task, 10)
