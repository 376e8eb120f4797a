"""Federated rounds on Flower with real processes: a SuperLink and three SuperNodes over TLS, SecAgg+ on.

What the server-side process received is read from the ServerApp's transcript (`transcript` run config: every
array of every message it got), and compared with each site's true clipped update, which the test computes
itself by training the same model on the same data with the same seed. site-2 requires secure aggregation;
site-0 and site-1 accept plain rounds (the baseline the check is shown to catch).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_harness import FACTORY, Federation, round_config
from flwr.common.secure_aggregation.quantization import quantize

from kiri_runtime.learning import accounting, ledgers, rounds
from kiri_runtime.learning.loading import load_arrays, load_model, save_weights
from kiri_runtime.learning.parts import TrainedPart
from kiri_runtime.learning.training import train_local
from learning_tiny_model import make_model, write_sites

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

SITES = ["site-0", "site-1", "site-2"]
PLAIN_SITES = frozenset({"site-0", "site-1"})
CLIP, NOISE, DELTA = 1.0, 0.3, 1e-5
HIDDEN = 64  # 771 parameters: long enough vectors for the correlation bound below
SECURE_ROUND, PLAIN_ROUND, PER_SITE_ROUND = 1, 12, 21


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path, Path]]:
    root = tmp_path_factory.mktemp("flower")
    data, held_out = write_sites(root, len(SITES))
    torch.manual_seed(0)
    weights = root / "initial.safetensors"
    save_weights(make_model(HIDDEN), weights)  # type: ignore[arg-type]
    fed = Federation(
        root, dict(zip(SITES, data, strict=True)), allow_plain=True, plain_sites=PLAIN_SITES
    ).start()
    try:
        yield fed, held_out, weights
    finally:
        fed.stop()


def config(root: Path, held_out: Path, weights: Path, number: int, **extra: object) -> dict[str, object]:
    return round_config(
        root, held_out, weights, SITES, number, **{"factory-kwargs": json.dumps({"hidden": HIDDEN}), **extra}
    )


@pytest.fixture(scope="module")
def secure_round(federation: tuple[Federation, Path, Path]) -> rounds.RoundRecord:
    fed, held_out, weights = federation
    transcript = fed.root / "transcript"
    return fed.run_round(config(fed.root, held_out, weights, SECURE_ROUND, transcript=str(transcript)))


@pytest.fixture(scope="module")
def plain_round(federation: tuple[Federation, Path, Path]) -> rounds.RoundRecord:
    fed, held_out, weights = federation
    extra = {
        "transcript": str(fed.root / "transcript"),
        "out": str(fed.root / "out-plain"),
        "secure-aggregation": False,
    }
    return fed.run_round(config(fed.root, held_out, weights, PLAIN_ROUND, **extra))


def clipped_params(base: Path, data: Path, number: int) -> np.ndarray:
    """What the site sends before SecAgg+: its trained weights, their update clipped to CLIP (flat)."""
    module = load_model(FACTORY, {"hidden": HIDDEN}, base)
    start = {n: p.detach().numpy().copy() for n, p in module.named_parameters()}
    x, y = load_arrays(data, "site data")
    result = train_local(
        module, x, y, TrainedPart("whole"), epochs=1, lr=0.1, batch_size=16, seed=number, lora_seed=0
    )
    names = sorted(result.update)
    update = np.concatenate([result.update[n].ravel() for n in names])
    scale = min(1.0, CLIP / float(np.linalg.norm(update)))
    return np.concatenate([start[n].ravel() for n in names]) + update * scale


def received_arrays(transcript: Path) -> list[np.ndarray]:
    """Every array the server received, and per message and record the record's arrays end to end (a site
    sends the model as one array per parameter tensor, in the order of their names)."""
    out = []
    for path in sorted(transcript.glob("*.npz")):
        with np.load(path) as f:
            groups: dict[str, list[np.ndarray]] = {}
            for k in f.files:
                out.append(np.asarray(f[k]).ravel())
                groups.setdefault(k.rsplit("/", 1)[0], []).append(np.asarray(f[k]).ravel())
            out += [np.concatenate(g) for g in groups.values() if len(g) > 1]
            # SecAgg+'s masked vector starts with the masked weight factor (one value): without it too.
            out += [np.concatenate(g[1:]) for g in groups.values() if len(g) > 2 and g[0].size == 1]
    return out


def test_a_round_over_tls_with_secagg_plus_is_accepted_and_every_sites_spend_is_in_the_ledger(
    federation: tuple[Federation, Path, Path], secure_round: rounds.RoundRecord
) -> None:
    fed, held_out, _ = federation
    first = secure_round
    assert first.status == "accepted", first.reason
    assert first.secure_aggregation is True
    assert [p.site for p in first.participants] == SITES
    assert all(p.samples == 120 for p in first.participants)
    one = accounting.epsilon(NOISE, 1, DELTA)
    assert first.privacy.per_site == pytest.approx(dict.fromkeys(SITES, one))
    assert first.traffic["receivedBytes"] > 0 and first.traffic["sentBytes"] > 0
    assert first.model is not None and Path(first.model.path).exists()
    assert first.eval_after is not None
    spent = ledgers.FileLedger(fed.root / "out" / ledgers.LEDGER_KEY).spent()
    assert spent == dict.fromkeys(SITES, 1)
    # The next round would take every site past a budget of one round: refused before anything is sent.
    budget = one + 1e-6
    refused = fed.run_round(
        config(fed.root, held_out, Path(first.model.path), 2, **{"target-epsilon": budget})
    )
    assert refused.status == "refused"
    assert refused.participants == []
    assert {s.site for s in refused.skipped} == set(SITES)
    assert all(s.reason.startswith("privacy budget: epsilon would reach") for s in refused.skipped)
    assert ledgers.FileLedger(fed.root / "out" / ledgers.LEDGER_KEY).spent() == spent


def test_the_server_side_process_holds_only_masked_vectors_with_secagg_plus_and_each_update_without_it(
    federation: tuple[Federation, Path, Path],
    secure_round: rounds.RoundRecord,
    plain_round: rounds.RoundRecord,
) -> None:
    fed, _, weights = federation
    assert secure_round.status == plain_round.status == "accepted"
    transcript = fed.root / "transcript"
    for mode, number in (("secure", SECURE_ROUND), ("plain", PLAIN_ROUND)):
        got = received_arrays(transcript / f"{number:04d}")
        assert got, f"the {mode} round's transcript is empty"
        senders = PLAIN_SITES if mode == "plain" else SITES
        for site in senders:
            truth = clipped_params(weights, fed.sites[site], number)
            same_size = [a for a in got if a.size == truth.size]
            in_clear = [a for a in same_size if np.allclose(a.astype(np.float64), truth, atol=1e-4)]
            if mode == "plain":
                # Without SecAgg+ the server holds each site's update: the check sees one when it is there.
                assert len(in_clear) == 1, (
                    f"{site}: {len(in_clear)} clear copies among {len(same_size)} arrays"
                )
                continue
            assert in_clear == [], f"{site}'s update reached the server in the clear"
            quantized = quantize([truth.astype(np.float32)], 8.0, 4194304)[0].astype(np.float64)
            masked = [a.astype(np.float64) for a in same_size]
            assert len(masked) == len(SITES)  # one masked vector per site, nothing else of that size
            for vector in masked:
                assert not np.array_equal(vector, quantized)
                # The masks are uniform mod 2^32: a masked vector does not even correlate with the values.
                assert abs(float(np.corrcoef(vector, quantized)[0, 1])) < 0.2
                assert vector.max() > 2**31  # spread over the modulus, far beyond the 2^22 quantization


def test_a_site_requiring_secure_aggregation_sends_nothing_to_a_plain_round(
    federation: tuple[Federation, Path, Path], plain_round: rounds.RoundRecord
) -> None:
    fed, _, weights = federation
    assert plain_round.secure_aggregation is False
    assert [p.site for p in plain_round.participants] == sorted(PLAIN_SITES)
    (skipped,) = plain_round.skipped
    assert skipped.site == "site-2"
    assert skipped.reason == "no result by the close of the round (offline, straggler or failed)"
    truth = clipped_params(weights, fed.sites["site-2"], PLAIN_ROUND)
    got = received_arrays(fed.root / "transcript" / f"{PLAIN_ROUND:04d}")
    assert not any(a.size == truth.size and np.allclose(a, truth, atol=1e-4) for a in got)
    assert len([a for a in got if a.size == truth.size]) == len(PLAIN_SITES)


def test_a_per_site_round_keeps_each_sites_model_on_the_site_and_sends_the_server_metrics_only(
    federation: tuple[Federation, Path, Path],
) -> None:
    fed, held_out, weights = federation
    transcript = fed.root / "transcript-per-site"
    out = fed.root / "out-per-site"
    extra = {"policy": "perSite", "transcript": str(transcript), "out": str(out)}
    record = fed.run_round(config(fed.root, held_out, weights, PER_SITE_ROUND, **extra))
    assert record.status == "accepted", record.reason
    assert [p.site for p in record.participants] == SITES
    assert record.model is None  # nothing to publish: every site keeps its own
    assert record.privacy.per_site == {}  # no update released, nothing spent
    assert not (out / ledgers.LEDGER_KEY).exists()
    arrays = received_arrays(transcript / f"{PER_SITE_ROUND:04d}")
    assert not any(a.size >= 771 for a in arrays)  # no model-sized array reached the server
    for site in SITES:
        kept = fed.work_dir(f"supernode-{site}") / "kept" / f"round-{PER_SITE_ROUND:04d}.safetensors"
        assert kept.exists(), f"{site} kept nothing"
        module = load_model(FACTORY, {"hidden": HIDDEN}, kept)
        x, y = load_arrays(fed.sites[site], "site data")
        mine = torch.nn.functional.cross_entropy(module(torch.as_tensor(x)), torch.as_tensor(y))
        base = load_model(FACTORY, {"hidden": HIDDEN}, weights)
        before = torch.nn.functional.cross_entropy(base(torch.as_tensor(x)), torch.as_tensor(y))
        assert float(mine) < float(before)  # the site's own model fits the site's own data better
