"""The aggregator's HTTP face: thin aiohttp routes over `collecting.Aggregator`, and the process that serves it.

HTTP (every call but /healthz needs `Authorization: Bearer <the site's token>`):

* `GET /v1/round?site=S`: the open round (number, base model sha256, trained part, LoRA seed, DP parameters)
  and whether S may take part.
* `GET /v1/model?site=S`: the current global weights file, sha256 in `X-Kiri-Sha256`: safetensors (the first
  round's may be the user's own torch state dict).
* `POST /v1/rounds/{round}/sites/{site}/delta`: one update in the deltas.py format (safetensors). 202
  accepted; 400 malformed; 401 bad token; 403 site not expected or over its privacy budget; 409 wrong round,
  stale base, other DP parameters or a second upload; 410 round closed; 413 too large; 422 wrong names or
  shapes.

Every error is `{"error": "<why>"}` with the status its `LearningError` names. Tokens never reach the log:
requests are logged by site and round only, and the access log is off.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from kiri_runtime.learning.collecting import Aggregator
from kiri_runtime.learning.errors import BadDelta, LearningError

log = logging.getLogger("kiri.learning.aggregator")


class Routes:
    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.aggregator.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/round", self._round)
        app.router.add_get("/v1/model", self._model)
        app.router.add_post("/v1/rounds/{round}/sites/{site}/delta", self._delta)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except LearningError as e:
            log.warning("%s %s: %d %s", request.method, request.path, e.status, e)
            return web.json_response({"error": str(e)}, status=e.status)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                {"error": f"body over {self.aggregator.max_body_bytes} bytes"}, status=413
            )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _site(self, request: web.Request) -> str:
        site = request.query.get("site", "")
        if not site:
            raise BadDelta("query parameter site= is required")
        self.aggregator.authorize(site, request.headers.get("Authorization", ""))
        return site

    async def _round(self, request: web.Request) -> web.Response:
        return web.json_response(self.aggregator.round_info(self._site(request)))

    async def _model(self, request: web.Request) -> web.Response:
        self._site(request)
        data, sha256 = self.aggregator.global_weights()
        headers = {"X-Kiri-Sha256": sha256}
        return web.Response(body=data, headers=headers, content_type="application/octet-stream")

    async def _delta(self, request: web.Request) -> web.Response:
        site = request.match_info["site"]
        self.aggregator.authorize(site, request.headers.get("Authorization", ""))
        st = self.aggregator.admit(request.match_info["round"], site, request.content_length)
        body = await request.read()
        return web.json_response(self.aggregator.take(st, site, body), status=202)


def app(aggregator: Aggregator) -> web.Application:
    return Routes(aggregator).app()


async def serve(aggregator: Aggregator, host: str, port: int, count: int, port_file: Path | None) -> int:
    """Serve until `count` rounds ran (or one was refused); 0 when the last round was accepted, else 3."""
    runner = web.AppRunner(app(aggregator), access_log=None)
    await runner.setup()
    # Bind first, so that port 0 yields a free port we can report before serving.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        await runner.cleanup()
        raise LearningError(f"cannot listen on {host}:{port}: {e}") from None
    bound = int(sock.getsockname()[1])
    await web.SockSite(runner, sock).start()
    log.info("aggregator listening on %s:%d", host, bound)
    if port_file is not None:
        tmp = port_file.with_name(f".{port_file.name}.tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)
    try:
        records = await aggregator.run(count)
        # Let trainers polling for the next round see `finished` before the socket goes away.
        await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()
    return 0 if records and records[-1].status == "accepted" else 3
