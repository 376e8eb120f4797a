"""The cloud side of speculative collaboration: `/v1/completions` with `echo: true` and `logprobs: n` scores a whole
prompt (the edge's context plus its draft) in one forward pass and then generates `max_tokens` tokens.

The verify call (what an edge `kiri serve` in `speculative` mode sends; vLLM answers the same body):

    POST /v1/completions
    {"model": M, "prompt": [token ids: context + k draft tokens], "max_tokens": 1, "echo": true,
     "logprobs": n, "return_tokens_as_token_ids": true, "temperature": T, ...}

The answer's `choices[0].logprobs` lists every prompt token and then the generated one: `tokens` ("token_id:N"),
`token_logprobs` (None for the first prompt token: nothing predicts it) and `top_logprobs` (the n most likely next
tokens at each position, keyed "token_id:N", with the token actually there). Position j's top list is the
model's distribution given tokens < j, so the k draft positions and the one generated token come from one pass.
Log-probabilities are the model's own (temperature 1, before top-k/top-p), as vLLM's are.

The checked cascade's hand-off (collaborating.py, `--cascade-check`) is the same call with `max_tokens` = the
hand-off's cloud tokens (and the request's `stop` when above 1): the held edge tokens scored and the cloud's
continuation after them, one request, one prefill. The continuation is used only when every held token stands.

onnxruntime-genai 0.18, measured: `Generator.get_logits()` after `append_tokens` of many tokens returns only the
last position ([1, 1, vocab]); `get_output("logits")` returns every appended position ([1, n, vocab]). The
prompt's logits so come from the prefill itself: no second pass. Prefill logits agree with token-by-token
decoding to 3e-6 on the tiny LLaMA (different kernel shapes), so a greedy verify and a greedy decode pick the same
token except at an exact near-tie.

The scorer runs on its own thread (one request at a time), apart from the decode scheduler: a verify is one
prefill, and it must not wait behind a cohort's decode steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiri_runtime.generating import TokenLogprob, _cut_at_stop
from kiri_runtime.generative_model import GenerativeModel, SamplingParams
from kiri_runtime.metrics import RuntimeMetrics

TOKEN_ID_PREFIX = "token_id:"


@dataclass
class Scored:
    """A prompt scored and continued: log-probabilities per prompt position (None for the first) and generated."""

    prompt_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None]
    first_text: str = ""  # the first prompt token's text (it has no log-probability)
    completion: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


class PromptScorer:
    """Echo requests over one model, one at a time on a thread of their own."""

    def __init__(self, model: GenerativeModel, name: str, metrics: RuntimeMetrics, step_delay_s: float = 0.0):
        self.model = model
        self.step_delay_s = step_delay_s  # test aid (`--delay-ms`): per forward pass, as for decode steps
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiri-score")
        self._prompt_tokens = metrics.lm_prompt_tokens.labels(name)
        self._generation_tokens = metrics.lm_generation_tokens.labels(name)

    async def score(
        self, ids: list[int], params: SamplingParams, top_n: int, adapter: str | None = None
    ) -> Scored:
        """`adapter`: the onnxruntime-genai key of a LoRA adapter the caller holds (adapters.py) for the call."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._score, ids, params, top_n, adapter)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _entry(self, token: int, logp: np.ndarray, top_n: int) -> TokenLogprob:
        text = self.model.token_text
        top: tuple[tuple[int, str, float], ...] = ()
        if top_n:
            best = np.argpartition(-logp, top_n - 1)[:top_n]
            best = best[np.argsort(-logp[best], kind="stable")]
            top = tuple((int(t), text(int(t)), float(logp[t])) for t in best)
        return TokenLogprob(token, text(token), float(logp[token]), top)

    def _score(self, ids: list[int], params: SamplingParams, top_n: int, adapter: str | None) -> Scored:
        model = self.model
        max_length = min(model.context_length, len(ids) + params.max_tokens)
        generator = model.generator([ids], params, max_length, adapter)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        logp = log_softmax(np.asarray(generator.get_output("logits"), dtype=np.float32)[0])
        self._prompt_tokens.inc(len(ids))
        entries = [self._entry(ids[j], logp[j - 1], top_n) for j in range(1, len(ids))]
        scored = Scored(ids, [None, *entries], model.token_text(ids[0]))
        last = logp[-1]
        stream = model.tokenizer.create_stream()
        text = ""
        while len(scored.completion) < params.max_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            scored.completion.append(self._entry(token, last, top_n))
            self._generation_tokens.inc()
            if token in model.eos_token_ids or token in params.stop_token_ids:
                scored.finish_reason = "stop"
                break
            text += stream.decode(token)
            text, stopped = _cut_at_stop(text, params.stop)
            if stopped:
                scored.finish_reason = "stop"
                break
            if len(scored.completion) < params.max_tokens:
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                last = log_softmax(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
        scored.text = text
        return scored


def spell(token_id: int, text: str, as_ids: bool) -> str:
    return f"{TOKEN_ID_PREFIX}{token_id}" if as_ids else text


def spell_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """A completion's logprobs with tokens spelled "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    offsets, at = [], 0
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.text)
    return {
        "tokens": [spell(lp.token_id, lp.text, True) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{spell(t, s, True): p for t, s, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def echo_response(
    rid: str, model_name: str, created: int, prompt_text: str, scored: Scored, as_ids: bool, logprobs: bool
) -> dict[str, Any]:
    """OpenAI's legacy completion with echo: the prompt, then the completion, in `text` and in `logprobs`."""
    body_logprobs = None
    if logprobs:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        at = 0
        entries: list[tuple[int, TokenLogprob | None]] = [
            (t, e) for t, e in zip(scored.prompt_ids, scored.prompt_logprobs, strict=True)
        ]
        entries += [(e.token_id, e) for e in scored.completion]
        for token_id, entry in entries:
            text = entry.text if entry is not None else scored.first_text
            tokens.append(spell(token_id, text, as_ids))
            offsets.append(at)
            at += len(text)
            if entry is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(entry.logprob)
            top = {spell(t, s, as_ids): p for t, s, p in entry.top}
            top.setdefault(spell(entry.token_id, entry.text, as_ids), entry.logprob)
            tops.append(top)
        body_logprobs = {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
    completion = len(scored.completion)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "text": prompt_text + scored.text,
                "logprobs": body_logprobs,
                "finish_reason": scored.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": len(scored.prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(scored.prompt_ids) + completion,
        },
    }
