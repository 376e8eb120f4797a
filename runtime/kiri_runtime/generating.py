"""The transport-free core of language-model serving: the decode scheduler that many concurrent requests share
over one `generative_model.GenerativeModel`.

`Scheduler` owns one decode thread; `submit` returns a `GenerationHandle` that the HTTP adapter
reads `Delta`s from and can `cancel` (client gone: its admission slot is freed at once, its row is dropped at
the next step).

Scheduling (measured in bench/runtime/bench_generate.py, argued in docs/architecture.md). `continuous` (the default
where the model allows it): every running request is a row of one `decoding.SlotDecoder`. Each iteration first
prefills the requests that arrived (batched, right-padded, into the next free rows; a request's first token
comes from that prefill), then decodes one token for every row in one forward pass, whatever their lengths; a
row that ends leaves between steps and its slot is reused. Sampling (greedy argmax, or temperature / top-k /
top-p from the request's own random generator, seeded by `seed`) is done here on the logits, so a seeded
answer does not depend on who else is being served. A request that uses a LoRA adapter (adapters.py; named in
the model, or the default adapter) is not a row: the adapter applies only inside onnxruntime-genai's `Generator`,
so it decodes in a cohort (below) that the same iterations step beside the rows. A LoRA-ready model's adapter
inputs have empty defaults, so its rows decode the base model exactly.

`cohort` and `none` decode with onnxruntime-genai's own `Generator` (a model `SlotDecoder` cannot run, or by
choice). onnxruntime-genai 0.18 batches a `Generator` only when all its prompts are appended at once, and then samples every row with the same
search options; a row cannot join later. Left-padding prompts of different lengths into one batch gave wrong
logits on the padded rows (off by up to 10 on the tiny LLaMA, CPU GroupQueryAttention), so only prompts of equal
length share a batch. Requests are grouped into *cohorts*: those waiting when a decode iteration begins with the
same prompt length and sampling options become one batched generator, and the decode thread steps every live
cohort once per iteration (iteration-level scheduling across generators). A request that arrives
mid-generation starts at the next iteration instead of waiting for the others to finish. A cohort is also one
LoRA adapter's requests: onnxruntime-genai activates an adapter per generator, for its whole life. A request
with a `seed` decodes alone, so its tokens do not depend on who else is being served.

Sampling is onnxruntime-genai's own (greedy argmax, or temperature / top-k / top-p with its seeded RNG), so a
greedy answer is token for token what a plain onnxruntime-genai greedy loop gives. Stop tokens, stop strings,
max_tokens and log-probabilities (from the logits the token was drawn from) are handled here per row.

Why one module: most of it is `Scheduler`, whose admission, cohort forming, decode loop and cancellation share
one lock and one thread's state; split across modules, that state would be reached from several places.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiri_runtime.adapters import AdapterSet, LoadedAdapter
from kiri_runtime.decoding import SlotDecoder, prefill_groups, sample
from kiri_runtime.errors import InferenceError, Overloaded
from kiri_runtime.generative_model import GenerativeModel, SamplingParams, first_line
from kiri_runtime.metrics import RuntimeMetrics, observe_many

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(slots=True)
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
        self.cancelled = False
        self.finished = False
        self.checked_at = time.monotonic()  # when the adapter last checked that the client is still there
        self._deltas: collections.deque[Delta] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
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
        self._deltas.append(delta)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, timeout: float | None = None) -> Delta | None:
        """The next delta, or None when `timeout` passed first. (A bare future and a timer handle, not
        `asyncio.wait_for` on a queue: that makes a task per call, paid per token when streaming.)"""
        if self._deltas:
            return self._deltas.popleft()
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self._deltas.popleft() if self._deltas else None

    def ready(self) -> list[Delta]:
        """Every delta already delivered and not yet read."""
        deltas = list(self._deltas)
        self._deltas.clear()
        return deltas


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# --------------------------------------------------------------------------------------------- scheduler


@dataclass(slots=True)
class _Row:
    handle: GenerationHandle
    prompt: list[int]
    params: SamplingParams
    submitted: float
    streaming: bool = True
    adapter: str | None = None  # the onnxruntime-genai key of the request's LoRA adapter (adapters.py)
    stream: Any = None  # the tokenizer's incremental detokenizer
    stop_ids: frozenset[int] = frozenset()  # the model's end-of-sequence tokens and the request's stop tokens
    pending: str = ""  # decoded text held back: it may be the start of a stop string
    generated: int = 0
    # When each token came; the inter-token latencies and the generation-token counter are brought up to date
    # from here at the end (and every METRICS_FLUSH_S while decoding), not per token.
    stamps: list[float] = field(default_factory=list)
    flushed: int = 0  # stamps already counted and observed
    # A non-streamed request's answer so far (it gets one Delta at the end).
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None  # set when done: "stop", "length" or "abort"
    done: bool = False
    # Continuous batching: positions the row may reach, its next input token, its sampler.
    capacity: int = 0
    next_token: int = 0
    rng: np.random.Generator | None = None


@dataclass(slots=True)
class _Cohort:
    generator: Any
    rows: list[_Row]
    max_length: int
    logits: bool  # some row wants log-probabilities
    live: int = 0  # rows not done


# A decode step gives the GIL back to a waiting event loop only when this interval is up (CPython's default is
# 5 ms): with the default, a request arriving, or a streamed token on its way out, waited milliseconds for a
# decode thread that was only doing its per-token bookkeeping. Lowered for the whole process, never raised.
SWITCH_INTERVAL_S = 0.0005
METRICS_FLUSH_S = 1.0
BATCHING_MODES = ("continuous", "cohort", "none")


class Scheduler:
    """One decode thread over `model`; `submit` is called on the event loop, everything else runs on the thread.

    Per token the thread does only what the answer needs (sample, detokenize, stop checks); metrics are
    recorded per request or per METRICS_FLUSH_S, gauges when the set of requests changes, and results cross
    to the event loop once per iteration (once per request for a non-streamed one), coalesced while the loop
    has not yet taken the last batch."""

    def __init__(
        self,
        model: GenerativeModel,
        name: str,
        metrics: RuntimeMetrics,
        *,
        max_num_seqs: int = 16,
        queue_limit: int = 0,
        batching: str = "continuous",
        step_delay_s: float = 0.0,
        adapters: AdapterSet | None = None,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching {batching!r}: one of {', '.join(BATCHING_MODES)}")
        self.model = model
        self.name = name
        self.adapters = adapters if adapters is not None else AdapterSet(model, model.lora_layout, name)
        self._collect_due = False  # a request ended: a retired adapter may be free to unload now
        self.metrics = metrics
        self.max_num_seqs = max(1, max_num_seqs)
        self.queue_limit = queue_limit
        self.decoder = model.decoder if batching == "continuous" else None
        if batching == "continuous" and self.decoder is None:
            log.warning(
                "model %s: continuous batching unavailable (%s); onnxruntime-genai cohorts instead",
                name,
                model.decoder_unsupported or "not loaded for it",
            )
            batching = "cohort"
        if self.decoder is None:
            _ = model.model  # onnxruntime-genai's model, loaded before the server is ready
        self.batching = batching
        self.step_delay_s = step_delay_s  # test aid (`--delay-ms`): slows every decode iteration
        # Children looked up once: `labels()` costs microseconds.
        m = metrics
        self._ttft, self._itl = m.lm_ttft.labels(name), m.lm_itl.labels(name)
        self._e2e, self._queue_time = m.lm_e2e.labels(name), m.lm_queue_time.labels(name)
        self._prompt_tokens, self._generation_tokens = (
            m.lm_prompt_tokens.labels(name),
            m.lm_generation_tokens.labels(name),
        )
        self._finished = {why: m.lm_finished.labels(name, why) for why in ("stop", "length", "abort")}
        self._running_gauge, self._waiting_gauge = m.lm_running.labels(name), m.lm_waiting.labels(name)
        self._kv_usage = m.lm_kv_usage.labels(name)
        self._eos = model.eos_token_ids
        self._gauges: tuple[int, int, int] | None = None
        self.in_flight = 0  # admitted and not yet finished or cancelled (event-loop side)
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cohorts: list[_Cohort] = []
        self._slots: list[_Row] = []  # continuous: row i of the decoder is self._slots[i]
        self._running = 0  # rows in a cohort and not done (decode thread)
        # KV positions held: each generator holds max_length per row (onnxruntime-genai shares one buffer for
        # past and present); usage is this over what max_num_seqs full contexts would need.
        self._held = 0
        self._flushed_at = time.perf_counter()
        self._wake = threading.Condition()
        self._stopping = False
        # Results on their way to an event loop: filled by the decode thread, emptied by the loop.
        self._outbox_lock = threading.Lock()
        self._outboxes: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, Delta]]] = {}
        self.adapters.on_retired_free = self._retired_free
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="kiri-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ event-loop side

    def submit(
        self, prompt: list[int], params: SamplingParams, stream: bool = True, adapter: str | None = None
    ) -> GenerationHandle:
        """Admit a request (Overloaded past the queue limit); raises before any work is queued. With `stream`
        False the request gets one merged `Delta` at the end instead of one per step. `adapter`: the LoRA adapter
        the model name chose (None: the default; AdapterNotFound if not loaded), held until the request ends."""
        if self.queue_limit and self.in_flight >= self.queue_limit:
            raise Overloaded(f"{self.in_flight} requests in flight (limit {self.queue_limit}); retry later")
        loaded = self.adapters.acquire(adapter)
        self.in_flight += 1
        handle = GenerationHandle(
            asyncio.get_running_loop(), len(prompt), functools.partial(self._release, loaded)
        )
        row = _Row(
            handle, prompt, params, time.perf_counter(), stream, None if loaded is None else loaded.key
        )
        with self._wake:
            self._waiting.append(row)
            self._wake.notify()
        return handle

    def _retired_free(self) -> None:
        """The last request on a retired adapter ended (event loop, or an echo's thread): wake the decode thread
        to unload it; an idle decode thread would otherwise wait for the next request to end."""
        with self._wake:
            self._collect_due = True
            self._wake.notify()

    def _release(self, adapter: LoadedAdapter | None) -> None:
        self.in_flight -= 1
        if adapter is not None:
            self.adapters.release(adapter)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: hand every result waiting for it to its request."""
        with self._outbox_lock:
            posts = self._outboxes.pop(loop, [])
        for handle, delta in posts:
            handle._deliver(delta)

    # ------------------------------------------------------------ decode thread

    def _run(self) -> None:
        while True:
            if self._collect_due:
                # Here, not in _iterate: the generators of the cohorts that ended are freed by now.
                self._collect_due = False
                self._collect()
            # While decoding with nobody waiting, no lock: a deque's truth is read atomically.
            if self._waiting or not (self._cohorts or self._slots) or self._stopping:
                with self._wake:
                    while not (
                        self._stopping or self._waiting or self._cohorts or self._slots or self._collect_due
                    ):
                        self._wake.wait()
                    if self._stopping:
                        return
                    arrivals = self._take_arrivals()
            else:
                arrivals = []
            try:
                self._iterate(arrivals)
            except Exception:  # never let the decode thread die: fail what was running, keep serving
                log.exception("decode step failed")
                self._fail_all()

    def _take_arrivals(self) -> list[_Row]:
        taken: list[_Row] = []
        while self._waiting and self._running + len(taken) < self.max_num_seqs:
            row = self._waiting.popleft()
            if row.handle.cancelled:
                continue
            taken.append(row)
        return taken

    def _iterate(self, arrivals: list[_Row]) -> None:
        posts: list[tuple[GenerationHandle, Delta]] = []
        ended: list[_Row] = []
        if self.decoder is None:
            self._iterate_cohorts(arrivals, posts, ended)
        else:
            # A LoRA adapter applies only inside onnxruntime-genai's Generator: a request that uses one (named in
            # the model, or the default adapter) decodes in a cohort beside the rows of the base-model requests.
            adapted = [r for r in arrivals if r.adapter is not None]
            self._iterate_rows(self.decoder, [r for r in arrivals if r.adapter is None], posts, ended)
            if adapted or self._cohorts:
                self._iterate_cohorts(adapted, posts, ended)
        # Metrics of the requests that ended, before their answers leave: a client that reads /metrics after
        # its answer finds it counted. Nothing at all in most iterations.
        for r in ended:
            self._account(r)
        if posts:
            self._post(posts)
        now = time.perf_counter()
        if now - self._flushed_at >= METRICS_FLUSH_S:
            self._flushed_at = now
            for r in [r for c in self._cohorts for r in c.rows] + self._slots:
                if not r.done:
                    self._flush(r)
        if arrivals or ended or self._gauges is None or len(self._waiting) != self._gauges[1]:
            self._publish_gauges()

    def _iterate_cohorts(
        self, arrivals: list[_Row], posts: list[tuple[GenerationHandle, Delta]], ended: list[_Row]
    ) -> None:
        if arrivals:
            for cohort_rows in self._group(arrivals):
                self._start(cohort_rows, posts)
        if self.step_delay_s and self._cohorts and not self._slots:  # with rows, _iterate_rows slept
            time.sleep(self.step_delay_s)
        for cohort in self._cohorts:
            self._step(cohort, posts, ended)
        if ended:
            self._held -= sum(c.max_length * len(c.rows) for c in self._cohorts if not c.live)
            self._cohorts = [c for c in self._cohorts if c.live]
            self._collect_due = self.adapters.has_retired

    # ------------------------------------------------------------ continuous batching

    def _iterate_rows(
        self,
        decoder: SlotDecoder,
        arrivals: list[_Row],
        posts: list[tuple[GenerationHandle, Delta]],
        ended: list[_Row],
    ) -> None:
        joining = [r for r in arrivals if not r.handle.cancelled]
        if joining:
            for group in prefill_groups([len(r.prompt) for r in joining]):
                self._join(decoder, [joining[i] for i in group], posts, ended)
        if self.step_delay_s and self._slots:
            time.sleep(self.step_delay_s)
        rows = self._slots
        if rows and not all(r.done for r in rows):
            logits = decoder.step([r.next_token for r in rows])
            greedy = logits.argmax(axis=1).tolist()
            now = time.perf_counter()
            for i, r in enumerate(rows):
                if r.done:
                    continue
                if r.handle.cancelled:  # the client went away: its row ends here
                    self._end_row(r, "abort", ended)
                    continue
                self._next(r, greedy[i], logits[i], now, posts, ended)
        if any(r.done for r in rows):
            for i in range(len(rows) - 1, -1, -1):
                if rows[i].done:
                    self._held -= rows[i].capacity
                    moved = decoder.release(i)
                    if moved is not None:
                        rows[i] = rows[moved]
                    rows.pop()

    def _join(
        self,
        decoder: SlotDecoder,
        rows: list[_Row],
        posts: list[tuple[GenerationHandle, Delta]],
        ended: list[_Row],
    ) -> None:
        """Prefill `rows` (one forward pass) into the decoder's next rows and take their first tokens."""
        for r in rows:
            r.capacity = min(self.model.context_length, len(r.prompt) + r.params.max_tokens)
        try:
            logits = decoder.prefill([r.prompt for r in rows], [r.capacity for r in rows])
        except Exception as e:  # ONNX Runtime raises its own types; fail these requests only
            error = GenerationFailed(f"onnxruntime failed to prefill: {first_line(e)}")
            for r in rows:
                r.done = True
                posts.append((r.handle, Delta(error=error)))
            return
        now = time.perf_counter()
        greedy = logits.argmax(axis=1).tolist()
        for i, r in enumerate(rows):
            r.stream = self.model.tokenizer.create_stream()
            r.stop_ids = self._eos.union(r.params.stop_token_ids)
            if not r.params.greedy:
                r.rng = np.random.default_rng(r.params.seed)
            self._queue_time.observe(now - r.submitted)
            self._slots.append(r)
            self._running += 1
            self._held += r.capacity
            self._next(r, greedy[i], logits[i], now, posts, ended)
        self._prompt_tokens.inc(sum(len(r.prompt) for r in rows))

    def _next(
        self,
        r: _Row,
        greedy: int,
        logits: np.ndarray,
        now: float,
        posts: list[tuple[GenerationHandle, Delta]],
        ended: list[_Row],
    ) -> None:
        """Row `r`'s token from `logits` (`greedy` is their argmax), through the per-row bookkeeping."""
        params = r.params
        token = greedy
        if r.rng is not None:
            token = sample(logits, params.temperature, params.top_p, params.top_k, r.rng)
        exhausted = len(r.prompt) + r.generated + 1 >= r.capacity
        delta = self._advance(r, token, logits if params.logprobs is not None else None, now, exhausted)
        r.next_token = token
        if r.done:
            self._end_row(r, r.finish or "length", ended)
        if delta is not None:
            posts.append((r.handle, delta))

    def _end_row(self, r: _Row, finish: str, ended: list[_Row]) -> None:
        r.done, r.finish = True, finish
        self._running -= 1
        ended.append(r)

    def _post(self, posts: list[tuple[GenerationHandle, Delta]]) -> None:
        """Queue results for their event loop; wake it only if it has not been woken for earlier ones yet."""
        wake: list[asyncio.AbstractEventLoop] = []
        with self._outbox_lock:
            for handle, delta in posts:
                box = self._outboxes.get(handle.loop)
                if box is None:
                    box = self._outboxes[handle.loop] = []
                    wake.append(handle.loop)
                box.append((handle, delta))
        for loop in wake:
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # the loop is closed (server stopped): nobody to answer
                with self._outbox_lock:
                    self._outboxes.pop(loop, None)

    def _group(self, arrivals: list[_Row]) -> list[list[_Row]]:
        """Arrivals with equal prompt lengths and sampling options batched together (no padding: see above)."""
        if self.batching == "none":
            return [[r] for r in arrivals]
        groups: list[list[_Row]] = []
        by_key: dict[tuple[Any, ...], list[_Row]] = {}
        for row in arrivals:
            key = row.params.cohort_key()
            if key is None:
                groups.append([row])
                continue
            group = by_key.setdefault((*key, len(row.prompt), row.adapter), [])
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
            generator = self.model.generator(
                [r.prompt for r in live], live[0].params, max_length, live[0].adapter
            )
        except RuntimeError as e:
            error = GenerationFailed(f"onnxruntime-genai failed to start generation: {first_line(e)}")
            for r in live:
                r.done = True
                posts.append((r.handle, Delta(error=error)))
            return
        for r in live:
            r.stream = self.model.tokenizer.create_stream()
            r.stop_ids = self._eos.union(r.params.stop_token_ids)
            self._queue_time.observe(now - r.submitted)
        self._prompt_tokens.inc(sum(len(r.prompt) for r in live))
        wants_logits = any(r.params.logprobs is not None for r in live)
        self._cohorts.append(_Cohort(generator, live, max_length, wants_logits, len(live)))
        self._running += len(live)
        self._held += max_length * len(live)

    def _step(self, cohort: _Cohort, posts: list[tuple[GenerationHandle, Delta]], ended: list[_Row]) -> None:
        rows = cohort.rows
        g = cohort.generator
        logits = None
        if cohort.logits:
            logits = np.asarray(g.get_logits(), dtype=np.float32).reshape(len(rows), -1)
        g.generate_next_token()
        tokens = g.get_next_tokens().tolist()
        now = time.perf_counter()
        exhausted = g.is_done()
        for i, r in enumerate(rows):
            if r.done:
                continue
            if r.handle.cancelled:  # the client went away: its token is dropped, its row ends here
                self._end(cohort, r, "abort", ended)
                continue
            delta = self._advance(r, tokens[i], None if logits is None else logits[i], now, exhausted)
            if r.done:
                self._end(cohort, r, r.finish or "length", ended)
            if delta is not None:
                posts.append((r.handle, delta))

    def _end(self, cohort: _Cohort, r: _Row, finish: str, ended: list[_Row]) -> None:
        r.done, r.finish = True, finish
        cohort.live -= 1
        self._running -= 1
        ended.append(r)

    def _advance(
        self, r: _Row, token: int, logits: np.ndarray | None, now: float, exhausted: bool
    ) -> Delta | None:
        """One token for one row: its Delta (streamed, or the merged answer when it ends), or None."""
        r.stamps.append(now)
        if not r.generated:
            self._ttft.observe(now - r.submitted)
        r.generated += 1
        params = r.params
        lp = None
        if logits is not None and params.logprobs is not None:
            lp = self._logprob(token, logits, params.logprobs)
        if token in r.stop_ids:
            text, r.pending = r.pending, ""
            return self._final(r, text, None, lp, "stop", "eos_token" if token in self._eos else "stop_token")
        text = r.stream.decode(token)
        if params.stop:
            text, stopped = _cut_at_stop(r.pending + text, params.stop)
            if stopped:
                r.pending = ""
                return self._final(r, text, token, lp, "stop", "stop_sequence")
            hold = _held_back(text, params.stop)
            text, r.pending = text[: len(text) - hold], text[len(text) - hold :]
        if r.generated >= params.max_tokens or exhausted:
            text, r.pending = text + r.pending, ""
            return self._final(r, text, token, lp, "length", "length")
        if r.streaming:
            return Delta(text, [token], [lp] if lp is not None else [])
        r.texts.append(text)
        r.token_ids.append(token)
        if lp is not None:
            r.logprobs.append(lp)
        return None

    def _final(
        self, r: _Row, text: str, token: int | None, lp: TokenLogprob | None, finish: str, why: str
    ) -> Delta:
        r.done, r.finish = True, finish
        if r.streaming:
            delta = Delta(text, [] if token is None else [token], [] if lp is None else [lp])
        else:
            r.texts.append(text)
            if token is not None:
                r.token_ids.append(token)
            if lp is not None:
                r.logprobs.append(lp)
            delta = Delta("".join(r.texts), r.token_ids, r.logprobs)
        delta.finish_reason, delta.stop_reason = finish, why
        delta.prompt_tokens, delta.completion_tokens = len(r.prompt), r.generated
        return delta

    def _account(self, r: _Row) -> None:
        """A request's metrics once it has ended."""
        self._flush(r)
        if r.finish != "abort" and r.stamps:
            self._e2e.observe(r.stamps[-1] - r.submitted)
        self._finished[r.finish or "abort"].inc()

    def _flush(self, r: _Row) -> None:
        """Generation tokens and inter-token latencies recorded since the last flush, into the metrics."""
        stamps, start = r.stamps, r.flushed
        if start == len(stamps):
            return
        self._generation_tokens.inc(len(stamps) - start)
        observe_many(self._itl, [stamps[k] - stamps[k - 1] for k in range(max(start, 1), len(stamps))])
        r.flushed = len(stamps)

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
        gauges = (self._running, len(self._waiting), self._held)
        if gauges == self._gauges:
            return  # most iterations change nothing
        self._gauges = gauges
        self._running_gauge.set(gauges[0])
        self._waiting_gauge.set(gauges[1])
        self._kv_usage.set(gauges[2] / (self.max_num_seqs * self.model.context_length))

    def _collect(self) -> None:
        try:
            self.adapters.collect()
        except Exception:  # never let the decode thread die over housekeeping
            log.exception("unloading a retired adapter failed")

    def _fail_all(self) -> None:
        posts: list[tuple[GenerationHandle, Delta]] = []
        error = GenerationFailed("onnxruntime-genai failed during a decode step; see the server log")
        for c in self._cohorts:
            for r in c.rows:
                if not r.done:
                    r.done = True
                    posts.append((r.handle, Delta(error=error)))
        for r in self._slots:
            if not r.done:
                r.done = True
                posts.append((r.handle, Delta(error=error)))
        self._cohorts, self._slots = [], []
        if self.decoder is not None:
            self.decoder.clear()
        self._running = self._held = 0
        self._collect_due = self.adapters.has_retired
        self._publish_gauges()
        if posts:
            self._post(posts)


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
