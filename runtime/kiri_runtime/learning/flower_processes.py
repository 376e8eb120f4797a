"""`kiri flower-superlink` and `kiri flower-supernode`: Flower's own SuperLink and SuperNode, with a longer window
for a task's process to start.

Why not the plain executables: Flower 1.42 runs every message a SuperNode receives (and every run on the
SuperLink) in a fresh process, which must report within `HEARTBEAT_DEFAULT_INTERVAL` (30 s) of the task being
claimed or its token expires and the task is retried. Measured on the shared 2-core box at load average 20,
`flwr-clientapp` alone took 7 s to print its help, and three SuperNodes starting their ClientApps at once never
made it: every task of a SecAgg+ round failed with "Runtime task-token authentication failed" and the round
closed with no result (tests/integration/learning). Small edge devices start Python as slowly. These commands
set that window (`KIRI_FLOWER_TASK_START_SECONDS`, default 180 s) before handing the arguments, unchanged, to
Flower's entry point; the heartbeats themselves are Flower's.

SuperNode authentication (`kiri flower-superlink --supernode-public-keys DIR --enable-supernode-auth`): the
SuperLink registers every `DIR/<site>.pub` (OpenSSH public keys, `node_keys`) under the site's name through
Flower's own Control API handler for `flwr supernode register`, in process, after its state exists and before
it serves (so no SuperNode ever meets a SuperLink that does not know it yet, and no human runs the CLI). Then
the Control API's node-management routes (register, unregister, add to or remove from a federation) answer 403
to every caller: in Flower without account authentication the Control API is open on the Fleet API's port,
and left open, anything that reaches the port could register a key of its own and join as a site. The sites
are exactly the mounted keys; changing them is changing the pod. Which node id each site's key got goes to
the ServerApp (`node_keys.registered_sites`), which admits a node only as that site.

The Runtime API stays in the pod (`--isolation subprocess`): Flower 1.42 serves the Fleet, Control and Runtime
(ServerAppIo) APIs on one HTTP socket (`--host`, `--port`), and has no flag to bind the Runtime API apart. The
ServerApp runs in this pod, and its SuperExec and `flwr-serverapp` reach the Runtime API on 127.0.0.1; Flower
checks no credential there without `--superexec-auth-secret-file`, which the SuperExec it starts itself is
never given. So `/v1/runtime/*` answers 403 to every peer that is not loopback: a SuperNode or the round Job,
which reach the port, cannot claim the ServerApp's task or pull its messages.

The Control API on a port of its own (`kiri flower-superlink --control-port PORT`): the same app is served on a
second socket (same host, same TLS certificate), and the Control API's routes answer there only, while that
port answers nothing else (`ControlApiApart`). Flower has no flag for it (`--control-api-address` is
deprecated and ignored in 1.42); with it, a NetworkPolicy can let the round Job, and only it, reach the Control
API (submitting a run executes a ServerApp in the SuperLink's pod), and the SuperNodes only the Fleet API.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from kiri_runtime.learning import node_keys

TASK_START_ENV = "KIRI_FLOWER_TASK_START_SECONDS"
DEFAULT_TASK_START_SECONDS = 180
KEYS_FLAG = "--supernode-public-keys"
AUTH_FLAG = "--enable-supernode-auth"
LEGACY_GRPC_CONTROL_ENV = "FLWR_INTERNAL_GRPC_CONTROL_API"
NODE_ROUTES = frozenset(
    f"/v1/control/{name}"
    for name in ("register-node", "unregister-node", "add-node-to-federation", "remove-node-from-federation")
)
"""The Control API routes that change which SuperNodes may join: closed on the wire when Kiri registers."""
ISOLATION_FLAG = "--isolation"
CONTROL_PORT_FLAG = "--control-port"
CONTROL_PREFIX = ("v1", "control")
RUNTIME_PREFIX = ("v1", "runtime")
"""The Runtime (ServerAppIo) API's routes: `/v1/runtime/...`, loopback peers only under subprocess isolation."""
RUNTIME_API_LOCAL = "the SuperLink's Runtime API answers only inside its own pod (kiri flower-superlink, --isolation subprocess)"


def control_elsewhere(port: int) -> str:
    return f"the Control API of this SuperLink is served on its port {port} only (kiri flower-superlink --control-port)"


def control_only(port: int) -> str:
    return f"port {port} of this SuperLink serves the Control API only (kiri flower-superlink --control-port)"


