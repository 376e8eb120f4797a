"""The transport-free core of language-model serving: the decode scheduler that many concurrent requests share
over one `generative_model.GenerativeModel`.

`Scheduler` owns one decode thread; `submit` returns a `GenerationHandle` that the HTTP adapter
reads `Delta`s from and can `cancel` (client gone: its admission slot is freed at once, its row is dropped at
the next step).

Scheduling (measured in bench/runtime/bench_generate.py, argued in docs/architecture.md): onnxruntime-genai 0.18
batches a `Generator` only when all its prompts are appended at once, and then samples every row with the same
search options; a row cannot join later. Left-padding prompts of different lengths into one batch gave wrong
logits on the padded rows (off by up to 10 on the tiny LLaMA, CPU GroupQueryAttention), so only prompts of equal
length share a batch. Requests are grouped into *cohorts*: those waiting when a decode iteration begins with the
same prompt length and sampling options become one batched generator, and the decode thread steps every live
cohort once per iteration (iteration-level scheduling across generators). A request that arrives
mid-generation starts at the next iteration instead of waiting for the others to finish. A request with a
`seed` decodes alone, so its tokens do not depend on who else is being served.

Sampling is onnxruntime-genai's own (greedy argmax, or temperature / top-k / top-p with its seeded RNG), so a
greedy answer is token for token what a plain onnxruntime-genai greedy loop gives. Stop tokens, stop strings,
max_tokens and log-probabilities (from the logits the token was drawn from) are handled here per row.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiri_runtime.errors import InferenceError, Overloaded
from kiri_runtime.generative_model import GenerativeModel, SamplingParams, first_line
from kiri_runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class Delta:
    """What one decode step produced for one request; the last one has `finish_reason` set."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" (OpenAI's words)
    stop_reason: str | None = None  # "eos_token", "stop_token", "stop_sequence", "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: InferenceError | None = None


class GenerationFailed(InferenceError):
    """onnxruntime-genai failed while generating (KServe's generate extension: 424)."""

    status = 500


# --------------------------------------------------------------------------------------------- handles


class GenerationHandle:
    """The asyncio side of one request: `Delta`s arrive in order; `cancel` frees the slot at once."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, prompt_tokens: int, release: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.checked_at = time.monotonic()  # when the adapter last checked that the client is still there
        self._release = release

    def _close(self) -> None:
        if not self.finished:
            self.finished = True
            self._release()

    def cancel(self) -> None:
        self.cancelled = True
        self._close()

    def _deliver(self, delta: Delta) -> None:
        if delta.finish_reason is not None or delta.error is not None:
            self._close()
        self.queue.put_nowait(delta)

    async def next(self, timeout: float | None = None) -> Delta | None:
        """The next delta, or None when `timeout` passed first."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


# --------------------------------------------------------------------------------------------- scheduler


@dataclass
class _Row:
    handle: GenerationHandle
    prompt: list[int]
    params: SamplingParams
    submitted: float
    streaming: bool = True
    merged: Delta | None = None  # a non-streaming request's deltas so far
    stream: Any = None  # the tokenizer's incremental detokenizer
    pending: str = ""  # decoded text held back: it may be the start of a stop string
    generated: int = 0
    started: float = 0.0
    last_token: float = 0.0
    done: bool = False


@dataclass
class _Cohort:
    generator: Any
    rows: list[_Row]
    max_length: int
    logits: bool  # some row wants log-probabilities

    @property
    def live(self) -> bool:
        return any(not r.done for r in self.rows)


class Scheduler:
    """One decode thread over `model`; `submit` is called on the event loop, everything else runs on the thread."""

    def __init__(
        self,
        model: GenerativeModel,
        name: str,
        metrics: RuntimeMetrics,
        *,
        max_num_seqs: int = 16,
        queue_limit: int = 0,
        batching: bool = True,
        step_delay_s: float = 0.0,
    ) -> None:
        self.model = model
        self.name = name
        self.metrics = metrics
        self.max_num_seqs = max(1, max_num_seqs)
        self.queue_limit = queue_limit
        self.batching = batching
        self.step_delay_s = step_delay_s  # test aid (`--delay-ms`): slows every decode iteration
        # Children looked up once: `labels()` costs microseconds, paid per token it would match a decode step.
        m = metrics
        self._ttft, self._itl = m.lm_ttft.labels(name), m.lm_itl.labels(name)
        self._e2e, self._queue_time = m.lm_e2e.labels(name), m.lm_queue_time.labels(name)
        self._prompt_tokens, self._generation_tokens = (
            m.lm_prompt_tokens.labels(name),
            m.lm_generation_tokens.labels(name),
        )
        self._running, self._waiting_gauge = m.lm_running.labels(name), m.lm_waiting.labels(name)
        self._kv_usage = m.lm_kv_usage.labels(name)
        self._gauges: tuple[int, int, int] | None = None
        self.in_flight = 0  # admitted and not yet finished or cancelled (event-loop side)
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cohorts: list[_Cohort] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kiri-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ event-loop side

    def submit(self, prompt: list[int], params: SamplingParams, stream: bool = True) -> GenerationHandle:
        """Admit a request (Overloaded past the queue limit); raises before any work is queued. With `stream`
        False the request gets one merged `Delta` at the end instead of one per step: a thread hop per token
        costs more than a decode step of a small model."""
        if self.queue_limit and self.in_flight >= self.queue_limit:
            raise Overloaded(f"{self.in_flight} requests in flight (limit {self.queue_limit}); retry later")
        self.in_flight += 1
        handle = GenerationHandle(asyncio.get_running_loop(), len(prompt), self._release)
        row = _Row(handle, prompt, params, time.perf_counter(), stream)
        with self._wake:
            self._waiting.append(row)
            self._wake.notify()
        return handle

    def _release(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ decode thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._cohorts:
                    self._wake.wait()
                if self._stopping:
                    return
                arrivals = self._take_arrivals()
            try:
                self._iterate(arrivals)
            except Exception:  # never let the decode thread die: fail what was running, keep serving
                log.exception("decode step failed")
                self._fail_all()

    def _take_arrivals(self) -> list[_Row]:
        running = sum(1 for c in self._cohorts for r in c.rows if not r.done)
        taken: list[_Row] = []
        while self._waiting and running + len(taken) < self.max_num_seqs:
            row = self._waiting.popleft()
            if row.handle.cancelled:
                continue
            taken.append(row)
        return taken

    def _iterate(self, arrivals: list[_Row]) -> None:
        posts: list[tuple[GenerationHandle, Delta]] = []
        for cohort_rows in self._group(arrivals):
            self._start(cohort_rows, posts)
        if self.step_delay_s and self._cohorts:
            time.sleep(self.step_delay_s)
        for cohort in self._cohorts:
            self._step(cohort, posts)
        self._cohorts = [c for c in self._cohorts if c.live]
        self._publish_gauges()
        if posts:
            loop = posts[0][0].loop
            loop.call_soon_threadsafe(_deliver_all, posts)

    def _group(self, arrivals: list[_Row]) -> list[list[_Row]]:
        """Arrivals with equal prompt lengths and sampling options batched together (no padding: see above)."""
        if not self.batching:
            return [[r] for r in arrivals]
        groups: list[list[_Row]] = []
        by_key: dict[tuple[Any, ...], list[_Row]] = {}
        for row in arrivals:
            key = row.params.cohort_key()
            if key is None:
                groups.append([row])
                continue
            group = by_key.setdefault((*key, len(row.prompt)), [])
            if not group:
                groups.append(group)
            group.append(row)
        return groups

    def _start(self, rows: list[_Row], posts: list[tuple[GenerationHandle, Delta]]) -> None:
        live = [r for r in rows if not r.handle.cancelled]
        if not live:
            return
        width = max(len(r.prompt) for r in live)
        max_length = min(self.model.context_length, width + max(r.params.max_tokens for r in live))
        now = time.perf_counter()
        try:
            generator = self.model.generator([r.prompt for r in live], live[0].params, max_length)
        except RuntimeError as e:
            error = GenerationFailed(f"onnxruntime-genai failed to start generation: {first_line(e)}")
            for r in live:
                r.done = True
                posts.append((r.handle, Delta(error=error)))
            return
        for r in live:
            r.started = now
            r.stream = self.model.tokenizer.create_stream()
            self._queue_time.observe(now - r.submitted)
            self._prompt_tokens.inc(len(r.prompt))
        wants_logits = any(r.params.logprobs is not None for r in live)
        self._cohorts.append(_Cohort(generator, live, max_length, wants_logits))

    def _step(self, cohort: _Cohort, posts: list[tuple[GenerationHandle, Delta]]) -> None:
        for r in cohort.rows:
            if not r.done and r.handle.cancelled:
                r.done = True
                self.metrics.lm_finished.labels(self.name, "abort").inc()
        if not cohort.live:
            return
        g = cohort.generator
        logits = None
        if cohort.logits:
            logits = np.asarray(g.get_logits(), dtype=np.float32).reshape(len(cohort.rows), -1)
        g.generate_next_token()
        tokens = g.get_next_tokens()
        now = time.perf_counter()
        exhausted = g.is_done()
        generated = 0
        for i, r in enumerate(cohort.rows):
            if r.done:
                continue
            generated += 1
            delta = self._advance(r, int(tokens[i]), None if logits is None else logits[i], now)
            if exhausted and delta.finish_reason is None:
                self._finish(r, delta, "length", "length", now)
            if not r.streaming:
                delta = _merge(r.merged, delta)
                if delta.finish_reason is None:
                    r.merged = delta
                    continue
            posts.append((r.handle, delta))
        self._generation_tokens.inc(generated)

    def _advance(self, r: _Row, token: int, logits: np.ndarray | None, now: float) -> Delta:
        if r.generated == 0:
            self._ttft.observe(now - r.submitted)
        else:
            self._itl.observe(now - r.last_token)
        r.last_token = now
        r.generated += 1
        delta = Delta()
        if r.params.logprobs is not None and logits is not None:
            delta.logprobs.append(self._logprob(token, logits, r.params.logprobs))
        if token in self.model.eos_token_ids or token in r.params.stop_token_ids:
            why = "eos_token" if token in self.model.eos_token_ids else "stop_token"
            delta.text, r.pending = r.pending, ""
            return self._finish(r, delta, "stop", why, now)
        delta.token_ids.append(token)
        r.pending += r.stream.decode(token)
        text, stopped = _cut_at_stop(r.pending, r.params.stop)
        if stopped:
            delta.text, r.pending = text, ""
            return self._finish(r, delta, "stop", "stop_sequence", now)
        hold = _held_back(text, r.params.stop)
        delta.text, r.pending = text[: len(text) - hold], text[len(text) - hold :]
        if r.generated >= r.params.max_tokens:
            delta.text, r.pending = delta.text + r.pending, ""
            return self._finish(r, delta, "length", "length", now)
        return delta

    def _finish(self, r: _Row, delta: Delta, finish: str, why: str, now: float) -> Delta:
        r.done = True
        delta.finish_reason, delta.stop_reason = finish, why
        delta.prompt_tokens, delta.completion_tokens = len(r.prompt), r.generated
        self._e2e.observe(now - r.submitted)
        self.metrics.lm_finished.labels(self.name, finish).inc()
        return delta

    def _logprob(self, token: int, logits: np.ndarray, top_n: int) -> TokenLogprob:
        shifted = logits - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        top: tuple[tuple[int, str, float], ...] = ()
        if top_n:
            best = np.argpartition(-logp, top_n - 1)[:top_n]
            best = best[np.argsort(-logp[best], kind="stable")]
            top = tuple((int(t), self.model.token_text(int(t)), float(logp[t])) for t in best)
        return TokenLogprob(token, self.model.token_text(token), float(logp[token]), top)

    def _publish_gauges(self) -> None:
        running = sum(1 for c in self._cohorts for r in c.rows if not r.done)
        # Each generator holds max_length KV positions per row (onnxruntime-genai shares one buffer for past
        # and present), so usage is the positions held over what max_num_seqs full contexts would need.
        held = sum(c.max_length * len(c.rows) for c in self._cohorts)
        gauges = (running, len(self._waiting), held)
        if gauges != self._gauges:  # set only on change: most iterations change nothing
            self._gauges = gauges
            self._running.set(running)
            self._waiting_gauge.set(len(self._waiting))
            self._kv_usage.set(held / (self.max_num_seqs * self.model.context_length))

    def _fail_all(self) -> None:
        posts: list[tuple[GenerationHandle, Delta]] = []
        error = GenerationFailed("onnxruntime-genai failed during a decode step; see the server log")
        for c in self._cohorts:
            for r in c.rows:
                if not r.done:
                    r.done = True
                    posts.append((r.handle, Delta(error=error)))
        self._cohorts = []
        if posts:
            posts[0][0].loop.call_soon_threadsafe(_deliver_all, posts)


def _merge(before: Delta | None, after: Delta) -> Delta:
    if before is None:
        return after
    before.text += after.text
    before.token_ids += after.token_ids
    before.logprobs += after.logprobs
    before.finish_reason, before.stop_reason = after.finish_reason, after.stop_reason
    before.prompt_tokens, before.completion_tokens = after.prompt_tokens, after.completion_tokens
    return before


def _deliver_all(posts: list[tuple[GenerationHandle, Delta]]) -> None:
    for handle, delta in posts:
        handle._deliver(delta)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (so are not sent yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold
