"""The aggregator's rounds, without a transport: open a round, take uploads, close it, publish or skip it.

`serving.py` puts these calls behind HTTP; nothing here knows about requests, and nothing here imports torch
(the model is a `GlobalModel`; `loading.TorchGlobalModel` is the torch one).

A round closes when every expected site has uploaded, when minClients have uploaded and `grace` seconds
passed (a straggler or offline site does not stall it), or at the deadline. It is accepted with at least
minClients updates, else skipped with the reason. Before it opens, sites whose epsilon would exceed the
target after this round are refused; with fewer than minClients left, the whole round is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiri_runtime.learning import accounting, aggregating, deltas, ledgers, rounds
from kiri_runtime.learning.errors import (
    BadDelta,
    Conflict,
    Forbidden,
    LearningError,
    RoundClosed,
    TooLarge,
    Unauthorized,
)
from kiri_runtime.learning.loading import sha256_file
from kiri_runtime.learning.parts import TrainedPart, dense_update, upload_shapes

log = logging.getLogger("kiri.learning.aggregator")
SHARED_TOKEN_KEY = "*"


class GlobalModel(Protocol):
    """The model the rounds update: what the aggregator needs of it, whatever framework holds the weights."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every trained parameter."""
        ...

    def evaluate(self) -> rounds.Evaluation:
        """Loss (and accuracy) on the held-out set."""
        ...

    def updated(self, update: Mapping[str, np.ndarray], server_lr: float) -> GlobalModel | None:
        """A new model with `server_lr * update` added; None when a weight would be NaN or infinite."""
        ...

    def save(self, path: Path) -> None:
        """Write the weights file (safetensors, atomically) that sites download and the next round names by its
        sha256."""
        ...


@dataclass
class Settings:
    part: TrainedPart
    clip_norm: float
    noise_multiplier: float
    dp_delta: float
    target_epsilon: float | None = None
    sites: tuple[str, ...] = ()  # expected sites; empty: any site holding a token
    clients_per_round: int | None = None
    min_clients: int = 1
    deadline_seconds: float = 600.0
    grace_seconds: float = 30.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise LearningError(f"minClients must be >= 1, got {self.min_clients}")
        if self.sites and self.min_clients > len(self.sites):
            raise LearningError(f"minClients {self.min_clients} exceeds the {len(self.sites)} expected sites")
        if self.aggregation not in aggregating.AGGREGATIONS:
            raise LearningError(f"aggregation {self.aggregation!r}: use one of {aggregating.AGGREGATIONS}")
        if self.deadline_seconds <= 0 or self.grace_seconds < 0:
            raise LearningError("the deadline must be > 0 and the grace >= 0 seconds")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise LearningError(f"targetEpsilon must be > 0, got {self.target_epsilon}")
        accounting.epsilon(self.noise_multiplier, 1, self.dp_delta)  # validates delta


@dataclass
class RoundState:
    number: int
    base_sha256: str
    lora_seed: int
    opened: float
    opened_at: str
    refused: dict[str, str]  # site -> why it may not take part
    deltas: dict[str, deltas.Delta] = field(default_factory=dict)
    upload_bytes: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    quorum_at: float | None = None
    open: bool = True


def load_tokens(path: Path) -> dict[str, str]:
    """A directory with one file per site (a mounted Secret) or a file of `site=token` lines; `*` is shared."""
    tokens: dict[str, str] = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                tokens[f.name] = f.read_text(encoding="utf-8").strip()
    elif path.is_file():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            site, sep, token = line.partition("=")
            if not sep or not site.strip() or not token.strip():
                raise LearningError(f"{path}:{i}: expected 'site=token'")
            tokens[site.strip()] = token.strip()
    else:
        raise LearningError(f"tokens {path}: no such file or directory")
    if not tokens or any(len(t) < 16 for t in tokens.values()):
        raise LearningError(f"tokens {path}: need at least one token, each at least 16 characters")
    return tokens


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def lora_seed(number: int, base_sha256: str) -> int:
    """The seed of a round's frozen LoRA bases: every site and the aggregator derive the same one."""
    return int.from_bytes(hashlib.sha256(f"{number}:{base_sha256}".encode()).digest()[:8], "little") >> 1


