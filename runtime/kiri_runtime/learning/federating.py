"""Kiri's Flower ServerApp: one federated round, its privacy ledger and its record.

`server_app` is what the SuperLink runs for each `flwr run` of Kiri's Flower App (`learning/flower_app`). A
round:

1. counts what each site already spent (the round records and the ledger: the larger count wins) and refuses
   sites whose epsilon would pass `target-epsilon` after this round;
2. waits (up to `deadline-seconds`) for the SuperNodes of the expected sites, and asks each node which site
   it is (its `site` node config, a `get_properties` query): nodes of other sites or over budget take no part,
   nor, when SuperNodes authenticate, a node saying it is a site other than the one its key was registered for;
3. with at least `min-clients` admitted sites, runs one Flower round (`DefaultWorkflow`, its fit step
   `SecAggPlusWorkflow` unless `secure-aggregation = false`) with `strategies.RoundStrategy`: sites clip,
   the ledger is written as soon as their results are in, the server adds the Gaussian noise;
4. applies the noised average to the model, evaluates it on the held-out set, writes
   `rounds/<NNNN>/weights.safetensors` and `round.json` (with the bytes the round moved, `metering`).

Nothing here is torch but the model (`loading.TorchGlobalModel`); the sites' side is `site_app`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.common import GetPropertiesIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from kiri_runtime.learning import accounting, ledgers, node_keys, rounds, strategies
from kiri_runtime.learning.adapter_rounds import AdapterSettings, AdapterSubject
from kiri_runtime.learning.errors import LearningError
from kiri_runtime.learning.loading import TorchGlobalModel, load_arrays, load_model, sha256_file
from kiri_runtime.learning.metering import MeteredGrid, write_transcript
from kiri_runtime.learning.parts import dense_update, lora_seed, upload_shapes
from kiri_runtime.learning.settings import (
    KEY_BASE,
    KEY_BASE_SHA,
    KEY_LORA_SEED,
    KEY_PART,
    KEY_POLICY,
    KEY_ROUND,
    RoundSettings,
)

log = logging.getLogger("kiri.learning.server")

NODE_POLL_SECONDS = 0.5
SITE_WEIGHT = 1.0  # the weight every site's result carries (FitRes.num_examples)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def secure_workflow(s: RoundSettings) -> SecAggPlusWorkflow:
    """SecAgg+ for the fit step. Each site scales its values by weight / `max_weight` before it quantises them
    in [-clipping-range, clipping-range]; every site sends weight 1 (`site_app`, `strategies.UniformFedAvg`),
    so `max_weight` 1 makes that range the range of the values themselves. Flower's default of 1000 would let a
    site send values up to 1000 times the range, and round them to steps 1000 times coarser."""
    return SecAggPlusWorkflow(
        num_shares=1.0,  # every admitted site holds a share of every other's keys (SecAgg+ at n)
        reconstruction_threshold=0.67,
        max_weight=SITE_WEIGHT,
        clipping_range=s.clipping_range,
        timeout=s.deadline_seconds,
    )


def open_ledger(s: RoundSettings) -> ledgers.Ledger:
    if not s.ledger:
        return ledgers.FileLedger(Path(s.out) / ledgers.LEDGER_KEY)
    if s.ledger_factory:
        # The operator's ConfigMap ledger lives in kiri_operator; the runtime names it, never imports it.
        from kiri_runtime.compressing.exporting import load_factory

        register = load_factory(s.ledger_factory)
        register()
    kind, _, target = s.ledger.partition(":")
    return ledgers.open_ledger(kind, target, {"owner": s.ledger_owner})


class Round:
    """One round's state between the steps of `run`; `record()` is what it ends with."""

    def __init__(self, s: RoundSettings, ledger: ledgers.Ledger) -> None:
        self.s = s
        self.ledger = ledger
        self.out = Path(s.out)
        self.weights = Path(s.weights)
        self.adapter: AdapterSubject | None = None
        if s.model.part.kind == "adapter":
            a = AdapterSettings.from_run_config(dict(s.raw))
            self.adapter = AdapterSubject(a, s.weights, self.out, Path(s.eval))
            self.base_sha256 = self.adapter.base_sha256
        else:
            self.base_sha256 = sha256_file(self.weights)
            module = load_model(s.model.factory, s.model.factory_kwargs, self.weights)
            self.model = TorchGlobalModel(module, load_arrays(Path(s.eval), "held-out set"))
        history = rounds.history(self.out)
        self.number = s.round or (history[-1].round + 1 if history else 1)
        self.counts = dict(rounds.participation(history, self.number))
        for site, n in ledger.spent().items():
            self.counts[site] = max(self.counts.get(site, 0), n)
        self.refused = self._refusals()
        self.seed = lora_seed(self.number, self.base_sha256)
        if self.adapter is not None:
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.names = self.adapter.names
        else:
            self.shapes = self.model.shapes()
            self.names = sorted(upload_shapes(s.model.part, self.shapes))
        self.opened_at = _now()
        self.admitted: dict[int, str] = {}
        self.registered = node_keys.registered_sites()  # node id -> site, when SuperNodes authenticate
        self.skipped: dict[str, str] = dict(self.refused)
        self.participants: dict[str, dict[str, Any]] = {}

    # ---- before the round -------------------------------------------------------------------------

    def _refusals(self) -> dict[str, str]:
        s = self.s
        if s.target_epsilon is None or s.policy == "perSite":  # a perSite round releases no update
            return {}
        refused = {}
        for site in sorted(set(s.sites) | set(self.counts)):
            n = self.counts.get(site, 0) + 1
            eps = accounting.epsilon(s.noise_multiplier, n, s.dp_delta)
            if eps > s.target_epsilon:
                refused[site] = (
                    f"privacy budget: epsilon would reach {eps:.3f} > targetEpsilon {s.target_epsilon:g} "
                    f"after {n} rounds"
                )
        return refused

    def wanted(self) -> int:
        if self.s.sites:
            return len([x for x in self.s.sites if x not in self.refused])
        return self.s.min_clients

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.s.deadline_seconds
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.wanted() or time.monotonic() >= deadline:
                return nodes
            time.sleep(NODE_POLL_SECONDS)

    def admit(self, grid: Grid, nodes: list[int]) -> None:
        """Ask every node which site it is; keep one node per expected, in-budget site."""
        messages = [
            Message(
                content=compat.getpropertiesins_to_recorddict(GetPropertiesIns({})),
                dst_node_id=n,
                message_type=MessageTypeLegacy.GET_PROPERTIES,
            )
            for n in nodes
        ]
        replies = grid.send_and_receive(messages, timeout=self.s.deadline_seconds)
        for reply in replies:
            if reply.has_error():
                continue
            site = str(compat.recorddict_to_getpropertiesres(reply.content).properties.get("site", ""))
            node = int(reply.metadata.src_node_id)
            if not site or (self.s.sites and site not in self.s.sites):
                log.warning("node %d (site %r) is not expected in round %d", node, site, self.number)
            elif self.registered is not None and self.registered.get(node) != site:
                log.warning(
                    "round %d: node %d says it is site %s, but its key is registered for %s; ignored",
                    self.number,
                    node,
                    site,
                    self.registered.get(node, "no site"),
                )
            elif site in self.refused:
                log.warning("round %d: site %s refused: %s", self.number, site, self.refused[site])
            elif site in self.admitted.values():
                log.warning("round %d: a second node says it is site %s; ignored", self.number, site)
            else:
                self.admitted[node] = site
        for site in self.s.sites:
            if site not in self.admitted.values() and site not in self.skipped:
                self.skipped[site] = "no SuperNode of this site connected before the deadline (offline)"

    # ---- the round ------------------------------------------------------------------------------------

    def evaluate(self) -> rounds.Evaluation:
        return self.adapter.evaluate() if self.adapter is not None else self.model.evaluate()

    def initial(self) -> list[np.ndarray]:
        if self.adapter is not None:
            return self.adapter.initial()
        if self.s.model.part.kind == "lora":  # FFA-LoRA: B starts at zero, A is derived from the seed
            shapes = upload_shapes(self.s.model.part, self.shapes)
            return [np.zeros(shapes[n], dtype=np.float32) for n in self.names]
        state = self.model.module.state_dict()
        return [state[n].detach().cpu().numpy().astype(np.float32) for n in self.names]

    def fit_config(self, _round: int) -> dict[str, Any]:
        import json

        config = {
            KEY_POLICY: self.s.policy,
            KEY_ROUND: self.number,
            KEY_LORA_SEED: self.seed,
            KEY_PART: json.dumps(self.s.model.part.describe(), sort_keys=True),
        }
        if self.adapter is not None:
            return {**config, **self.adapter.fit_config()}
        return {**config, KEY_BASE: self.weights.read_bytes(), KEY_BASE_SHA: self.base_sha256}

    def spend(self, sites: Sequence[str]) -> None:
        counts = dict(self.counts)
        for site in sites:
            counts[site] = counts.get(site, 0) + 1
        per_site = {x: accounting.epsilon(self.s.noise_multiplier, counts[x], self.s.dp_delta) for x in sites}
        self.ledger.spend(self.number, sites, per_site)
        self.counts = counts

    def train(self, grid: Grid, context: Context) -> strategies.RoundOutcome:
        s = self.s
        initial = self.initial()
        strategy = strategies.build(
            noise_multiplier=s.noise_multiplier,
            clip_norm=s.clip_norm,
            trimmed=s.trim_fraction if s.aggregation == "trimmed-mean" else None,
            secure_range=s.clipping_range if s.secure_aggregation else None,
            sites=len(self.admitted),
            initial=ndarrays_to_parameters(initial),
            admitted=self.admitted,
            fit_config=self.fit_config,
            spend=self.spend,
        )
        fit_workflow = secure_workflow(s) if s.secure_aggregation else None
        legacy = LegacyContext(
            context,
            config=ServerConfig(num_rounds=1, round_timeout=s.deadline_seconds),
            strategy=strategy,
        )
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        return strategy.outcome

    def train_per_site(self, grid: Grid) -> strategies.RoundOutcome:
        """`perSite`: every admitted site trains and keeps its result; only metrics come back. No update is
        released, so nothing is spent from the privacy budget."""
        from flwr.app.message_type import MessageType
        from flwr.common import FitIns

        outcome = strategies.RoundOutcome()
        config = self.fit_config(self.number)
        messages = [
            Message(
                content=compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), dict(config)), True),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in sorted(self.admitted)
        ]
        for reply in grid.send_and_receive(messages, timeout=self.s.deadline_seconds):
            site = self.admitted.get(int(reply.metadata.src_node_id))
            if site is None or reply.has_error():
                outcome.failures += 1
                continue
            res = compat.recorddict_to_fitres(reply.content, keep_input=True)
            if res.parameters.tensors:
                raise LearningError(
                    f"site {site} sent tensors in a perSite round; only metrics may leave a site"
                )
            outcome.participants[site] = dict(res.metrics)
        return outcome

    # ---- after ----------------------------------------------------------------------------------------

    def record(
        self,
        status: rounds.RoundStatus,
        reason: str,
        *,
        before: rounds.Evaluation | None = None,
        after: rounds.Evaluation | None = None,
        artifact: rounds.Artifact | None = None,
        served: rounds.Artifact | None = None,
        traffic: Mapping[str, Any] | None = None,
    ) -> rounds.RoundRecord:
        s = self.s
        per_site = {
            site: accounting.epsilon(s.noise_multiplier, n, s.dp_delta)
            for site, n in sorted(self.counts.items())
        }
        participants = [
            rounds.Participant(
                site=site,
                samples=int(m.get("samples", 0)),
                upload_bytes=int(m.get("bytes", 0)),
                adapter=_kept_adapter(m),
            )
            for site, m in sorted(self.participants.items())
        ]
        record = rounds.RoundRecord(
            round=self.number,
            status=status,
            reason=reason,
            base_sha256=self.base_sha256,
            part=s.model.part.describe(),
            aggregation=s.aggregation,
            secure_aggregation=s.secure_aggregation,
            participants=participants,
            skipped=[rounds.SkippedSite(site=k, reason=v) for k, v in sorted(self.skipped.items())],
            eval_before=before if before is not None else self.evaluate(),
            eval_after=after,
            privacy=rounds.Privacy(
                noise_multiplier=s.noise_multiplier,
                clip_norm=s.clip_norm,
                delta=s.dp_delta,
                target_epsilon=s.target_epsilon,
                epsilon=max(per_site.values(), default=0.0),
                per_site=per_site,
            ),
            model=artifact,
            served=served,
            traffic=dict(traffic or {}),
            opened_at=self.opened_at,
            closed_at=_now(),
        )
        rounds.dump(record, rounds.round_dir(self.out, self.number))
        log.info(
            "round %d %s: %d participants, epsilon %.3f%s",
            self.number,
            status,
            len(participants),
            record.privacy.epsilon,
            f" ({reason})" if reason else "",
        )
        return record

    def conclude(
        self, outcome: strategies.RoundOutcome, traffic: Mapping[str, Any], by_node: Mapping[int, int]
    ) -> rounds.RoundRecord:
        self.participants = outcome.participants
        for node, site in self.admitted.items():
            if site in self.participants:
                self.participants[site]["bytes"] = by_node.get(node, 0)
        for site in self.admitted.values():
            if site not in self.participants:
                self.skipped[site] = "no result by the close of the round (offline, straggler or failed)"
        if outcome.error:
            return self.record("skipped", outcome.error, traffic=traffic)
        if outcome.aggregate is None or len(self.participants) < self.s.min_clients:
            reason = f"{len(self.participants)} of min-clients {self.s.min_clients} results arrived"
            return self.record("skipped", reason, traffic=traffic)
        aggregate = parameters_to_ndarrays(outcome.aggregate)
        if self.adapter is not None:
            published = self.adapter.publish(aggregate, rounds.round_dir(self.out, self.number))
            if isinstance(published, str):
                return self.record("skipped", published, traffic=traffic)
            before, after, artifact, served = published
            return self.record(
                "accepted", "", before=before, after=after, artifact=artifact, served=served, traffic=traffic
            )
        update = {
            n: (a - b).astype(np.float32)
            for n, a, b in zip(self.names, aggregate, self.initial(), strict=True)
        }
        dense = dense_update(self.s.model.part, update, self.shapes, self.seed)
        before = self.model.evaluate()
        model = self.model.updated(dense, self.s.server_lr)
        if model is None:
            reason = (
                f"the aggregated model has non-finite weights: sites {', '.join(outcome.non_finite)} sent "
                "non-finite values"
                if outcome.non_finite
                else "the aggregated model has non-finite weights: lower learning-rate or server-learning-rate"
            )
            return self.record("skipped", reason, before=before, traffic=traffic)
        after = model.evaluate()
        path = rounds.round_dir(self.out, self.number) / rounds.WEIGHTS_FILE
        model.save(path)
        artifact = rounds.Artifact(path=str(path), sha256=sha256_file(path), bytes=path.stat().st_size)
        return self.record("accepted", "", before=before, after=after, artifact=artifact, traffic=traffic)


