"""Which of the SuperLink's APIs answers whom, on which port. Flower 1.42 serves the Fleet, Control and Runtime
(ServerAppIo) APIs on one socket; `kiri flower-superlink` keeps the Runtime API to peers inside its own pod
(loopback) under `--isolation subprocess`, and with `--control-port` serves the Control API on that port alone.
The real process on two sockets: tests/integration/learning/test_supernode_auth.py."""

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
    """flwr.superlink.main, whose `create_app` (and the entry point's `uvicorn`) the tests patch: undone after."""
    import importlib

    from flwr.superlink import main

    entry = importlib.import_module("flwr.superlink.cli.flower_superlink")
    monkeypatch.setattr(main, "create_app", main.create_app)
    monkeypatch.setattr(entry, "uvicorn", entry.uvicorn)
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


def test_the_control_api_answers_on_its_own_port_only_and_that_port_answers_nothing_else(
    create_app: Any,
) -> None:
    flower_processes.serve_control_apart(19093)
    app = create_app.create_app()
    # TestClient gives the app the base URL's port as the local port of the connection (`scope["server"]`).
    fleet_port = TestClient(app, base_url="http://md-superlink.ns.svc:19092", client=POD_PEER)
    control_port = TestClient(app, base_url="http://md-superlink.ns.svc:19093", client=POD_PEER)
    refused = fleet_port.post("/v1/control/list-runs", content=b"", headers=PROTOBUF)
    assert refused.status_code == 403
    assert refused.json() == {"detail": flower_processes.control_elsewhere(19093)}
    assert control_port.post("/v1/control/list-runs", content=b"", headers=PROTOBUF).status_code == 200
    for path in ["/v1/fleet/get-run", "/v1/runtime/acquire-task", "/health", "/docs"]:
        other = control_port.post(path, content=b"", headers=PROTOBUF)
        assert other.status_code == 403 and other.json() == {"detail": flower_processes.control_only(19093)}
    fleet = fleet_port.post("/v1/fleet/get-run", content=b"", headers=PROTOBUF)
    assert fleet.status_code == 401 and fleet.json() == {"detail": "Invalid SuperNode authentication"}


def test_without_control_port_flowers_one_port_serves_the_control_api_as_before(create_app: Any) -> None:
    app = create_app.create_app()
    one_port = TestClient(app, base_url="http://127.0.0.1:9092", client=POD_PEER)
    assert one_port.post("/v1/control/list-runs", content=b"", headers=PROTOBUF).status_code == 200


def test_kiri_flower_superlink_control_port_serves_the_app_on_both_sockets_with_the_same_settings(
    create_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from flwr.superlink import cli as flower_cli

    from kiri_operator import cli

    bound: list[tuple[str, int]] = []
    served: list[tuple[Any, list[tuple[str, int]]]] = []

    def bind_socket(config: uvicorn.Config) -> Any:
        bound.append((config.host, config.port))
        return (config.host, config.port)

    def run(server: uvicorn.Server, sockets: list[Any]) -> None:
        served.append((server.config.ssl_certfile, sockets))

    def flower_superlink() -> None:  # what Flower's entry point does once it has parsed its flags
        import importlib

        entry = importlib.import_module("flwr.superlink.cli.flower_superlink")
        entry.uvicorn.run(app=create_app.create_app(), host="0.0.0.0", port=9092, ssl_certfile="tls.crt")

    monkeypatch.setattr(uvicorn.Config, "bind_socket", bind_socket)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(flower_cli, "flower_superlink", flower_superlink)
    cli.main(["flower-superlink", "--control-port", "9093", "--port", "9092"])
    assert bound == [("0.0.0.0", 9092), ("0.0.0.0", 9093)]
    assert served == [("tls.crt", [("0.0.0.0", 9092), ("0.0.0.0", 9093)])]


def test_a_control_port_equal_to_the_fleet_port_is_refused_before_flower_starts(create_app: Any) -> None:
    from kiri_operator import cli

    for args in (["--port", "9092"], ["--port=9092"]):
        with pytest.raises(SystemExit, match="--control-port 9092: must differ from --port"):
            cli.main(["flower-superlink", "--control-port", "9092", *args, "--insecure"])
