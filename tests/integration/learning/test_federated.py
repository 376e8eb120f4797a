"""Federated rounds with real trainer and aggregator processes on 127.0.0.1 and seeded non-IID site data."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import dp_accounting
import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from dp_accounting import rdp
from learning_harness import FACTORY, TOKENS, kiri, wait_port, write_tokens

from kiri_runtime.learning import deltas, rounds
from kiri_runtime.learning.parts import TrainedPart, upload_shapes
from learning_tiny_model import make_model, write_sites

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLIP, NOISE, DELTA = 1.0, 0.3, 1e-5


def aggregator_args(tmp: Path, held_out: Path, sites: list[str], *extra: str) -> list[str]:
    return [
        "aggregate",
        "--factory", FACTORY,
        "--eval", str(held_out),
        "--out", str(tmp / "out"),
        "--tokens", str(write_tokens(tmp, sites)),
        "--sites", ",".join(sites),
        "--clip-norm", str(CLIP),
        "--noise-multiplier", str(NOISE),
        "--dp-delta", str(DELTA),
        "--host", "127.0.0.1",
        "--port", "0",
        "--port-file", str(tmp / "port"),
        *extra,
    ]  # fmt: skip


def trainer_args(tmp: Path, url: str, site: str, data: Path, *extra: str) -> list[str]:
    return [
        "train-edge",
        "--factory", FACTORY,
        "--aggregator", url,
        "--site", site,
        "--token-file", str(tmp / "site-tokens" / site),
        "--data", str(data),
        "--work-dir", str(tmp / f"work-{site}"),
        "--clip-norm", str(CLIP),
        "--noise-multiplier", str(NOISE),
        "--learning-rate", "0.1",
        "--batch-size", "16",
        "--epochs", "2",
        "--seed", site.rsplit("-", 1)[1],
        "--noise-seed", "7" + site.rsplit("-", 1)[1],
        *extra,
    ]  # fmt: skip


def accountant_epsilon(noise: float, rounds_: int, delta: float) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), rounds_))
    return float(acc.get_epsilon(delta))


def held_out_accuracy(weights: Path, held_out: Path) -> float:
    model: Any = make_model()
    model.load_state_dict(safetensors.torch.load_file(weights))
    data = np.load(held_out)
    with torch.no_grad():
        pred = model(torch.as_tensor(data["x"])).argmax(dim=1).numpy()
    return float((pred == data["y"]).mean())


def test_rounds_improve_accuracy_account_privacy_and_send_no_samples(
    tmp_path: Path, processes: list[Any], proxy_factory: Any
) -> None:
    sites = [f"site-{i}" for i in range(4)]
    paths, held_out = write_sites(tmp_path, len(sites), seed=0)
    agg_log = tmp_path / "aggregator.log"
    agg = kiri(
        *aggregator_args(tmp_path, held_out, sites, "--rounds", "3", "--part", "lora", "--lora-rank", "2",
                         "--min-clients", "3", "--deadline-seconds", "90", "--grace-seconds", "10"),
        log=agg_log,
    )  # fmt: skip
    processes.append(agg)
    port = wait_port(tmp_path / "port", agg, agg_log)
    proxy = proxy_factory(f"http://127.0.0.1:{port}")
    logs = []
    for site, data in zip(sites, paths, strict=True):
        log = tmp_path / f"{site}.log"
        logs.append(log)
        processes.append(
            kiri(
                *trainer_args(
                    tmp_path, proxy.url, site, data, "--rounds", "3", "--part", "lora", "--lora-rank", "2"
                ),
                log=log,
            )
        )
    assert agg.wait(timeout=240) == 0, agg_log.read_text()
    for p, log in zip(processes[1:], logs, strict=True):
        assert p.wait(timeout=60) == 0, log.read_text()

    records = rounds.history(tmp_path / "out")
    assert [r.round for r in records] == [1, 2, 3]
    assert all(r.status == "accepted" and len(r.participants) == 4 for r in records), records
    # The published artifact is what the record says, and its accuracy is re-measured here, not trusted.
    last = records[-1]
    assert last.model is not None
    weights = Path(last.model.path)
    assert weights == tmp_path / "out" / "rounds" / "0003" / "weights.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == last.model.sha256
    measured = held_out_accuracy(weights, held_out)
    assert measured == pytest.approx(last.eval_after.accuracy if last.eval_after else -1, abs=1e-6)
    start = records[0].eval_before
    assert start is not None and start.accuracy is not None
    assert measured >= start.accuracy + 0.1, (start.accuracy, measured)

    # Every global model is safetensors: the pinned initial weights (round 1's base) and each round's, and
    # that is what each site downloaded (by sha256, named by the format it sniffed).
    initial = tmp_path / "out" / "initial-weights.safetensors"
    bases = [initial, *(Path(r.model.path) for r in records[:-1] if r.model is not None)]
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in bases]
    assert [r.base_sha256 for r in records] == shas
    for site in sites:
        got = sorted(p.name for p in (tmp_path / f"work-{site}").iterdir())
        assert got == sorted(f"global-{sha[:16]}.safetensors" for sha in shas)

    # Epsilon: each site took part in 3 rounds; the accountant, run here, must agree.
    for n, record in enumerate(records, 1):
        assert record.privacy.epsilon == pytest.approx(accountant_epsilon(NOISE, n, DELTA), rel=1e-9)
        assert set(record.privacy.per_site) == set(sites)

    # Every trainer POST is one delta of exactly the round's shapes, and no sample row is in any body.
    posts = [r for r in proxy.requests if r.method == "POST"]
    assert len(posts) == 12
    shapes = {n: tuple(p.shape) for n, p in make_model().named_parameters()}
    expected = upload_shapes(TrainedPart(kind="lora", rank=2), shapes)
    rows = []
    for path in paths:
        x = np.load(path)["x"].astype("<f4")
        rows += [row.tobytes() for row in x]
        rows += [json.dumps(float(v))[:8].encode() for v in x[:5].ravel()]  # textual leaks in the header
    for post in posts:
        decoded = deltas.decode(post.body)
        deltas.check_shapes(decoded.tensors, expected)
        head_end = deltas.HEADER_LENGTH_BYTES + int.from_bytes(
            post.body[: deltas.HEADER_LENGTH_BYTES], "little"
        )
        assert len(post.body) - head_end == sum(4 * int(np.prod(s)) for s in expected.values())
        assert not any(row in post.body for row in rows)
    # Secrets stay out of logs.
    for log in [agg_log, *logs]:
        text = log.read_text()
        assert not any(token in text for token in TOKENS.values())


def test_site_killed_mid_round_does_not_stall_it(tmp_path: Path, processes: list[Any]) -> None:
    sites = [f"site-{i}" for i in range(3)]
    paths, held_out = write_sites(tmp_path, len(sites), seed=1)
    # The user's initial weights as a torch state dict: the aggregator serves that file as round 1's base.
    torch.manual_seed(5)
    user_weights = tmp_path / "v1.pt"
    start: Any = make_model()
    torch.save(start.state_dict(), user_weights)
    user_sha = hashlib.sha256(user_weights.read_bytes()).hexdigest()
    agg_log = tmp_path / "aggregator.log"
    deadline = 300
    agg = kiri(
        *aggregator_args(tmp_path, held_out, sites, "--part", "layers", "--layers", "2", "--min-clients", "2",
                         "--deadline-seconds", str(deadline), "--grace-seconds", "5",
                         "--weights", str(user_weights)),
        log=agg_log,
    )  # fmt: skip
    processes.append(agg)
    url = f"http://127.0.0.1:{wait_port(tmp_path / 'port', agg, agg_log)}"
    trainers = []
    for site, data in zip(sites, paths, strict=True):
        # site-2 trains "forever": it is mid-round when it is killed.
        epochs = ["--epochs", "1000000"] if site == "site-2" else []
        log = tmp_path / f"{site}.log"
        trainers.append(
            kiri(
                *trainer_args(tmp_path, url, site, data, "--part", "layers", "--layers", "2", *epochs),
                log=log,
            )
        )
    processes.extend(trainers)
    for p in trainers[:2]:
        assert p.wait(timeout=150) == 0
    victim = trainers[2]
    assert victim.poll() is None, "the straggler finished; it should still be training"
    victim.kill()
    assert agg.wait(timeout=60) == 0, agg_log.read_text()

    (record,) = rounds.history(tmp_path / "out")
    took = datetime.fromisoformat(record.closed_at) - datetime.fromisoformat(record.opened_at)
    assert took.total_seconds() < deadline / 2
    assert record.status == "accepted"
    assert [p.site for p in record.participants] == sites[:2]
    assert [(s.site, s.reason) for s in record.skipped] == [
        ("site-2", "no update by the close of the round (offline or straggler)")
    ]
    # Only the two uploads were spent; the killed site never released anything.
    assert set(record.privacy.per_site) == set(sites[:2])
    # Round 1 started from the user's torch file, which the sites downloaded as such; it published safetensors.
    assert record.base_sha256 == user_sha
    for site in sites[:2]:
        assert [p.name for p in (tmp_path / f"work-{site}").iterdir()] == [f"global-{user_sha[:16]}.pt"]
    assert record.model is not None and Path(record.model.path).name == "weights.safetensors"
    assert sorted(safetensors.torch.load_file(record.model.path)) == sorted(start.state_dict())


def _zero_delta(info: dict[str, Any], site: str, shapes: dict[str, tuple[int, ...]]) -> deltas.Delta:
    return deltas.Delta(
        round=info["round"],
        site=site,
        samples=10,
        base_sha256=info["baseSha256"],
        part=info["part"],
        clip_norm=CLIP,
        noise_multiplier=NOISE,
        tensors={n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()},
    )


def test_bad_tokens_and_bad_deltas_are_rejected_and_the_budget_refuses_a_round(
    tmp_path: Path, processes: list[Any]
) -> None:
    sites = ["site-0"]
    _, held_out = write_sites(tmp_path, 1, seed=2)
    budget = (accountant_epsilon(NOISE * 10, 2, DELTA) + accountant_epsilon(NOISE * 10, 3, DELTA)) / 2
    agg_log = tmp_path / "aggregator.log"
    args = aggregator_args(
        tmp_path, held_out, sites, "--rounds", "3", "--min-clients", "1", "--grace-seconds", "2"
    )
    write_tokens(tmp_path, ["site-0", "site-1"])  # site-1 holds a token but is not expected in these rounds
    args[args.index("--noise-multiplier") + 1] = str(NOISE * 10)
    agg = kiri(*args, "--target-epsilon", str(budget), log=agg_log)
    processes.append(agg)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{wait_port(tmp_path / 'port', agg, agg_log)}", timeout=10
    )
    auth = {"Authorization": f"Bearer {TOKENS['site-0']}"}
    info = client.get("/v1/round", params={"site": "site-0"}, headers=auth).json()
    shapes = {n: tuple(p.shape) for n, p in make_model().named_parameters()}
    good = _zero_delta(info, "site-0", shapes)
    good.noise_multiplier = NOISE * 10
    url = f"/v1/rounds/{info['round']}/sites/site-0/delta"

    def post(body: bytes, headers: dict[str, str] = auth, path: str = url) -> int:
        return client.post(path, content=body, headers=headers).status_code

    assert client.get("/v1/round", params={"site": "site-0"}).status_code == 401
    assert post(deltas.encode(good), {"Authorization": "Bearer wrong-token-wrong-token"}) == 401
    assert post(deltas.encode(good), {"Authorization": f"Bearer {TOKENS['site-1']}"}) == 401  # another site's
    assert post(b"garbage that is not a delta") == 400
    assert post(deltas.encode(good)[:-5]) == 400  # truncated
    wrong_shape = _zero_delta(info, "site-0", {**shapes, "2.weight": (4, 4)})
    wrong_shape.noise_multiplier = NOISE * 10
    assert post(deltas.encode(wrong_shape)) == 422
    nan = _zero_delta(info, "site-0", shapes)
    nan.noise_multiplier = NOISE * 10
    nan.tensors["0.bias"][0] = np.nan
    assert post(deltas.encode(nan)) == 400
    less_noise = _zero_delta(info, "site-0", shapes)
    assert post(deltas.encode(less_noise)) == 409  # the accountant would be wrong for it
    assert post(deltas.encode(good), path=f"/v1/rounds/{info['round'] + 1}/sites/site-0/delta") == 409
    assert post(b"\0" * (20 << 20)) == 413
    assert client.get("/healthz").status_code == 200  # none of that crashed it

    # Two rounds fit the budget; the third would exceed it and is refused before any site uploads.
    for number in (1, 2):
        for _ in range(100):
            info = client.get("/v1/round", params={"site": "site-0"}, headers=auth).json()
            if info.get("open") and info["round"] == number:
                break
            time.sleep(0.1)
        delta = _zero_delta(info, "site-0", shapes)
        delta.noise_multiplier = NOISE * 10
        assert post(deltas.encode(delta), path=f"/v1/rounds/{number}/sites/site-0/delta") == 202
        # With every expected site in, the round closes at once: a second upload finds it closed.
        assert post(deltas.encode(delta), path=f"/v1/rounds/{number}/sites/site-0/delta") in (409, 410)
    assert agg.wait(timeout=60) == 3, agg_log.read_text()
    records = rounds.history(tmp_path / "out")
    assert [r.status for r in records] == ["accepted", "accepted", "refused"]
    assert records[0].skipped == []
    assert "privacy budget" in records[2].skipped[0].reason
    assert records[2].reason == "only 0 sites within the privacy budget, minClients is 1"
    assert records[1].privacy.epsilon == pytest.approx(accountant_epsilon(NOISE * 10, 2, DELTA), rel=1e-9)
    assert records[1].privacy.epsilon <= budget < accountant_epsilon(NOISE * 10, 3, DELTA)
    assert not any(t in agg_log.read_text() for t in TOKENS.values())