REGISTRATION_CLOSED = (
    "SuperNode registration is closed on this SuperLink: it registers the public keys mounted from the "
    "operator's Secrets at start (kiri flower-superlink --supernode-public-keys)"
)
log = logging.getLogger("flwr")  # Flower's own logger: its handler prints to the SuperLink's log

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def widen_task_start_window(seconds: float) -> None:
    from flwr.supercore.corestate import in_memory_corestate, sql_corestate

    for module in (in_memory_corestate, sql_corestate):
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def _window() -> float:
    text = os.environ.get(TASK_START_ENV, "")
    try:
        return float(text) if text else float(DEFAULT_TASK_START_SECONDS)
    except ValueError:
        raise SystemExit(f"{TASK_START_ENV}={text!r}: expected seconds") from None


def read_public_keys(directory: Path) -> dict[str, bytes]:
    """`<site>.pub` files in `directory` -> the bytes Flower registers for each site. Refuses an empty
    directory (a SuperLink that nobody may join is a mistake) and any key Flower would refuse."""
    if not directory.is_dir():
        raise SystemExit(f"{KEYS_FLAG} {directory}: not a directory")
    keys: dict[str, bytes] = {}
    for path in sorted(directory.glob("*.pub")):
        try:
            keys[path.stem] = node_keys.registration_bytes(path.read_bytes())
        except node_keys.NodeKeyError as exc:
            raise SystemExit(f"{KEYS_FLAG}: {path.name}: {exc}") from None
    if not keys:
        raise SystemExit(f"{KEYS_FLAG} {directory}: no <site>.pub file")
    if len(set(keys.values())) != len(keys):
        raise SystemExit(f"{KEYS_FLAG} {directory}: two sites have the same public key")
    return keys


def register_supernodes(state: Any, account: Any, keys: Mapping[str, bytes]) -> dict[str, int]:
    """Register each site's public key (site -> node id) with the Control API's own `RegisterNode` handler,
    the one `flwr supernode register` reaches: the same checks, the same record, under `account`."""
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.superlink.servicer.control import control_handlers

    ids: dict[str, int] = {}
    for site, public_key in keys.items():
        reply = control_handlers.register_node(
            RegisterNodeRequest(public_key=public_key, name=site), account, state
        )
        ids[site] = int(reply.node_id)
        log.info("registered SuperNode of site %s as node %d", site, ids[site])
    return ids


class NodeRegistrationClosed:
    """ASGI middleware: the Control API's node-management routes answer 403, to every caller."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).rstrip("/") in NODE_ROUTES:
            body = json.dumps({"detail": REGISTRATION_CLOSED}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _loopback(client: Any) -> bool:
    try:
        address = ipaddress.ip_address(str(client[0]))
    except (TypeError, IndexError, ValueError):
        return False  # no peer address (or a name, as test clients give): not provably this pod
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _segments(scope: Scope) -> tuple[str, ...]:
    return tuple(p for p in str(scope.get("path", "")).split("/") if p)


async def _refuse(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RuntimeApiLocal:
    """ASGI middleware: the Runtime API's routes answer 403 to every peer that is not loopback. The path is
    compared by its segments, so `//v1//runtime/` or a trailing `/` cannot slip past."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = _segments(scope)[: len(RUNTIME_PREFIX)] == RUNTIME_PREFIX
        if scope["type"] == "http" and runtime and not _loopback(scope.get("client")):
            return await _refuse(send, RUNTIME_API_LOCAL)
        await self.app(scope, receive, send)


class ControlApiApart:
    """ASGI middleware: the Control API's routes answer on `control_port` only, and that port answers nothing
    else (by the local port of the connection, `scope["server"]`)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], control_port: int) -> None:
        self.app = app
        self.control_port = control_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            on_control = server is not None and len(server) > 1 and server[1] == self.control_port
            control = _segments(scope)[: len(CONTROL_PREFIX)] == CONTROL_PREFIX
            if control and not on_control:
                return await _refuse(send, control_elsewhere(self.control_port))
            if on_control and not control:
                return await _refuse(send, control_only(self.control_port))
        await self.app(scope, receive, send)


class _TwoSocketUvicorn:
    """Stands in for the `uvicorn` module in Flower's SuperLink entry point: `run` serves the app on Flower's
    `--host`/`--port` and on `control_port` of the same host, with the same settings (TLS included)."""

    def __init__(self, control_port: int) -> None:
        self.control_port = control_port

    def run(self, app: Any, **kwargs: Any) -> None:
        import uvicorn

        config = uvicorn.Config(app, **kwargs)
        control = uvicorn.Config(app, **{**kwargs, "port": self.control_port})
        sockets = [config.bind_socket(), control.bind_socket()]
        uvicorn.Server(config).run(sockets=sockets)


def _on_app(configure: Callable[[Any, Any], None]) -> None:
    """Have Flower's SuperLink entry point call `configure(app, config)` on the app it creates (middleware,
    registration), before it serves: `main.create_app` is the one place Flower builds it."""
    from flwr.superlink import main

    create_app = main.create_app

    def create_configured_app(config: Any = None, lifespan_class: Any = None) -> Any:
        app = create_app(config, lifespan_class)
        configure(app, config)
        return app

    main.create_app = create_configured_app  # type: ignore[assignment]


def serve_control_apart(control_port: int) -> None:
    """Serve the SuperLink's Control API on `control_port` only (`ControlApiApart`, `_TwoSocketUvicorn`)."""
    # The module, not the function of the same name that `flwr.superlink.cli` exports.
    entry = importlib.import_module("flwr.superlink.cli.flower_superlink")
    _on_app(lambda app, _config: app.add_middleware(ControlApiApart, control_port=control_port))
    entry.uvicorn = _TwoSocketUvicorn(control_port)  # type: ignore[attr-defined]


