"""Kiri's Flower strategy for one round: which nodes train, and what happens the moment their results are in.

The stack, outermost first:

* `RoundStrategy`: asks only the nodes the round admitted (sites within their privacy budget), writes the
  privacy ledger for everyone whose result arrived *before* anything is aggregated (a crash afterwards cannot
  make a spend disappear), and keeps the aggregate and the participants for the round record.
* Flower's `DifferentialPrivacyClientSideFixedClipping`: sends `clipNorm` to the sites, whose
  `fixedclipping_mod` clips their update to it, and adds N(0, (z·C/n)²) to the average of n clipped updates,
  i.e. N(0, (z·C)²) on their sum: one Gaussian mechanism of multiplier z per site and round, which is what
  `accounting.epsilon` composes. Client-side clipping is the one that fits SecAgg+: the server never sees an
  update to clip.
* `UniformFedAvg` (or Flower's `FedTrimmedAvg` without secure aggregation): every site weighs the same.
  Sample-count weights would let one site's pull exceed C/n, and the noise is calibrated to C/n; sites still
  report their sample count as a metric.

With SecAgg+ the workflow hands `aggregate_fit` results whose parameters are all the unmasked *sum's* average:
the strategy never holds a single site's update (tests/integration/learning/test_flower_rounds.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedTrimmedAvg,
    Strategy,
)

log = logging.getLogger("kiri.learning.server")

Spend = Callable[[Sequence[str]], None]  # writes the ledger for these sites, or raises


class UniformFedAvg(FedAvg):
    """FedAvg with every result weighing one, whatever sample count it reports."""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        for _, res in results:
            res.num_examples = 1
        return super().aggregate_fit(server_round, results, failures)


@dataclass
class RoundOutcome:
    participants: dict[str, dict[str, Scalar]] = field(default_factory=dict)  # site -> its metrics
    failures: int = 0
    aggregate: Parameters | None = None
    error: str = ""
    non_finite: list[str] = field(default_factory=list)  # plain rounds: the sites that sent NaN or Inf


class RoundStrategy(Strategy):
    def __init__(
        self,
        inner: DifferentialPrivacyClientSideFixedClipping,
        initial: Parameters,
        admitted: Mapping[int, str],
        fit_config: Callable[[int], dict[str, Scalar]],
        spend: Spend,
        secure_range: float | None = None,
    ) -> None:
        self.inner = inner
        self.secure_range = secure_range  # SecAgg+'s clipping range, when the results are its average
        self.initial = initial
        self.admitted = dict(admitted)  # node id -> site
        self.fit_config = fit_config
        self.spend = spend
        self.outcome = RoundOutcome()

    def __repr__(self) -> str:
        return f"RoundStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        proxies = [p for nid, p in sorted(client_manager.all().items()) if int(nid) in self.admitted]
        # Let the DP wrapper add clipNorm to the instructions, then address them to the admitted nodes only.
        template = self.inner.configure_fit(server_round, parameters, _Fixed(proxies))
        config = {**self.fit_config(server_round), **(template[0][1].config if template else {})}
        return [(p, FitIns(parameters, dict(config))) for p in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        sites = [self.admitted[int(p.node_id)] for p, _ in results if int(p.node_id) in self.admitted]
        self.outcome.failures = len(failures)
        for proxy, res in results:
            site = self.admitted.get(int(proxy.node_id))
            if site is not None:
                self.outcome.participants[site] = dict(res.metrics)
        if sites:
            try:
                self.spend(sorted(sites))
            except Exception as e:  # not aggregated on an unrecorded spend: the next round would overspend
                self.outcome.error = f"the privacy ledger could not be written: {e}"
                return None, {}
        if self.secure_range is None:  # each result is one site's: say whose is not finite
            self.outcome.non_finite = sorted(
                self.admitted[int(p.node_id)]
                for p, res in results
                if int(p.node_id) in self.admitted
                and not all(bool(np.isfinite(a).all()) for a in parameters_to_ndarrays(res.parameters))
            )
        if self.secure_range is not None and results:
            outside = _outside(parameters_to_ndarrays(results[0][1].parameters), self.secure_range)
            if outside is not None:
                self.outcome.error = (
                    f"the secure aggregate has values outside the clipping range ±{self.secure_range:g} "
                    f"(up to {outside:.6g}): a site sent values SecAgg+ cannot bound (non-finite or "
                    "tampered); nothing aggregated"
                )
                log.warning("round %d: %s", server_round, self.outcome.error)
                return None, {}
        # Flower's wrapper adds N(0, (z·C/n)²) for n = num_sampled_clients: set to the results that arrived,
        # each site's mechanism keeps multiplier z whoever dropped out.
        self.inner.num_sampled_clients = len(results)
        if failures:
            log.warning(
                "round %d: %d sites failed; aggregating the other %d",
                server_round,
                len(failures),
                len(results),
            )
        params, metrics = self.inner.aggregate_fit(server_round, results, [])
        self.outcome.aggregate = params
        return params, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # the server evaluates on the held-out set itself

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _outside(arrays: Sequence[np.ndarray], clipping_range: float) -> float | None:
    """The largest |value| of a SecAgg+ average when it lies outside [-range, range], else None.

    Every honest site quantises its values in the range, so their average is in it too (up to rounding). A
    value outside comes from a site whose quantised integers were not: NaN turns into -2^31, and a modified
    client can send any integer modulo 2^32. Inside the range, no site pulls a value by more than 2·range/n.
    """
    tolerance = clipping_range * 1e-6
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    finite = all(bool(np.isfinite(a).all()) for a in arrays)
    return largest if not finite or largest > clipping_range + tolerance else None


class _Fixed(ClientManager):
    """A client manager that holds exactly the admitted proxies, for the inner strategy's sampling."""

    def __init__(self, proxies: Sequence[ClientProxy]) -> None:
        self.proxies = {p.cid: p for p in proxies}

    def num_available(self) -> int:
        return len(self.proxies)

    def register(self, client: ClientProxy) -> bool:
        return False

    def unregister(self, client: ClientProxy) -> None:
        return None

    def all(self) -> dict[str, ClientProxy]:
        return dict(self.proxies)

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return len(self.proxies) >= num_clients

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: object = None
    ) -> list[ClientProxy]:
        return list(self.proxies.values())[:num_clients]


def build(
    *,
    noise_multiplier: float,
    clip_norm: float,
    trimmed: float | None,
    sites: int,
    initial: Parameters,
    admitted: Mapping[int, str],
    fit_config: Callable[[int], dict[str, Scalar]],
    spend: Spend,
    secure_range: float | None = None,
) -> RoundStrategy:
    """The round's strategy; `trimmed` is the trim fraction for a trimmed mean (no secure aggregation);
    `secure_range` SecAgg+'s clipping range, when the results are its average (refused outside it)."""
    base: FedAvg
    if trimmed is not None:
        base = FedTrimmedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_available_clients=sites,
            min_evaluate_clients=0,
            beta=trimmed,
        )
    else:
        base = UniformFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=sites,
            min_available_clients=sites,
            min_evaluate_clients=0,
        )
    dp = DifferentialPrivacyClientSideFixedClipping(
        base, noise_multiplier=noise_multiplier, clipping_norm=clip_norm, num_sampled_clients=sites
    )
    return RoundStrategy(dp, initial, admitted, fit_config, spend, secure_range)
