"""`kiri flower-superlink --isolation subprocess`: the Runtime (ServerAppIo) API, which Flower 1.42 serves on the
same socket as the Fleet and Control APIs, answers only peers inside the SuperLink's own pod (loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("flwr")

from starlette.testclient import TestClient

from kiri_runtime.learning import flower_processes

POD_PEER = ("10.244.1.7", 40000)
"""A SuperNode's or the round Job's pod address: it reaches the SuperLink's one port."""
PROTOBUF = {"content-type": "application/protobuf"}


@pytest.fixture
def create_app(monkeypatch: pytest.MonkeyPatch) -> Any:
    from flwr.superlink import main

    monkeypatch.setattr(main, "create_app", main.create_app)  # undone after the test: the patch is global
    return main


def test_flowers_own_app_hands_the_serverapps_task_to_a_peer_from_another_pod(create_app: Any) -> None:
    # Why the middleware exists: without it, anything that reaches the port may claim the ServerApp's task.
    app = create_app.create_app()
    reply = TestClient(app, client=POD_PEER).post("/v1/runtime/acquire-task", content=b"", headers=PROTOBUF)
    assert reply.status_code == 200


def test_the_runtime_api_answers_403_to_another_pod_and_serves_this_pods_loopback(create_app: Any) -> None:
    flower_processes.keep_runtime_api_local()
    app = create_app.create_app()
    remote = TestClient(app, client=POD_PEER).post("/v1/runtime/acquire-task", content=b"", headers=PROTOBUF)
    assert remote.status_code == 403
    assert remote.json() == {"detail": flower_processes.RUNTIME_API_LOCAL}
    for peer in [("127.0.0.1", 40000), ("::1", 40000), ("::ffff:127.0.0.1", 40000)]:
        local = TestClient(app, client=peer).post("/v1/runtime/acquire-task", content=b"", headers=PROTOBUF)
        assert local.status_code == 200, peer
    # The Fleet and Control APIs are left to their own checks (SuperNode authentication answers this one).
    fleet = TestClient(app, client=POD_PEER).post("/v1/fleet/get-run", content=b"", headers=PROTOBUF)
    assert fleet.status_code == 401 and fleet.json() == {"detail": "Invalid SuperNode authentication"}


def test_a_runtime_route_spelt_with_extra_slashes_or_no_peer_address_is_still_refused() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    guard = flower_processes.RuntimeApiLocal(app)
    for path, client in [
        ("//v1//runtime/pull-messages/", POD_PEER),
        ("/v1/runtime", POD_PEER),
        ("/v1/runtime/acquire-task", None),
        ("/v1/runtime/acquire-task", ("testclient", 50000)),
    ]:
        asyncio.run(guard({"type": "http", "path": path, "client": client}, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [403] * 4
    for path in ["/v1/runtimes", "/v1/fleet/pull-messages", "/health"]:
        asyncio.run(guard({"type": "http", "path": path, "client": POD_PEER}, receive, send))
    asyncio.run(
        guard({"type": "http", "path": "/v1/runtime/acquire-task", "client": ("127.0.0.1", 1)}, receive, send)
    )
    assert seen == ["/v1/runtimes", "/v1/fleet/pull-messages", "/health", "/v1/runtime/acquire-task"]


def test_only_subprocess_isolation_keeps_the_runtime_api_in_the_pod() -> None:
    # Flower's default is subprocess; `process` runs the ServerApp in a pod of its own, which must reach it.
    assert flower_processes._subprocess_isolation(["--port", "9092"])
    assert flower_processes._subprocess_isolation(["--isolation", "subprocess"])
    assert flower_processes._subprocess_isolation(["--isolation=subprocess"])
    assert not flower_processes._subprocess_isolation(["--isolation", "process"])
    assert not flower_processes._subprocess_isolation(["--isolation=process"])


@pytest.mark.parametrize(("isolation", "status"), [("subprocess", 403), ("process", 200)])
def test_kiri_flower_superlink_closes_the_runtime_api_to_other_pods_only_under_subprocess_isolation(
    create_app: Any, monkeypatch: pytest.MonkeyPatch, isolation: str, status: int
) -> None:
    from flwr.superlink import cli as flower_cli

    from kiri_operator import cli

    answered: list[int] = []

    def flower_superlink() -> None:  # Flower's entry point, which would build the app and serve it
        app = create_app.create_app()
        reply = TestClient(app, client=POD_PEER).post(
            "/v1/runtime/acquire-task", content=b"", headers=PROTOBUF
        )
        answered.append(reply.status_code)

    monkeypatch.setattr(flower_cli, "flower_superlink", flower_superlink)
    cli.main(["flower-superlink", "--insecure", "--isolation", isolation])
    assert answered == [status]
