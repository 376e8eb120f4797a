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
  The uncertainty misses some int4 flips (a confident edge token that is not the cloud's), and after one the rest
  of the answer diverges. `--cascade-check` (`kiri.cascade_check`): `off` streams edge tokens as they come, as
  above. `handoffs` holds them until the next hand-off and sends them in the hand-off's one call: the verify
  call with `max_tokens` = the hand-off's cloud tokens, which scores the held span and continues after it in one
  request and one prefill. Each held token stands while the cloud agrees (greedy: its argmax; sampling: the
  rejection rule, as `speculative`); the first it refuses is replaced by the cloud's token, the call's
  continuation is dropped (it followed the refused token) and the edge resumes after the replacement. A clean
  span takes the continuation: as many round trips as `off`. `full` (the default) also checks the answer's tail
  in one more call at its end: every edge token is checked, and under greedy decoding the answer is the cloud's
  greedy answer (a speculative decoding whose drafts end where the edge is unsure). Checked tokens reach a
  streaming client once checked, so `handoffs` and `full` stream in bursts.

Hand-offs (reason constants below): the edge model not loaded (`not_ready`) or at its limit (`overloaded`) sends
the whole request to the cloud, as for tensor models (fallback.py); the cloud failing mid-answer
(`cloud_unavailable`) leaves the edge to finish alone: a less sure answer beats none.

Every answer's `usage` carries `kiri`: the mode, tokens per tier (`edge_tokens`: tokens the edge model produced
that the answer kept, accepted drafts included; `cloud_tokens`: the cloud's own), `cloud_passes` (cloud forward
passes: a verify is one, a continuation of n tokens n), `cloud_requests`, `draft_tokens`, `accepted_tokens`,
`checked_tokens` and `corrected_tokens` (cascade: edge tokens the cloud checked, and those it replaced: a
replaced token counts as the cloud's, the held tokens after it as nobody's), `handoffs` and `handoff_reason`
(the last: a cascade whose
hand-off found the cloud down says `cloud_unavailable`). Metrics: `metrics.CollabMetrics`.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiri_runtime.cloud_tier import CloudTier, CloudUnavailable
from kiri_runtime.collaborations import (
    CHECK_FULL,
    CHECK_OFF,
    CLOUD_ONLY,
    CLOUD_UNAVAILABLE,
    EDGE_ONLY,
    SPECULATIVE,
    UNCERTAINTY,
    Checked,
    CollabConfig,
    Options,
    Report,
    SpeculationTuner,
    accept_greedy,
    accept_sampled,
    parse_options,
    settle_check,
    uncertainty,
)
from kiri_runtime.edge_sessions import EdgeSession, Emitter, pick
from kiri_runtime.generating import Delta, GenerationFailed, GenerationHandle
from kiri_runtime.generation_api import Job
from kiri_runtime.generative_model import GenerativeModel, SamplingParams
from kiri_runtime.metrics import CollabMetrics, RuntimeMetrics

log = logging.getLogger(__name__)

