"""Hostile sites on the real Flower path: one site's SuperNode runs a modified ClientApp.

A hostile site controls its own node, so nothing the site's code does can be trusted: here its SuperNode starts
with a `sitecustomize.py` on its PYTHONPATH (the SuperNode's `flower-superexec` and its `flwr-clientapp`
subprocesses inherit the environment) that patches `site_app.SiteClient.fit` and turns off the site's
`fixedclipping_mod`. What it sends is read from a mode file at every fit, so one federation serves every round:

* `huge`: the site's update times 1e6, unclipped;
* `nan`: NaN everywhere, +Inf in the first value of every tensor.

Three honest sites and the hostile one; noise-multiplier 0 so that the published weights can be compared with
what the test computes itself (each site's update, trained on the same data with the same seed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_harness import FACTORY, Federation, env, round_config

from kiri_runtime.learning import rounds
from kiri_runtime.learning.loading import load_arrays, load_model, save_weights
from kiri_runtime.learning.parts import TrainedPart
from kiri_runtime.learning.training import train_local
from learning_tiny_model import make_model, write_sites

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

HONEST = ["site-0", "site-1", "site-2"]
HOSTILE = "site-3"
SITES = [*HONEST, HOSTILE]
CLIP = 1.0
CLIPPING_RANGE = 8.0  # SecAgg+'s default `clipping-range`: each value is quantised in [-8, 8]
TRIM = 0.25  # of 4 sites, drop the lowest and the highest value of every coordinate
BLOW_UP = 1e6
# SecAgg+ rounds each value stochastically to a step of 2·8/2^22 ≈ 3.8e-6; the average of four is within that.
QUANTUM = 2 * CLIPPING_RANGE / 2**22

SITECUSTOMIZE = '''
"""A hostile site's ClientApp: patches kiri_runtime.learning.site_app as soon as it is imported."""
import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

TARGET = "kiri_runtime.learning.site_app"
MODE = Path(os.environ["KIRI_HOSTILE_MODE_FILE"])
BLOW_UP = float(os.environ["KIRI_HOSTILE_BLOW_UP"])


def _mode():
    return MODE.read_text().strip()


