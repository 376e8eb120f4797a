"""The transport-free core of language-model serving: the onnxruntime-genai model, its tokenizer, and the decode
scheduler that many concurrent requests share.

`GenerativeModel` wraps an onnxruntime-genai model directory (genai_config.json, model.onnx, tokenizer files):
prompt rendering (the tokenizer's chat template, or `FALLBACK_TEMPLATE` when it has none), tokenization and the
context length. `Scheduler` owns one decode thread; `submit` returns a `GenerationHandle` that the HTTP adapter
reads `Delta`s from and can `cancel` (client gone: its admission slot is freed at once, its row is dropped at
the next step).

Scheduling (measured in bench/runtime/bench_generate.py, argued in docs/architecture.md): onnxruntime-genai 0.18
batches a `Generator` only when all its prompts are appended at once (left-padded), and then samples every row
with the same search options; a row cannot join later. So requests are grouped into *cohorts*: those waiting
when a decode step begins and sharing their sampling options become one batched generator, and the decode
thread steps every live cohort once per iteration (iteration-level scheduling across generators). A request
that arrives mid-generation starts at the next iteration instead of waiting for the others to finish. A request
with a `seed` decodes alone, so its tokens do not depend on who else is being served.

Sampling is onnxruntime-genai's own (greedy argmax, or temperature / top-k / top-p with its seeded RNG), so a
greedy answer is token for token what a plain onnxruntime-genai greedy loop gives. Stop tokens, stop strings,
max_tokens and log-probabilities (from the logits the token was drawn from) are handled here per row.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiri_runtime.dataplane import TensorSpec
from kiri_runtime.errors import BadRequest, InferenceError, Overloaded
from kiri_runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
PLATFORM = "onnxruntime_genai"
# Used when the tokenizer ships no chat template: one "role: content" line per message, then "assistant:".
FALLBACK_TEMPLATE = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"
MAX_TOP_LOGPROBS = 20


def is_generative_dir(path: Path) -> bool:
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options, already validated (`openai_api` checks ranges and says which is wrong)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; n: the chosen token's log-probability and the n most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def cohort_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys may share one batched generator; None: decode alone (seeded)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k)


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


class GenerativeModel:
    """An onnxruntime-genai model directory, loaded: model, tokenizer, chat template, context length."""

    platform = PLATFORM
    generative = True
    # What /v2/models/{name} reports: KServe's generate shape (text in, text out), not a tensor signature.
    inputs = [TensorSpec("text_input", "BYTES", (1,))]
    outputs = [TensorSpec("text_output", "BYTES", (1,))]

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        self.dir = model_dir
        cfg = og.Config(str(model_dir))
        if threads:
            session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.og = og
        self.model = og.Model(cfg)
        self.tokenizer = og.Tokenizer(self.model)
        genai = json.loads((model_dir / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]
        self.context_length = int(genai["context_length"])
        self.vocab_size = int(genai["vocab_size"])
        self.eos_token_ids = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        pad = genai.get("pad_token_id")
        self.pad_token_id: int | None = (
            int(pad[0] if isinstance(pad, list) else pad) if pad is not None else None
        )
        self.has_chat_template = _has_chat_template(model_dir)
        self._vocab_text: dict[int, str] = {}

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if not self.has_chat_template:
            lines = [FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages]
            return "".join(lines) + FALLBACK_GENERATION_PROMPT
        try:
            return str(
                self.tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
            )
        except RuntimeError as e:
            raise BadRequest(
                f"the model's chat template cannot render these messages: {_first_line(e)}"
            ) from None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def token_text(self, token_id: int) -> str:
        text = self._vocab_text.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode(np.array([token_id], dtype=np.int32)))
            self._vocab_text[token_id] = text
        return text

    def generator(self, prompts: Sequence[Sequence[int]], params: SamplingParams, max_length: int) -> Any:
        """A generator over `prompts` (left-padded to one length when there are several), prefilled."""
        og = self.og
        gp = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": max_length, "do_sample": not params.greedy}
        if len(prompts) > 1:
            options["batch_size"] = len(prompts)
        if not params.greedy:
            options["temperature"] = params.temperature
            options["top_p"] = params.top_p
            options["top_k"] = params.top_k or self.vocab_size
            if params.seed is not None:
                options["random_seed"] = params.seed
        gp.set_search_options(**options)
        generator = og.Generator(self.model, gp)
        if len(prompts) == 1:
            generator.append_tokens(np.asarray(prompts[0], dtype=np.int32))
        else:
            assert self.pad_token_id is not None
            width = max(len(p) for p in prompts)
            batch = np.full((len(prompts), width), self.pad_token_id, dtype=np.int32)
            for row, prompt in enumerate(prompts):
                batch[row, width - len(prompt) :] = prompt
            generator.append_tokens(batch)
        return generator

    def predict(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise BadRequest("a language model answers /generate and /v1/chat/completions, not tensor requests")


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


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
    ) -> None:
        self.model = model
        self.name = name
        self.metrics = metrics
        self.max_num_seqs = max(1, max_num_seqs)
        self.queue_limit = queue_limit
        self.batching = batching and model.pad_token_id is not None
        self.in_flight = 0  # admitted and not yet finished or cancelled (event-loop side)
        self._waiting: collections.deque[_Row] = collections.deque()
        self._cohorts: list[_Cohort] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kiri-decode", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ event-loop side

    def submit(self, prompt: list[int], params: SamplingParams) -> GenerationHandle:
        """Admit a request (Overloaded past the queue limit); raises before any work is queued."""
        if self.queue_limit and self.in_flight >= self.queue_limit:
            raise Overloaded(f"{self.in_flight} requests in flight (limit {self.queue_limit}); retry later")
        self.in_flight += 1
        handle = GenerationHandle(asyncio.get_running_loop(), len(prompt), self._release)
        row = _Row(handle, prompt, params, time.perf_counter())
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
        for cohort in self._cohorts:
            self._step(cohort, posts)
        self._cohorts = [c for c in self._cohorts if c.live]
        self._publish_gauges()
        if posts:
            loop = posts[0][0].loop
            loop.call_soon_threadsafe(_deliver_all, posts)

    def _group(self, arrivals: list[_Row]) -> list[list[_Row]]:
        """Arrivals with equal cohort keys batched together, as long as padded prompt + max_tokens fits."""
        if not self.batching:
            return [[r] for r in arrivals]
        groups: list[list[_Row]] = []
        open_by_key: dict[tuple[Any, ...], list[_Row]] = {}
        ctx = self.model.context_length
        for row in arrivals:
            key = row.params.cohort_key()
            group = open_by_key.get(key) if key is not None else None
            if group is not None:
                width = max(len(row.prompt), *(len(r.prompt) for r in group))
                longest = max(row.params.max_tokens, *(r.params.max_tokens for r in group))
                if width + longest <= ctx:
                    group.append(row)
                    continue
            group = [row]
            groups.append(group)
            if key is not None:
                open_by_key[key] = group
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
            error = GenerationFailed(f"onnxruntime-genai failed to start generation: {_first_line(e)}")
            for r in live:
                r.done = True
                posts.append((r.handle, Delta(error=error)))
            return
        for r in live:
            r.started = now
            r.stream = self.model.tokenizer.create_stream()
            self.metrics.lm_queue_time.labels(self.name).observe(now - r.submitted)
            self.metrics.lm_prompt_tokens.labels(self.name).inc(len(r.prompt))
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
        for i, r in enumerate(cohort.rows):
            if r.done:
                continue
            delta = self._advance(r, int(tokens[i]), None if logits is None else logits[i], now)
            if exhausted and delta.finish_reason is None:
                self._finish(r, delta, "length", "length", now)
            posts.append((r.handle, delta))

    def _advance(self, r: _Row, token: int, logits: np.ndarray | None, now: float) -> Delta:
        name = self.name
        if r.generated == 0:
            self.metrics.lm_ttft.labels(name).observe(now - r.submitted)
        else:
            self.metrics.lm_itl.labels(name).observe(now - r.last_token)
        r.last_token = now
        r.generated += 1
        self.metrics.lm_generation_tokens.labels(name).inc()
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
        self.metrics.lm_e2e.labels(self.name).observe(now - r.submitted)
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
        m, name = self.metrics, self.name
        m.lm_running.labels(name).set(sum(1 for c in self._cohorts for r in c.rows if not r.done))
        m.lm_waiting.labels(name).set(len(self._waiting))
        # Each generator holds max_length KV positions per row (onnxruntime-genai shares one buffer for past
        # and present), so usage is the positions held over what max_num_seqs full contexts would need.
        held = sum(c.max_length * len(c.rows) for c in self._cohorts)
        m.lm_kv_usage.labels(name).set(held / (self.max_num_seqs * self.model.context_length))

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
