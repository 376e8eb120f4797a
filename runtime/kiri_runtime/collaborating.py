"""Edge-cloud collaborative generation: an edge `kiri serve` on a language model working with a cloud tier per token.

Modes (`--collaboration`, per deployment; a request may choose another with the body field
`"kiri": {"collaboration": MODE}`; the OpenAI client sends it through `extra_body`):

- `edge-only`: the edge model answers (the decode scheduler, generating.py). The default.
- `cloud-only`: one request to the cloud tier; the edge only tokenizes and detokenizes.
- `speculative`: the edge drafts k tokens, the cloud verifies context + draft in ONE forward pass (the verify call
  of verifying.py: `/v1/completions` with a token-id prompt, `echo`, `logprobs`, `max_tokens: 1`; a vLLM cloud
  answers it too) and the edge keeps the accepted prefix plus the cloud's own next token. Greedy: a draft token is
  accepted when it is the cloud's argmax at its position, so the text is the cloud's greedy text token for token.
  Sampling: Leviathan et al.'s rule (accept with min(1, q/p), else draw from norm(max(0, q - p))), with q the
  cloud's distribution as its top-`logprobs` list gives it (temperature, top-k and top-p applied at the edge):
  exact when the cloud's top list holds the tokens the request can sample (top_k <= 20, or a nucleus inside it).
  k adapts (`SpeculationTuner`): it maximises expected tokens per second of a round, from the measured acceptance
  rate, the edge's draft time per token and the verify call's round trip.
- `cascade`: the edge generates while its uncertainty stays under the threshold: the mean over the last `window`
  tokens of 1 - (top-1 probability - runner-up probability) (`--cascade-metric margin`, the default), of
  1 - top-1 probability (`top1`) or of the next-token entropy in nats (`entropy`). Measured on the tiny LLaMA's int4
  edge against its fp32 cloud (768 held-out positions, bench/collab): keeping the 60 % least uncertain positions
  on the edge, the edge's argmax agreed with the cloud's on 97.2 % of them by margin, 93.5 % by top-1, 85.7 % by
  entropy (no better than all positions: a small model's flat tail drowns the entropy). A near-tie at the top is
  what int4 noise flips.
  Past it the uncertain token is not emitted: the cloud continues from the prefix (`/v1/completions` on the token
  ids) for `cloud_tokens` tokens (0: to the end), then the edge takes over again.

Hand-offs (reason constants below): the edge model not loaded (`not_ready`) or at its limit (`overloaded`) sends
the whole request to the cloud, as for tensor models (fallback.py); the cloud failing mid-answer
(`cloud_unavailable`) leaves the edge to finish alone: a less sure answer beats none.

Every answer's `usage` carries `kiri`: the mode, tokens per tier (`edge_tokens`: tokens the edge model produced
that the answer kept, accepted drafts included; `cloud_tokens`: the cloud's own), `cloud_passes` (cloud forward
passes: a verify is one, a continuation of n tokens n), `cloud_requests`, `draft_tokens`, `accepted_tokens`,
`handoffs` and `handoff_reason` (the last: a cascade whose
hand-off found the cloud down says `cloud_unavailable`). Metrics (vLLM's spec-decode names with the kiri: prefix):

| name | type | labels | meaning |
|---|---|---|---|
| `kiri:collab_requests_total` | counter | model, collaboration | generation requests by the mode that served them |
| `kiri:collab_tokens_total` | counter | model, tier | answer tokens by the tier that produced them (`edge`, `cloud`) |
| `kiri:collab_handoffs_total` | counter | model, reason | hand-offs: `uncertainty`, `not_ready`, `overloaded`, `cloud_unavailable` |
| `kiri:collab_cloud_passes_total` | counter | model | cloud forward passes (cloud passes per token: over `collab_tokens_total`) |
| `kiri:spec_decode_num_drafts_total` | counter | model | verify rounds |
| `kiri:spec_decode_num_draft_tokens_total` | counter | model | draft tokens sent |
| `kiri:spec_decode_num_accepted_tokens_total` | counter | model | draft tokens accepted (acceptance rate: over draft tokens) |

Edge work (draft steps, cascade steps) runs on worker threads, one onnxruntime-genai `Generator` per request kept
across rounds (`rewind_to` drops rejected drafts), apart from the decode scheduler. Logprobs are not offered in
`speculative` and `cascade` (400): the tokens come from two models.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np
from prometheus_client import Counter

from kiri_runtime.generating import Delta, GenerationFailed, GenerationHandle, _cut_at_stop, _held_back
from kiri_runtime.generation_api import ApiError, Job
from kiri_runtime.generative_model import GenerativeModel, SamplingParams
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.verifying import TOKEN_ID_PREFIX, log_softmax

log = logging.getLogger(__name__)

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
MAX_K = 32
EDGE_CHUNK = 16  # cascade: edge tokens per worker-thread hop (and per streamed delta)
OPTION_KEYS = frozenset(
    {"collaboration", "cascade_threshold", "cascade_window", "cascade_cloud_tokens", "speculative_k"}
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


def parse_options(raw: Any, config: CollabConfig, *, logprobs: bool) -> Options:
    """The request's `kiri` object checked (ApiError 400 naming the field) over the deployment's defaults."""
    opts = Options(
        config.mode,
        config.cascade_threshold,
        config.cascade_window,
        config.cascade_cloud_tokens,
        config.speculative_k,
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
        opts = replace(
            opts,
            mode=mode,
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


# --------------------------------------------------------------------------------------------- metrics


class CollabMetrics:
    def __init__(self, metrics: RuntimeMetrics) -> None:
        r = metrics.registry
        self.runtime = metrics
        self.requests = Counter(
            "kiri:collab_requests",
            "Generation requests by collaboration mode.",
            ["model", "collaboration"],
            registry=r,
        )
        self.tokens = Counter("kiri:collab_tokens", "Answer tokens by tier.", ["model", "tier"], registry=r)
        self.handoffs = Counter(
            "kiri:collab_handoffs", "Hand-offs by reason.", ["model", "reason"], registry=r
        )
        self.cloud_passes = Counter(
            "kiri:collab_cloud_passes", "Cloud forward passes.", ["model"], registry=r
        )
        self.drafts = Counter("kiri:spec_decode_num_drafts", "Verify rounds.", ["model"], registry=r)
        self.draft_tokens = Counter(
            "kiri:spec_decode_num_draft_tokens", "Draft tokens.", ["model"], registry=r
        )
        self.accepted_tokens = Counter(
            "kiri:spec_decode_num_accepted_tokens", "Accepted draft tokens.", ["model"], registry=r
        )


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
    handoffs: int = 0
    handoff_reason: str | None = None

    def handoff(self, reason: str) -> None:
        self.handoffs += 1
        self.handoff_reason = reason

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------- the cloud tier


class CloudUnavailable(Exception):
    """The cloud did not answer usefully (connection, timeout, non-200, a body we cannot read)."""


@dataclass
class Verdict:
    """A verify call's answer for k draft tokens: per draft position the cloud's top list; then its own token."""

    top: list[dict[int, float]]  # per draft position: token id -> log-probability (the cloud's top list)
    draft_logprobs: list[float]  # the cloud's log-probability of each draft token
    next_token: int  # what the cloud generated after the whole draft
    seconds: float = 0.0


class CloudTier:
    """OpenAI completions on token ids at the cloud tier (a Kiri cloud or vLLM)."""

    def __init__(self, base_url: str, model: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_keepalive_connections=32))

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self._client.post(self.base_url + path, json=body)
        except httpx.HTTPError as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}"[:200]) from None
        if reply.status_code != 200:
            raise CloudUnavailable(f"cloud answered {reply.status_code}: {reply.text[:200]}")
        try:
            data = reply.json()
        except ValueError:
            raise CloudUnavailable("cloud answered a body that is not JSON") from None
        if not isinstance(data, dict):
            raise CloudUnavailable("cloud answered a body that is not a JSON object")
        return data

    async def forward(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post(path, body)

    async def verify(self, ids: Sequence[int], k: int, params: SamplingParams, top_n: int) -> Verdict:
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": 1,
            "echo": True,
            "logprobs": top_n,
            "return_tokens_as_token_ids": True,
            **_sampling_body(params),
        }
        start = time.perf_counter()
        data = await self._post("/v1/completions", body)
        try:
            lps = data["choices"][0]["logprobs"]
            tokens = [_token_id(t) for t in lps["tokens"]]
            tops = lps["top_logprobs"]
            n = len(ids)
            if len(tokens) != n + 1 or tokens[:n] != list(ids):
                raise ValueError(f"{len(tokens)} tokens for a prompt of {n} plus one")
            first = n - k
            top = [{_token_id(t): float(p) for t, p in tops[first + i].items()} for i in range(k)]
            draft_lps = [float(lps["token_logprobs"][first + i]) for i in range(k)]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise CloudUnavailable(f"cloud's verify answer is unreadable: {exc}"[:200]) from None
        return Verdict(top, draft_lps, tokens[n], time.perf_counter() - start)

    async def complete(
        self, ids: Sequence[int], params: SamplingParams, max_tokens: int
    ) -> tuple[list[int], bool]:
        """The cloud's continuation of `ids` (token ids) and whether it finished on its own (eos, stop)."""
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": max_tokens,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            **_sampling_body(params),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        data = await self._post("/v1/completions", body)
        try:
            choice = data["choices"][0]
            tokens = [_token_id(t) for t in choice["logprobs"]["tokens"]]
            finished = choice.get("finish_reason") == "stop"
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CloudUnavailable(f"cloud's completion is unreadable: {exc}"[:200]) from None
        return tokens, finished

    async def close(self) -> None:
        await self._client.aclose()


