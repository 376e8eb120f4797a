"""The request and response vocabulary of language-model serving: OpenAI's chat and text completions, and KServe's
open-inference generate extension. Pure functions over dicts, no HTTP and no model.

Parsing checks every field it reads and raises `ApiError` naming the parameter (`param`) and what is wrong, so
the adapter answers 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}` (KServe's
generate routes answer `{"error": message}` with 422 instead). Fields are read the way the OpenAI API reads them
(e.g. `max_completion_tokens` before `max_tokens`, `stop` as a string or a list); vLLM's extensions `top_k` and
`stop_token_ids` are accepted too, and for completions a prompt of token ids, `echo` with `logprobs` (the prompt's
log-probabilities: the verify call of speculative collaboration, see verifying.py) and vLLM's
`return_tokens_as_token_ids`. Kiri's own extension is the `kiri` object (collaborations.parse_options checks it). What Kiri does
not implement (n > 1, tools, penalties, best_of, suffix) is refused with 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiri_runtime.errors import InferenceError
from kiri_runtime.generating import Delta, TokenLogprob
from kiri_runtime.generative_model import MAX_TOP_LOGPROBS, SamplingParams

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
COMPLETIONS_MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions


class ApiError(InferenceError):
    """A client error with OpenAI's error fields."""

    status = 400

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        if status is not None:
            self.status = status


_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------- parsing


@dataclass
class Job:
    """A parsed request: what to render into a prompt, and how to decode it."""

    model: str
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # completions and generate
    max_tokens: int | None = None  # None: whatever the context leaves
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields but max_tokens
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    prompt_ids: list[int] | None = None  # completions: a prompt given as token ids
    echo: bool = False  # completions: the prompt (and its log-probabilities) comes back before the completion
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens spelled "token_id:N"
    kiri: Any = None  # the `kiri` extension object, as sent (collaborating.py checks it)

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self.sampling)


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(f"the body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ApiError(f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object", code="invalid_json")
    return data


