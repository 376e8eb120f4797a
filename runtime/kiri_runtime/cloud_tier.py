"""The cloud tier of collaborative generation as an OpenAI completions client on token ids (a Kiri cloud or vLLM):
the verify call (verifying.py documents it) and plain continuations."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from kiri_runtime.collaborations import Verdict
from kiri_runtime.generative_model import SamplingParams
from kiri_runtime.verifying import TOKEN_ID_PREFIX


class CloudUnavailable(Exception):
    """The cloud did not answer usefully (connection, timeout, non-200, a body we cannot read)."""


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

    async def verify(
        self, ids: Sequence[int], k: int, params: SamplingParams, top_n: int, max_tokens: int = 1
    ) -> Verdict:
        """The last `k` of `ids` scored (the cloud's top lists at their positions) and up to `max_tokens` of the
        cloud's own after them, in one request (the cascade's checked hand-off asks for its continuation)."""
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": max_tokens,
            "echo": True,
            "logprobs": top_n,
            "return_tokens_as_token_ids": True,
            **_sampling_body(params),
        }
        if max_tokens > 1 and params.stop:
            body["stop"] = list(params.stop)
        start = time.perf_counter()
        data = await self._post("/v1/completions", body)
        try:
            choice = data["choices"][0]
            lps = choice["logprobs"]
            tokens = [_token_id(t) for t in lps["tokens"]]
            tops = lps["top_logprobs"]
            n = len(ids)
            if not n < len(tokens) <= n + max_tokens or tokens[:n] != list(ids):
                raise ValueError(f"{len(tokens)} tokens for a prompt of {n} plus 1 to {max_tokens}")
            first = n - k
            top = [{_token_id(t): float(p) for t, p in tops[first + i].items()} for i in range(k)]
            draft_lps = [float(lps["token_logprobs"][first + i]) for i in range(k)]
            finished = choice.get("finish_reason") == "stop"
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise CloudUnavailable(f"cloud's verify answer is unreadable: {exc}"[:200]) from None
        seconds = time.perf_counter() - start
        return Verdict(top, draft_lps, tokens[n], seconds, tokens[n:], finished)

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