EDGE_CHUNK = 16  # cascade: edge tokens per worker-thread hop (and per streamed delta)


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
                await self._cascade(run, run.options.cascade_threshold, None, run.options.cascade_check)
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

    async def _cascade(
        self, run: _Run, threshold: float, session: EdgeSession | None = None, check: str = CHECK_OFF
    ) -> None:
        """`check` off: edge tokens go out as they come. Otherwise they are held until the cloud checked them:
        at a hand-off, in the hand-off's one call (the verify call: the held span scored, then the cloud's
        continuation), and with `full` at the answer's end too."""
        window: collections.deque[float] = collections.deque(maxlen=run.options.cascade_window)
        metric = self.config.cascade_metric
        # edge tokens not yet checked (check on), and their distributions (sampling: the rejection rule needs them)
        held: list[int] = []
        held_probs: list[np.ndarray] = []
        while not run.emitter.done:
            if session is None:
                session = await asyncio.to_thread(self._session, run)
            else:
                missing = (run.context + held)[session.length :]
                if missing:
                    await asyncio.to_thread(session.append, missing)
            tokens, probs, uncertain = await asyncio.to_thread(
                self._edge_steps, session, run, window, threshold, metric, run.remaining - len(held)
            )
            if check == CHECK_OFF:
                if self._emit(run, tokens, "edge"):
                    return
            else:
                held += tokens
                held_probs += probs
            ended = self._span_ended(run, held)
            if not uncertain and not ended:
                continue
            if uncertain:
                self._handoff(run, UNCERTAINTY)
            span = run.options.cascade_cloud_tokens or run.remaining
            want = 0 if not uncertain else min(span, run.remaining - len(held))
            if held and (uncertain or check == CHECK_FULL):
                before = len(run.context)
                checked = await self._cloud_check(run, held, held_probs, want)
                if checked is None:  # the cloud is down: the edge's tokens stand, and it finishes alone
                    threshold, check = math.inf, CHECK_OFF
                    self._emit(run, held, "edge")
                    kept = len(held)
                else:
                    kept = len(checked.edge)  # a replacement: the edge resumes after it
                # the edge's context keeps the span's tokens the answer kept; the next round appends the rest
                await asyncio.to_thread(session.rewind, before + kept)
                held, held_probs = [], []
            elif held:  # check handoffs: the answer's tail goes out unchecked
                self._emit(run, held, "edge")
                held, held_probs = [], []
            elif await self._cloud_continue(run, want) is None:
                threshold, check = math.inf, CHECK_OFF
            window.clear()

    def _span_ended(self, run: _Run, held: list[int]) -> bool:
        """The held span ends the answer: an end token, the answer's budget or a stop string in its text (a
        check can end the answer only there, so the edge need not go on)."""
        if not held:
            return False
        if held[-1] in run.model.eos_token_ids or held[-1] in run.params.stop_token_ids:
            return True
        if len(held) >= run.remaining:
            return True
        stops = run.params.stop
        if not stops:
            return False
        text = str(run.model.tokenizer.decode(np.asarray(held, dtype=np.int32)))
        return any(stop in text for stop in stops)

    async def _cloud_check(
        self, run: _Run, held: list[int], held_probs: list[np.ndarray], want: int
    ) -> Checked | None:
        """The cloud checks `held` and continues `want` tokens in one verify call; the answer takes what it
        kept, its replacement or continuation. None: the cloud failed (nothing emitted)."""
        assert self.cloud is not None
        top_n = 1 if run.params.greedy else self.config.verify_logprobs
        try:
            verdict = await self.cloud.verify(run.context + held, len(held), run.params, top_n, max(1, want))
        except CloudUnavailable as exc:
            log.warning("cloud tier unavailable, the edge finishes alone: %s", exc)
            self._handoff(run, CLOUD_UNAVAILABLE)
            return None
        if run.params.greedy:
            accepted, token = accept_greedy(held, verdict)
        else:
            accepted, token = accept_sampled(held, held_probs, verdict, run.params, run.rng)
        checked = settle_check(held, accepted, token, verdict, want)
        report = run.report
        report.cloud_requests += 1
        report.cloud_passes += checked.passes
        report.checked_tokens += len(held)
        report.corrected_tokens += checked.corrected
        self.metrics.cloud_passes.labels(self.name).inc(checked.passes)
        self.metrics.checked_tokens.labels(self.name).inc(len(held))
        if checked.corrected:
            self.metrics.corrected_tokens.labels(self.name).inc()
        done = self._emit(run, checked.edge, "edge") or self._emit(run, checked.cloud, "cloud")
        if not done and checked.finished:  # the cloud stopped on a stop string it matched
            self._finish_short(run)
        return checked

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
        room: int,
    ) -> tuple[list[int], list[np.ndarray], bool]:
        """Edge tokens (and their distributions when sampling) until the window's uncertainty passes `threshold`
        (True), `room` tokens, an end token or EDGE_CHUNK tokens (False). The uncertain token itself is not
        taken."""
        out: list[int] = []
        probs: list[np.ndarray] = []
        budget = min(EDGE_CHUNK, room)
        eos = run.model.eos_token_ids
        while len(out) < budget:
            if threshold != math.inf:
                window.append(uncertainty(session.logits, metric))
                if sum(window) / len(window) > threshold:
                    return out, probs, True
            token, p = pick(session.logits, run.params, run.rng)
            out.append(token)
            if p is not None:
                probs.append(p)
            if token in eos or token in run.params.stop_token_ids or len(out) == room:
                break
            session.append([token])
        return out, probs, False

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
            token, p = pick(session.logits, run.params, run.rng)
            draft.append(token)
            if p is not None:
                probs.append(p)
            session.append([token])
            if token in run.model.eos_token_ids or token in run.params.stop_token_ids:
                break
        return draft, probs
