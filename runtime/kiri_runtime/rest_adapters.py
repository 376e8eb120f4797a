"""The admin routes of LoRA adapters, after vLLM's (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`):

    POST /v1/load_lora_adapter     {"lora_name", "lora_path", "sha256"?, "replace"? (or "load_inplace"), "default"?}
    POST /v1/unload_lora_adapter   {"lora_name"}
    POST /v1/default_lora_adapter  {"lora_name"}   (Kiri's: the adapter a bare model name gets; "base": none)

`lora_path` is a URI the artifact fetcher takes (file://, http(s)://, s3://, or a local path; a local one must lie
under an adapter directory, `ServeConfig.adapter_roots`): the file is
fetched into the node cache, checked against `sha256`, loaded, and pinned there as `<model>:<adapter>` (so a
rollback finds it on the node). `replace` swaps a loaded adapter without dropping the requests that use it
(adapters.py). The answers are JSON; errors are OpenAI's error body with 400 (bad request, bad artifact), 401
(no or wrong token), 403 (admin routes off), 404 (unknown adapter), 409 (loaded already, or the default).

Every admin route needs `Authorization: Bearer <token>`, the token being the content of `--admin-token-file`
(read at each request, so a rotated Secret is picked up) or `$KIRI_ADMIN_TOKEN`; without either, the routes are
off (403). The token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from kiri_runtime.adapters import BASE, SEPARATOR, LoadedAdapter, check_name
from kiri_runtime.errors import InferenceError
from kiri_runtime.generation_api import ApiError, error_body, parse_body

log = logging.getLogger(__name__)

TOKEN_ENV = "KIRI_ADMIN_TOKEN"
MAX_ADMIN_BODY = 64 * 1024


class Unauthorized(InferenceError):
    status = 401


class Forbidden(InferenceError):
    status = 403


@dataclass(frozen=True)
class AdminAuth:
    token_file: Path | None = None
    env: str = TOKEN_ENV

    def token(self) -> str | None:
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                log.error("admin token file %s unreadable: %s", self.token_file, e.strerror)
                return None
            return text or None
        return os.environ.get(self.env) or None

    def check(self, request: web.Request) -> None:
        expected = self.token()
        if expected is None:
            raise Forbidden(
                "admin routes are off: start kiri serve with --admin-token-file (or set $KIRI_ADMIN_TOKEN)"
            )
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("admin routes need Authorization: Bearer <admin token>")
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise Unauthorized("wrong admin token")


# (model, name, uri, sha256, replace, default) -> the adapter now loaded; Server.load_adapter
Loader = Callable[[str, str, str, str, bool, bool], Awaitable[LoadedAdapter]]
Unloader = Callable[[str, str], Awaitable[LoadedAdapter]]
Defaulter = Callable[[str, str], Awaitable[None]]


class AdapterRoutes:
    def __init__(
        self,
        auth: AdminAuth,
        model_name: str,
        load: Loader,
        unload: Unloader,
        set_default: Defaulter,
    ) -> None:
        self.auth = auth
        self.model_name = model_name
        self._load, self._unload, self._set_default = load, unload, set_default

    def add_routes(self, app: web.Application) -> None:
        app.add_routes(
            [
                web.post("/v1/load_lora_adapter", self.load),
                web.post("/v1/unload_lora_adapter", self.unload),
                web.post("/v1/default_lora_adapter", self.default),
            ]
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        self.auth.check(request)
        if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
            raise ApiError(f"body over {MAX_ADMIN_BODY} bytes")
        data = parse_body(await request.read())
        model = data.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(
                f"model {str(model)[:80]!r} is not served here", "model", "model_not_found", status=404
            )
        return data

    @staticmethod
    def _string(data: dict[str, Any], key: str, required: bool = True) -> str:
        value = data.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value:
            raise ApiError(f"{key} must be a non-empty string", key, "invalid_value")
        return value

    @staticmethod
    def _flag(data: dict[str, Any], key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(f"{key} must be true or false", key, "invalid_type")
        return value

    @staticmethod
    def _error(exc: InferenceError) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        param = getattr(exc, "param", None)
        code = getattr(exc, "code", None)
        return web.json_response(
            error_body(exc.status, exc.message, param, code), status=exc.status, headers=headers
        )

    def _describe(self, a: LoadedAdapter, total_s: float | None = None) -> dict[str, Any]:
        return {
            "lora_name": a.name,
            "model": f"{self.model_name}{SEPARATOR}{a.name}",
            "sha256": a.sha256,
            "uri": a.uri,
            "rank": a.rank,
            "bytes": a.bytes,
            # Fetch and verify, then read, check and load into onnxruntime-genai: the swap is in effect after
            # both; total_ms adds pinning the file in the node cache (fsynced) and the answer.
            "fetch_ms": round(1000 * a.fetch_seconds, 3),
            "load_ms": round(1000 * a.load_seconds, 3),
            **({} if total_s is None else {"total_ms": round(1000 * total_s, 3)}),  # + fetch, verify, pin
        }

    async def load(self, request: web.Request) -> web.Response:
        try:
            data = await self._body(request)
            name = check_name(self._string(data, "lora_name"))
            uri = self._string(data, "lora_path")
            sha = self._string(data, "sha256", required=False)
            # `load_inplace` is vLLM's spelling of replace.
            replace = self._flag(data, "replace") or self._flag(data, "load_inplace")
            start = time.perf_counter()
            loaded = await self._load(self.model_name, name, uri, sha, replace, self._flag(data, "default"))
            total = time.perf_counter() - start
        except InferenceError as exc:
            return self._error(exc)
        log.info("adapter %s loaded (sha256 %s, %.1f ms)", loaded.name, loaded.sha256[:12], 1000 * total)
        return web.json_response(self._describe(loaded, total))

    async def unload(self, request: web.Request) -> web.Response:
        try:
            data = await self._body(request)
            unloaded = await self._unload(self.model_name, self._string(data, "lora_name"))
        except InferenceError as exc:
            return self._error(exc)
        log.info("adapter %s unloaded", unloaded.name)
        return web.json_response(self._describe(unloaded))

    async def default(self, request: web.Request) -> web.Response:
        try:
            data = await self._body(request)
            name = self._string(data, "lora_name")
            await self._set_default(self.model_name, name)
        except InferenceError as exc:
            return self._error(exc)
        return web.json_response({"model": self.model_name, "default": None if name == BASE else name})