def _int(data: Mapping[str, Any], key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{key} must be an integer, got {json.dumps(value)[:40]}", key, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(f"{key} must be {bounds}, got {value}", key, "invalid_value")
    return value


def _float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(f"{key} must be a finite number, got {json.dumps(value)[:40]}", key, "invalid_type")
    return float(value)


def _bool(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{key} must be true or false", key, "invalid_type")
    return value


def _sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """temperature, top_p, top_k, seed, stop, stop_token_ids, checked against the ranges OpenAI and vLLM use."""
    out: dict[str, Any] = {}
    temperature = _float(data, "temperature")
    if temperature is not None:
        if not 0.0 <= temperature <= 2.0:
            raise ApiError(
                f"temperature must be between 0 and 2, got {temperature}", "temperature", "invalid_value"
            )
        out["temperature"] = temperature
    top_p = _float(data, "top_p")
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ApiError(f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
        out["top_p"] = top_p
    top_k = data.get("top_k")
    if top_k == -1:  # vLLM's spelling of "no top-k cut"
        top_k = 0
    checked_k = _int({"top_k": top_k}, "top_k", 0)
    if checked_k is not None:
        out["top_k"] = checked_k
    seed = _int(data, "seed")
    if seed is not None:
        out["seed"] = seed % (1 << 31)  # onnxruntime-genai's seed is a 32-bit int
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError("stop must be a non-empty string or a list of them", "stop", "invalid_type")
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop", "invalid_value")
        out["stop"] = tuple(stop)
    ids = data.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError("stop_token_ids must be a list of integers", "stop_token_ids", "invalid_type")
        out["stop_token_ids"] = tuple(ids)
    return out


def _unsupported(data: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = data.get(key)
        if value not in (None, False, 0, [], {}):
            raise ApiError(f"{key} is not supported by this server", key, "unsupported_parameter")


def _stream(data: Mapping[str, Any], job: Job) -> None:
    job.stream = _bool(data, "stream")
    options = data.get("stream_options")
    if options is not None:
        if not job.stream:
            raise ApiError(
                "stream_options is only allowed when stream is true", "stream_options", "invalid_value"
            )
        if not isinstance(options, dict):
            raise ApiError("stream_options must be an object", "stream_options", "invalid_type")
        job.include_usage = _bool(options, "include_usage")


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("model is required (a model name from GET /v1/models)", "model", "invalid_value")
    return model


def _max_tokens(data: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = _int(data, key, 1)
        if value is not None:
            return value
    return None


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f"messages[{index}].content: only text parts are supported", "messages", "invalid_content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(
        f"messages[{index}].content must be a string or a list of text parts", "messages", "invalid_type"
    )


def parse_chat(data: Mapping[str, Any]) -> Job:
    job = Job(model=_model(data))
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", "messages", "invalid_value")
    job.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object", "messages", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}",
                "messages",
                "invalid_value",
            )
        job.messages.append({"role": str(role), "content": _content(m, i)})
    _unsupported(data, "tools", "functions", "presence_penalty", "frequency_penalty", "logit_bias", "audio")
    n = _int(data, "n", 1, 1)
    del n
    job.max_tokens = _max_tokens(data, "max_completion_tokens", "max_tokens")
    job.sampling = _sampling(data)
    _stream(data, job)
    if _bool(data, "logprobs"):
        job.logprobs = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif data.get("top_logprobs") is not None:
        raise ApiError("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    job.kiri = data.get("kiri")
    return job


def parse_completion(data: Mapping[str, Any]) -> Job:
    job = Job(model=_model(data))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        job.prompt_ids = [int(t) for t in prompt]
        prompt = ""
    if not isinstance(prompt, str):
        raise ApiError(
            "prompt must be a string or a non-empty list of token ids (one prompt per request)",
            "prompt",
            "invalid_type",
        )
    job.prompt = prompt
    _unsupported(data, "suffix", "presence_penalty", "frequency_penalty", "logit_bias")
    _int(data, "n", 1, 1)
    _int(data, "best_of", 1, 1)
    job.max_tokens = _max_tokens(data, "max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
    job.sampling = _sampling(data)
    _stream(data, job)
    job.echo = _bool(data, "echo")
    job.tokens_as_ids = _bool(data, "return_tokens_as_token_ids")
    # An echo request is a verify call (verifying.py): it may ask for vLLM's limit of top log-probabilities.
    job.logprobs = _int(data, "logprobs", 0, MAX_TOP_LOGPROBS if job.echo else COMPLETIONS_MAX_LOGPROBS)
    if job.echo and job.stream:
        raise ApiError("echo is not supported with stream: true", "echo", "unsupported_parameter")
    job.kiri = data.get("kiri")
    return job


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_generate(model: str, data: Mapping[str, Any]) -> tuple[Job, bool]:
    """KServe's GenerateRequest: `text_input` and optional `parameters`; returns (job, details wanted)."""
    text = data.get("text_input")
    if not isinstance(text, str):
        raise ApiError("text_input must be a string", "text_input", "invalid_type")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError("parameters must be an object", "parameters", "invalid_type")
    job = Job(model=model, prompt=text)
    job.max_tokens = _max_tokens(params, "max_tokens", "max_new_tokens")
    job.sampling = _sampling(params)
    details = _bool(params, "details")
    job.logprobs = _int(params, "top_logprobs", 0, MAX_TOP_LOGPROBS) if details else None
    if details and job.logprobs is None:
        job.logprobs = 0
    return job, details


def resolve_max_tokens(job: Job, prompt_tokens: int, context_length: int) -> int:
    """The request's max_tokens checked against the context (400 before any work), or what the context leaves."""
    param = "messages" if job.messages is not None else "prompt"
    if prompt_tokens == 0:
        raise ApiError("the prompt is empty after tokenization", param, "empty_prompt")
    if prompt_tokens >= context_length:
        raise ApiError(
            f"this model's maximum context length is {context_length} tokens; the prompt has {prompt_tokens}",
            param,
            "context_length_exceeded",
        )
    room = context_length - prompt_tokens
    if job.max_tokens is None:
        return room
    if job.max_tokens > room:
        raise ApiError(
            f"this model's maximum context length is {context_length} tokens; the prompt has {prompt_tokens} "
            f"and max_tokens asks for {job.max_tokens} more",
            "max_tokens",
            "context_length_exceeded",
        )
    return job.max_tokens


# --------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.text,
        "logprob": lp.logprob,
        "bytes": list(lp.text.encode()),
        "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for _, t, p in lp.top],
    }


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_chat_logprob(lp) for lp in logprobs]}


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.text)
    return {
        "tokens": [lp.text for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t: p for _, t, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_response(
    rid: str, model: str, text: str, last: Delta, logprobs: list[TokenLogprob] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                "finish_reason": last.finish_reason,
            }
        ],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def completion_response(
    rid: str, model: str, text: str, last: Delta, logprobs: list[TokenLogprob] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": completion_logprobs(logprobs, 0) if logprobs is not None else None,
                "finish_reason": last.finish_reason,
            }
        ],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def completion_chunk(
    rid: str, model: str, created: int, text: str, finish: str | None, logprobs: Any = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, created: int, kind: str, last: Delta) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(last.prompt_tokens, last.completion_tokens),
    }


def generate_token(lp: TokenLogprob) -> dict[str, Any]:
    return {"id": lp.token_id, "text": lp.text, "logprob": lp.logprob, "special": False}


def generate_details(last: Delta, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
    """KServe's details: finish_reason is `length`, `eos_token` or `stop_sequence` (a stop token id counts as eos)."""
    reason = {"stop_token": "eos_token"}.get(last.stop_reason or "", last.stop_reason or "length")
    details: dict[str, Any] = {"finish_reason": reason}
    if logprobs is not None:
        details["logprobs"] = [generate_token(lp) for lp in logprobs]
    return details


def generate_response(model: str, version: str, text: str, details: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model, "model_version": version, "text_output": text}
    if details is not None:
        body["details"] = details
    return body
