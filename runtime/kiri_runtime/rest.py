"""The HTTP adapter (aiohttp): OIP v2 REST routes and `/metrics` over the transport-free dataplane; the
language-model routes (OpenAI, KServe generate) live in `rest_openai` and are added to the same app.

Why aiohttp and not starlette+uvicorn is measured in bench/runtime/bench_http_stack.py and argued in
docs/architecture.md ("Runtime HTTP stack"). Errors are OIP error JSON `{"error": "..."}` with a 4xx
for anything the client can fix; nothing a client sends stops the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kiri_runtime.dataplane import DataPlane
from kiri_runtime.errors import BadRequest, InferenceError, ModelNotFound
from kiri_runtime.fallback import Cascade
from kiri_runtime.intake import BODY_READ_SECONDS, DEFAULT_MAX_BODY_BYTES, Intake, IntakeConfig
from kiri_runtime.metrics import UNKNOWN_MODEL
from kiri_runtime.rest_adapters import AdapterRoutes
from kiri_runtime.rest_openai import GenerationRoutes
from kiri_runtime.tensors import HEADER_LENGTH, binary_outputs, encode_response

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "RestServer", "error_response", "make_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(
        body=json.dumps({"error": message}).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except InferenceError as exc:
        return error_response(exc.status, exc.message)


class RestServer:
    def __init__(
        self,
        dataplane: DataPlane,
        cascade: Cascade | None = None,
        *,
        max_body_bytes: int = 0,
        intake: IntakeConfig | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.cascade = cascade if cascade is not None else Cascade(dataplane)
        self.metrics = dataplane.metrics
        if intake is None:
            body = max_body_bytes or DEFAULT_MAX_BODY_BYTES
            intake = IntakeConfig(body, max(body, IntakeConfig.max_inflight_body_bytes))
        self.max_body_bytes = intake.max_body_bytes
        self.intake = Intake(intake, self.metrics.inflight_body_bytes)
        self.generation = GenerationRoutes(dataplane, self.max_body_bytes)
        self.admin: AdapterRoutes | None = None  # LoRA adapters' admin routes (serving.Server sets them)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=self.max_body_bytes)
        get, post = web.get, web.post
        app.add_routes(
            [
                get("/v2/health/live", self.live),
                get("/v2/health/ready", self.ready),
                get("/v2", self.server_metadata),
                get("/v2/models/{name}", self.model_metadata),
                get("/v2/models/{name}/versions/{version}", self.model_metadata),
                get("/v2/models/{name}/ready", self.model_ready),
                get("/v2/models/{name}/versions/{version}/ready", self.model_ready),
                post("/v2/models/{name}/infer", self.infer),
                post("/v2/models/{name}/versions/{version}/infer", self.infer),
                get("/metrics", self.scrape),
            ]
        )
        self.generation.add_routes(app)
        if self.admin is not None:
            self.admin.add_routes(app)
        return app

    # Probes answer 503 when not ready so a kubelet httpGet probe reads them without parsing JSON.
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": self.dataplane.live()})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.dataplane.ready()
        if ready:
            return web.json_response({"ready": True})
        # The reason is for whoever reads the probe by hand (kubectl port-forward, curl): a kubelet httpGet
        # probe keeps only the status code.
        return web.json_response({"ready": False, "reason": self.dataplane.not_ready_reason()}, status=503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.dataplane.server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version")
        return web.json_response(self.dataplane.model_metadata(name, version))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version")
        ready = self.dataplane.model_ready(name, version)
        if ready:
            return web.json_response({"name": name, "ready": True})
        reason = self.dataplane.not_ready_reason()
        return web.json_response({"name": name, "ready": False, "reason": reason}, status=503)

    async def scrape(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def infer(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        name, version = request.match_info["name"], request.match_info.get("version")
        label = name if self.dataplane.has_model(name) else UNKNOWN_MODEL
        try:
            response = await self._infer(request, name, version)
        except InferenceError as exc:
            response = error_response(exc.status, exc.message, exc.retry_after)
        except Exception:
            log.exception("infer on %s failed", name)
            response = error_response(500, "internal error; see the server log")
        if not request.content.at_eof():
            response.force_close()  # refused unread: close rather than linger reading a body we will drop
        seconds = time.perf_counter() - start - request.get(BODY_READ_SECONDS, 0.0)
        self.metrics.observe_infer(label, response.status, seconds)
        return response

    async def _infer(self, request: web.Request, name: str, version: str | None) -> web.Response:
        if not self.dataplane.has_model(name):
            raise ModelNotFound(f"model {name!r} is not served here")
        header_length = _header_length(request.headers.get(HEADER_LENGTH))
        async with self.intake.body(request) as body:
            decoded = await self.intake.decode(body, header_length)
            answer = await self.cascade.infer(name, decoded, version)
            out, out_header_length = encode_response(answer, binary_outputs(decoded))
        if out_header_length is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(out_header_length)},
        )


def _header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {raw!r}") from None


def make_app(dataplane: DataPlane, cascade: Cascade | None = None, **kwargs: Any) -> web.Application:
    return RestServer(dataplane, cascade, **kwargs).app()