class Aggregator:
    def __init__(
        self,
        settings: Settings,
        model: GlobalModel,
        weights: Path,
        out_dir: Path,
        tokens: Mapping[str, str],
        ledger: ledgers.Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.ledger: ledgers.Ledger = ledger or ledgers.FileLedger(out_dir / ledgers.LEDGER_KEY)
        self.model = model
        self.weights = weights
        self.base_sha256 = sha256_file(weights)
        self.out_dir = out_dir
        self.tokens = dict(tokens)
        self.shapes = model.shapes()
        self.expected = upload_shapes(settings.part, self.shapes)
        self.max_body_bytes = deltas.max_body_bytes(self.expected)
        self.state: RoundState | None = None
        self.finished = False
        self.changed = asyncio.Event()

    # ---- what a site asks ------------------------------------------------------------------------------

    def authorize(self, site: str, authorization: str) -> None:
        """Check an `Authorization` header value against the site's token (or the shared one)."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("missing bearer token")
        expected = self.tokens.get(site) or self.tokens.get(SHARED_TOKEN_KEY)
        # Compare against a dummy when the site is unknown, so timing does not reveal which sites exist.
        ok = hmac.compare_digest(given.encode(), (expected or "\0" * 32).encode())
        if not ok or expected is None:
            raise Unauthorized(f"bad token for site {site!r}")

    def round_info(self, site: str) -> dict[str, Any]:
        """The open round as `site` sees it: its parameters and whether the site may take part."""
        s, st = self.settings, self.state
        body: dict[str, Any] = {"finished": self.finished, "open": bool(st and st.open)}
        if st is not None:
            reason = self._not_allowed(st, site)
            body.update(
                round=st.number,
                baseSha256=st.base_sha256,
                part=s.part.describe(),
                loraSeed=st.lora_seed,
                clipNorm=s.clip_norm,
                noiseMultiplier=s.noise_multiplier,
                closesAt=st.opened + s.deadline_seconds,
                submitted=site in st.deltas,
                eligible=reason is None,
                reason=reason or "",
            )
        return body

    def global_weights(self) -> tuple[bytes, str]:
        """The current global weights file and its sha256."""
        data = self.weights.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def _not_allowed(self, st: RoundState, site: str) -> str | None:
        if self.settings.sites and site not in self.settings.sites:
            return f"site {site!r} is not expected in this round"
        return st.refused.get(site)

    def admit(self, round_text: str, site: str, content_length: int | None) -> RoundState:
        """Whether `site` may upload `content_length` bytes to round `round_text`, before the body is read."""
        st = self.state
        try:
            number = int(round_text)
        except ValueError:
            raise BadDelta(f"round {round_text!r} is not a number") from None
        if st is None or number != st.number:
            raise Conflict(f"round {number} is not the open round {st.number if st else None}")
        if not st.open:
            raise RoundClosed(f"round {number} is closed")
        reason = self._not_allowed(st, site)
        if reason is not None:
            raise Forbidden(reason)
        if site in st.deltas:
            raise Conflict(f"site {site!r} already uploaded to round {number}")
        if content_length is not None and content_length > self.max_body_bytes:
            raise TooLarge(f"body of {content_length} bytes; this round takes at most {self.max_body_bytes}")
        return st

    def take(self, st: RoundState, site: str, body: bytes) -> dict[str, Any]:
        """Decode, check and keep `site`'s upload to the round `admit` returned; the answer to send back."""
        try:
            delta = self._check(st, site, body)
        except BadDelta as e:
            st.rejected[site] = str(e)
            raise
        if not st.open:  # closed while the body was arriving
            raise RoundClosed(f"round {st.number} closed while the upload arrived")
        st.deltas[site] = delta
        st.upload_bytes[site] = len(body)
        st.rejected.pop(site, None)
        if st.quorum_at is None and len(st.deltas) >= self.settings.min_clients:
            st.quorum_at = time.monotonic()
        log.info(
            "round %d: delta from %s accepted (%d samples, %d bytes)",
            st.number,
            site,
            delta.samples,
            len(body),
        )
        self.changed.set()
        return {"accepted": True, "round": st.number}

    def _check(self, st: RoundState, site: str, body: bytes) -> deltas.Delta:
        s = self.settings
        delta = deltas.decode(body)
        if delta.round != st.number or delta.site != site:
            raise Conflict(
                f"delta is for round {delta.round} site {delta.site!r}, posted as {st.number} {site!r}"
            )
        if delta.base_sha256 != st.base_sha256:
            raise Conflict(
                f"delta was trained from base {delta.base_sha256[:12]}, the round's is {st.base_sha256[:12]}"
            )
        if delta.part != s.part.describe():
            raise Conflict(f"delta trains {delta.part}, the round trains {s.part.describe()}")
        if not np.isclose(delta.clip_norm, s.clip_norm) or not np.isclose(
            delta.noise_multiplier, s.noise_multiplier
        ):
            raise Conflict(
                f"delta used clipNorm {delta.clip_norm} noiseMultiplier {delta.noise_multiplier}; the round's are "
                f"{s.clip_norm} and {s.noise_multiplier}, and the accountant is only right for those"
            )
        deltas.check_shapes(delta.tensors, self.expected)
        return delta

    # ---- rounds ---------------------------------------------------------------------------------------

    def _refusals(self, counts: Mapping[str, int]) -> dict[str, str]:
        s = self.settings
        if s.target_epsilon is None:
            return {}
        candidates = set(s.sites) | set(counts) | ({k for k in self.tokens if k != SHARED_TOKEN_KEY})
        refused = {}
        for site in sorted(candidates):
            eps = accounting.epsilon(s.noise_multiplier, counts.get(site, 0) + 1, s.dp_delta)
            if eps > s.target_epsilon:
                refused[site] = (
                    f"privacy budget: epsilon would reach {eps:.3f} > targetEpsilon {s.target_epsilon:g} "
                    f"after {counts.get(site, 0) + 1} rounds"
                )
        return refused

    def _privacy(self, counts: Mapping[str, int]) -> rounds.Privacy:
        s = self.settings
        per_site = {
            site: accounting.epsilon(s.noise_multiplier, n, s.dp_delta) for site, n in sorted(counts.items())
        }
        return rounds.Privacy(
            noise_multiplier=s.noise_multiplier,
            clip_norm=s.clip_norm,
            delta=s.dp_delta,
            target_epsilon=s.target_epsilon,
            epsilon=max(per_site.values(), default=0.0),
            per_site=per_site,
        )

    def next_round(self) -> int:
        done = rounds.history(self.out_dir)
        return done[-1].round + 1 if done else 1

    async def run(self, count: int) -> list[rounds.RoundRecord]:
        records = []
        try:
            for _ in range(count):
                record = await self.run_round(self.next_round())
                records.append(record)
                if record.status == "refused":
                    break
        finally:
            self.finished = True
        return records

    async def run_round(self, number: int) -> rounds.RoundRecord:
        s = self.settings
        history = rounds.history(self.out_dir)
        counts = rounds.participation(history, number)
        # The ledger also holds what rounds without a record spent (a crash, a retry): the larger count wins.
        for site, n in (await asyncio.to_thread(self.ledger.spent)).items():
            counts[site] = max(counts.get(site, 0), n)
        refused = self._refusals(counts)
        st = RoundState(
            number=number,
            base_sha256=self.base_sha256,
            lora_seed=lora_seed(number, self.base_sha256),
            opened=time.monotonic(),
            opened_at=_now(),
            refused=refused,
        )
        eligible = [x for x in s.sites if x not in refused] if s.sites else None
        if eligible is not None and len(eligible) < s.min_clients:
            st.open = False
            reason = f"only {len(eligible)} sites within the privacy budget, minClients is {s.min_clients}"
            return self._finish(st, counts, "refused", reason)
        self.state = st
        log.info("round %d open (base %s, deadline %gs)", number, st.base_sha256[:12], s.deadline_seconds)
        wanted = len(eligible) if eligible is not None else (s.clients_per_round or 0)
        if s.clients_per_round:
            wanted = min(wanted, s.clients_per_round) if wanted else s.clients_per_round
        while True:
            now = time.monotonic()
            if wanted and len(st.deltas) >= wanted:
                break
            ends = [st.opened + s.deadline_seconds]
            if st.quorum_at is not None:
                ends.append(st.quorum_at + s.grace_seconds)
            if now >= min(ends):
                break
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(ends) - now)
        st.open = False
        for site in st.deltas:  # every upload spent privacy, whether or not the round is accepted
            counts[site] = counts.get(site, 0) + 1
        if st.deltas:
            try:
                spent = self._privacy(counts).per_site
                await asyncio.to_thread(self.ledger.spend, number, sorted(st.deltas), spent)
            except Exception as e:  # not accepted on an unrecorded spend: the next round would overspend
                return self._finish(st, counts, "skipped", f"the privacy ledger could not be written: {e}")
        if len(st.deltas) < s.min_clients:
            reason = f"{len(st.deltas)} of minClients {s.min_clients} updates arrived by the deadline"
            return self._finish(st, counts, "skipped", reason)
        try:
            return await asyncio.to_thread(self._accept, st, counts)
        except Exception as e:  # the spend is in the ledger; the record says why nothing was published
            log.exception("round %d: aggregation failed", number)
            return self._finish(st, counts, "skipped", f"aggregation failed: {type(e).__name__}: {e}"[:500])

    def _skipped(self, st: RoundState) -> list[rounds.SkippedSite]:
        known = set(self.settings.sites) | set(st.rejected) | set(st.refused)
        out = []
        for site in sorted(known - set(st.deltas)):
            if site in st.refused:
                reason = st.refused[site]
            elif site in st.rejected:
                reason = f"update rejected: {st.rejected[site]}"
            else:
                reason = "no update by the close of the round (offline or straggler)"
            out.append(rounds.SkippedSite(site=site, reason=reason))
        return out

    def _finish(
        self,
        st: RoundState,
        counts: Mapping[str, int],
        status: rounds.RoundStatus,
        reason: str,
        *,
        before: rounds.Evaluation | None = None,
        after: rounds.Evaluation | None = None,
        model: rounds.Artifact | None = None,
    ) -> rounds.RoundRecord:
        record = rounds.RoundRecord(
            round=st.number,
            status=status,
            reason=reason,
            base_sha256=st.base_sha256,
            part=self.settings.part.describe(),
            aggregation=self.settings.aggregation,
            participants=[
                rounds.Participant(site=k, samples=d.samples, upload_bytes=st.upload_bytes[k])
                for k, d in sorted(st.deltas.items())
            ],
            skipped=self._skipped(st),
            eval_before=before if before is not None else self.model.evaluate(),
            eval_after=after,
            privacy=self._privacy(counts),
            model=model,
            opened_at=st.opened_at,
            closed_at=_now(),
        )
        rounds.dump(record, rounds.round_dir(self.out_dir, st.number))
        log.info(
            "round %d %s: %d participants, %d skipped, epsilon %.3f%s",
            st.number,
            status,
            len(record.participants),
            len(record.skipped),
            record.privacy.epsilon,
            f" ({reason})" if reason else "",
        )
        return record

    def _accept(self, st: RoundState, counts: Mapping[str, int]) -> rounds.RoundRecord:
        s = self.settings
        sites = sorted(st.deltas)
        dimension = sum(int(np.prod(shape)) for shape in self.expected.values())
        bound = aggregating.norm_bound(s.clip_norm, s.noise_multiplier, dimension)
        updates, weights, touched = aggregating.bound_influence(
            [st.deltas[k].tensors for k in sites], [st.deltas[k].samples for k in sites], bound
        )
        if touched:
            log.warning(
                "round %d: updates of %s clipped to norm %.3g or their samples weight capped",
                st.number,
                ", ".join(sites[i] for i in touched),
                bound,
            )
        combined = aggregating.aggregate(s.aggregation, updates, weights, s.trim_fraction)
        dense = dense_update(s.part, combined, self.shapes, st.lora_seed)
        before = self.model.evaluate()
        model = self.model.updated(dense, s.server_lr)
        if model is None:
            reason = (
                "the aggregated model has non-finite weights: lower learningRate or --server-learning-rate"
            )
            return self._finish(st, counts, "skipped", reason, before=before)
        after = model.evaluate()
        path = rounds.round_dir(self.out_dir, st.number) / rounds.WEIGHTS_FILE
        model.save(path)
        sha = sha256_file(path)
        artifact = rounds.Artifact(path=str(path), sha256=sha, bytes=path.stat().st_size)
        record = self._finish(st, counts, "accepted", "", before=before, after=after, model=artifact)
        self.model, self.weights, self.base_sha256 = model, path, sha
        return record
