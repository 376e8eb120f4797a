"""The data and the pure rules of edge-cloud collaborative generation (collaborating.py does the work): modes and
reasons, a deployment's settings and a request's options (`parse_options`), the answer's `usage.kiri` report, and
the decisions: which draft tokens a verify keeps (greedy, or Leviathan et al.'s rejection rule), how uncertain the
edge is, and how many tokens to draft (`SpeculationTuner`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kiri_runtime.generation_api import ApiError
from kiri_runtime.generative_model import SamplingParams
from kiri_runtime.verifying import log_softmax

EDGE_ONLY, CLOUD_ONLY, SPECULATIVE, CASCADE = "edge-only", "cloud-only", "speculative", "cascade"
MODES = (EDGE_ONLY, CLOUD_ONLY, SPECULATIVE, CASCADE)
# Why a request (or part of one) changed tier.
UNCERTAINTY, NOT_READY, OVERLOADED, CLOUD_UNAVAILABLE = (
    "uncertainty",
    "not_ready",
    "overloaded",
    "cloud_unavailable",
)
METRICS = ("margin", "top1", "entropy")
# What the cloud checks of the cascade's edge tokens: nothing (`off`: they stream as the edge makes them), the edge
# tokens since the last check at each hand-off, in the hand-off's own call (`handoffs`), or that and the answer's
# tail in one more call at its end (`full`: every edge token checked; under greedy decoding the answer is the
# cloud's greedy answer).
CHECK_OFF, CHECK_HANDOFFS, CHECK_FULL = "off", "handoffs", "full"
CHECKS = (CHECK_OFF, CHECK_HANDOFFS, CHECK_FULL)
MAX_K = 32
OPTION_KEYS = frozenset(
    {
        "collaboration",
        "cascade_threshold",
        "cascade_window",
        "cascade_cloud_tokens",
        "cascade_check",
        "speculative_k",
    }
)


@dataclass(frozen=True)
class CollabConfig:
    """A deployment's collaboration settings (`kiri serve` flags)."""

    mode: str = EDGE_ONLY
    cloud_url: str | None = None
    cloud_model: str | None = None  # the model name at the cloud tier (default: the edge's)
    timeout_s: float = 30.0
    cascade_metric: str = "margin"
    cascade_threshold: float = 0.7
    cascade_window: int = 1
    cascade_cloud_tokens: int = 0  # tokens the cloud produces per hand-off; 0: the rest of the answer
    cascade_check: str = CHECK_FULL  # CHECKS: what the cloud checks of the edge's tokens
    speculative_k: int = 0  # 0: adaptive
    speculative_max_k: int = 12
    verify_logprobs: int = 20  # top log-probabilities a sampled verify asks for (vLLM's default limit)


@dataclass(frozen=True)
class Options:
    """One request's collaboration: the deployment's settings with the request's `kiri` overrides."""

    mode: str
    cascade_threshold: float
    cascade_window: int
    cascade_cloud_tokens: int
    speculative_k: int
    cascade_check: str = CHECK_FULL