def keep_runtime_api_local() -> None:
    """Make the SuperLink's app answer the Runtime API to loopback peers only (`RuntimeApiLocal`)."""
    _on_app(lambda app, _config: app.add_middleware(RuntimeApiLocal))


def _flag_values(flower_args: list[str], flag: str) -> list[str]:
    """Every value `flag` is given in Flower's arguments (`--flag value` or `--flag=value`), in order."""
    values = []
    for i, arg in enumerate(flower_args):
        if arg == flag and i + 1 < len(flower_args):
            values.append(flower_args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _subprocess_isolation(flower_args: list[str]) -> bool:
    """Flower's own default is `subprocess`; `--isolation process` runs the ServerApp outside this pod."""
    return ["subprocess", *_flag_values(flower_args, ISOLATION_FLAG)][-1] == "subprocess"


def register_at_start(keys: Mapping[str, bytes]) -> None:
    """Make the SuperLink's app register `keys` once its state exists, and close node registration on it."""

    def register(app: Any, config: Any) -> None:
        if config is None or not config.enable_supernode_auth:
            raise SystemExit(f"{KEYS_FLAG} needs {AUTH_FLAG}")
        valid, account = config.authn_plugin.validate_tokens_in_metadata([])
        if not valid or account is None:
            raise SystemExit(f"{KEYS_FLAG}: the Control API's account plugin gives no account to register as")
        ids = register_supernodes(app.state.linkstate_factory.state(), account, keys)
        # The ServerApp runs in a process this one starts (SuperExec, then flwr-serverapp): it inherits this.
        sites_file = Path(tempfile.mkdtemp(prefix="kiri-supernodes-")) / "sites.json"
        node_keys.write_registered_sites(sites_file, {node: site for site, node in ids.items()})
        os.environ[node_keys.SITES_ENV] = str(sites_file)
        app.add_middleware(NodeRegistrationClosed)

    _on_app(register)


def _superlink(args: argparse.Namespace) -> int:
    widen_task_start_window(_window())
    if args.supernode_public_keys is not None:
        if AUTH_FLAG not in args.flower_args:
            raise SystemExit(f"{KEYS_FLAG} needs {AUTH_FLAG}")
        if os.environ.get(LEGACY_GRPC_CONTROL_ENV) == "1":
            # Flower's legacy gRPC Control API has its own RegisterNode, which the HTTP middleware cannot close.
            raise SystemExit(
                f"{KEYS_FLAG}: unset {LEGACY_GRPC_CONTROL_ENV} (it opens node registration again)"
            )
        register_at_start(read_public_keys(Path(args.supernode_public_keys)))
    if _subprocess_isolation(args.flower_args):
        keep_runtime_api_local()
    if args.control_port is not None:
        if str(args.control_port) in _flag_values(args.flower_args, "--port"):
            raise SystemExit(f"{CONTROL_PORT_FLAG} {args.control_port}: must differ from --port")
        serve_control_apart(args.control_port)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *args.flower_args]
    flower_superlink()
    return 0


def _supernode(args: argparse.Namespace) -> int:
    widen_task_start_window(_window())
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args.flower_args]
    flower_supernode()
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    for name, handler, what in (
        ("flower-superlink", _superlink, "Flower's SuperLink"),
        ("flower-supernode", _supernode, "Flower's SuperNode"),
    ):
        p = subparsers.add_parser(
            name,
            help=f"{what}, with a task-start window for slow machines (${TASK_START_ENV}); Flower's own flags",
            add_help=False,
            allow_abbrev=False,
        )
        p.set_defaults(handler=handler, passthrough=True, flower_args=[])
        if name == "flower-superlink":
            p.add_argument(
                KEYS_FLAG,
                metavar="DIR",
                help="register DIR/<site>.pub (OpenSSH EC public keys) as the only SuperNodes, and close "
                f"node registration on the Control API; needs {AUTH_FLAG}",
            )
            p.add_argument(
                CONTROL_PORT_FLAG,
                metavar="PORT",
                type=int,
                help="serve the Control API on this port (same host and certificate) and nowhere else; "
                "--port then serves the Fleet and Runtime APIs only",
            )