def _patch(m):
    import numpy as np

    honest_fit = m.SiteClient.fit
    honest_clipping = m.fixedclipping_mod

    def fit(self, parameters, config):
        out, n, metrics = honest_fit(self, parameters, config)
        mode = _mode()
        if mode == "huge":
            out = [(p + np.float32(BLOW_UP) * (o - p)).astype(np.float32) for o, p in zip(out, parameters)]
        elif mode == "nan":
            out = [np.full_like(o, np.nan) for o in out]
            for o in out:
                o.flat[0] = np.inf
        with open(MODE.with_name("fits.log"), "a") as f:
            f.write(f"{os.getpid()} {mode}\\n")
        return out, n, metrics

    def clipping(msg, ctxt, call_next):
        if _mode() == "honest":
            return honest_clipping(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    m.SiteClient.fit = fit
    m.fixedclipping_mod = clipping


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
'''


@dataclass
class Setup:
    fed: Federation
    held_out: Path
    weights: Path
    mode: Path  # the hostile site's mode file

    def run(self, number: int, mode: str, **extra: object) -> rounds.RoundRecord:
        self.mode.write_text(mode)
        config = round_config(
            self.fed.root,
            self.held_out,
            self.weights,
            SITES,
            number,
            **{
                "noise-multiplier": 0.0,
                "min-clients": len(SITES),
                "out": str(self.fed.root / f"out-{number}"),
            },
            **extra,
        )
        return self.fed.run_round(config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("hostile")
    data, held_out = write_sites(root, len(SITES))
    torch.manual_seed(0)
    weights = root / "initial.safetensors"
    save_weights(make_model(), weights)  # type: ignore[arg-type]
    hostile_path = root / "hostile-python"
    hostile_path.mkdir()
    (hostile_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    mode = root / "hostile-mode"
    mode.write_text("honest")
    hostile_env = {
        "PYTHONPATH": os.pathsep.join([str(hostile_path), env()["PYTHONPATH"]]),
        "KIRI_HOSTILE_MODE_FILE": str(mode),
        "KIRI_HOSTILE_BLOW_UP": repr(BLOW_UP),
    }
    fed = Federation(
        root, dict(zip(SITES, data, strict=True)), allow_plain=True, site_env={HOSTILE: hostile_env}
    ).start()
    try:
        yield Setup(fed, held_out, weights, mode)
    finally:
        fed.stop()


def site_params(s: Setup, site: str, number: int, mode: str) -> dict[str, np.ndarray]:
    """What `site` sends for round `number` before SecAgg+ (name -> float32 array): its trained weights, the
    update clipped to CLIP; for the hostile modes what the patched ClientApp makes of them, unclipped."""
    module = load_model(FACTORY, {}, s.weights)
    start = {n: p.detach().numpy().copy() for n, p in module.named_parameters()}
    x, y = load_arrays(s.fed.sites[site], "site data")
    result = train_local(
        module, x, y, TrainedPart("whole"), epochs=1, lr=0.1, batch_size=16, seed=number, lora_seed=0
    )
    names = sorted(result.update)
    sent = {n: (start[n] + result.update[n]).astype(np.float32) for n in names}
    if mode == "huge":
        return {n: (start[n] + np.float32(BLOW_UP) * (sent[n] - start[n])).astype(np.float32) for n in names}
    norm = float(np.linalg.norm(np.concatenate([(sent[n] - start[n]).ravel() for n in names])))
    scale = min(1.0, CLIP / norm)
    return {n: (start[n] + (sent[n] - start[n]) * np.float32(scale)).astype(np.float32) for n in names}


def mean(sites: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {n: np.mean([site[n].astype(np.float64) for site in sites], axis=0) for n in sites[0]}


def trimmed_mean(sites: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per coordinate: sort the sites' values, drop the lowest and highest TRIM of them, average the rest."""
    cut = int(TRIM * len(sites))
    out = {}
    for n in sites[0]:
        stacked = np.sort(np.stack([site[n].astype(np.float64) for site in sites]), axis=0)
        out[n] = stacked[cut : len(sites) - cut].mean(axis=0)
    return out


def published(record: rounds.RoundRecord) -> dict[str, np.ndarray]:
    assert record.model is not None
    module = load_model(FACTORY, {}, Path(record.model.path))
    return {n: p.detach().numpy().astype(np.float64) for n, p in module.named_parameters()}


def initial(s: Setup) -> dict[str, np.ndarray]:
    module = load_model(FACTORY, {}, s.weights)
    return {n: p.detach().numpy().astype(np.float64) for n, p in module.named_parameters()}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


def fits_log(s: Setup) -> list[str]:
    path = s.mode.with_name("fits.log")
    return path.read_text().split("\n")[:-1] if path.exists() else []


def honest_sites(s: Setup, number: int) -> list[dict[str, np.ndarray]]:
    return [site_params(s, x, number, "honest") for x in HONEST]


def nan_params(s: Setup) -> dict[str, np.ndarray]:
    """What the hostile site sends in mode `nan`."""
    out = {}
    for n, w in initial(s).items():
        a = np.full_like(w, np.nan)
        a.flat[0] = np.inf
        out[n] = a
    return out


def between_honest(g: dict[str, np.ndarray], honest: list[dict[str, np.ndarray]]) -> bool:
    slack = 1e-6  # float32 storage of the published weights
    return all(
        bool(np.all(g[n] >= np.min([h[n] for h in honest], axis=0) - slack))
        and bool(np.all(g[n] <= np.max([h[n] for h in honest], axis=0) + slack))
        for n in g
    )


def describe(name: str, record: rounds.RoundRecord) -> None:
    print(
        f"\n{name}: {record.status} {record.reason!r} participants={[p.site for p in record.participants]} "
        f"before={record.eval_before} after={record.eval_after}"
    )


SECURE_HONEST, SECURE_HUGE, SECURE_NAN = 1, 2, 3
TRIMMED_HONEST, TRIMMED_HUGE, TRIMMED_NAN = 11, 12, 13
PLAIN_NAN = 21
TRIMMED = {"secure-aggregation": False, "aggregation": "trimmed-mean", "trim-fraction": TRIM}


@pytest.fixture(scope="module")
def secure_honest(setup: Setup) -> rounds.RoundRecord:
    return setup.run(SECURE_HONEST, "honest")


@pytest.fixture(scope="module")
def secure_huge(setup: Setup) -> rounds.RoundRecord:
    return setup.run(SECURE_HUGE, "huge")


@pytest.fixture(scope="module")
def secure_nan(setup: Setup) -> rounds.RoundRecord:
    return setup.run(SECURE_NAN, "nan")


@pytest.fixture(scope="module")
def trimmed_honest(setup: Setup) -> rounds.RoundRecord:
    return setup.run(TRIMMED_HONEST, "honest", **TRIMMED)


@pytest.fixture(scope="module")
def trimmed_huge(setup: Setup) -> rounds.RoundRecord:
    return setup.run(TRIMMED_HUGE, "huge", **TRIMMED)


@pytest.fixture(scope="module")
def trimmed_nan(setup: Setup) -> rounds.RoundRecord:
    return setup.run(TRIMMED_NAN, "nan", **TRIMMED)


def test_under_secagg_plus_a_site_sending_a_million_times_its_update_unclipped_pulls_each_weight_at_most_two_clipping_ranges_over_n(
    setup: Setup, secure_honest: rounds.RoundRecord, secure_huge: rounds.RoundRecord
) -> None:
    s = setup
    describe("secure honest", secure_honest)
    describe("secure huge", secure_huge)
    assert secure_honest.status == secure_huge.status == "accepted", (
        secure_honest.reason,
        secure_huge.reason,
    )
    assert [p.site for p in secure_huge.participants] == SITES
    baseline, g = published(secure_honest), published(secure_huge)
    honest_expected = mean(
        [*honest_sites(s, SECURE_HONEST), site_params(s, HOSTILE, SECURE_HONEST, "honest")]
    )
    print(" honest round: max |g - mean of the clipped updates|", max_diff(baseline, honest_expected))
    assert max_diff(baseline, honest_expected) <= QUANTUM + 1e-6
    # SecAgg+ clips the hostile values to [-8, 8] before it quantises them: that is all that bounds them.
    hostile = {
        n: np.clip(v, -CLIPPING_RANGE, CLIPPING_RANGE)
        for n, v in site_params(s, HOSTILE, SECURE_HUGE, "huge").items()
    }
    expected = mean([*honest_sites(s, SECURE_HUGE), hostile])
    pull = max_diff(g, baseline)
    print(
        f" hostile round: max |g - expected| {max_diff(g, expected):.3g}, max |g - honest round| {pull:.4f}"
    )
    assert max_diff(g, expected) <= QUANTUM + 1e-6
    assert pull <= 2 * CLIPPING_RANGE / len(SITES)
    # The bound holds, and it is wide: a pull of up to 4 on weights of |w| < 0.5 wrecks this round's model.
    assert secure_huge.eval_after is not None and secure_honest.eval_after is not None
    assert secure_huge.eval_after.loss > secure_huge.eval_before.loss
    hostile_fits = [line.split() for line in fits_log(s)]
    assert [mode for _, mode in hostile_fits][:2] == ["honest", "huge"]
    supernode_pids = {p.pid for p in s.fed.procs}
    assert not {int(pid) for pid, _ in hostile_fits} & supernode_pids  # patched in the ClientApp subprocess


def test_under_secagg_plus_a_site_sending_nan_and_inf_gets_the_round_skipped_with_the_reason_and_nothing_published(
    setup: Setup, secure_nan: rounds.RoundRecord
) -> None:
    describe("secure nan", secure_nan)
    assert secure_nan.status == "skipped"
    assert secure_nan.reason.startswith(
        "the secure aggregate has values outside the clipping range ±8 (up to "
    ), secure_nan.reason
    assert secure_nan.reason.endswith(
        "): a site sent values SecAgg+ cannot bound (non-finite or tampered); nothing aggregated"
    )
    assert secure_nan.model is None and secure_nan.eval_after is None
    assert not (
        rounds.round_dir(setup.fed.root / f"out-{SECURE_NAN}", SECURE_NAN) / rounds.WEIGHTS_FILE
    ).exists()


def test_a_trimmed_mean_round_drops_the_coordinates_of_a_site_sending_a_million_times_its_update(
    setup: Setup, trimmed_honest: rounds.RoundRecord, trimmed_huge: rounds.RoundRecord
) -> None:
    s = setup
    describe("trimmed honest", trimmed_honest)
    describe("trimmed huge", trimmed_huge)
    assert trimmed_honest.status == trimmed_huge.status == "accepted", (
        trimmed_honest.reason,
        trimmed_huge.reason,
    )
    assert [p.site for p in trimmed_huge.participants] == SITES
    honest = honest_sites(s, TRIMMED_HUGE)
    g = published(trimmed_huge)
    expected = trimmed_mean([*honest, site_params(s, HOSTILE, TRIMMED_HUGE, "huge")])
    print(f" max |g - trimmed mean| {max_diff(g, expected):.3g}")
    assert max_diff(g, expected) <= 1e-6  # float32 weights and float32 averaging; measured 1.5e-8
    assert between_honest(g, honest)  # no coordinate follows the hostile site out of the honest range
    before, after = trimmed_honest.eval_after, trimmed_huge.eval_after
    assert (
        before is not None
        and after is not None
        and before.accuracy is not None
        and after.accuracy is not None
    )
    print(
        f" held-out: honest-only round loss {before.loss:.4f} acc {before.accuracy:.4f}, hostile round loss {after.loss:.4f} acc {after.accuracy:.4f}"
    )
    assert after.loss <= before.loss + 0.05
    assert after.accuracy >= before.accuracy - 0.02  # 6 of the 300 held-out samples


def test_a_trimmed_mean_round_trims_a_site_sending_nan_and_inf_as_the_highest_value_of_every_coordinate(
    setup: Setup, trimmed_honest: rounds.RoundRecord, trimmed_nan: rounds.RoundRecord
) -> None:
    s = setup
    describe("trimmed nan", trimmed_nan)
    assert trimmed_nan.status == "accepted", trimmed_nan.reason
    honest = honest_sites(s, TRIMMED_NAN)
    g = published(trimmed_nan)
    assert all(bool(np.isfinite(v).all()) for v in g.values())
    # NaN and +Inf sort last: the mean keeps the two highest honest values of every coordinate.
    expected = trimmed_mean([*honest, nan_params(s)])
    print(f" max |g - trimmed mean| {max_diff(g, expected):.3g}")
    assert max_diff(g, expected) <= 1e-6
    assert between_honest(g, honest)
    before, after = trimmed_honest.eval_after, trimmed_nan.eval_after
    assert (
        before is not None
        and after is not None
        and before.accuracy is not None
        and after.accuracy is not None
    )
    print(
        f" held-out: honest-only loss {before.loss:.4f} acc {before.accuracy:.4f}, NaN round loss {after.loss:.4f} acc {after.accuracy:.4f}"
    )
    assert after.loss <= before.loss + 0.05
    assert after.accuracy > trimmed_nan.eval_before.accuracy  # still better than the model it started from


def test_a_plain_fedavg_round_with_a_site_sending_nan_is_skipped_and_publishes_nothing(setup: Setup) -> None:
    record = setup.run(PLAIN_NAN, "nan", **{"secure-aggregation": False})
    describe("plain nan", record)
    assert record.status == "skipped"
    assert record.reason == (
        f"the aggregated model has non-finite weights: sites {HOSTILE} sent non-finite values"
    )
    assert [p.site for p in record.participants] == SITES
    assert record.model is None and record.eval_after is None
    assert not (
        rounds.round_dir(setup.fed.root / f"out-{PLAIN_NAN}", PLAIN_NAN) / rounds.WEIGHTS_FILE
    ).exists()
