"""One OIP v2 infer endpoint over the Kiri dataplane, on a chosen HTTP stack (for bench_http_stack.py).

    python stack_server.py --stack aiohttp|aiohttp-uvloop|starlette-uvicorn --model M.onnx --port P

The dataplane, codec and cascade are Kiri's own in every case; only the HTTP layer changes.
"""

from __future__ import annotations

import argparse
import asyncio

from kiri_runtime.dataplane import DataPlane, OnnxModel
from kiri_runtime.errors import InferenceError
from kiri_runtime.fallback import Cascade
from kiri_runtime.rest import RestServer
from kiri_runtime.tensors import HEADER_LENGTH, binary_outputs, decode_request, encode_response


def build(model: str) -> tuple[DataPlane, Cascade]:
    dataplane = DataPlane()
    dataplane.load("m", OnnxModel(model, threads=1))
    return dataplane, Cascade(dataplane)


def starlette_app(dataplane: DataPlane, cascade: Cascade):  # type: ignore[no-untyped-def]
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        try:
            body = await request.body()
            raw = request.headers.get(HEADER_LENGTH)
            decoded = decode_request(body, int(raw) if raw is not None else None)
            answer = await cascade.infer(request.path_params["name"], decoded)
            out, n = encode_response(answer, binary_outputs(decoded))
        except InferenceError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if n is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(n)})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": dataplane.ready()})

    return Starlette(
        routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"]), Route("/v2/health/ready", ready)]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    dataplane, cascade = build(args.model)
    if args.stack.startswith("aiohttp"):
        from aiohttp import web

        if args.stack == "aiohttp-uvloop":
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        app = RestServer(dataplane, cascade).app()
        web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)
    else:
        import uvicorn

        uvicorn.run(
            starlette_app(dataplane, cascade),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            access_log=False,
        )


if __name__ == "__main__":
    main()