def _kept_adapter(metrics: Mapping[str, Any]) -> rounds.KeptAdapter | None:
    """A perSite adapter round's facts about the adapter the site kept (no weights), from its metrics."""
    if "adapter-sha256" not in metrics:
        return None
    try:
        return rounds.KeptAdapter(
            file=str(metrics["adapter-file"]),
            sha256=str(metrics["adapter-sha256"]),
            bytes=int(metrics["adapter-bytes"]),
            held_out_base_perplexity=float(metrics["heldout-base-ppl"]),
            held_out_adapter_perplexity=float(metrics["heldout-adapter-ppl"]),
        )
    except (KeyError, TypeError, ValueError):
        return None  # a site that reports half of it has kept nothing the edge can fetch


def run(grid: Grid, context: Context) -> rounds.RoundRecord:
    s = RoundSettings.from_run_config(context.run_config)
    r = Round(s, open_ledger(s))
    metered = MeteredGrid(grid, keep=bool(s.transcript))
    try:
        return _run(r, metered, context)
    finally:
        if s.transcript:
            write_transcript(metered.traffic.received, Path(s.transcript) / f"{r.number:04d}")


def _run(r: Round, metered: MeteredGrid, context: Context) -> rounds.RoundRecord:
    s = r.s
    nodes = r.wait_for_nodes(metered)
    r.admit(metered, nodes)
    if len(r.admitted) < s.min_clients:
        reason = (
            f"{len(r.admitted)} sites admitted (within budget and connected), min-clients is {s.min_clients}"
        )
        status: rounds.RoundStatus = "refused" if r.refused else "skipped"
        return r.record(status, reason, traffic=metered.traffic.as_dict())
    log.info(
        "round %d: sites %s, secure aggregation %s",
        r.number,
        sorted(r.admitted.values()),
        s.secure_aggregation,
    )
    setup, setup_by_node = metered.traffic.as_dict(), dict(metered.traffic.by_node)
    if s.policy == "perSite":
        outcome = r.train_per_site(metered)
        r.participants = outcome.participants
        for site in r.admitted.values():
            if site not in r.participants:
                r.skipped[site] = "no metrics by the close of the round (offline, straggler or failed)"
        traffic = {k: v - setup.get(k, 0) for k, v in metered.traffic.as_dict().items()}
        ok = len(r.participants) >= s.min_clients
        reason = "" if ok else f"{len(r.participants)} of min-clients {s.min_clients} sites reported"
        return r.record("accepted" if ok else "skipped", reason, traffic=traffic)
    outcome = r.train(metered, context)
    traffic = {k: v - setup.get(k, 0) for k, v in metered.traffic.as_dict().items()}
    by_node = {n: b - setup_by_node.get(n, 0) for n, b in metered.traffic.by_node.items()}
    return r.conclude(outcome, traffic, by_node)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from kiri_runtime import redaction

    redaction.install()
    try:
        run(grid, context)
    except LearningError as e:
        log.error("kiri round: %s", e)
        raise