def parse_options(raw: Any, config: CollabConfig, *, logprobs: bool) -> Options:
    """The request's `kiri` object checked (ApiError 400 naming the field) over the deployment's defaults."""
    opts = Options(
        config.mode,
        config.cascade_threshold,
        config.cascade_window,
        config.cascade_cloud_tokens,
        config.speculative_k,
        config.cascade_check,
    )
    if raw is not None:
        if not isinstance(raw, dict):
            raise ApiError("kiri must be an object", "kiri", "invalid_type")
        unknown = sorted(set(raw) - OPTION_KEYS)
        if unknown:
            raise ApiError(
                f"kiri.{unknown[0]} is not a Kiri option (known: {', '.join(sorted(OPTION_KEYS))})",
                f"kiri.{unknown[0]}",
                "invalid_value",
            )
        mode = raw.get("collaboration", opts.mode)
        if mode not in MODES:
            raise ApiError(
                f"kiri.collaboration must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}",
                "kiri.collaboration",
                "invalid_value",
            )
        check = raw.get("cascade_check", opts.cascade_check)
        if check not in CHECKS:
            raise ApiError(
                f"kiri.cascade_check must be one of {', '.join(CHECKS)}, got {str(check)[:40]!r}",
                "kiri.cascade_check",
                "invalid_value",
            )
        opts = replace(
            opts,
            mode=mode,
            cascade_check=check,
            cascade_threshold=_number(raw, "cascade_threshold", opts.cascade_threshold),
            cascade_window=_count(raw, "cascade_window", opts.cascade_window, 1, 64),
            cascade_cloud_tokens=_count(raw, "cascade_cloud_tokens", opts.cascade_cloud_tokens, 0, 1 << 20),
            speculative_k=_count(raw, "speculative_k", opts.speculative_k, 0, MAX_K),
        )
    if opts.mode != EDGE_ONLY and config.cloud_url is None:
        raise ApiError(
            f"collaboration {opts.mode!r} needs a cloud tier, and this server has none (--fallback-url)",
            "kiri.collaboration",
            "invalid_value",
        )
    if logprobs and opts.mode in (SPECULATIVE, CASCADE):
        raise ApiError(
            f"logprobs are not offered with collaboration {opts.mode!r} (its tokens come from two models)",
            "logprobs",
            "unsupported_parameter",
        )
    return opts


