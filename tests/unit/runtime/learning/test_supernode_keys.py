"""node_keys and `kiri flower-superlink --supernode-public-keys`: the key files, and what the SuperLink refuses
before it starts. The real processes (who may join) are in tests/integration/learning/test_supernode_auth.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kiri_operator import cli
from kiri_runtime.learning import flower_processes, node_keys


def test_a_key_pair_is_p384_in_the_forms_flower_reads_and_its_repr_hides_the_private_key() -> None:
    keys = node_keys.make()
    private = serialization.load_ssh_private_key(keys.private_key, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert keys.public_key.startswith(b"ecdsa-sha2-nistp384 ") and keys.public_key.endswith(b"\n")
    # The bytes registered are those Flower's SuperNode presents: PEM SubjectPublicKeyInfo of that key.
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert node_keys.registration_bytes(keys.public_key) == public_key_to_bytes(private.public_key())
    assert "PRIVATE" not in repr(keys) and keys.private_key.decode() not in repr(keys)
    assert node_keys.make().public_key != keys.public_key


def test_a_public_key_flower_would_refuse_is_refused_with_the_reason() -> None:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    line = ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(node_keys.NodeKeyError, match="not an EC public key"):
        node_keys.registration_bytes(line)
    with pytest.raises(node_keys.NodeKeyError, match="not an OpenSSH public key"):
        node_keys.registration_bytes(b"-----BEGIN PUBLIC KEY-----\n")


def _write(directory: Path, sites: dict[str, bytes]) -> Path:
    directory.mkdir(exist_ok=True)
    for site, public in sites.items():
        (directory / f"{site}.pub").write_bytes(public)
    return directory


def test_the_sites_are_the_pub_files_by_name_and_nothing_else_in_the_directory(tmp_path: Path) -> None:
    a, b = node_keys.make(), node_keys.make()
    keys = _write(tmp_path / "keys", {"site-a": a.public_key, "site-b.eu": b.public_key})
    (keys / "notes.txt").write_text("not a key")
    assert flower_processes.read_public_keys(keys) == {
        "site-a": node_keys.registration_bytes(a.public_key),
        "site-b.eu": node_keys.registration_bytes(b.public_key),
    }


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no <site>.pub file"),
        ({"site-a": b"ssh-rsa AAAA"}, "site-a.pub: not an OpenSSH public key"),
        ("same", "two sites have the same public key"),
    ],
)
def test_a_key_directory_that_would_let_nobody_or_the_wrong_node_in_stops_the_superlink(
    tmp_path: Path, files: Any, message: str
) -> None:
    if files == "same":
        public = node_keys.make().public_key
        files = {"site-a": public, "site-b": public}
    keys = _write(tmp_path / "keys", files)
    with pytest.raises(SystemExit, match=message):
        flower_processes.read_public_keys(keys)
    with pytest.raises(SystemExit, match="not a directory"):
        flower_processes.read_public_keys(tmp_path / "absent")


def test_public_keys_without_supernode_auth_on_are_refused_before_flower_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _write(tmp_path / "keys", {"site-a": node_keys.make().public_key})
    with pytest.raises(SystemExit, match="--supernode-public-keys needs --enable-supernode-auth"):
        cli.main(["flower-superlink", "--supernode-public-keys", str(keys), "--insecure"])
    # Flower's legacy gRPC Control API would serve its own RegisterNode, out of the middleware's reach.
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    with pytest.raises(SystemExit, match="unset FLWR_INTERNAL_GRPC_CONTROL_API"):
        cli.main(["flower-superlink", "--supernode-public-keys", str(keys), "--enable-supernode-auth"])


def test_the_control_apis_node_routes_answer_403_and_every_other_route_passes() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    guard = flower_processes.NodeRegistrationClosed(app)
    for path in [
        "/v1/control/register-node",
        "/v1/control/unregister-node/",
        "/v1/control/add-node-to-federation",
        "/v1/control/remove-node-from-federation",
    ]:
        asyncio.run(guard({"type": "http", "path": path}, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [403] * 4
    assert b"SuperNode registration is closed" in sent[1]["body"]
    for path in ["/v1/control/list-nodes", "/v1/control/start-run", "/v1/fleet/activate-node"]:
        asyncio.run(guard({"type": "http", "path": path}, receive, send))
    assert seen == ["/v1/control/list-nodes", "/v1/control/start-run", "/v1/fleet/activate-node"]


class _Grid:
    """Answers the round's `get_properties` query with the site each node says it is."""

    def __init__(self, claims: dict[int, str]) -> None:
        self.claims = claims

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        from flwr.app import Message
        from flwr.common import Code, GetPropertiesRes, Status
        from flwr.compat.common import recorddict_compat as compat

        return [
            Message(
                compat.getpropertiesres_to_recorddict(
                    GetPropertiesRes(Status(Code.OK, ""), {"site": self.claims[m.metadata.dst_node_id]})
                ),
                reply_to=m,
            )
            for m in messages
        ]


def _round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registered: dict[int, str] | None) -> Any:
    from types import SimpleNamespace

    from flwr.supercore.task_identity import TaskIdentity

    from kiri_runtime.learning import federating

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the ServerApp's side
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    if registered is None:
        monkeypatch.delenv(node_keys.SITES_ENV, raising=False)
    else:
        node_keys.write_registered_sites(tmp_path / "sites.json", registered)
        monkeypatch.setenv(node_keys.SITES_ENV, str(tmp_path / "sites.json"))
    r = federating.Round.__new__(federating.Round)  # only what `admit` reads: no model to load
    r.s = SimpleNamespace(sites=["site-a", "site-b"], deadline_seconds=1.0)
    r.number, r.refused, r.admitted, r.skipped = 1, {}, {}, {}
    r.registered = node_keys.registered_sites()
    return r


def test_a_round_admits_a_node_only_as_the_site_its_key_was_registered_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Node 11 holds site-a's key and says it is site-b; node 13 was registered for no site.
    claims = {11: "site-b", 12: "site-b", 13: "site-a"}
    r = _round(tmp_path, monkeypatch, {11: "site-a", 12: "site-b"})
    r.admit(_Grid(claims), sorted(claims))
    assert r.admitted == {12: "site-b"}
    assert r.skipped == {"site-a": "no SuperNode of this site connected before the deadline (offline)"}
    # Without registered keys (a SuperLink without SuperNode auth), a node is the site it says, first come.
    r = _round(tmp_path, monkeypatch, None)
    r.admit(_Grid(claims), sorted(claims))
    assert r.admitted == {11: "site-b", 13: "site-a"}


def test_a_registered_sites_file_that_cannot_be_read_is_an_error_not_an_open_door(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(node_keys.SITES_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(node_keys.NodeKeyError, match="the registered sites cannot be read"):
        node_keys.registered_sites()
