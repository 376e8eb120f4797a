"""The HTTP adapter of language-model serving (aiohttp): OpenAI's `/v1/chat/completions`, `/v1/completions` and
`/v1/models`, and KServe's `/v2/models/{name}/generate` and `/generate_stream`.

Each handler reads the body, lets `generation_api` parse it, renders and tokenizes the prompt, checks it against
the context, submits it to the model's `Scheduler`, and writes what comes back: one JSON body, or Server-Sent
Events (`data: {...}` per decode step; OpenAI's streams end with `data: [DONE]`). A client that goes away is
noticed by the failed write (streams) or by polling the transport while waiting (plain requests), and its
request is cancelled at once.

Status codes: OpenAI routes answer 400 (bad input), 404 (unknown model), 413, 429 (queue full, with
Retry-After), 503 (not loaded yet), 500; their body is `{"error": {"message", "type", "param", "code"}}`. KServe
routes follow its generate extension: 422 for bad input, 429, 424 when generation fails, `{"error": message}`.
Every answer counts in `kiri_requests_total{model, code}`; a client that left counts as 499, not as a 5xx.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from kiri_runtime.adapters import BASE, SEPARATOR, split_model
from kiri_runtime.collaborating import Collaborator
from kiri_runtime.dataplane import DataPlane
from kiri_runtime.errors import InferenceError, ModelNotFound, ModelNotReady, Overloaded, PayloadTooLarge
from kiri_runtime.generating import Delta, GenerationFailed, GenerationHandle, Scheduler
from kiri_runtime.generation_api import (
    ApiError,
    Job,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    error_body,
    generate_details,
    generate_response,
    generate_token,
    new_id,
    now,
    parse_body,
    parse_chat,
    parse_completion,
    parse_generate,
    resolve_max_tokens,
    usage_chunk,
)
from kiri_runtime.generative_model import GenerativeModel
from kiri_runtime.metrics import UNKNOWN_MODEL
from kiri_runtime.rest_collab import echo, forward, prompt_ids, submit, usage_kiri
from kiri_runtime.verifying import PromptScorer, spell_logprobs

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection": counted, never a 5xx
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerationRoutes:
    """The language-model routes over the dataplane's registry (readiness, metadata) and one scheduler per model."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int) -> None:
        self.dataplane = dataplane
        self.metrics = dataplane.metrics
        self.max_body_bytes = max_body_bytes
        self.schedulers: dict[str, Scheduler] = {}
        self.collaborator: Collaborator | None = None  # edge-cloud collaboration (collaborating.py)
        self.scorers: dict[str, PromptScorer] = {}  # echo requests: the verify call (verifying.py)

    def add_routes(self, app: web.Application) -> None:
        post = web.post
        app.add_routes(
            [
                web.get("/v1/models", self.models),
                post("/v1/chat/completions", self.chat),
                post("/v1/completions", self.completions),
                post("/v2/models/{name}/generate", self.generate),
                post("/v2/models/{name}/versions/{version}/generate", self.generate),
                post("/v2/models/{name}/generate_stream", self.generate_stream),
                post("/v2/models/{name}/versions/{version}/generate_stream", self.generate_stream),
            ]
        )

    def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()
        for scorer in self.scorers.values():
            scorer.close()

    # ------------------------------------------------------------ common

    def _scheduler(self, full_name: str) -> Scheduler:
        """The scheduler of `model` or `model:adapter` (the adapter checked to be loaded: 404 otherwise)."""
        name, adapter = split_model(full_name)
        if not self.dataplane.has_model(name):
            raise ApiError(f"model {full_name!r} is not served here", "model", "model_not_found", status=404)
        scheduler = self.schedulers.get(name)
        if scheduler is None:
            if not self.dataplane.model_ready(name):
                raise ModelNotReady(f"model {name!r} is not loaded yet")
            raise ApiError(f"model {name!r} is not a language model: use /v2/models/{name}/infer", "model")
        if self.dataplane.draining:
            raise ModelNotReady("the server is shutting down")
        if not self.dataplane.model_ready(name):  # loaded, its --adapter files still loading
            raise ModelNotReady(f"model {name!r} is not loaded yet")
        if adapter is not None and adapter != BASE and scheduler.adapters.get(adapter) is None:
            raise ApiError(
                f"model {full_name!r} is not served here: adapter {adapter!r} is not loaded (GET /v1/models)",
                "model",
                "model_not_found",
                status=404,
            )
        return scheduler

    async def _body(self, request: web.Request) -> dict[str, Any]:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"body of {length} bytes is over the {self.max_body_bytes}-byte limit")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"body is over the {self.max_body_bytes}-byte limit") from None
        return parse_body(raw)

    def _submit(self, job: Job, prompt_text: str, stream: bool) -> GenerationHandle:
        scheduler = self._scheduler(job.model)
        model: GenerativeModel = scheduler.model
        ids = prompt_ids(job, model, prompt_text)
        max_tokens = resolve_max_tokens(job, len(ids), model.context_length)
        adapter = split_model(job.model)[1]
        if self.collaborator is not None:
            return submit(self.collaborator, scheduler, job, ids, job.params(max_tokens), stream, adapter)
        return scheduler.submit(ids, job.params(max_tokens), stream, adapter)

    async def _answer(
        self,
        request: web.Request,
        handle: GenerationHandle,
        label: str,
        start: float,
        error: Callable[[InferenceError], web.Response],
    ) -> list[Delta] | web.Response:
        """A non-streamed request's deltas, or the response that ends it early (client gone, failed), counted."""
        deltas, status = await _collect(request, handle)
        if status == CLIENT_CLOSED:
            self._count(label, status, start)
            return web.Response(status=CLIENT_CLOSED)
        failure = deltas[-1].error
        if failure is not None:
            response = error(failure)
            self._count(label, response.status, start)
            return response
        return deltas

    def _count(self, label: str, status: int, start: float) -> None:
        # As for infer: a 4xx (499: the client went away) is the client's doing and never reaches the gates.
        self.metrics.observe_infer(label, status, time.perf_counter() - start)

    def _label(self, name: str | None) -> str:
        """The metrics label: the base model's name (an adapter's requests count as its model's)."""
        if name is None:
            return UNKNOWN_MODEL
        base = split_model(name)[0]
        return base if self.dataplane.has_model(base) else UNKNOWN_MODEL

    @staticmethod
    def _openai_error(exc: InferenceError) -> web.Response:
        status = 429 if isinstance(exc, Overloaded) else exc.status
        param = getattr(exc, "param", None)
        code = getattr(exc, "code", None)
        if isinstance(exc, ModelNotFound):
            param, code = "model", "model_not_found"
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
        return web.json_response(error_body(status, exc.message, param, code), status=status, headers=headers)

    @staticmethod
    def _kserve_error(exc: InferenceError) -> web.Response:
        if isinstance(exc, Overloaded):
            status = 429
        elif isinstance(exc, GenerationFailed):
            status = 424
        elif exc.status in (400, 413):
            status = 422
        else:
            status = exc.status
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
        return web.json_response({"error": exc.message}, status=status, headers=headers)

    # ------------------------------------------------------------ OpenAI

    async def models(self, request: web.Request) -> web.Response:
        """Each model, then each of its adapters as `model:adapter` with vLLM's `parent` (and `root`: its URI)."""
        data: list[dict[str, Any]] = []
        for name, scheduler in self.schedulers.items():
            length = scheduler.model.context_length
            base = {
                "id": name,
                "object": "model",
                "created": now(),
                "owned_by": "kiri",
                "max_model_len": length,
            }
            data.append({**base, "root": name, "parent": None})
            for a in scheduler.adapters.listing():
                data.append(
                    {
                        **base,
                        "id": f"{name}{SEPARATOR}{a.name}",
                        "created": int(a.loaded_at),
                        "root": a.uri or a.name,
                        "parent": name,
                        "kiri": {
                            "adapter": a.name,
                            "sha256": a.sha256,
                            "rank": a.rank,
                            "bytes": a.bytes,
                            "default": a.name == scheduler.adapters.default,
                        },
                    }
                )
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def _openai(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        start = time.perf_counter()
        name: str | None = None
        try:
            data = await self._body(request)
            name = data.get("model") if isinstance(data.get("model"), str) else None
            job = parse_chat(data) if chat else parse_completion(data)
            if self.collaborator is not None:
                self.collaborator.options(job)  # a bad `kiri` object is a 400 whatever the edge's state
            if job.echo:
                body = await echo(self.scorers, self.metrics, self._scheduler(job.model), job, new_id("cmpl"))
                self._count(self._label(name), 200, start)
                return web.json_response(body)
            scheduler = self._scheduler(job.model)
            if job.messages is not None:
                prompt = scheduler.model.render_chat(job.messages)
            else:
                prompt = job.prompt or ""
            handle = self._submit(job, prompt, job.stream)
        except InferenceError as exc:
            try:
                forwarded = await forward(self.collaborator, request, data, chat, exc) if name else None
            except InferenceError as failure:
                exc, forwarded = failure, None
            if forwarded is not None:
                self._count(self._label(name), 200, start)
                return forwarded
            response = self._openai_error(exc)
            self._count(self._label(name), response.status, start)
            return response
        label = self._label(name)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if job.stream:
            status, streamed = await self._openai_stream(request, handle, job, rid, chat)
            self._count(label, status, start)
            return streamed
        deltas = await self._answer(request, handle, label, start, self._openai_error)
        if isinstance(deltas, web.Response):
            return deltas
        last = deltas[-1]
        text = "".join(d.text for d in deltas)
        logprobs = [lp for d in deltas for lp in d.logprobs] if job.logprobs is not None else None
        build = chat_response if chat else completion_response
        body = build(rid, job.model, text, last, logprobs)
        if job.tokens_as_ids and logprobs is not None and not chat:
            body["choices"][0]["logprobs"] = spell_logprobs(logprobs)
        kiri = usage_kiri(self.collaborator, handle, last)
        if kiri is not None:
            body["usage"]["kiri"] = kiri
        self._count(label, 200, start)
        return web.json_response(body)

    async def _openai_stream(
        self, request: web.Request, handle: GenerationHandle, job: Job, rid: str, chat: bool
    ) -> tuple[int, web.StreamResponse]:
        response = web.StreamResponse(headers=SSE_HEADERS)
        created, model = now(), job.model
        kind = "chat.completion.chunk" if chat else "text_completion"
        offset = 0
        try:
            await response.prepare(request)
            if chat:
                await response.write(
                    _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
                )
            while True:
                deltas = await _drain(request, handle)
                if deltas is None:
                    return CLIENT_CLOSED, response
                events: list[bytes] = []
                last: Delta | None = None
                for d in deltas:
                    if d.error is not None:
                        status = 429 if isinstance(d.error, Overloaded) else d.error.status
                        events.append(_sse(error_body(status, d.error.message)))
                        events.append(b"data: [DONE]\n\n")
                        await response.write(b"".join(events))
                        return status, response
                    if not d.text and not d.logprobs and d.finish_reason is None:
                        continue
                    if chat:
                        lp = chat_logprobs(d.logprobs) if job.logprobs is not None else None
                        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                        events.append(_sse(chat_chunk(rid, model, created, delta, d.finish_reason, lp)))
                    else:
                        lp = completion_logprobs(d.logprobs, offset) if job.logprobs is not None else None
                        events.append(
                            _sse(completion_chunk(rid, model, created, d.text, d.finish_reason, lp))
                        )
                    offset += len(d.text)
                    if d.finish_reason is not None:
                        last = d
                if last is not None:
                    if job.include_usage:
                        chunk = usage_chunk(rid, model, created, kind, last)
                        kiri = usage_kiri(self.collaborator, handle, last)
                        if kiri is not None:
                            chunk["usage"]["kiri"] = kiri
                        events.append(_sse(chunk))
                    events.append(b"data: [DONE]\n\n")
                if events:
                    await response.write(b"".join(events))
                if last is not None:
                    await response.write_eof()
                    return 200, response
        except (ConnectionError, RuntimeError) as exc:  # the client went away mid-write
            log.debug("stream %s ended early: %s", rid, exc)
            handle.cancel()
            return CLIENT_CLOSED, response

    # ------------------------------------------------------------ KServe generate

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, stream=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, stream=True)

    async def _generate(self, request: web.Request, *, stream: bool) -> web.StreamResponse:
        start = time.perf_counter()
        name, version = request.match_info["name"], request.match_info.get("version")
        label = self._label(name)
        base = split_model(name)[0]
        try:
            if version is not None and self.dataplane.has_model(base):
                self.dataplane.model_metadata(base, version)  # ModelNotFound for a version not served
            data = await self._body(request)
            job, details = parse_generate(name, data)
            handle = self._submit(job, job.prompt or "", stream)
        except InferenceError as exc:
            response = self._kserve_error(exc)
            self._count(label, response.status, start)
            return response
        served_version = self.dataplane.model_metadata(base)["versions"][0]
        if stream:
            status, streamed = await self._kserve_stream(request, handle, name, served_version, details)
            self._count(label, status, start)
            return streamed
        deltas = await self._answer(request, handle, label, start, self._kserve_error)
        if isinstance(deltas, web.Response):
            return deltas
        last = deltas[-1]
        text = "".join(d.text for d in deltas)
        logprobs = [lp for d in deltas for lp in d.logprobs] if details else None
        body = generate_response(
            name, served_version, text, generate_details(last, logprobs) if details else None
        )
        self._count(label, 200, start)
        return web.json_response(body)

    async def _kserve_stream(
        self, request: web.Request, handle: GenerationHandle, name: str, version: str, details: bool
    ) -> tuple[int, web.StreamResponse]:
        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await response.prepare(request)
            while True:
                deltas = await _drain(request, handle)
                if deltas is None:
                    return CLIENT_CLOSED, response
                events: list[bytes] = []
                done = False
                for d in deltas:
                    if d.error is not None:
                        await response.write(b"".join(events) + _sse({"error": d.error.message}))
                        return 424, response
                    if not d.text and d.finish_reason is None and not (details and d.logprobs):
                        continue
                    body = generate_response(name, version, d.text, None)
                    if d.finish_reason is not None or details:
                        extra: dict[str, Any] = {}
                        if d.finish_reason is not None:
                            extra = generate_details(d, None)
                        if details and d.logprobs:
                            extra["token"] = generate_token(d.logprobs[-1])
                        body["details"] = extra
                    events.append(_sse(body))
                    done = done or d.finish_reason is not None
                if events:
                    await response.write(b"".join(events))
                if done:
                    await response.write_eof()
                    return 200, response
        except (ConnectionError, RuntimeError) as exc:
            log.debug("generate_stream on %s ended early: %s", name, exc)
            handle.cancel()
            return CLIENT_CLOSED, response


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _client_gone(request: web.Request) -> bool:
    """aiohttp keeps reading the socket while a handler runs: a closed connection drops the transport."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _drain(request: web.Request, handle: GenerationHandle) -> list[Delta] | None:
    """Every delta queued now (waiting for at least one), or None when the client went away (request cancelled).
    The connection is checked at most every DISCONNECT_POLL_S, whether tokens are flowing or not."""
    while True:
        first = await handle.next(DISCONNECT_POLL_S)
        clock = time.monotonic()
        if clock - handle.checked_at >= DISCONNECT_POLL_S:
            handle.checked_at = clock
            if _client_gone(request):
                handle.cancel()
                return None
        if first is not None:
            return [first, *handle.ready()]


async def _collect(request: web.Request, handle: GenerationHandle) -> tuple[list[Delta], int]:
    deltas: list[Delta] = []
    while True:
        batch = await _drain(request, handle)
        if batch is None:
            return deltas, CLIENT_CLOSED
        deltas.extend(batch)
        if deltas[-1].finish_reason is not None or deltas[-1].error is not None:
            return deltas, 200
