"""The HTTP side of edge-cloud collaboration, kept out of rest_openai.py's handlers: a request's token ids, its
hand-over to the `Collaborator` (collaborating.py) or the decode scheduler, the `usage.kiri` report, the whole
request forwarded to the cloud when the edge model cannot answer, and the echo completion (the verify call,
verifying.py)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kiri_runtime.adapters import BASE, split_model
from kiri_runtime.cloud_tier import CloudUnavailable
from kiri_runtime.collaborating import Collaborator
from kiri_runtime.collaborations import EDGE_ONLY, NOT_READY, OVERLOADED
from kiri_runtime.errors import InferenceError, ModelNotReady, Overloaded, UpstreamError
from kiri_runtime.generating import Delta, GenerationHandle, Scheduler
from kiri_runtime.generation_api import (
    ApiError,
    Job,
    chat_chunk,
    completion_chunk,
    now,
    resolve_max_tokens,
)
from kiri_runtime.generative_model import GenerativeModel, SamplingParams
from kiri_runtime.metrics import RuntimeMetrics
from kiri_runtime.verifying import PromptScorer, echo_response

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def prompt_ids(job: Job, model: GenerativeModel, prompt_text: str) -> list[int]:
    """The prompt's token ids: given (completions may send ids, as vLLM takes them) or encoded."""
    if job.prompt_ids is None:
        return model.encode(prompt_text)
    bad = next((t for t in job.prompt_ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise ApiError(f"token id {bad} is outside the vocabulary (0..{model.vocab_size - 1})", "prompt")
    return job.prompt_ids


def submit(
    collab: Collaborator,
    scheduler: Scheduler,
    job: Job,
    ids: list[int],
    params: SamplingParams,
    stream: bool,
    adapter: str | None = None,
) -> GenerationHandle:
    """The request to the collaborator (its mode needs the cloud) or to the scheduler (edge-only). An adapter
    (`model:adapter`) is served edge-only: the cloud tier has the base model, not the site's adapter; a bare
    model name in a collaborative mode runs on the edge's base model."""
    options = collab.options(job)
    if options.mode == EDGE_ONLY:
        handle = scheduler.submit(ids, params, stream, adapter)
        collab.counted(options)
        return handle
    if adapter is not None and adapter != BASE:
        raise ApiError(
            f"adapter {adapter} is served edge-only; collaboration {options.mode} runs the base model "
            "(ask for the bare model name, or kiri.collaboration edge-only)",
            "model",
        )
    if collab.overloaded(scheduler.max_num_seqs, scheduler.queue_limit, scheduler.in_flight):
        raise Overloaded(f"{collab.active} collaborative requests in flight; retry later")
    collab.counted(options)
    return collab.submit(scheduler.model, ids, params, options)


def usage_kiri(collab: Collaborator | None, handle: GenerationHandle, last: Delta) -> dict[str, Any] | None:
    report = getattr(handle, "kiri", None)
    if report is not None:
        return dict(report.as_dict())
    if collab is not None:
        return collab.edge_only_report(last).as_dict()
    return None


async def forward(
    collab: Collaborator | None, request: web.Request, data: dict[str, Any], chat: bool, exc: InferenceError
) -> web.StreamResponse | None:
    """The cloud's answer when the edge model is not ready or at its limit, or None (no cloud, other errors)."""
    if collab is None or collab.cloud is None or not isinstance(exc, ModelNotReady | Overloaded):
        return None
    reason = OVERLOADED if isinstance(exc, Overloaded) else NOT_READY
    stream = data.get("stream") is True
    body = {k: v for k, v in data.items() if k not in ("stream", "stream_options")}
    try:
        answer = await collab.forward("/v1/chat/completions" if chat else "/v1/completions", body, reason)
    except CloudUnavailable as failure:
        raise UpstreamError(
            f"the edge model is unavailable ({reason}) and the cloud failed: {failure}"
        ) from None
    if not stream:
        return web.json_response(answer)
    return await replay_stream(request, answer, chat)


async def echo(
    scorers: dict[str, PromptScorer], metrics: RuntimeMetrics, scheduler: Scheduler, job: Job, rid: str
) -> dict[str, Any]:
    """A completion with echo: the verify call of speculative collaboration (verifying.py)."""
    model: GenerativeModel = scheduler.model
    ids = prompt_ids(job, model, job.prompt or "")
    max_tokens = resolve_max_tokens(job, len(ids), model.context_length)
    name, adapter = split_model(job.model)
    scorer = scorers.get(name)
    if scorer is None:
        scorer = PromptScorer(model, name, metrics, scheduler.step_delay_s)
        scorers[name] = scorer
    loaded = scheduler.adapters.acquire(adapter)
    try:
        key = None if loaded is None else loaded.key
        scored = await scorer.score(ids, job.params(max_tokens), job.logprobs or 0, key)
    finally:
        if loaded is not None:
            scheduler.adapters.release(loaded)
    prompt_text = job.prompt if job.prompt_ids is None else str(model.tokenizer.decode(ids))
    return echo_response(
        rid, job.model, now(), prompt_text or "", scored, job.tokens_as_ids, job.logprobs is not None
    )


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def replay_stream(request: web.Request, answer: dict[str, Any], chat: bool) -> web.StreamResponse:
    """A whole answer (the cloud's, forwarded) written as the stream the client asked for."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    rid, model, created = str(answer.get("id", "")), str(answer.get("model", "")), now()
    choice = (answer.get("choices") or [{}])[0]
    finish = choice.get("finish_reason")
    if chat:
        text = str((choice.get("message") or {}).get("content") or "")
        events = [
            chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None),
            chat_chunk(rid, model, created, {"content": text}, None),
            chat_chunk(rid, model, created, {}, finish),
        ]
    else:
        events = [completion_chunk(rid, model, created, str(choice.get("text") or ""), finish)]
    kind = "chat.completion.chunk" if chat else "text_completion"
    usage = {"id": rid, "object": kind, "created": created, "model": model, "choices": []}
    events.append({**usage, "usage": answer.get("usage")})
    await response.write(b"".join(_sse(e) for e in events) + b"data: [DONE]\n\n")
    await response.write_eof()
    return response