def _token_id(spelled: Any) -> int:
    if not isinstance(spelled, str) or not spelled.startswith(TOKEN_ID_PREFIX):
        raise ValueError(
            f"token {str(spelled)[:30]!r} is not spelled token_id:N (return_tokens_as_token_ids)"
        )
    return int(spelled[len(TOKEN_ID_PREFIX) :])


def _sampling_body(params: SamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {"temperature": 0.0 if params.greedy else params.temperature}
    if not params.greedy:
        body["top_p"] = params.top_p
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    return body


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


# --------------------------------------------------------------------------------------------- edge side


class EdgeSession:
    """One request's context on the edge model, kept across rounds: a Generator fed by `append_tokens` only."""

    def __init__(self, model: GenerativeModel, prompt: Sequence[int], max_length: int) -> None:
        og = model.og
        gp = og.GeneratorParams(model.model)
        gp.set_search_options(max_length=max_length, do_sample=False)
        self.generator = og.Generator(model.model, gp)
        self.length = 0
        self.logits = np.zeros(0, dtype=np.float32)
        self.append(prompt)

    def append(self, tokens: Sequence[int]) -> None:
        self.generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        self.length += len(tokens)
        self.logits = np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(-1)

    def replace_tail(self, keep: int, tokens: Sequence[int]) -> None:
        """Drop everything after `keep` tokens (rejected drafts), then append `tokens`."""
        if keep < self.length:
            self.generator.rewind_to(keep)
            self.length = keep
        self.append(tokens)


def _pick(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator
) -> tuple[int, np.ndarray | None]:
    if params.greedy:
        return int(np.argmax(logits)), None
    p = sampling_probs(logits, params)
    return int(rng.choice(p.size, p=p)), p


class Emitter:
    """Turns tokens into the answer's text the way the decode scheduler does: eos and stop tokens end it, stop
    strings cut it (text that may start one is held back), max_tokens ends it."""

    def __init__(self, model: GenerativeModel, params: SamplingParams, prompt_tokens: int) -> None:
        self.model = model
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.stream = model.tokenizer.create_stream()
        self.pending = ""
        self.generated = 0
        self.done = False

    def feed(self, tokens: Sequence[int]) -> tuple[Delta, int]:
        """The delta for `tokens`, and how many of them the answer kept (it may end partway)."""
        delta = Delta()
        used = 0
        for token in tokens:
            if self.done:
                break
            used += 1
            self.generated += 1
            if token in self.model.eos_token_ids or token in self.params.stop_token_ids:
                delta.text += self.pending
                self.pending = ""
                self._finish(
                    delta, "stop", "eos_token" if token in self.model.eos_token_ids else "stop_token"
                )
                break
            delta.token_ids.append(token)
            self.pending += self.stream.decode(token)
            text, stopped = _cut_at_stop(self.pending, self.params.stop)
            if stopped:
                delta.text += text
                self.pending = ""
                self._finish(delta, "stop", "stop_sequence")
                break
            hold = _held_back(text, self.params.stop)
            delta.text += text[: len(text) - hold]
            self.pending = text[len(text) - hold :]
            if self.generated >= self.params.max_tokens:
                delta.text += self.pending
                self.pending = ""
                self._finish(delta, "length", "length")
        return delta, used

    def finish_now(self, delta: Delta) -> None:
        """The cloud said it is done (length or a stop string it matched): end here."""
        if not self.done:
            delta.text += self.pending
            self.pending = ""
            self._finish(delta, "length", "length")

    def _finish(self, delta: Delta, finish: str, why: str) -> None:
        self.done = True
        delta.finish_reason, delta.stop_reason = finish, why
        delta.prompt_tokens, delta.completion_tokens = self.prompt_tokens, self.generated


# --------------------------------------------------------------------------------------------- requests


class CollabHandle(GenerationHandle):
    """A collaborative request's deltas, read by the HTTP adapter like a scheduler's; `kiri` is its report."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, prompt_tokens: int, release: Any, report: Report
    ) -> None:
        super().__init__(loop, prompt_tokens, release)
        self.kiri = report
        self.task: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.task.cancel()


@dataclass
class _Run:
    handle: CollabHandle
    model: GenerativeModel
    prompt: list[int]
    params: SamplingParams
    options: Options
    emitter: Emitter
    rng: np.random.Generator
    submitted: float
    tokens: list[int] = field(default_factory=list)  # the answer so far (prompt excluded)
    first_at: float = 0.0
    last_at: float = 0.0

    @property
    def report(self) -> Report:
        return self.handle.kiri

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.tokens)


class Collaborator:
    """The collaboration modes of one edge server: `submit` starts a request, `forward` hands a whole one over."""

    def __init__(self, config: CollabConfig, name: str, metrics: RuntimeMetrics) -> None:
        self.config = config
        self.name = name
        self.metrics = CollabMetrics(metrics)
        self.cloud = (
            CloudTier(config.cloud_url, config.cloud_model or name, config.timeout_s)
            if config.cloud_url
            else None
        )
        self.tuner = SpeculationTuner(config.speculative_max_k)
        self.active = 0

    def options(self, job: Job) -> Options:
        return parse_options(job.kiri, self.config, logprobs=job.logprobs is not None)

    def overloaded(self, max_sessions: int, queue_limit: int, scheduler_in_flight: int) -> bool:
        if self.active >= max_sessions:
            return True
        return bool(queue_limit) and self.active + scheduler_in_flight >= queue_limit

    def counted(self, options: Options) -> None:
        self.metrics.requests.labels(self.name, options.mode).inc()

    def edge_only_report(self, last: Delta) -> Report:
        self.metrics.tokens.labels(self.name, "edge").inc(last.completion_tokens)
        return Report(EDGE_ONLY, edge_tokens=last.completion_tokens)

    def submit(
        self, model: GenerativeModel, prompt: list[int], params: SamplingParams, options: Options
    ) -> CollabHandle:
        self.active += 1
        report = Report(options.mode)
        handle = CollabHandle(asyncio.get_running_loop(), len(prompt), self._release, report)
        seed = params.seed if params.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        run = _Run(
            handle,
            model,
            prompt,
            params,
            options,
            Emitter(model, params, len(prompt)),
            np.random.default_rng(seed),
            time.perf_counter(),
        )
        handle.task = asyncio.get_running_loop().create_task(self._run(run))
        return handle

    def _release(self) -> None:
        self.active -= 1

    async def forward(self, path: str, data: dict[str, Any], reason: str) -> dict[str, Any]:
        """The whole request answered by the cloud (the edge model cannot): its body, usage.kiri added."""
        assert self.cloud is not None
        body = {k: v for k, v in data.items() if k != "kiri"}
        body["model"] = self.cloud.model
        self.metrics.handoffs.labels(self.name, reason).inc()
        answer = await self.cloud.forward(path, body)
        answer["model"] = data.get("model", answer.get("model"))
        raw_usage = answer.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        tokens = int(usage.get("completion_tokens", 0) or 0)
        report = Report(CLOUD_ONLY, cloud_tokens=tokens, cloud_passes=tokens, cloud_requests=1)
        report.handoff(reason)
        self.metrics.tokens.labels(self.name, "cloud").inc(tokens)
        self.metrics.cloud_passes.labels(self.name).inc(tokens)
        answer["usage"] = {**usage, "kiri": report.as_dict()}
        return answer

    async def close(self) -> None:
        if self.cloud is not None:
            await self.cloud.close()

    # ------------------------------------------------------------ one request

    async def _run(self, run: _Run) -> None:
        try:
            mode = run.options.mode
            if mode == CLOUD_ONLY:
                await self._cloud_only(run)
            elif mode == SPECULATIVE:
                await self._speculative(run)
            else:
                await self._cascade(run, run.options.cascade_threshold)
        except asyncio.CancelledError:
            self.metrics.runtime.lm_finished.labels(self.name, "abort").inc()
            raise
        except Exception as exc:  # never leave the client waiting: fail the request, keep serving
            log.exception("collaborative generation failed")
            run.handle._deliver(
                Delta(error=GenerationFailed(f"collaborative generation failed: {exc}"[:300]))
            )

    def _emit(self, run: _Run, tokens: Sequence[int], tier: str) -> bool:
        """Sends `tokens` (produced by `tier`) to the client; True when the answer is complete."""
        if not tokens or run.emitter.done:
            return run.emitter.done
        delta, used = run.emitter.feed(tokens)
        run.tokens.extend(tokens[:used])
        self._account(run, delta, used, tier)
        return run.emitter.done

    def _account(self, run: _Run, delta: Delta, used: int, tier: str) -> None:
        m = self.metrics.runtime
        now = time.perf_counter()
        if used:
            if tier == "edge":
                run.report.edge_tokens += used
            else:
                run.report.cloud_tokens += used
            self.metrics.tokens.labels(self.name, tier).inc(used)
            if not run.first_at:
                run.first_at = run.last_at = now
                m.lm_ttft.labels(self.name).observe(now - run.submitted)
                used -= 1  # the others arrived with it
            if used:
                gap = (now - run.last_at) / used
                itl = m.lm_itl.labels(self.name)
                for _ in range(used):
                    itl.observe(gap)
            run.last_at = now
        if delta.finish_reason is not None:
            m.lm_e2e.labels(self.name).observe(now - run.submitted)
            m.lm_finished.labels(self.name, delta.finish_reason).inc()
        if delta.text or delta.finish_reason is not None:
            run.handle._deliver(delta)

    def _finish_short(self, run: _Run) -> None:
        if not run.emitter.done:
            delta = Delta()
            run.emitter.finish_now(delta)
            self._account(run, delta, 0, "cloud")

    def _handoff(self, run: _Run, reason: str) -> None:
        run.report.handoff(reason)
        self.metrics.handoffs.labels(self.name, reason).inc()

    async def _cloud_continue(self, run: _Run, max_tokens: int) -> bool | None:
        """The cloud's next `max_tokens` tokens emitted; True: the answer is complete; None: the cloud failed."""
        assert self.cloud is not None
        try:
            tokens, finished = await self.cloud.complete(run.context, run.params, max_tokens)
        except CloudUnavailable as exc:
            log.warning("cloud tier unavailable, the edge finishes alone: %s", exc)
            self._handoff(run, CLOUD_UNAVAILABLE)
            return None
        run.report.cloud_requests += 1
        run.report.cloud_passes += max(1, len(tokens))
        self.metrics.cloud_passes.labels(self.name).inc(max(1, len(tokens)))
        if self._emit(run, tokens, "cloud"):
            return True
        if finished or not tokens:  # the cloud stopped on a stop string it matched, or gave nothing
            self._finish_short(run)
            return True
        return False

    async def _cloud_only(self, run: _Run) -> None:
        result = await self._cloud_continue(run, run.remaining)
        if result is None:
            await self._cascade(run, math.inf, None)  # the edge answers alone
        elif not run.emitter.done:
            self._finish_short(run)

    async def _cascade(self, run: _Run, threshold: float, session: EdgeSession | None = None) -> None:
        window: collections.deque[float] = collections.deque(maxlen=run.options.cascade_window)
        metric = self.config.cascade_metric
        while not run.emitter.done:
            if session is None:
                session = await asyncio.to_thread(self._session, run)
            else:
                missing = run.context[session.length :]
                if missing:
                    await asyncio.to_thread(session.append, missing)
            tokens, uncertain = await asyncio.to_thread(
                self._edge_steps, session, run, window, threshold, metric
            )
            if self._emit(run, tokens, "edge"):
                return
            if not uncertain:
                continue
            self._handoff(run, UNCERTAINTY)
            span = run.options.cascade_cloud_tokens or run.remaining
            result = await self._cloud_continue(run, min(span, run.remaining))
            if result is None:
                threshold = math.inf
            elif result:
                return
            window.clear()

    def _session(self, run: _Run) -> EdgeSession:
        max_length = min(run.model.context_length, len(run.prompt) + run.params.max_tokens + 1)
        return EdgeSession(run.model, run.context, max_length)

    def _edge_steps(
        self,
        session: EdgeSession,
        run: _Run,
        window: collections.deque[float],
        threshold: float,
        metric: str,
    ) -> tuple[list[int], bool]:
        """Edge tokens until the window's uncertainty passes `threshold` (True), the answer's budget, an end token
        or EDGE_CHUNK tokens (False). The uncertain token itself is not taken."""
        out: list[int] = []
        budget = min(EDGE_CHUNK, run.remaining)
        eos = run.model.eos_token_ids
        while len(out) < budget:
            if threshold != math.inf:
                window.append(uncertainty(session.logits, metric))
                if sum(window) / len(window) > threshold:
                    return out, True
            token, _ = _pick(session.logits, run.params, run.rng)
            out.append(token)
            if token in eos or token in run.params.stop_token_ids or len(out) == run.remaining:
                break
            session.append([token])
        return out, False

    async def _speculative(self, run: _Run) -> None:
        assert self.cloud is not None
        session = await asyncio.to_thread(self._session, run)
        fixed_k = run.options.speculative_k
        top_n = 1 if run.params.greedy else self.config.verify_logprobs
        while not run.emitter.done:
            k = min(fixed_k or self.tuner.choose(), run.remaining - 1)
            start = time.perf_counter()
            draft, probs = await asyncio.to_thread(self._draft, session, run, max(k, 0))
            draft_s = time.perf_counter() - start
            try:
                verdict = await self.cloud.verify(run.context + draft, len(draft), run.params, top_n)
            except CloudUnavailable as exc:
                log.warning("cloud tier unavailable, the edge finishes alone: %s", exc)
                self._handoff(run, CLOUD_UNAVAILABLE)
                if self._emit(run, draft, "edge"):
                    return
                await self._cascade(run, math.inf, session)  # the edge finishes alone
                return
            if run.params.greedy:
                accepted, token = accept_greedy(draft, verdict)
            else:
                accepted, token = accept_sampled(draft, probs, verdict, run.params, run.rng)
            if not fixed_k:
                self.tuner.observe(len(draft), accepted, draft_s, verdict.seconds)
            report = run.report
            report.cloud_requests += 1
            report.cloud_passes += 1
            report.draft_tokens += len(draft)
            report.accepted_tokens += accepted
            self.metrics.cloud_passes.labels(self.name).inc()
            self.metrics.drafts.labels(self.name).inc()
            self.metrics.draft_tokens.labels(self.name).inc(len(draft))
            self.metrics.accepted_tokens.labels(self.name).inc(accepted)
            keep = len(run.context) + accepted
            if self._emit(run, draft[:accepted], "edge") or self._emit(run, [token], "cloud"):
                return
            await asyncio.to_thread(session.replace_tail, keep, [token])

    def _draft(self, session: EdgeSession, run: _Run, k: int) -> tuple[list[int], list[np.ndarray]]:
        """k edge tokens after the context (fewer when one ends the answer); their distributions when sampling."""
        draft: list[int] = []
        probs: list[np.ndarray] = []
        for _ in range(k):
            token, p = _pick(session.logits, run.params, run.rng)
            draft.append(token)
            if p is not None:
                probs.append(p)
            session.append([token])
            if token in run.model.eos_token_ids or token in run.params.stop_token_ids:
                break
        return draft, probs