def _number(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ApiError(f"kiri.{key} must be a number >= 0", f"kiri.{key}", "invalid_value")
    return float(value)


def _count(raw: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(f"kiri.{key} must be an integer from {lo} to {hi}", f"kiri.{key}", "invalid_value")
    return value


@dataclass
class Report:
    """The `usage.kiri` of one answer."""

    collaboration: str
    edge_tokens: int = 0
    cloud_tokens: int = 0
    cloud_passes: int = 0
    cloud_requests: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    checked_tokens: int = 0  # cascade: edge tokens the cloud checked
    corrected_tokens: int = (
        0  # cascade: edge tokens the cloud replaced (each ends its check; the rest is dropped)
    )
    handoffs: int = 0
    handoff_reason: str | None = None

    def handoff(self, reason: str) -> None:
        self.handoffs += 1
        self.handoff_reason = reason

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Verdict:
    """A verify call's answer for k draft tokens: per draft position the cloud's top list; then its own token."""

    top: list[dict[int, float]]  # per draft position: token id -> log-probability (the cloud's top list)
    draft_logprobs: list[float]  # the cloud's log-probability of each draft token
    next_token: int  # what the cloud generated after the whole draft
    seconds: float = 0.0
    continuation: list[int] = field(
        default_factory=list
    )  # all it generated after the draft (next_token first)
    finished: bool = False  # the continuation ended on its own (eos, a stop token or string)


@dataclass(frozen=True)
class Checked:
    """A cascade check settled: what the answer takes from it, in order (`edge` then `cloud`), and its cost."""

    edge: list[int]  # the checked edge tokens the cloud kept
    cloud: list[int]  # the cloud's replacement of the first refused edge token, or its continuation
    corrected: bool  # an edge token was refused: the edge resumes after the replacement
    finished: bool  # the cloud's continuation ended the answer on its own
    passes: int  # cloud forward passes the call ran: the span and its first token in one, then one per token


def settle_check(held: Sequence[int], accepted: int, token: int, verdict: Verdict, want: int) -> Checked:
    """The answer's part of one cascade check of `held` edge tokens (the cloud kept `accepted` of them; `token`:
    its replacement of the next one, or its first token after all of them), continuing `want` cloud tokens when
    it kept them all (0: a final check, nothing after). A refusal drops the continuation: it followed the edge's
    refused token."""
    passes = max(1, len(verdict.continuation))
    if accepted < len(held):
        return Checked(list(held[:accepted]), [token], True, False, passes)
    continuation = verdict.continuation or [token]
    finished = verdict.finished and 0 < len(continuation) <= want
    return Checked(list(held), list(continuation[:want]), False, finished, passes)


# --------------------------------------------------------------------------------------------- decisions (pure)


def sampling_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a request samples from: temperature, then top-k, then top-p (onnxruntime-genai's order)."""
    z = logits.astype(np.float64) / max(params.temperature, 1e-6)
    if params.top_k and params.top_k < z.size:
        cut = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < params.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    out: np.ndarray = p
    return out


def cloud_probs(top: Mapping[int, float], vocab: int, params: SamplingParams) -> np.ndarray:
    """The cloud's sampling distribution from its top list (tokens outside it get none)."""
    logits = np.full(vocab, -np.inf)
    for token, lp in top.items():
        if 0 <= token < vocab:
            logits[token] = lp
    return sampling_probs(logits, params)


def accept_greedy(draft: Sequence[int], verdict: Verdict) -> tuple[int, int]:
    """(accepted draft tokens, the cloud's token after them): a draft token stands while it is the cloud's argmax."""
    for i, token in enumerate(draft):
        best = max(verdict.top[i].items(), key=lambda kv: (kv[1], -kv[0]))[0]
        if best != token:
            return i, best
    return len(draft), verdict.next_token


def accept_sampled(
    draft: Sequence[int],
    edge_probs: Sequence[np.ndarray],
    verdict: Verdict,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Leviathan et al.: keep draft token x with probability min(1, q(x)/p(x)); at the first refusal draw from
    norm(max(0, q - p)); all kept: the cloud's own sample after the draft."""
    for i, token in enumerate(draft):
        p = edge_probs[i]
        q = cloud_probs(verdict.top[i], p.size, params)
        if rng.random() < min(1.0, q[token] / max(p[token], 1e-30)):
            continue
        residual = np.maximum(q - p, 0.0)
        total = residual.sum()
        dist = residual / total if total > 0 else q
        return i, int(rng.choice(dist.size, p=dist))
    return len(draft), verdict.next_token


def uncertainty(logits: np.ndarray, metric: str) -> float:
    """`entropy`: of the next-token distribution, in nats; `top1`: 1 - its top probability; `margin`: 1 - (top
    probability - runner-up probability)."""
    logp = log_softmax(logits)
    if metric == "top1":
        return float(1.0 - math.exp(float(logp.max())))
    if metric == "margin":
        two = np.exp(np.partition(logp, -2)[-2:])
        return float(1.0 - abs(two[1] - two[0]))
    p = np.exp(logp)
    return float(-(p * logp).sum())


class SpeculationTuner:
    """Chooses k from measured acceptance rate (per token), draft time per token and verify round trip (EMAs)."""

    def __init__(self, max_k: int, alpha: float = 0.2) -> None:
        self.max_k = max(1, max_k)
        self.alpha = alpha
        self.acceptance = 0.8
        self.draft_s = 0.001
        self.verify_s: float | None = None

    def observe(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        a = self.alpha
        if k:
            # accepted of k, but a refusal ends the round: the per-token rate that explains `accepted`
            rate = accepted / k if accepted == k else accepted / (accepted + 1)
            self.acceptance = (1 - a) * self.acceptance + a * rate
            self.draft_s = (1 - a) * self.draft_s + a * (draft_s / k)
        self.verify_s = verify_s if self.verify_s is None else (1 - a) * self.verify_s + a * verify_s

    def choose(self) -> int:
        verify = self.verify_s if self.verify_s is not None else 0.05
        alpha = min(self.acceptance, 0.99)
        best_k, best_rate = 1, 0.0
        for k in range(1, self.max_k + 1):
            expected = (1 - alpha ** (k + 1)) / (1 - alpha)  # accepted drafts + the cloud's token
            rate = expected / (k * self.draft_s + verify)
            if rate > best_rate * 1.001:
                best_k, best_rate = k, rate
        return best_k
